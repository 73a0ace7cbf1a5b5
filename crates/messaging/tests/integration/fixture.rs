//! The fixture itself: a test that panics before `finish` leaves no queue,
//! exchange or database behind.

use std::{sync::atomic::Ordering, time::Duration};

use lapin::{
    ExchangeKind,
    options::{ExchangeDeclareOptions, QueueDeclareOptions},
};
use messaging::{FieldTable, Handler, IncomingMessage, Outcome};
use sqlx::Connection;

use crate::support::{self, Fixture};

struct Acks;

impl Handler for Acks {
    async fn handle(&self, _message: IncomingMessage) -> Outcome {
        Outcome::Ack
    }
}

/// What a fixture made, by name.
#[derive(Debug)]
struct Made {
    queues: Vec<String>,
    exchanges: Vec<String>,
    database: String,
}

impl Made {
    fn of(fixture: &Fixture) -> Self {
        Self {
            queues: fixture.names.queue.queue_names(),
            exchanges: vec![fixture.names.exchange.clone(), fixture.names.dlx.clone()],
            database: fixture.db().name.clone(),
        }
    }

    /// How many of the queues, exchanges and database exist.
    async fn existing(&self) -> usize {
        let mut found = 0;
        for queue in &self.queues {
            found += usize::from(queue_exists(queue).await);
        }
        for exchange in &self.exchanges {
            found += usize::from(exchange_exists(exchange).await);
        }
        found + usize::from(database_exists(&self.database).await)
    }

    fn count(&self) -> usize {
        self.queues.len() + self.exchanges.len() + 1
    }
}

/// A passive declare on a channel of its own (a missing queue closes it).
async fn queue_exists(name: &str) -> bool {
    let (conn, ch) = support::raw_channel().await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = ch
        .queue_declare(name.into(), passive, FieldTable::default())
        .await
        .is_ok();
    let _ = conn.close(200, "bye".into()).await;
    found
}

async fn exchange_exists(name: &str) -> bool {
    let (conn, ch) = support::raw_channel().await;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = ch
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = conn.close(200, "bye".into()).await;
    found
}

async fn database_exists(name: &str) -> bool {
    let mut admin = sqlx::PgConnection::connect(&testkit::database_url())
        .await
        .expect("admin connection");
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut admin)
        .await
        .expect("pg_database");
    let _ = admin.close().await;
    found.is_some()
}

/// A fixture with a relay and a consumer at work.
async fn busy_fixture() -> Fixture {
    let mut fixture = Fixture::new(support::fast_retry(3)).await;
    let relay = fixture.relay();
    let consumer = fixture.consume(Acks, support::consumer_options());
    fixture.commit_event("k").await;
    testkit::wait_until(
        "the event relayed and consumed",
        Duration::from_secs(10),
        || async {
            relay.status().published == 1 && consumer.stats.acked.load(Ordering::Relaxed) == 1
        },
    )
    .await;
    fixture
}

#[tokio::test(flavor = "multi_thread")]
async fn a_test_task_that_panics_leaves_no_queue_exchange_or_database_behind() {
    let (made_tx, made_rx) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let fixture = busy_fixture().await;
        let made = Made::of(&fixture);
        assert_eq!(made.existing().await, made.count(), "all made: {made:?}");
        let _ = made_tx.send(made);
        panic!("a failing test");
    });

    let failed = failing.await.expect_err("the task panicked");
    assert!(failed.is_panic(), "{failed:?}");
    let made = made_rx.await.expect("the fixture was made");
    assert_eq!(made.existing().await, 0, "left behind of {made:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fixture_unwound_past_on_the_test_thread_leaves_nothing_behind() {
    let fixture = busy_fixture().await;
    let made = Made::of(&fixture);
    assert_eq!(made.existing().await, made.count(), "all made: {made:?}");

    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _fixture = fixture;
        panic!("a failing test");
    }));

    assert!(unwound.is_err());
    assert_eq!(made.existing().await, 0, "left behind of {made:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finished_fixture_leaves_nothing_behind() {
    let fixture = busy_fixture().await;
    let made = Made::of(&fixture);

    fixture.finish().await;

    assert_eq!(made.existing().await, 0, "left behind of {made:?}");
}
