//! A consumer whose dependency is unavailable pauses instead of spending retries,
//! resumes by itself, and survives losing its connection while paused.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use messaging::{ConsumerOptions, Handler, IncomingMessage, Outcome, OutgoingMessage, Publisher};

use crate::support::{self, Fixture, Log};

/// Answers `Unavailable` while its "database" is down, acks once it is up.
struct NeedsDatabase {
    up: Arc<AtomicBool>,
    probes: Arc<AtomicU32>,
    acked: Log<(String, u32)>,
}

impl Handler for NeedsDatabase {
    async fn handle(&self, message: IncomingMessage) -> Outcome {
        if !self.up.load(Ordering::SeqCst) {
            return Outcome::Unavailable("database: connection refused".into());
        }
        self.acked.lock().expect("log").push((
            String::from_utf8_lossy(&message.payload).into_owned(),
            message.attempt,
        ));
        Outcome::Ack
    }

    async fn ready(&self) -> Result<(), String> {
        self.probes.fetch_add(1, Ordering::SeqCst);
        if self.up.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("still down".into())
        }
    }
}

fn options() -> ConsumerOptions {
    ConsumerOptions {
        prefetch: 8,
        concurrency: 4,
        ..ConsumerOptions::default()
    }
}

async fn publish_numbered(publisher: &Publisher, exchange: &str, n: usize) {
    let messages: Vec<OutgoingMessage> = (0..n)
        .map(|i| OutgoingMessage::new(exchange, "k", "t", format!("m{i}").into_bytes()))
        .collect();
    assert!(
        publisher
            .publish_batch(&messages)
            .await
            .iter()
            .all(Result::is_ok)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_pauses_the_consumer_spends_no_retry_and_everything_is_processed_once_it_ends() {
    // One attempt only: a single spent retry would dead-letter.
    let mut fixture = Fixture::without_database(support::fast_retry(1)).await;
    let up = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(AtomicU32::new(0));
    let acked = support::log();
    let probe = fixture.consume(
        NeedsDatabase {
            up: up.clone(),
            probes: probes.clone(),
            acked: acked.clone(),
        },
        options(),
    );
    publish_numbered(&fixture.publisher(), &fixture.names.exchange, 20).await;
    testkit::wait_until("the consumer to pause", Duration::from_secs(10), || async {
        probe.paused().is_some()
    })
    .await;
    testkit::wait_until("a few probes", Duration::from_secs(10), || async {
        probes.load(Ordering::SeqCst) >= 3
    })
    .await;
    // Not taken: what the consumer does not hold is still in the queue.
    assert!(fixture.ready().await >= 12, "deliveries stay in the queue");
    up.store(true, Ordering::SeqCst);
    testkit::wait_until("all 20 processed", Duration::from_secs(20), || async {
        acked.lock().expect("log").len() == 20
    })
    .await;
    assert!(probe.paused().is_none());
    assert!(
        acked
            .lock()
            .expect("log")
            .iter()
            .all(|(_, attempt)| *attempt == 1),
        "no retry was spent on the outage"
    );
    assert_eq!(fixture.dlq_ready().await, 0);
    assert_eq!(probe.stats.pauses.load(Ordering::SeqCst), 1);
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_that_loses_its_connection_while_paused_resubscribes_and_resumes() {
    let mut fixture = Fixture::without_database(support::fast_retry(1)).await;
    let (proxy, broker) = fixture.proxied_broker(|_| {}).await;
    let up = Arc::new(AtomicBool::new(false));
    let acked = support::log();
    let probe = fixture.consume_on(
        broker,
        NeedsDatabase {
            up: up.clone(),
            probes: Arc::new(AtomicU32::new(0)),
            acked: acked.clone(),
        },
        options(),
    );
    publish_numbered(&fixture.publisher(), &fixture.names.exchange, 10).await;
    testkit::wait_until("the consumer to pause", Duration::from_secs(10), || async {
        probe.paused().is_some()
    })
    .await;
    proxy.sever();
    testkit::wait_until(
        "re-subscribed after the cut",
        Duration::from_secs(20),
        || async { probe.stats.subscriptions.load(Ordering::SeqCst) >= 2 && probe.is_subscribed() },
    )
    .await;
    up.store(true, Ordering::SeqCst);
    testkit::wait_until("all 10 processed", Duration::from_secs(20), || async {
        let acked = acked.lock().expect("log");
        let mut bodies: Vec<&str> = acked.iter().map(|(b, _)| b.as_str()).collect();
        bodies.sort_unstable();
        bodies.dedup();
        bodies.len() == 10
    })
    .await;
    fixture.finish().await;
}
