//! The service side of an operator's order timeline: each order's history in
//! order-service (`GET /orders/{id}/events`) and inventory-service
//! (`GET /reservations/{order_id}`), the `created_before` filter of
//! `GET /orders`, and the pending-order gauges on `/metrics`.

use std::time::Duration;

use contracts::events::v1::{OrderItem, StockReserved};
use e2e::{Options, Stack};
use lapin::{
    BasicProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use prost::{Message, Name};
use serde_json::{Value, json};

const CLIENT_TRACE: &str = "5b8efff798038103d269b633813fc60c";
const CLIENT_SPAN: &str = "eee19b7ec3c1b174";

const WAIT: Duration = Duration::from_secs(30);

/// Places an order for `items` whose `POST /orders` carries [`CLIENT_TRACE`];
/// returns its id.
async fn place_traced(stack: &Stack, customer: &str, items: &[(&str, i64)]) -> String {
    let items: Vec<Value> = items
        .iter()
        .map(|(sku, quantity)| json!({"sku": sku, "quantity": quantity}))
        .collect();
    let response = stack
        .http
        .post(format!("{}/orders", stack.order()))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&json!({"customer_id": customer, "items": items}))
        .send()
        .await
        .expect("POST /orders");
    assert_eq!(response.status(), 202);
    response.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

/// Status, content type and body of `GET url`.
async fn get(stack: &Stack, url: &str) -> (u16, String, Value) {
    let response = stack.http.get(url).send().await.expect("GET");
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: {e}: {text}"));
    (status, kind, body)
}

/// (event, direction) of each history item.
fn kinds(items: &Value) -> Vec<(String, String)> {
    items
        .as_array()
        .expect("items array")
        .iter()
        .map(|i| {
            (
                i["event"].as_str().unwrap_or_default().to_owned(),
                i["direction"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn expect(kinds: &[(&str, &str)]) -> Vec<(String, String)> {
    kinds
        .iter()
        .map(|(e, d)| ((*e).to_owned(), (*d).to_owned()))
        .collect()
}

/// Whether every emitted item's outbox row is published.
fn all_published(items: &Value) -> bool {
    items
        .as_array()
        .expect("items array")
        .iter()
        .filter(|i| i["direction"] == "emitted")
        .all(|i| i["outbox"]["state"] == "published")
}

/// Waits until `url` answers 200 with exactly `expected` in `field`, every
/// emitted event published; returns the body.
async fn wait_history(stack: &Stack, url: &str, field: &str, expected: &[(&str, &str)]) -> Value {
    let expected = expect(expected);
    let mut last = Value::Null;
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let (status, _, body) = get(stack, url).await;
            if status == 200 && kinds(&body[field]) == expected && all_published(&body[field]) {
                return body;
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!("{url}: never {expected:?}, every emitted one published; last {last}")
    })
}

fn order_events_url(stack: &Stack, id: &str) -> String {
    format!("{}/orders/{id}/events", stack.order())
}

fn reservation_url(stack: &Stack, id: &str) -> String {
    format!("{}/reservations/{id}", stack.inventory())
}

/// Every item carries the client's trace id, a message id and a time; emitted
/// ones a published outbox row, applied ones none.
fn assert_items_traced_and_published(items: &Value) {
    for item in items.as_array().expect("items") {
        assert_eq!(item["trace_id"], CLIENT_TRACE, "{item}");
        assert!(
            item["message_id"].as_str().is_some_and(|m| !m.is_empty()),
            "{item}"
        );
        assert!(item["at"].as_str().is_some_and(is_rfc3339), "{item}");
        if item["direction"] == "emitted" {
            let outbox = &item["outbox"];
            assert_eq!(outbox["state"], "published", "{item}");
            assert!(outbox["published_at"].as_str().is_some(), "{item}");
            assert!(
                outbox["attempts"].as_i64().is_some_and(|a| a >= 1),
                "{item}"
            );
            assert_eq!(outbox["last_error"], Value::Null, "{item}");
        } else {
            assert!(item.get("outbox").is_none(), "{item}");
        }
    }
}

/// `2025-01-31T12:00:00.123456Z` or with an offset.
fn is_rfc3339(at: &str) -> bool {
    regex::Regex::new(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
        .expect("regex")
        .is_match(at)
}

/// The message id of the first item with `event` and `direction`.
fn message_id(items: &Value, event: &str, direction: &str) -> String {
    items
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["event"] == event && i["direction"] == direction)
        .and_then(|i| i["message_id"].as_str())
        .unwrap_or_else(|| panic!("no {direction} {event} in {items}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_confirmed_orders_history_shows_each_hop_in_both_services_in_one_trace() {
    let stack = Stack::start().await;
    let sku = testkit::unique("H");
    stack.set_stock(&sku, 5).await;
    let id = place_traced(&stack, "historian", &[(&sku, 2)]).await;
    assert_eq!(stack.settled(&id).await["status"], "confirmed");

    let order = wait_history(
        &stack,
        &order_events_url(&stack, &id),
        "items",
        &[
            ("order.placed", "emitted"),
            ("inventory.reserved", "applied"),
            ("order.confirmed", "emitted"),
        ],
    )
    .await;
    assert_eq!(order["order_id"], id.as_str());
    assert_eq!(order["trace_id"], CLIENT_TRACE);
    assert_items_traced_and_published(&order["items"]);

    let reservation = wait_history(
        &stack,
        &reservation_url(&stack, &id),
        "events",
        &[
            ("order.placed", "applied"),
            ("inventory.reserved", "emitted"),
        ],
    )
    .await;
    assert_eq!(reservation["order_id"], id.as_str());
    assert_eq!(reservation["state"], "reserved");
    assert_eq!(
        reservation["items"],
        json!([{"sku": sku, "quantity": 2}]),
        "{reservation}"
    );
    for field in ["created_at", "updated_at"] {
        assert!(
            reservation[field].as_str().is_some_and(is_rfc3339),
            "{field}: {reservation}"
        );
    }
    assert_items_traced_and_published(&reservation["events"]);
    // The two sides name the same messages.
    assert_eq!(
        message_id(&order["items"], "order.placed", "emitted"),
        message_id(&reservation["events"], "order.placed", "applied")
    );
    assert_eq!(
        message_id(&order["items"], "inventory.reserved", "applied"),
        message_id(&reservation["events"], "inventory.reserved", "emitted")
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_inventory_result_adds_nothing_to_the_orders_history() {
    let stack = Stack::start().await;
    let sku = testkit::unique("H");
    stack.set_stock(&sku, 5).await;
    let id = place_traced(&stack, "historian", &[(&sku, 1)]).await;
    assert_eq!(stack.settled(&id).await["status"], "confirmed");
    let expected = [
        ("order.placed", "emitted"),
        ("inventory.reserved", "applied"),
        ("order.confirmed", "emitted"),
    ];
    let before = wait_history(&stack, &order_events_url(&stack, &id), "items", &expected).await;
    let reserved_id = message_id(&before["items"], "inventory.reserved", "applied");
    let acked = "messaging_consumed_total{queue=\"order.inventory-events\",outcome=\"ack\"}";
    let acked_before = stack.metric(&stack.order(), acked).await;

    // The same message again, as a broker redelivers it: same message id.
    let conn = lapin::Connection::connect(&stack.vhost.amqp_url(), Default::default())
        .await
        .expect("amqp");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let payload = StockReserved {
        order_id: id.clone(),
        items: vec![OrderItem {
            sku: sku.clone(),
            quantity: 1,
        }],
        reserved_at: None,
    }
    .encode_to_vec();
    channel
        .basic_publish(
            contracts::names::EVENTS_EXCHANGE.into(),
            contracts::names::keys::STOCK_RESERVED.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &payload,
            BasicProperties::default()
                .with_message_id(reserved_id.as_str().into())
                .with_type(StockReserved::full_name().as_str().into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    testkit::wait_until("the duplicate acked", WAIT, || async {
        stack.metric(&stack.order(), acked).await > acked_before
    })
    .await;
    let _ = conn.close(200, "done".into()).await;

    let (_, _, after) = get(&stack, &order_events_url(&stack, &id)).await;
    assert_eq!(after, before, "nothing recorded for the duplicate");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_orders_history_shows_the_rejection_in_both_services() {
    let stack = Stack::start().await;
    let unknown = testkit::unique("NOPE");
    let id = place_traced(&stack, "historian", &[(&unknown, 1)]).await;
    assert_eq!(stack.settled(&id).await["status"], "rejected");

    let order = wait_history(
        &stack,
        &order_events_url(&stack, &id),
        "items",
        &[
            ("order.placed", "emitted"),
            ("inventory.rejected", "applied"),
            ("order.rejected", "emitted"),
        ],
    )
    .await;
    assert_eq!(order["trace_id"], CLIENT_TRACE);
    assert_items_traced_and_published(&order["items"]);
    let reservation = wait_history(
        &stack,
        &reservation_url(&stack, &id),
        "events",
        &[
            ("order.placed", "applied"),
            ("inventory.rejected", "emitted"),
        ],
    )
    .await;
    assert_eq!(reservation["state"], "rejected");
    assert_items_traced_and_published(&reservation["events"]);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_orders_history_shows_the_cancellation_and_the_release() {
    let stack = Stack::start().await;
    let sku = testkit::unique("H");
    stack.set_stock(&sku, 5).await;
    let id = place_traced(&stack, "historian", &[(&sku, 3)]).await;
    assert_eq!(stack.settled(&id).await["status"], "confirmed");
    let cancelled = stack
        .http
        .post(format!("{}/orders/{id}/cancel", stack.order()))
        .send()
        .await
        .expect("cancel");
    assert_eq!(cancelled.status(), 200);

    let order = wait_history(
        &stack,
        &order_events_url(&stack, &id),
        "items",
        &[
            ("order.placed", "emitted"),
            ("inventory.reserved", "applied"),
            ("order.confirmed", "emitted"),
            ("order.cancelled", "emitted"),
            ("inventory.released", "applied"),
        ],
    )
    .await;
    let trace_ids: Vec<&Value> = order["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| &i["trace_id"])
        .collect();
    // The cancellation is a request of its own: its own trace.
    assert!(trace_ids[..3].iter().all(|t| *t == CLIENT_TRACE), "{order}");
    assert!(
        trace_ids[3]
            .as_str()
            .is_some_and(|t| t.len() == 32 && t != CLIENT_TRACE),
        "{order}"
    );
    assert_eq!(trace_ids[3], trace_ids[4], "{order}");
    assert_eq!(order["trace_id"], CLIENT_TRACE, "the first event's trace");

    let reservation = wait_history(
        &stack,
        &reservation_url(&stack, &id),
        "events",
        &[
            ("order.placed", "applied"),
            ("inventory.reserved", "emitted"),
            ("order.cancelled", "applied"),
            ("inventory.released", "emitted"),
        ],
    )
    .await;
    assert_eq!(reservation["state"], "released");
    assert_eq!(stack.stock(&sku).await, (5, 0));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn histories_of_unknown_orders_are_404_and_malformed_ids_400_problems() {
    let stack = Stack::start().await;
    let unknown = uuid::Uuid::new_v4();
    for (url, expected) in [
        (format!("{}/orders/{unknown}/events", stack.order()), 404),
        (format!("{}/orders/not-a-uuid/events", stack.order()), 400),
        (format!("{}/reservations/{unknown}", stack.inventory()), 404),
        (format!("{}/reservations/12345", stack.inventory()), 400),
    ] {
        let (status, kind, problem) = get(&stack, &url).await;
        assert_eq!(status, expected, "{url}: {problem}");
        assert_eq!(kind, "application/problem+json", "{url}");
        assert_eq!(problem["status"], expected, "{url}: {problem}");
        assert!(
            problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{url}: {problem}"
        );
    }
    stack.stop().await;
}

/// `/orders?<query>`, percent-encoded (an offset's `+` would read as a space).
fn orders_url(stack: &Stack, query: &[(&str, &str)]) -> reqwest::Url {
    reqwest::Url::parse_with_params(&format!("{}/orders", stack.order()), query).expect("url")
}

/// `GET /orders` with `query`; the ids listed and `next`.
async fn list(stack: &Stack, query: &[(&str, &str)]) -> (Vec<String>, Option<String>) {
    let response = stack
        .http
        .get(orders_url(stack, query))
        .send()
        .await
        .expect("GET /orders");
    assert_eq!(response.status(), 200, "{query:?}");
    let body: Value = response.json().await.expect("json");
    let ids = body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|o| o["id"].as_str().expect("id").to_owned())
        .collect();
    (ids, body["next"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_created_before_an_instant_are_listed_with_status_and_pages() {
    let stack = Stack::start().await;
    let sku = testkit::unique("H");
    stack.set_stock(&sku, 100).await;
    let unknown = testkit::unique("NOPE");
    // confirmed, rejected, confirmed, confirmed (oldest first)
    let mut ids = Vec::new();
    for item in [&sku, &unknown, &sku, &sku] {
        let id = stack.place("before", &[(item.as_str(), 1)]).await;
        stack.settled(&id).await;
        ids.push(id);
    }
    let last_created = stack.order_json(&ids[3]).await["created_at"]
        .as_str()
        .expect("created_at")
        .to_owned();

    let (all, _) = list(&stack, &[("created_before", &last_created)]).await;
    assert_eq!(
        all,
        [&*ids[2], &*ids[1], &*ids[0]],
        "strictly before, newest first"
    );

    let query = [
        ("customer_id", "before"),
        ("status", "confirmed"),
        ("created_before", last_created.as_str()),
        ("limit", "1"),
    ];
    let (first, next) = list(&stack, &query).await;
    assert_eq!(first, [&*ids[2]]);
    let next = next.expect("a second page");
    let mut paged = query.to_vec();
    paged.push(("cursor", &next));
    let (second, next) = list(&stack, &paged).await;
    assert_eq!(second, [&*ids[0]], "the rejected order is skipped");
    assert_eq!(next, None);

    let response = stack
        .http
        .get(orders_url(&stack, &[("created_before", "yesterday")]))
        .send()
        .await
        .expect("GET /orders");
    assert_eq!(response.status(), 400);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let problem: Value = response.json().await.expect("json");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("created_before")),
        "{problem}"
    );
    stack.stop().await;
}

/// The value of the sample `name` (no labels) on `url`'s `/metrics`, if present.
async fn gauge(stack: &Stack, url: &str, name: &str) -> Option<f64> {
    stack.sample(url, &format!("{name} ")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_oldest_pending_orders_age_is_on_metrics_while_inventory_is_away() {
    let mut stack = Stack::start_with(Options {
        held_back: vec!["inventory-service"],
        ..Options::default()
    })
    .await;
    let order = stack.order();
    assert_eq!(gauge(&stack, &order, "orders_pending").await, Some(0.0));
    assert_eq!(
        gauge(&stack, &order, "orders_oldest_pending_seconds").await,
        Some(0.0)
    );

    let id = stack.place("waiting", &[("NOWHERE", 1)]).await;
    testkit::wait_until("one order pending for a while", WAIT, || async {
        gauge(&stack, &order, "orders_pending").await == Some(1.0)
            && gauge(&stack, &order, "orders_oldest_pending_seconds")
                .await
                .is_some_and(|age| age > 0.0)
    })
    .await;

    // Inventory comes back and answers (unknown SKU: rejected): nothing pending.
    stack.start_service("inventory-service").await;
    assert_eq!(stack.settled(&id).await["status"], "rejected");
    testkit::wait_until("no order pending", WAIT, || async {
        gauge(&stack, &order, "orders_pending").await == Some(0.0)
            && gauge(&stack, &order, "orders_oldest_pending_seconds").await == Some(0.0)
    })
    .await;
    stack.stop().await;
}
