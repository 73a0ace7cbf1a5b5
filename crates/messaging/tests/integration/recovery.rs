use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use lapin::options::QueueDeleteOptions;
use messaging::{Handler, IncomingMessage, Outcome, OutgoingMessage, Publisher};

use crate::support::{self, Fixture};

struct Collect(Arc<Mutex<HashSet<String>>>);

impl Handler for Collect {
    async fn handle(&self, message: IncomingMessage) -> Outcome {
        self.0.lock().expect("set").insert(message.message_id);
        Outcome::Ack
    }
}

/// Publishes until the broker confirms; returns how many attempts failed.
async fn publish_until_confirmed(publisher: &Publisher, message: &OutgoingMessage) -> u32 {
    let mut failures = 0;
    while publisher.publish(message).await.is_err() {
        failures += 1;
        assert!(failures < 2_000, "publishing never recovered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    failures
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_published_before_during_and_after_connection_cuts_are_all_consumed() {
    let mut fixture = Fixture::without_database(support::fast_retry(3)).await;
    let (proxy, broker) = fixture.proxied_broker(|_| {}).await;
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let consumer = fixture.consume_on(
        broker.clone(),
        Collect(seen.clone()),
        support::consumer_options(),
    );
    let publisher =
        Publisher::new(broker.clone(), "test").with_confirm_timeout(Duration::from_secs(5));
    let messages: Vec<_> = (0..300)
        .map(|i| {
            OutgoingMessage::new(
                &fixture.names.exchange,
                format!("k.{i}"),
                "t",
                vec![1u8; 64],
            )
        })
        .collect();

    let mut failed_publishes = 0;
    let mut cuts = 0u64;
    let subscriptions = || {
        consumer
            .stats
            .subscriptions
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    for (i, message) in messages.iter().enumerate() {
        if i % 100 == 50 || i == 120 {
            // Each cut lands on a subscribed consumer, so each one costs it a
            // subscription that it must win back (a cut during a re-subscribe
            // would merge two losses into one).
            testkit::wait_until(
                "the consumer subscribed again",
                Duration::from_secs(10),
                || async { subscriptions() > cuts },
            )
            .await;
            cuts += 1;
        }
        if i % 100 == 50 {
            proxy.sever();
        }
        if i == 120 {
            // A longer outage: new connections are refused for a while.
            proxy.block();
            let blocked = broker.clone();
            testkit::wait_until(
                "the broker handle to notice",
                Duration::from_secs(10),
                || {
                    let b = blocked.clone();
                    async move { !b.is_connected() }
                },
            )
            .await;
            assert!(
                publisher.publish(message).await.is_err(),
                "no success while disconnected"
            );
            proxy.restore();
        }
        failed_publishes += publish_until_confirmed(&publisher, message).await;
    }

    let expected: HashSet<String> = messages.iter().map(|m| m.message_id.clone()).collect();
    let stats = consumer.stats.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !seen.lock().expect("set").is_superset(&expected) {
        if tokio::time::Instant::now() > deadline {
            let ready = fixture.ready().await;
            let consumed = seen.lock().expect("set").intersection(&expected).count();
            panic!(
                "not every confirmed message was consumed: seen {consumed} of {}, subscribed {}, connected {}, stats {stats:?}, ready {ready}",
                expected.len(),
                consumer.is_subscribed(),
                broker.is_connected(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failed_publishes > 0, "the cuts hit publishing");
    assert!(
        broker.reconnects() >= 3,
        "reconnected after each cut: {}",
        broker.reconnects()
    );
    assert!(consumer.is_subscribed(), "the consumer resumed by itself");
    assert!(
        subscriptions() > cuts,
        "subscribed again after each of the {cuts} cuts: {}",
        subscriptions()
    );
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_whose_queue_is_deleted_re_declares_it_and_resumes() {
    let mut fixture = Fixture::without_database(support::fast_retry(3)).await;
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let consumer = fixture.consume(Collect(seen.clone()), support::consumer_options());
    testkit::wait_until("subscribed", Duration::from_secs(10), || async {
        consumer.is_subscribed()
    })
    .await;

    fixture
        .channel()
        .queue_delete(
            fixture.names.queue.name.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .expect("delete queue");

    let stats = consumer.stats.clone();
    testkit::wait_until("re-subscribed", Duration::from_secs(10), || async {
        stats
            .subscriptions
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
            && consumer.is_subscribed()
    })
    .await;
    let message = OutgoingMessage::new(&fixture.names.exchange, "after.delete", "t", b"x".to_vec());
    fixture
        .publisher()
        .publish(&message)
        .await
        .expect("routable again: bindings restored");
    testkit::wait_until(
        "consumed after re-declare",
        Duration::from_secs(10),
        || async { seen.lock().expect("set").contains(&message.message_id) },
    )
    .await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_in_flight_when_the_connection_dies_fails_promptly_and_never_falsely_succeeds() {
    let mut fixture = Fixture::without_database(support::fast_retry(3)).await;
    let (proxy, broker) = fixture.proxied_broker(|_| {}).await;
    let publisher = Publisher::new(broker.clone(), "test");
    let exchange = fixture.names.exchange.clone();
    publisher
        .publish(&OutgoingMessage::new(&exchange, "warm", "t", vec![]))
        .await
        .expect("warm up");
    let batch: Vec<_> = (0..3_000)
        .map(|_| OutgoingMessage::new(&exchange, "k", "t", vec![0u8; 1024]))
        .collect();
    let started = std::time::Instant::now();

    let in_flight = tokio::spawn({
        let publisher = publisher.clone();
        let batch = batch.clone();
        async move { publisher.publish_batch(&batch).await }
    });
    tokio::task::yield_now().await;
    proxy.block();
    let results = in_flight.await.expect("batch task");

    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no hang: {:?}",
        started.elapsed()
    );
    assert!(results.iter().any(Result::is_err), "the cut hit the batch");
    // Every reported success is really in the queue.
    let confirmed: HashSet<String> = batch
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .map(|(m, _)| m.message_id.clone())
        .collect();
    let mut queued = HashSet::new();
    while let Some(got) = fixture.get().await {
        if let Some(id) = got.delivery.properties.message_id() {
            queued.insert(id.to_string());
        }
    }
    assert!(
        queued.is_superset(&confirmed),
        "a publish reported success without reaching the queue"
    );
    proxy.restore();
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnect_that_freezes_while_declaring_the_topology_gives_up_and_tries_again() {
    let mut fixture = Fixture::without_database(support::fast_retry(3)).await;
    // No heartbeats: nothing but the supervisor's own bound notices a peer that
    // stopped answering.
    let (proxy, broker) = fixture
        .proxied_broker(|settings| settings.heartbeat = Duration::ZERO)
        .await;
    proxy.stall_next_declare();
    proxy.sever();
    testkit::wait_until(
        "the reconnect to freeze mid-declare",
        Duration::from_secs(10),
        || async { proxy.stalls() == 1 },
    )
    .await;
    testkit::wait_until("connected again", Duration::from_secs(30), || async {
        broker.is_connected()
    })
    .await;
    assert!(broker.reconnects() >= 1);
    assert!(broker.heartbeat().is_alive());
    let publisher = Publisher::new(broker.clone(), "test");
    publish_until_confirmed(
        &publisher,
        &OutgoingMessage::new(&fixture.names.exchange, "k", "t", b"after".to_vec()),
    )
    .await;
    fixture.finish().await;
}
