//! The consumer of `order.inventory-events`: applies reservation results to
//! orders, once per message (inbox), recording the message in the order's
//! history and emitting the next event in the same transaction.

use contracts::decode::Event;
use messaging::{ApplyError, BoxFuture, InboxHandler, IncomingMessage, Outcome};
use service_kit::history;
use sqlx::PgConnection;
use tracing::Instrument;
use uuid::Uuid;

use crate::store::{self, Applied};

#[derive(Debug)]
pub struct InventoryEvents {
    /// Told how long each order this consumer completes waited.
    pub admission: crate::admission::Admission,
}

/// A reservation result for an order.
#[derive(Debug)]
pub struct InventoryEvent {
    order_id: Uuid,
    event: Event,
}

impl InboxHandler for InventoryEvents {
    type Event = InventoryEvent;
    /// How long the order waited, when this result completed it.
    type Output = Option<std::time::Duration>;

    fn decode(&self, message: &IncomingMessage) -> Result<InventoryEvent, String> {
        let (order_id, event) = Event::decode_expected(
            &message.message_type,
            &message.payload,
            "inventory results queue",
            |e| {
                matches!(
                    e,
                    Event::StockReserved(_) | Event::StockRejected(_) | Event::StockReleased(_)
                )
            },
        )?;
        Ok(InventoryEvent { order_id, event })
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a IncomingMessage,
        event: &'a InventoryEvent,
    ) -> BoxFuture<'a, Result<Self::Output, ApplyError>> {
        let InventoryEvent { order_id, event } = event;
        let order_id = *order_id;
        let span = tracing::info_span!("apply inventory result", shop.order_id = %order_id, shop.event = event.routing_key());
        Box::pin(
            async move {
                // Rolled back with the rest if the order turns out unknown.
                history::record_applied(tx, order_id, &history::Applied::of(message)).await?;
                let applied = match event {
                    Event::StockReserved(_) => store::confirm(tx, order_id).await?,
                    Event::StockRejected(e) => store::reject(tx, order_id, &e.shortages).await?,
                    // A release needs nothing here: the order was cancelled already.
                    _ => Applied::Unchanged,
                };
                if applied == Applied::UnknownOrder {
                    return Err(ApplyError::Permanent(format!("unknown order {order_id}")));
                }
                tracing::info!(?applied, "inventory result applied");
                Ok(match applied {
                    Applied::Moved(_, waited) => Some(waited),
                    _ => None,
                })
            }
            .instrument(span),
        )
    }

    async fn after(
        &self,
        _message: &IncomingMessage,
        _event: &InventoryEvent,
        applied: Option<Self::Output>,
    ) -> Outcome {
        if let Some(Some(waited)) = applied {
            self.admission.completed(waited);
        }
        Outcome::Ack
    }
}
