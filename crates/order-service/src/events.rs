//! The consumer of `order.inventory-events`: applies reservation results to
//! orders, once per message (inbox), recording the message in the order's
//! history and emitting the next event in the same transaction.

use contracts::decode::Event;
use messaging::{Handler, Inbox, IncomingMessage, Outcome, Processed};
use service_kit::history;
use tracing::Instrument;
use uuid::Uuid;

use crate::store::{self, Applied};

#[derive(Debug)]
pub struct InventoryEvents {
    pub inbox: Inbox,
}

enum Failure {
    Database(sqlx::Error),
    Permanent(String),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

impl Handler for InventoryEvents {
    async fn handle(&self, message: IncomingMessage) -> Outcome {
        let event = match Event::decode(&message.message_type, &message.payload) {
            Ok(event) => event,
            Err(reason) => return Outcome::Reject(reason),
        };
        let Ok(order_id) = Uuid::parse_str(event.order_id()) else {
            return Outcome::Reject(format!(
                "invalid order id '{}'",
                event.order_id().escape_debug()
            ));
        };
        let span = tracing::info_span!("apply inventory result", shop.order_id = %order_id, shop.event = event.routing_key());
        let received = history::Applied::of(&message);
        let result = self
            .inbox
            .process(&message.message_id, |tx| {
                Box::pin(async move {
                    // Rolled back with the rest if the order turns out unknown.
                    history::record_applied(tx, order_id, &received).await?;
                    let applied = match &event {
                        Event::StockReserved(_) => store::confirm(tx, order_id).await?,
                        Event::StockRejected(e) => {
                            store::reject(tx, order_id, &e.shortages).await?
                        }
                        // A release needs nothing here: the order was cancelled already.
                        Event::StockReleased(_) => Applied::Unchanged,
                        other => {
                            return Err(Failure::Permanent(format!(
                                "unexpected {} on the inventory results queue",
                                other.routing_key()
                            )));
                        }
                    };
                    if applied == Applied::UnknownOrder {
                        return Err(Failure::Permanent(format!("unknown order {order_id}")));
                    }
                    tracing::info!(?applied, "inventory result applied");
                    Ok(())
                })
            })
            .instrument(span)
            .await;
        match result {
            Ok(Processed::Done(()) | Processed::Duplicate) => Outcome::Ack,
            Err(Failure::Permanent(reason)) => Outcome::Reject(reason),
            Err(Failure::Database(e)) => Outcome::database(&e),
        }
    }

    /// Asked while paused after an outage: the database answers again.
    async fn ready(&self) -> Result<(), String> {
        self.inbox.ping().await
    }
}
