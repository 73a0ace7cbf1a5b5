//! Admission control: while the orders completing now waited longer than
//! `ADMISSION_TARGET`, a share of new orders is answered 429 with `Retry-After`
//! and nothing is written for them; once the wait comes down, intake opens
//! again. While nothing completes (an outage) intake stays open.

use std::time::Duration;

use e2e::{Options, Stack};
use serde_json::Value;

async fn post_order(http: &reqwest::Client, url: &str, sku: &str) -> reqwest::Response {
    http.post(format!("{url}/orders"))
        .json(&serde_json::json!({"customer_id": "ada", "items": [{"sku": sku, "quantity": 1}]}))
        .send()
        .await
        .expect("POST /orders")
}

/// What one POST was answered.
#[derive(Debug)]
enum Answer {
    Accepted(String),
    Refused {
        retry_after: Option<u64>,
        problem: Value,
        content_type: Option<String>,
    },
}

async fn answer(response: reqwest::Response) -> Answer {
    match response.status().as_u16() {
        202 => {
            let v: Value = response.json().await.expect("json");
            Answer::Accepted(v["id"].as_str().expect("id").to_owned())
        }
        429 => Answer::Refused {
            retry_after: response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            content_type: response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            problem: response.json().await.expect("problem json"),
        },
        other => panic!("POST /orders answered {other}"),
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
    let http = reqwest::Client::new();

    // Inventory is away: nothing completes, every order is accepted into the outbox.
    let mut answers = Vec::new();
    for _ in 0..40 {
        let a = answer(post_order(&http, &stack.order(), &sku).await).await;
        assert!(
            matches!(a, Answer::Accepted(_)),
            "intake stays open during an outage: {a:?}"
        );
        answers.push(a);
    }
    // The backlog has waited longer than the target before anything completes it.
    testkit::wait_until(
        "the backlog waited 500 ms",
        Duration::from_secs(10),
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT min(created_at) < now() - interval '500 milliseconds' FROM orders",
            )
            .fetch_one(&stack.databases[0].pool)
            .await
            .expect("oldest order")
        },
    )
    .await;

    // Orders keep coming from another client while inventory comes back and its
    // backlog completes, each order having waited over 500 ms: some are refused,
    // then intake opens again.
    let (url, poster_sku, poster_http) = (stack.order(), sku.clone(), http.clone());
    let poster = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut answers = Vec::new();
        let mut refused = false;
        while tokio::time::Instant::now() < deadline {
            let a = answer(post_order(&poster_http, &url, &poster_sku).await).await;
            let accepted = matches!(a, Answer::Accepted(_));
            refused |= !accepted;
            answers.push(a);
            if refused && accepted {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        answers
    });
    stack.start_service("inventory-service").await;
    stack.set_stock(&sku, 10_000).await;
    answers.extend(poster.await.expect("poster"));

    let refusals: Vec<&Answer> = answers
        .iter()
        .filter(|a| matches!(a, Answer::Refused { .. }))
        .collect();
    assert!(!refusals.is_empty(), "no 429 while the backlog drained");
    for refusal in &refusals {
        let Answer::Refused {
            retry_after,
            problem,
            content_type,
        } = refusal
        else {
            unreachable!("filtered")
        };
        assert!(
            retry_after.is_some_and(|s| (1..=10).contains(&s)),
            "Retry-After {retry_after:?}"
        );
        assert_eq!(content_type.as_deref(), Some("application/problem+json"));
        assert_eq!(problem["status"], 429);
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains("faster than the shop completes them")),
            "{problem}"
        );
    }
    assert!(
        matches!(answers.last(), Some(Answer::Accepted(_))),
        "intake opened again"
    );
    let accepted: Vec<&String> = answers
        .iter()
        .filter_map(|a| match a {
            Answer::Accepted(id) => Some(id),
            Answer::Refused { .. } => None,
        })
        .collect();
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&stack.databases[0].pool)
        .await
        .expect("count");
    assert_eq!(
        written,
        i64::try_from(accepted.len()).expect("count"),
        "a refused order writes nothing"
    );
    assert!(stack.metric(&stack.order(), "orders_shed ").await >= 1.0);
    // Nothing accepted is lost (the backlog may have reached inventory before
    // its stock did: rejected is an end too).
    for id in accepted {
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
