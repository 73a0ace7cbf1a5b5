//! The consumer of `inventory.order-events`: reserves stock for placed orders and
//! releases it for cancelled ones, once per message (inbox), recording each
//! message in the order's history in the same transaction.

use contracts::decode::Event;
use messaging::{Handler, Inbox, IncomingMessage, Outcome, Processed};
use service_kit::history;
use tracing::Instrument;
use uuid::Uuid;

use crate::store;

#[derive(Debug)]
pub struct OrderEvents {
    pub inbox: Inbox,
}

impl Handler for OrderEvents {
    async fn handle(&self, message: IncomingMessage) -> Outcome {
        let event = match Event::decode(&message.message_type, &message.payload) {
            Ok(event @ (Event::OrderPlaced(_) | Event::OrderCancelled(_))) => event,
            Ok(other) => {
                return Outcome::Reject(format!(
                    "unexpected {} on the order events queue",
                    other.routing_key()
                ));
            }
            Err(reason) => return Outcome::Reject(reason),
        };
        let Ok(order_id) = Uuid::parse_str(event.order_id()) else {
            return Outcome::Reject(format!(
                "invalid order id '{}'",
                event.order_id().escape_debug()
            ));
        };
        let span = tracing::info_span!("apply order event", shop.order_id = %order_id, shop.event = event.routing_key());
        let received = history::Applied::of(&message);
        let result = self
            .inbox
            .process(&message.message_id, |tx| {
                Box::pin(async move {
                    history::record_applied(tx, order_id, &received).await?;
                    match &event {
                        Event::OrderPlaced(placed) => {
                            let outcome = store::reserve(tx, order_id, placed).await?;
                            tracing::info!(?outcome, "order handled");
                        }
                        _ => {
                            let outcome = store::release(tx, order_id).await?;
                            tracing::info!(?outcome, "cancellation handled");
                        }
                    }
                    Ok::<_, sqlx::Error>(())
                })
            })
            .instrument(span)
            .await;
        match result {
            Ok(Processed::Done(()) | Processed::Duplicate) => Outcome::Ack,
            Err(e) => Outcome::database(&e),
        }
    }

    /// Asked while paused after an outage: the database answers again.
    async fn ready(&self) -> Result<(), String> {
        self.inbox.ping().await
    }
}
