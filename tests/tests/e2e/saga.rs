use std::time::Duration;

use e2e::{Options, Stack};

fn sku(name: &str) -> String {
    testkit::unique(name)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_placed_order_with_stock_is_confirmed_reserves_stock_and_notifies_placed_and_confirmed() {
    let stack = Stack::start().await;
    let (a, b) = (sku("A"), sku("B"));
    stack.set_stock(&a, 10).await;
    stack.set_stock(&b, 5).await;

    let id = stack.place("alice", &[(&a, 3), (&b, 5)]).await;

    let order = stack.settled(&id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["customer_id"], "alice");
    assert_eq!(order["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(stack.stock(&a).await, (7, 3));
    assert_eq!(stack.stock(&b).await, (0, 5));
    let mut events = stack
        .wait_notified(&id, &["order.placed", "order.confirmed"])
        .await;
    events.sort();
    assert_eq!(events, ["order.confirmed", "order.placed"]);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn insufficient_stock_and_unknown_skus_reject_the_order_with_shortages_and_leave_stock_unchanged()
 {
    let stack = Stack::start().await;
    let (a, b, unknown) = (sku("A"), sku("B"), sku("NOPE"));
    stack.set_stock(&a, 2).await;
    stack.set_stock(&b, 9).await;

    let id = stack.place("bob", &[(&a, 5), (&b, 1), (&unknown, 1)]).await;

    let order = stack.settled(&id).await;
    assert_eq!(order["status"], "rejected", "{order}");
    let reason = order["reason"].as_str().expect("reason");
    assert!(
        reason.contains(&format!("{a} requested 5, available 2")),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("unknown SKU {unknown}")),
        "{reason}"
    );
    let shortages = order["shortages"].as_array().expect("shortages");
    assert_eq!(shortages.len(), 2, "{order}");
    assert!(
        shortages
            .iter()
            .any(|s| s["sku"] == a.as_str() && s["requested"] == 5 && s["available"] == 2)
    );
    assert!(
        shortages
            .iter()
            .any(|s| s["sku"] == unknown.as_str() && s["known"] == false)
    );
    assert_eq!(stack.stock(&a).await, (2, 0), "nothing reserved");
    assert_eq!(stack.stock(&b).await, (9, 0), "all or nothing");
    stack
        .wait_notified(&id, &["order.placed", "order.rejected"])
        .await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_confirmed_order_restores_stock_and_notifies() {
    let stack = Stack::start().await;
    let a = sku("A");
    stack.set_stock(&a, 10).await;
    let id = stack.place("carol", &[(&a, 4)]).await;
    assert_eq!(stack.settled(&id).await["status"], "confirmed");
    assert_eq!(stack.stock(&a).await, (6, 4));

    let r = stack
        .http
        .post(format!("{}/orders/{id}/cancel", stack.order()))
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), 200);
    let again = stack
        .http
        .post(format!("{}/orders/{id}/cancel", stack.order()))
        .send()
        .await
        .expect("cancel");
    assert_eq!(again.status(), 200, "cancelling twice is a no-op");

    assert_eq!(stack.order_json(&id).await["status"], "cancelled");
    testkit::wait_until("stock restored", Duration::from_secs(30), || async {
        stack.stock(&a).await == (10, 0)
    })
    .await;
    stack
        .wait_notified(&id, &["order.placed", "order.confirmed", "order.cancelled"])
        .await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_pending_order_before_inventory_answers_ends_cancelled_with_stock_restored() {
    let mut stack = Stack::start_with(Options {
        held_back: vec!["inventory-service"],
        ..Options::default()
    })
    .await;
    let a = sku("A");
    let id = stack.place("dave", &[(&a, 2)]).await;
    let r = stack
        .http
        .post(format!("{}/orders/{id}/cancel", stack.order()))
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), 200);
    assert_eq!(stack.order_json(&id).await["status"], "cancelled");

    // Inventory comes up with the placement and the cancellation both waiting.
    stack.start_service("inventory-service").await;
    stack.set_stock(&a, 10).await;
    let inventory = stack.inventory();
    testkit::wait_until(
        "inventory handled both events",
        Duration::from_secs(30),
        || async {
            stack
                .metric(
                    &inventory,
                    "messaging_consumed_total{queue=\"inventory.order-events\",outcome=\"ack\"}",
                )
                .await
                >= 2.0
        },
    )
    .await;

    assert_eq!(stack.stock(&a).await, (10, 0), "nothing stays reserved");
    assert_eq!(
        stack.order_json(&id).await["status"],
        "cancelled",
        "a late reservation never moves it back"
    );
    stack
        .wait_notified(&id, &["order.placed", "order.cancelled"])
        .await;
    stack.stop().await;
}

/// Places `orders` concurrent single-unit orders for one SKU holding `units`.
async fn oversubscribe(stack: &Stack, orders: usize, units: i64) -> (Vec<String>, String) {
    let a = sku("HOT");
    stack.set_stock(&a, units).await;
    let placing: Vec<_> = (0..orders)
        .map(|i| {
            let customer = format!("rush-{i}");
            let sku = a.clone();
            async move { stack.place(&customer, &[(&sku, 1)]).await }
        })
        .collect();
    (futures_util::future::join_all(placing).await, a)
}

async fn count_outcomes(stack: &Stack, ids: &[String]) -> (usize, usize) {
    let mut confirmed = 0;
    let mut rejected = 0;
    for id in ids {
        match stack.settled(id).await["status"].as_str() {
            Some("confirmed") => confirmed += 1,
            Some("rejected") => rejected += 1,
            other => panic!("order {id} ended {other:?}"),
        }
    }
    (confirmed, rejected)
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_concurrent_orders_for_ten_units_confirm_exactly_ten() {
    let stack = Stack::start().await;

    let (ids, a) = oversubscribe(&stack, 60, 10).await;

    assert_eq!(count_outcomes(&stack, &ids).await, (10, 50));
    assert_eq!(stack.stock(&a).await, (0, 10), "never oversold");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_of_every_service_give_the_same_outcomes_without_duplicates() {
    let stack = Stack::start_with(Options {
        replicas: 2,
        ..Options::default()
    })
    .await;
    assert_eq!(stack.processes.len(), 6);

    let (ids, a) = oversubscribe(&stack, 60, 10).await;

    assert_eq!(count_outcomes(&stack, &ids).await, (10, 50));
    assert_eq!(stack.stock(&a).await, (0, 10), "no duplicate reservation");
    for id in &ids {
        let events = stack.wait_notified(id, &["order.placed"]).await;
        let settled = stack.order_json(id).await["status"]
            .as_str()
            .map(|s| format!("order.{s}"))
            .expect("status");
        let events = if events.contains(&settled) {
            events
        } else {
            stack.wait_notified(id, &["order.placed", &settled]).await
        };
        let mut unique = events.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            events.len(),
            "duplicate notification for {id}: {events:?}"
        );
        assert_eq!(events.len(), 2, "{id}: {events:?}");
    }
    // Both replicas of each consumer did work (competing consumers).
    for service in ["inventory-service", "order-service"] {
        let queue = if service == "order-service" {
            "order.inventory-events"
        } else {
            "inventory.order-events"
        };
        let mut total = 0.0;
        for url in stack.urls(service) {
            total += stack
                .metric(
                    &url,
                    &format!("messaging_consumed_total{{queue=\"{queue}\",outcome=\"ack\"}}"),
                )
                .await;
        }
        assert!(total >= 60.0, "{service} acked {total}");
    }
    stack.stop().await;
}
