//! Confirmed publishing: every message goes out `mandatory`, persistent, on a
//! channel in confirm mode, and a publish succeeds only when the broker confirmed
//! it. An unroutable message (returned) and a nack are errors; so is a batch that
//! is not confirmed within `confirm_timeout`, and a publish while disconnected or
//! blocked by a broker alarm fails at once instead of waiting. A batch puts all its
//! messages on the wire before awaiting any confirm, so throughput is not bound by
//! one round trip per message.
//!
//! One deadline bounds the whole batch (sends and confirms), and the batch is
//! abandoned as soon as the broker blocks the connection, so a caller holding a
//! database transaction around it never holds it longer than `confirm_timeout`.
//! Sending stops at the first failed send. After a timeout, an abandoned batch or
//! a channel error the channel is discarded: a late confirm or return on it could
//! otherwise settle a later message (see `publish_batch`).

use std::{sync::Arc, time::Duration};

use futures_util::future::join_all;
use lapin::{
    BasicProperties, Channel, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{FieldTable, ShortString},
};
use opentelemetry::Context;
use tokio::sync::Mutex;
use tracing::{Instrument, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{Broker, propagation};

pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf";

/// How long a whole batch may take, sends and confirms: under the
/// `idle_in_transaction` and statement bounds of a caller's transaction.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// A message to publish, with its envelope.
#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    /// The deduplication key end to end (the outbox row id).
    pub message_id: String,
    pub exchange: String,
    pub routing_key: String,
    /// Full protobuf name, e.g. `shop.events.v1.OrderPlaced`.
    pub message_type: String,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub correlation_id: Option<String>,
    /// The producing application; `None` names the publisher's own.
    pub app_id: Option<String>,
    /// Event time, seconds since the Unix epoch (AMQP timestamps are seconds).
    pub timestamp: Option<u64>,
    /// Extra headers; trace headers are added by the publisher.
    pub headers: FieldTable,
    /// The trace context the producer span continues; `None` continues the current
    /// span (the outbox relay passes the context stored with the row).
    pub parent: Option<Context>,
}

impl OutgoingMessage {
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        message_type: impl Into<String>,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            message_id: uuid::Uuid::now_v7().to_string(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            message_type: message_type.into(),
            payload,
            content_type: CONTENT_TYPE_PROTOBUF.to_owned(),
            correlation_id: None,
            app_id: None,
            timestamp: Some(unix_now()),
            headers: FieldTable::default(),
            parent: None,
        }
    }
}

/// Why a publish did not succeed. Only `Ok(())` means the broker has the message.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to RabbitMQ")]
    NotConnected,
    #[error(
        "message unroutable: exchange '{exchange}' has no queue bound for routing key '{routing_key}' ({reply})"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
        reply: String,
    },
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    /// The broker closed the channel with a channel-level error (e.g. 404 for a
    /// missing exchange, 406 for a body over its maximum size). Every unconfirmed
    /// message of the batch sees it: only a message published alone is known to
    /// have caused it.
    #[error("RabbitMQ closed the channel: {code} {text}")]
    ChannelClosed { code: u16, text: String },
    #[error("RabbitMQ blocked publishing on this connection (resource alarm)")]
    Blocked,
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("not sent: an earlier message of the batch could not be sent")]
    NotSent,
    #[error("publish failed: {0}")]
    Broker(String),
}

impl PublishError {
    /// True when the message itself was refused (it would fail again on a healthy
    /// broker): unroutable, or the channel closed for what the message is (404: its
    /// exchange does not exist, 406: e.g. its body is over the broker's maximum).
    /// False when the broker, the connection or a permission failed: a nack (the
    /// broker's queue could not take it, e.g. overflow), 403 and every other code
    /// concern every message alike.
    pub fn is_message_refused(&self) -> bool {
        matches!(
            self,
            Self::Unroutable { .. }
                | Self::ChannelClosed {
                    code: 404 | 406,
                    ..
                }
        )
    }

    fn from_lapin(error: &lapin::Error) -> Self {
        if let lapin::ErrorKind::ProtocolError(amqp) = error.kind()
            && matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_))
        {
            return Self::ChannelClosed {
                code: amqp.get_id(),
                text: amqp.get_message().to_string(),
            };
        }
        Self::Broker(error.to_string())
    }
}

