//! Decoding an incoming message by its AMQP `type`: an unknown type or a payload
//! that does not decode is a permanent failure (the message goes to the DLQ).

use prost::{Message, Name};

use crate::events::v1::{
    OrderCancelled, OrderConfirmed, OrderPlaced, OrderRejected, StockRejected, StockReleased,
    StockReserved,
};

/// Every v1 event.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    OrderPlaced(OrderPlaced),
    OrderConfirmed(OrderConfirmed),
    OrderRejected(OrderRejected),
    OrderCancelled(OrderCancelled),
    StockReserved(StockReserved),
    StockRejected(StockRejected),
    StockReleased(StockReleased),
}

impl Event {
    pub fn decode(message_type: &str, payload: &[u8]) -> Result<Self, String> {
        fn de<M: Message + Name + Default>(payload: &[u8]) -> Result<M, String> {
            M::decode(payload).map_err(|e| format!("undecodable {} payload: {e}", M::full_name()))
        }
        Ok(match message_type {
            t if t == OrderPlaced::full_name() => Self::OrderPlaced(de(payload)?),
            t if t == OrderConfirmed::full_name() => Self::OrderConfirmed(de(payload)?),
            t if t == OrderRejected::full_name() => Self::OrderRejected(de(payload)?),
            t if t == OrderCancelled::full_name() => Self::OrderCancelled(de(payload)?),
            t if t == StockReserved::full_name() => Self::StockReserved(de(payload)?),
            t if t == StockRejected::full_name() => Self::StockRejected(de(payload)?),
            t if t == StockReleased::full_name() => Self::StockReleased(de(payload)?),
            other => {
                let shown: String = other.chars().take(100).collect();
                return Err(format!("unknown message type '{shown}'"));
            }
        })
    }

    /// Decodes a message a consumer's queue carries: one of the events `expected`
    /// accepts, about a valid order id. `Err` is the reason to dead-letter it;
    /// `queue` names the queue in it ("unexpected order.placed on the {queue}").
    pub fn decode_expected(
        message_type: &str,
        payload: &[u8],
        queue: &str,
        expected: fn(&Self) -> bool,
    ) -> Result<(uuid::Uuid, Self), String> {
        let event = Self::decode(message_type, payload)?;
        if !expected(&event) {
            return Err(format!("unexpected {} on the {queue}", event.routing_key()));
        }
        let order_id = uuid::Uuid::parse_str(event.order_id())
            .map_err(|_| format!("invalid order id '{}'", event.order_id().escape_debug()))?;
        Ok((order_id, event))
    }

    /// The order this event is about.
    pub fn order_id(&self) -> &str {
        match self {
            Self::OrderPlaced(e) => &e.order_id,
            Self::OrderConfirmed(e) => &e.order_id,
            Self::OrderRejected(e) => &e.order_id,
            Self::OrderCancelled(e) => &e.order_id,
            Self::StockReserved(e) => &e.order_id,
            Self::StockRejected(e) => &e.order_id,
            Self::StockReleased(e) => &e.order_id,
        }
    }

    /// The routing key it is published with, e.g. `order.confirmed`.
    pub fn routing_key(&self) -> &'static str {
        use crate::names::keys;
        match self {
            Self::OrderPlaced(_) => keys::ORDER_PLACED,
            Self::OrderConfirmed(_) => keys::ORDER_CONFIRMED,
            Self::OrderRejected(_) => keys::ORDER_REJECTED,
            Self::OrderCancelled(_) => keys::ORDER_CANCELLED,
            Self::StockReserved(_) => keys::STOCK_RESERVED,
            Self::StockRejected(_) => keys::STOCK_REJECTED,
            Self::StockReleased(_) => keys::STOCK_RELEASED,
        }
    }
}

/// An event ready for the outbox: exchange `shop.events`, its routing key and type.
pub fn outgoing<M: Message + Name>(
    routing_key: &str,
    event: &M,
    order_id: &str,
) -> messaging::NewMessage {
    messaging::NewMessage::new(
        crate::names::EVENTS_EXCHANGE,
        routing_key,
        M::full_name(),
        event.encode_to_vec(),
    )
    .correlated(order_id)
}

/// The current time as a protobuf timestamp.
pub fn now() -> Option<prost_types::Timestamp> {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Some(prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_types_and_bad_payloads_are_errors() {
        assert!(
            Event::decode("shop.events.v1.Nope", b"")
                .unwrap_err()
                .contains("unknown message type")
        );
        let err = Event::decode("shop.events.v1.OrderPlaced", b"\xff\xff\xff").unwrap_err();
        assert!(err.contains("undecodable"), "{err}");
    }

    #[test]
    fn round_trips_by_type() {
        let placed = OrderPlaced {
            order_id: "o".into(),
            ..Default::default()
        };
        let decoded =
            Event::decode("shop.events.v1.OrderPlaced", &placed.encode_to_vec()).expect("decodes");
        assert_eq!(decoded, Event::OrderPlaced(placed));
        assert_eq!(decoded.routing_key(), "order.placed");
    }
}
