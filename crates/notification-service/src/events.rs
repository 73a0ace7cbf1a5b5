//! The consumer of `notification.order-events` (bound to the fanout exchange):
//! records exactly one notification per (order, event), writes it to the log, and
//! POSTs it to the webhook when one is configured.
//!
//! The record commits first (inbox, same transaction; with the other messages
//! of its batch). The webhook call follows;
//! if it fails the handler asks for a retry, and the redelivery (a duplicate for
//! the inbox) finds the notification still undelivered and tries again, until the
//! runtime's attempts run out and the message goes to the DLQ with the reason.
//! The webhook receives `Idempotency-Key: <message id>` to drop repeats.

use std::time::Duration;

use contracts::decode::Event;
use messaging::{ApplyError, BoxFuture, InboxHandler, IncomingMessage, Outcome};
use sqlx::{PgConnection, PgPool};
use tracing::Instrument;
use uuid::Uuid;

use crate::store;

#[derive(Debug)]
pub struct OrderEvents {
    /// For the webhook's state, outside the inbox transaction.
    pub pool: PgPool,
    pub webhook: Option<Webhook>,
}

#[derive(Clone, Debug)]
pub struct Webhook {
    pub url: reqwest::Url,
    pub client: reqwest::Client,
}

impl Webhook {
    pub fn new(url: reqwest::Url, timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(Self {
            url,
            client: reqwest::Client::builder().timeout(timeout).build()?,
        })
    }

    /// `Err(true)` is worth retrying (network, 5xx, 408, 429); `Err(false)` is not.
    async fn post(&self, message_id: &str, body: &serde_json::Value) -> Result<(), (bool, String)> {
        let response = self
            .client
            .post(self.url.clone())
            .header("Idempotency-Key", message_id)
            .json(body)
            .send()
            .await
            .map_err(|e| (true, format!("webhook unreachable: {e}")))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            let retry =
                status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429;
            Err((retry, format!("webhook answered {status}")))
        }
    }
}

/// An order event to notify about.
#[derive(Debug)]
pub struct OrderEvent {
    order_id: Uuid,
    event: Event,
}

impl InboxHandler for OrderEvents {
    type Event = OrderEvent;
    /// The notification recorded now (none when one exists for the order and
    /// event already): what the webhook delivers, without reading it back.
    type Output = Option<store::Pending>;

    fn decode(&self, message: &IncomingMessage) -> Result<OrderEvent, String> {
        let (order_id, event) = Event::decode_expected(
            &message.message_type,
            &message.payload,
            "notifications queue",
            |e| {
                matches!(
                    e,
                    Event::OrderPlaced(_)
                        | Event::OrderConfirmed(_)
                        | Event::OrderRejected(_)
                        | Event::OrderCancelled(_)
                )
            },
        )?;
        Ok(OrderEvent { order_id, event })
    }

    /// Records the notification (the log channel is delivered by recording it).
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a IncomingMessage,
        event: &'a OrderEvent,
    ) -> BoxFuture<'a, Result<Option<store::Pending>, ApplyError>> {
        let OrderEvent { order_id, event } = event;
        let name = event.routing_key();
        let channel = if self.webhook.is_some() {
            "webhook"
        } else {
            "log"
        };
        let body = serde_json::json!({
            "order_id": order_id,
            "event": name,
            "message_id": message.message_id,
            "summary": summary(event),
        });
        let span = tracing::info_span!("notify", shop.order_id = %order_id, shop.event = name);
        Box::pin(
            async move {
                let new = store::New {
                    order_id: *order_id,
                    event: name,
                    message_id: &message.message_id,
                    channel,
                    body: &body,
                    delivered: channel == "log",
                };
                let recorded = store::record(tx, new).await?;
                Ok(recorded.map(|id| store::Pending {
                    id,
                    message_id: message.message_id.clone(),
                    body,
                }))
            }
            .instrument(span),
        )
    }

    /// Logs a notification recorded now, and delivers the webhook one that is
    /// still undelivered: the one just recorded as it is, else (a redelivery,
    /// or a notification recorded for the event before) read back.
    async fn after(
        &self,
        _message: &IncomingMessage,
        event: &OrderEvent,
        recorded: Option<Option<store::Pending>>,
    ) -> Outcome {
        let OrderEvent { order_id, event } = event;
        let name = event.routing_key();
        let recorded = recorded.flatten();
        if recorded.is_some() {
            tracing::info!(order_id = %order_id, event = name, "notification: {}", summary(event));
        }
        let Some(webhook) = &self.webhook else {
            return Outcome::Ack;
        };
        let span =
            tracing::info_span!("deliver webhook", shop.order_id = %order_id, shop.event = name);
        async {
            let pending = match recorded {
                Some(now) => Some(now),
                None => match store::pending_webhook(&self.pool, *order_id, name).await {
                    Ok(p) => p,
                    Err(e) => return Outcome::database(&e),
                },
            };
            let Some(store::Pending {
                id,
                message_id,
                body,
            }) = pending
            else {
                return Outcome::Ack;
            };
            match webhook.post(&message_id, &body).await {
                Ok(()) => match store::mark_delivered(&self.pool, id).await {
                    Ok(()) => Outcome::Ack,
                    Err(e) => Outcome::database(&e),
                },
                Err((retry, reason)) => {
                    if let Err(e) = store::mark_failed(&self.pool, id, &reason).await {
                        tracing::warn!(error = %e, "recording the webhook failure failed");
                    }
                    if retry {
                        Outcome::Retry(reason)
                    } else {
                        Outcome::Reject(reason)
                    }
                }
            }
        }
        .instrument(span)
        .await
    }
}

fn summary(event: &Event) -> String {
    match event {
        Event::OrderPlaced(e) => {
            format!("order {} placed with {} item(s)", e.order_id, e.items.len())
        }
        Event::OrderConfirmed(e) => format!("order {} confirmed", e.order_id),
        Event::OrderRejected(e) => format!("order {} rejected: {}", e.order_id, e.reason),
        Event::OrderCancelled(e) => format!("order {} cancelled", e.order_id),
        other => format!("{} for order {}", other.routing_key(), other.order_id()),
    }
}