/// Publishes with confirms on its own channel, reopened after reconnects.
/// Clones share the channel.
#[derive(Clone, Debug)]
pub struct Publisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    broker: Broker,
    app_id: String,
    confirm_timeout: Duration,
    channel: Mutex<Option<(u64, Channel)>>,
}

impl Publisher {
    /// `app_id` is the producing service's name, stamped on every message.
    pub fn new(broker: Broker, app_id: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                broker,
                app_id: app_id.into(),
                confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
                channel: Mutex::new(None),
            }),
        }
    }

    /// The same publisher with another confirm timeout (on a fresh channel).
    #[must_use]
    pub fn with_confirm_timeout(self, timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                broker: self.inner.broker.clone(),
                app_id: self.inner.app_id.clone(),
                confirm_timeout: timeout,
                channel: Mutex::new(None),
            }),
        }
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        self.publish_batch(std::slice::from_ref(message))
            .await
            .pop()
            .unwrap_or(Err(PublishError::NotConnected))
    }

    /// True while the broker blocks this publisher's connection (an alarm).
    pub fn is_blocked(&self) -> bool {
        self.inner.broker.is_blocked()
    }

    /// How long one batch may take (sends and confirms).
    pub fn confirm_timeout(&self) -> Duration {
        self.inner.confirm_timeout
    }

    /// True while this publisher's connection is open.
    pub fn is_connected(&self) -> bool {
        self.inner.broker.is_connected()
    }

    /// Publishes all messages, then awaits all confirms. The result at index `i`
    /// belongs to `messages[i]`.
    ///
    /// Batches on one publisher run one at a time. The client library hands a
    /// `basic.return` to an arbitrary confirm of a multiple-ack, so a return is
    /// matched to its message by `message_id`; with one batch in flight every
    /// return belongs to it. For the same reason a channel whose batch did not
    /// settle completely (timeout, alarm, channel error) is never reused.
    pub async fn publish_batch(
        &self,
        messages: &[OutgoingMessage],
    ) -> Vec<Result<(), PublishError>> {
        if self.inner.broker.is_blocked() {
            return vec![Err(PublishError::Blocked); messages.len()];
        }
        let mut slot = self.inner.channel.lock().await;
        let channel = match self.channel(&mut slot).await {
            Ok(channel) => channel,
            Err(e) => {
                return vec![Err(e); messages.len()];
            }
        };
        let timeout = self.inner.confirm_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let blocked = self.inner.broker.blocked_signal();
        tokio::pin!(blocked);
        // The alarm future may complete in the send loop; it must not be polled
        // again after that.
        let mut was_blocked = false;
        let mut pending = Vec::with_capacity(messages.len());
        let mut spans = Vec::with_capacity(messages.len());
        let mut failed = false;
        for message in messages {
            let span = producer_span(message);
            spans.push(span.clone());
            if failed {
                pending.push(Err(PublishError::NotSent));
                continue;
            }
            let parent = message
                .parent
                .clone()
                .unwrap_or_else(|| tracing::Span::current().context());
            propagation::set_parent(&span, parent.clone());
            propagation::tag_correlation(&span, message.correlation_id.as_deref());
            let mut headers = message.headers.clone();
            propagation::inject(&propagation::context_of(&span, &parent), &mut headers);
            let properties = BasicProperties::default()
                .with_message_id(message.message_id.as_str().into())
                .with_type(message.message_type.as_str().into())
                .with_content_type(message.content_type.as_str().into())
                .with_delivery_mode(2)
                .with_app_id(
                    message
                        .app_id
                        .as_deref()
                        .unwrap_or(&self.inner.app_id)
                        .into(),
                )
                .with_headers(headers);
            let properties = match &message.correlation_id {
                Some(id) => properties.with_correlation_id(ShortString::from(id.as_str())),
                None => properties,
            };
            let properties = match message.timestamp {
                Some(ts) => properties.with_timestamp(ts),
                None => properties,
            };
            let send = channel
                .basic_publish(
                    message.exchange.as_str().into(),
                    message.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &message.payload,
                    properties,
                )
                .instrument(span.clone());
            // Sending can stay pending when the connection dies under it, or
            // when the broker stops reading it (alarm).
            let sent = tokio::select! {
                sent = tokio::time::timeout_at(deadline, send) => match sent {
                    Ok(sent) => sent.map_err(|e| PublishError::from_lapin(&e)),
                    Err(_) => Err(PublishError::ConfirmTimeout(timeout)),
                },
                () = &mut blocked, if !was_blocked => {
                    was_blocked = true;
                    Err(PublishError::Blocked)
                }
            };
            failed = sent.is_err();
            pending.push(sent);
        }
        let confirmations = join_all(pending.into_iter().zip(spans.iter().cloned()).map(
            |(sent, span)| {
                async move {
                    match sent {
                        Err(e) => Err(e),
                        Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                            Err(_) => Err(PublishError::ConfirmTimeout(timeout)),
                            Ok(Err(e)) => Err(PublishError::from_lapin(&e)),
                            Ok(Ok(confirmation)) => Ok(confirmation),
                        },
                    }
                }
                .instrument(span)
            },
        ));
        // An alarm raised while sending or while confirms are outstanding abandons
        // the batch the same way. What was confirmed before is published again
        // later under the same message ids (consumers dedup).
        if was_blocked {
            drop(confirmations);
            Self::discard(&mut slot);
            return vec![Err(PublishError::Blocked); messages.len()];
        }
        let confirmations = tokio::select! {
            all = confirmations => all,
            () = &mut blocked => {
                Self::discard(&mut slot);
                return vec![Err(PublishError::Blocked); messages.len()];
            }
        };
        if confirmations.iter().any(Result::is_err) {
            Self::discard(&mut slot);
        }
        drop(slot);

        let mut results = Vec::with_capacity(messages.len());
        let mut returned = Vec::new();
        for (index, confirmation) in confirmations.into_iter().enumerate() {
            results.push(match confirmation {
                Err(e) => Err(e),
                Ok(Confirmation::Ack(carried)) => {
                    returned.extend(carried.map(|r| (index, r)));
                    Ok(())
                }
                Ok(Confirmation::NotRequested) => Ok(()),
                Ok(Confirmation::Nack(carried)) => {
                    returned.extend(carried.map(|r| (index, r)));
                    Err(PublishError::Nacked)
                }
            });
        }
        for (carrier, message) in returned {
            let id = message
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned());
            let index = id
                .and_then(|id| messages.iter().position(|m| m.message_id == id))
                .unwrap_or(carrier);
            results[index] = Err(PublishError::Unroutable {
                exchange: messages[index].exchange.clone(),
                routing_key: messages[index].routing_key.clone(),
                reply: format!("{} {}", message.reply_code, message.reply_text),
            });
        }
        for (result, span) in results.iter().zip(&spans) {
            if let Err(e) = result {
                span.record("error.type", e.to_string());
                span.set_status(opentelemetry::trace::Status::error(e.to_string()));
            }
        }
        results
    }

    /// Forgets the channel and closes it in the background: its unsettled
    /// confirms and returns must not reach a later batch.
    fn discard(slot: &mut Option<(u64, Channel)>) {
        if let Some((_, channel)) = slot.take() {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    channel.close(200, "discarded after an unsettled batch".into()),
                )
                .await;
            });
        }
    }

    /// The confirm-mode channel of the current connection, opened on first use and
    /// after every reconnect or channel error.
    async fn channel(&self, slot: &mut Option<(u64, Channel)>) -> Result<Channel, PublishError> {
        let link = self.inner.broker.current();
        if let Some((generation, channel)) = slot.as_ref()
            && *generation == link.generation
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        *slot = None;
        let connection = link
            .connection
            .filter(|c| c.status().connected())
            .ok_or(PublishError::NotConnected)?;
        let open = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>(channel)
        };
        let channel = tokio::time::timeout(self.inner.confirm_timeout, open)
            .await
            .map_err(|_| PublishError::ConfirmTimeout(self.inner.confirm_timeout))?
            .map_err(|e| PublishError::from_lapin(&e))?;
        *slot = Some((link.generation, channel.clone()));
        Ok(channel)
    }
}

fn producer_span(message: &OutgoingMessage) -> tracing::Span {
    tracing::info_span!(
        "publish",
        otel.name = %format!("publish {}", message.exchange),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %message.exchange,
        messaging.rabbitmq.destination.routing_key = %message.routing_key,
        messaging.message.id = %message.message_id,
        messaging.message.conversation_id = message.correlation_id.as_deref(),
        messaging.message.body.size = message.payload.len(),
        shop.message_type = %message.message_type,
        error.type = Empty,
    )
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
