//! Backward compatibility of the v1 wire format: bytes written by the first
//! release of each event (stored under `tests/golden/v1/`) must still decode to
//! the same values. Renumbering or retyping a field breaks this test.
//!
//! To add a golden file for a *new* message type, run with `WRITE_GOLDEN=1` once
//! and commit the file; never regenerate an existing one.

use contracts::{
    Message, Name,
    events::v1::{
        OrderCancelled, OrderConfirmed, OrderItem, OrderPlaced, OrderRejected, Shortage,
        StockRejected, StockReleased, StockReserved,
    },
};
use prost_types::Timestamp;

const ORDER_ID: &str = "0190f2a1-7c3e-7d4b-9a51-2f6c1e0b8d11";

fn ts() -> Option<Timestamp> {
    Some(Timestamp {
        seconds: 1_767_225_600,
        nanos: 123_000_000,
    })
}

fn items() -> Vec<OrderItem> {
    vec![
        OrderItem {
            sku: "SKU-1".into(),
            quantity: 2,
        },
        OrderItem {
            sku: "SKU-2".into(),
            quantity: 1,
        },
    ]
}

fn shortages() -> Vec<Shortage> {
    vec![
        Shortage {
            sku: "SKU-1".into(),
            requested: 5,
            available: 3,
            known: true,
        },
        Shortage {
            sku: "NOPE".into(),
            requested: 1,
            available: 0,
            known: false,
        },
    ]
}

fn check<M: Message + Name + Default + PartialEq + std::fmt::Debug>(expected: M) {
    let path = format!(
        "{}/tests/golden/v1/{}.hex",
        env!("CARGO_MANIFEST_DIR"),
        M::NAME
    );
    if std::env::var_os("WRITE_GOLDEN").is_some() && !std::path::Path::new(&path).exists() {
        std::fs::write(&path, hex::encode(expected.encode_to_vec())).expect("write golden");
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let bytes = hex::decode(stored.trim()).expect("golden file is hex");
    let decoded = M::decode(bytes.as_slice())
        .unwrap_or_else(|e| panic!("{} no longer decodes: {e}", M::NAME));
    assert_eq!(decoded, expected, "{} decodes differently", M::full_name());
}

#[test]
fn order_placed_v1_still_decodes() {
    check(OrderPlaced {
        order_id: ORDER_ID.into(),
        customer_id: "customer-42".into(),
        email: Some("ada@example.com".into()),
        items: items(),
        placed_at: ts(),
    });
}

#[test]
fn order_confirmed_v1_still_decodes() {
    check(OrderConfirmed {
        order_id: ORDER_ID.into(),
        confirmed_at: ts(),
    });
}

#[test]
fn order_rejected_v1_still_decodes() {
    check(OrderRejected {
        order_id: ORDER_ID.into(),
        reason: "insufficient stock".into(),
        shortages: shortages(),
        rejected_at: ts(),
    });
}

#[test]
fn order_cancelled_v1_still_decodes() {
    check(OrderCancelled {
        order_id: ORDER_ID.into(),
        reason: "customer request".into(),
        cancelled_at: ts(),
    });
}

#[test]
fn stock_reserved_v1_still_decodes() {
    check(StockReserved {
        order_id: ORDER_ID.into(),
        items: items(),
        reserved_at: ts(),
    });
}

#[test]
fn stock_rejected_v1_still_decodes() {
    check(StockRejected {
        order_id: ORDER_ID.into(),
        shortages: shortages(),
        rejected_at: ts(),
    });
}

#[test]
fn stock_released_v1_still_decodes() {
    check(StockReleased {
        order_id: ORDER_ID.into(),
        items: items(),
        released_at: ts(),
    });
}

#[test]
fn type_names_carry_the_version_in_the_package() {
    assert_eq!(
        contracts::type_name::<OrderPlaced>(),
        "shop.events.v1.OrderPlaced"
    );
    assert_eq!(
        contracts::type_name::<StockRejected>(),
        "shop.events.v1.StockRejected"
    );
}
