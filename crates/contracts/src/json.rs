//! Events as JSON, for people reading them (the operator tool shows dead letters
//! and parked rows this way): field names as in the `.proto` files, timestamps
//! as RFC 3339.

use prost_types::Timestamp;
use serde_json::{Value, json};

use crate::{
    decode::Event,
    events::v1::{OrderItem, Shortage},
};

impl Event {
    pub fn to_json(&self) -> Value {
        match self {
            Self::OrderPlaced(e) => json!({
                "order_id": e.order_id, "customer_id": e.customer_id, "email": e.email,
                "items": items(&e.items), "placed_at": time(e.placed_at.as_ref()),
            }),
            Self::OrderConfirmed(e) => json!({
                "order_id": e.order_id, "confirmed_at": time(e.confirmed_at.as_ref()),
            }),
            Self::OrderRejected(e) => json!({
                "order_id": e.order_id, "reason": e.reason,
                "shortages": shortages(&e.shortages), "rejected_at": time(e.rejected_at.as_ref()),
            }),
            Self::OrderCancelled(e) => json!({
                "order_id": e.order_id, "reason": e.reason,
                "cancelled_at": time(e.cancelled_at.as_ref()),
            }),
            Self::StockReserved(e) => json!({
                "order_id": e.order_id, "items": items(&e.items),
                "reserved_at": time(e.reserved_at.as_ref()),
            }),
            Self::StockRejected(e) => json!({
                "order_id": e.order_id, "shortages": shortages(&e.shortages),
                "rejected_at": time(e.rejected_at.as_ref()),
            }),
            Self::StockReleased(e) => json!({
                "order_id": e.order_id, "items": items(&e.items),
                "released_at": time(e.released_at.as_ref()),
            }),
        }
    }
}

fn items(items: &[OrderItem]) -> Value {
    items
        .iter()
        .map(|i| json!({"sku": i.sku, "quantity": i.quantity}))
        .collect()
}

fn shortages(shortages: &[Shortage]) -> Value {
    shortages
        .iter()
        .map(|s| {
            json!({"sku": s.sku, "requested": s.requested, "available": s.available, "known": s.known})
        })
        .collect()
}

fn time(t: Option<&Timestamp>) -> Value {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))
        .map_or(Value::Null, |t| Value::String(t.to_rfc3339()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::v1::OrderConfirmed;

    #[test]
    fn an_event_reads_as_its_proto_fields_with_rfc3339_times() {
        let event = Event::OrderConfirmed(OrderConfirmed {
            order_id: "o-1".into(),
            confirmed_at: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
        });
        assert_eq!(
            event.to_json(),
            json!({"order_id": "o-1", "confirmed_at": "2023-11-14T22:13:20+00:00"})
        );
    }
}
