//! Admission control: while orders queue up in a saga that is still moving,
//! new orders are answered 429 with `Retry-After` and nothing is written; once
//! the queue is gone, intake opens again. An outage (nothing moving) never sheds.

use std::time::Duration;

use e2e::{Options, Stack};
use serde_json::Value;

/// The order-service's database.
fn orders_db(stack: &Stack) -> &sqlx::PgPool {
    &stack.databases[0].pool
}

/// Inserts `count` pending orders created a second ago: a queue the saga has
/// not worked through yet.
async fn queue_up(stack: &Stack, count: i64) {
    sqlx::query(
        "INSERT INTO orders (id, customer_id, status, created_at, updated_at)
         SELECT gen_random_uuid(), 'queued', 'pending', now() - interval '1 second', now()
         FROM generate_series(1, $1)",
    )
    .bind(count)
    .execute(orders_db(stack))
    .await
    .expect("queue up pending orders");
}

async fn post_order(stack: &Stack, sku: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/orders", stack.order()))
        .json(&serde_json::json!({"customer_id": "ada", "items": [{"sku": sku, "quantity": 1}]}))
        .send()
        .await
        .expect("POST /orders")
}

fn options() -> Options {
    Options {
        env: vec![
            ("order-service", "ADMISSION_TARGET".into(), "200ms".into()),
            ("order-service", "ADMISSION_MIN_PENDING".into(), "50".into()),
        ],
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_in_a_moving_saga_answers_new_orders_429_with_retry_after_until_it_is_gone() {
    let stack = Stack::start_with(options()).await;
    let sku = testkit::unique("WIDGET");
    stack.set_stock(&sku, 1_000).await;
    queue_up(&stack, 100).await;

    // A queue alone is no overload while nothing completes (an outage looks
    // the same): intake stays open.
    let first = stack.place("ada", &[(&sku, 1)]).await;
    assert_eq!(stack.settled(&first).await["status"], "confirmed");

    // The saga has moved (an order just completed) and 100 orders wait: shed.
    let mut shed = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut accepted = vec![first];
    while shed.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no 429 while 100 orders queued"
        );
        let response = post_order(&stack, &sku).await;
        match response.status().as_u16() {
            202 => {
                let v: Value = response.json().await.expect("json");
                let id = v["id"].as_str().expect("id").to_owned();
                stack.settled(&id).await;
                accepted.push(id);
            }
            429 => shed = Some(response),
            other => panic!("POST /orders answered {other}"),
        }
    }
    let shed = shed.expect("a 429");
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
    let count_before: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(orders_db(&stack))
        .await
        .expect("count");
    assert_eq!(
        post_order(&stack, &sku).await.status(),
        429,
        "still shedding"
    );
    let count_after: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(orders_db(&stack))
        .await
        .expect("count");
    assert_eq!(count_before, count_after, "a shed order writes nothing");
    assert_eq!(
        stack
            .metric(&stack.order(), "orders_admission_shedding ")
            .await,
        1.0
    );
    assert!(stack.metric(&stack.order(), "orders_shed ").await >= 2.0);

    // The queue is worked off: intake opens again.
    sqlx::query("UPDATE orders SET status = 'rejected' WHERE customer_id = 'queued'")
        .execute(orders_db(&stack))
        .await
        .expect("work off the queue");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = post_order(&stack, &sku).await;
        if response.status() == 202 {
            let v: Value = response.json().await.expect("json");
            accepted.push(v["id"].as_str().expect("id").to_owned());
            break;
        }
        assert_eq!(response.status(), 429);
        assert!(
            tokio::time::Instant::now() < deadline,
            "intake did not open again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in &accepted {
        assert_eq!(
            stack.settled(id).await["status"],
            "confirmed",
            "accepted order {id}"
        );
    }
    assert_eq!(
        stack
            .metric(&stack.order(), "orders_admission_shedding ")
            .await,
        0.0
    );
    stack.stop().await;
}
