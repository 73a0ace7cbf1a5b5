//! Admission control: while the orders completing now waited longer than
//! `ADMISSION_TARGET`, new orders are answered 429 with `Retry-After` and
//! nothing is written; once the wait comes down, intake opens again. While
//! nothing completes (an outage) intake stays open.

use std::time::Duration;

use e2e::{Options, Stack};
use serde_json::Value;

async fn post_order(stack: &Stack, sku: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/orders", stack.order()))
        .json(&serde_json::json!({"customer_id": "ada", "items": [{"sku": sku, "quantity": 1}]}))
        .send()
        .await
        .expect("POST /orders")
}

async fn order_count(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&stack.databases[0].pool)
        .await
        .expect("count")
}

/// Posts orders until one is answered `status`, keeping the ids of the accepted.
async fn post_until(
    stack: &Stack,
    sku: &str,
    status: u16,
    accepted: &mut Vec<String>,
) -> reqwest::Response {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let response = post_order(stack, sku).await;
        if response.status() == status {
            return response;
        }
        match response.status().as_u16() {
            202 => {
                let v: Value = response.json().await.expect("json");
                accepted.push(v["id"].as_str().expect("id").to_owned());
            }
            429 => {}
            other => panic!("POST /orders answered {other}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {status} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_are_refused_with_429_while_a_backlog_drains_and_accepted_during_an_outage_and_after()
 {
    let mut stack = Stack::start_with(Options {
        held_back: vec!["inventory-service"],
        env: vec![("order-service", "ADMISSION_TARGET".into(), "300ms".into())],
        ..Options::default()
    })
    .await;
    let sku = testkit::unique("WIDGET");

    // Inventory is away: nothing completes, every order is accepted into the outbox.
    let mut accepted = Vec::new();
    for _ in 0..40 {
        let response = post_order(&stack, &sku).await;
        assert_eq!(response.status(), 202, "intake stays open during an outage");
        let v: Value = response.json().await.expect("json");
        accepted.push(v["id"].as_str().expect("id").to_owned());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Inventory is back: the backlog completes, each order having waited > 500 ms.
    stack.start_service("inventory-service").await;
    stack.set_stock(&sku, 10_000).await;
    let shed = post_until(&stack, &sku, 429, &mut accepted).await;
    let retry_after: u64 = shed
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in whole seconds");
    assert!(retry_after >= 1, "Retry-After {retry_after}");
    assert_eq!(
        shed.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let problem: Value = shed.json().await.expect("problem json");
    assert_eq!(problem["status"], 429);
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("faster than the shop completes them")),
        "{problem}"
    );
    let before = order_count(&stack).await;
    let again = post_order(&stack, &sku).await.status();
    if again == 429 {
        assert_eq!(
            order_count(&stack).await,
            before,
            "a refused order writes nothing"
        );
    }
    assert!(stack.metric(&stack.order(), "orders_shed ").await >= 1.0);

    // The backlog is gone and new orders complete quickly: intake opens again.
    post_until(&stack, &sku, 202, &mut accepted).await;
    // Nothing accepted is lost (the backlog may have reached inventory before
    // its stock did: rejected is an end too).
    for id in &accepted {
        let status = stack.settled(id).await["status"].clone();
        assert!(
            status == "confirmed" || status == "rejected",
            "accepted order {id} ended {status}"
        );
    }
    testkit::wait_until(
        "shedding gauge back to 0",
        Duration::from_secs(10),
        || async {
            stack
                .metric(&stack.order(), "orders_admission_shedding ")
                .await
                == 0.0
        },
    )
    .await;
    stack.stop().await;
}
