//! The consumer of `inventory.order-events`: reserves stock for placed orders and
//! releases it for cancelled ones, once per message (inbox), recording each
//! message in the order's history in the same transaction.

use contracts::decode::Event;
use messaging::{ApplyError, BoxFuture, InboxHandler, IncomingMessage};
use service_kit::history;
use sqlx::PgConnection;
use tracing::Instrument;
use uuid::Uuid;

use crate::store;

#[derive(Debug)]
pub struct OrderEvents;

/// A placed or cancelled order.
#[derive(Debug)]
pub struct OrderEvent {
    order_id: Uuid,
    event: Event,
}

impl InboxHandler for OrderEvents {
    type Event = OrderEvent;
    type Output = ();

    fn decode(&self, message: &IncomingMessage) -> Result<OrderEvent, String> {
        let (order_id, event) = Event::decode_expected(
            &message.message_type,
            &message.payload,
            "order events queue",
            |e| matches!(e, Event::OrderPlaced(_) | Event::OrderCancelled(_)),
        )?;
        Ok(OrderEvent { order_id, event })
    }

    /// Every order's lock and every stock row first, in one order
    /// ([`store::lock_all`]).
    fn before<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [&'a OrderEvent],
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        let orders: Vec<Uuid> = events.iter().map(|e| e.order_id).collect();
        let reserving: Vec<&str> = events
            .iter()
            .filter_map(|e| match &e.event {
                Event::OrderPlaced(placed) => Some(placed.items.iter().map(|i| i.sku.as_str())),
                _ => None,
            })
            .flatten()
            .collect();
        Box::pin(async move {
            store::lock_all(tx, &orders, &reserving).await?;
            Ok(())
        })
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a IncomingMessage,
        event: &'a OrderEvent,
    ) -> BoxFuture<'a, Result<Self::Output, ApplyError>> {
        let OrderEvent { order_id, event } = event;
        let span = tracing::info_span!("apply order event", shop.order_id = %order_id, shop.event = event.routing_key());
        Box::pin(
            async move {
                history::record_applied(tx, *order_id, &history::Applied::of(message)).await?;
                if let Event::OrderPlaced(placed) = event {
                    let outcome = store::reserve(tx, *order_id, placed).await?;
                    tracing::info!(?outcome, "order handled");
                } else {
                    let outcome = store::release(tx, *order_id).await?;
                    tracing::info!(?outcome, "cancellation handled");
                }
                Ok(())
            }
            .instrument(span),
        )
    }
}
