//! The confirm/batch send path: put every message of a batch on the wire and
//! await all confirms under one deadline, abandon the batch on an alarm, and
//! match returns and nacks back to their messages.

use futures_util::future::join_all;
use lapin::{BasicProperties, Confirmation, options::BasicPublishOptions, types::ShortString};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{OutgoingMessage, PublishError, Publisher, span::producer_span};
use crate::propagation;

impl Publisher {
    /// Publishes all messages, then awaits all confirms. The result at index `i`
    /// belongs to `messages[i]`.
    ///
    /// Batches on one publisher run one at a time. The client library hands a
    /// `basic.return` to an arbitrary confirm of a multiple-ack, so a return is
    /// matched to its message by `message_id`; with one batch in flight every
    /// return belongs to it. For the same reason a channel whose batch did not
    /// settle completely (timeout, alarm, channel error, a nack) is never reused.
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
        // A nack may be the channel's, not the message's: RabbitMQ 3.10 nacks
        // every publish on a channel that first reached a quorum queue while
        // the queue's leader node was down, for as long as the channel lives
        // (seen in the cluster chaos scenario). So a channel that saw a nack is
        // not reused either; the next batch opens a fresh one.
        if confirmations
            .iter()
            .any(|c| !matches!(c, Ok(Confirmation::Ack(_) | Confirmation::NotRequested)))
        {
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
}
