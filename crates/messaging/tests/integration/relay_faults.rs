//! Rows the broker refuses or that cannot be read back off alone and end parked,
//! while every other row flows.

use std::time::Duration;

use messaging::{Backoff, RelayOptions};

use crate::support::{self, Fixture};

fn parking_relay() -> RelayOptions {
    RelayOptions {
        park_after: 3,
        row_backoff: Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        },
        ..support::fast_relay()
    }
}

/// Waits until the queue holds `n` ready messages (the good rows went out).
async fn wait_for_ready(fixture: &Fixture, n: u32) {
    testkit::wait_until(
        &format!("{n} good rows in the queue"),
        Duration::from_secs(15),
        || async { fixture.ready().await == n },
    )
    .await;
}

async fn commit_good_rows(fixture: &Fixture, n: usize) {
    for i in 0..n {
        fixture.commit_event(&format!("good.{i}")).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_for_a_missing_exchange_is_parked_with_its_reason_and_the_rows_behind_it_flow() {
    let mut fixture = Fixture::new(support::fast_retry(3)).await;
    // The bad row is first in seq order: the one every claim meets first.
    let missing = format!("{}.missing", fixture.names.exchange);
    let bad = support::commit_event(fixture.pool(), &missing, "bad").await;
    commit_good_rows(&fixture, 20).await;
    let relay = fixture.relay_with(parking_relay());
    wait_for_ready(&fixture, 20).await;
    let (failures, error): (i32, String) = testkit::wait_for(
        "the bad row to be parked",
        Duration::from_secs(30),
        || async {
            sqlx::query_as(
                "SELECT failures, last_error FROM outbox WHERE id = $1 AND parked_at IS NOT NULL",
            )
            .bind(bad)
            .fetch_optional(fixture.pool())
            .await
            .expect("query")
        },
    )
    .await;
    assert_eq!(failures, 3, "parked after park_after refusals");
    assert!(error.contains("404"), "the reason is kept: {error}");
    testkit::wait_until("the status to count it", Duration::from_secs(5), || async {
        let status = relay.status();
        status.parked == 1 && status.backlog == 0
    })
    .await;
    // A parked row is not claimed again.
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM outbox WHERE id = $1")
        .bind(bad)
        .fetch_one(fixture.pool())
        .await
        .expect("attempts");
    commit_good_rows(&fixture, 1).await;
    wait_for_ready(&fixture, 21).await;
    let later: i32 = sqlx::query_scalar("SELECT attempts FROM outbox WHERE id = $1")
        .bind(bad)
        .fetch_one(fixture.pool())
        .await
        .expect("attempts");
    assert_eq!(later, attempts, "a parked row stays where it is");
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_row_is_parked_at_once_and_the_rows_behind_it_flow() {
    let mut fixture = Fixture::new(support::fast_retry(3)).await;
    // Stored headers must be a map of strings; this one holds a number.
    sqlx::query(
        "INSERT INTO outbox (id, exchange, routing_key, type, payload, headers)
         VALUES (gen_random_uuid(), $1, 'bad', 't', '\\x00', '{\"x-count\": 1}')",
    )
    .bind(&fixture.names.exchange)
    .execute(fixture.pool())
    .await
    .expect("insert");
    commit_good_rows(&fixture, 10).await;
    fixture.relay_with(parking_relay());
    wait_for_ready(&fixture, 10).await;
    let error: String =
        testkit::wait_for("the row to be parked", Duration::from_secs(10), || async {
            sqlx::query_scalar("SELECT last_error FROM outbox WHERE parked_at IS NOT NULL")
                .fetch_optional(fixture.pool())
                .await
                .expect("query")
        })
        .await;
    assert!(error.contains("unreadable"), "{error}");
    assert_eq!(
        fixture
            .count("SELECT count(*) FROM outbox WHERE published_at IS NULL AND parked_at IS NULL")
            .await,
        0
    );
    fixture.finish().await;
}
