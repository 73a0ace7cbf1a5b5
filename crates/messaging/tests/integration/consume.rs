use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use lapin::{BasicProperties, options::BasicPublishOptions, types::FieldTable};
use messaging::{
    ConsumerOptions, Handler, IncomingMessage, Outcome, OutgoingMessage, consumer::header_str,
    consumer::header_u32, consumer::headers,
};

use crate::support::{self, Fixture, Log};

/// Fails with `Retry` for the first `failures` runs of each message, then acks.
struct Flaky {
    failures: u32,
    runs: Log<(u32, Instant)>,
    done: Arc<AtomicU32>,
}

impl Handler for Flaky {
    async fn handle(&self, message: IncomingMessage) -> Outcome {
        self.runs
            .lock()
            .expect("log")
            .push((message.attempt, Instant::now()));
        if message.attempt <= self.failures {
            Outcome::Retry(format!("transient failure {}", message.attempt))
        } else {
            self.done.fetch_add(1, Ordering::SeqCst);
            Outcome::Ack
        }
    }
}

struct Rejects;

impl Handler for Rejects {
    async fn handle(&self, message: IncomingMessage) -> Outcome {
        Outcome::Reject(format!("undecodable payload of {}", message.message_type))
    }
}

fn options() -> ConsumerOptions {
    ConsumerOptions {
        prefetch: 16,
        concurrency: 4,
        app_id: "test".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_failing_transiently_twice_then_succeeding_processes_once_after_growing_delays() {
    let mut fixture = Fixture::without_database(support::fast_retry(5)).await;
    let runs = support::log();
    let done = Arc::new(AtomicU32::new(0));
    fixture.consume(
        Flaky {
            failures: 2,
            runs: runs.clone(),
            done: done.clone(),
        },
        options(),
    );
    fixture.publish("k", b"x").await;

    testkit::wait_until(
        "success after two retries",
        Duration::from_secs(10),
        || async { done.load(Ordering::SeqCst) == 1 },
    )
    .await;

    let runs = runs.lock().expect("log").clone();
    let attempts: Vec<u32> = runs.iter().map(|r| r.0).collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    assert!(
        runs[1].1 - runs[0].1 >= Duration::from_millis(200),
        "first retry waited its delay"
    );
    assert!(
        runs[2].1 - runs[1].1 >= Duration::from_millis(400),
        "second retry waited longer"
    );
    fixture.stop().await;
    assert_eq!(fixture.dlq_ready().await, 0);
    assert_eq!(done.load(Ordering::SeqCst), 1, "processed exactly once");
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_always_failing_dead_letters_after_the_configured_attempts_with_the_count() {
    let mut fixture = Fixture::without_database(support::fast_retry(3)).await;
    let runs = support::log();
    fixture.consume(
        Flaky {
            failures: u32::MAX,
            runs: runs.clone(),
            done: Arc::new(AtomicU32::new(0)),
        },
        options(),
    );
    let message = fixture.publish("order.placed", b"x").await;

    let dead = testkit::wait_for(
        "the message in the DLQ",
        Duration::from_secs(10),
        || async { fixture.get_dead().await },
    )
    .await;

    let headers = dead.delivery.properties.headers().clone().expect("headers");
    assert_eq!(header_u32(&headers, headers::ATTEMPTS), Some(3));
    let reason = header_str(&headers, headers::DEATH_REASON).expect("reason");
    assert!(
        reason.contains("after 3 attempts") && reason.contains("transient failure 3"),
        "{reason}"
    );
    assert_eq!(
        header_str(&headers, headers::ORIGINAL_ROUTING_KEY).as_deref(),
        Some("order.placed")
    );
    assert_eq!(
        dead.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some(message.message_id.as_str()),
        "the same message id"
    );
    assert_eq!(runs.lock().expect("log").len(), 3, "no run after giving up");
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_policy_without_delays_dead_letters_at_the_first_failure() {
    // No delay, no retry queue: there is nowhere for a retry to wait.
    let policy = messaging::RetryPolicy {
        delays: Vec::new(),
        max_attempts: 5,
    };
    let mut fixture = Fixture::without_database(policy).await;
    let runs = support::log();
    fixture.consume(
        Flaky {
            failures: u32::MAX,
            runs: runs.clone(),
            done: Arc::new(AtomicU32::new(0)),
        },
        options(),
    );
    fixture.publish("k", b"x").await;

    let dead = testkit::wait_for(
        "the message in the DLQ",
        Duration::from_secs(10),
        || async { fixture.get_dead().await },
    )
    .await;
    let headers = dead.delivery.properties.headers().clone().expect("headers");
    assert_eq!(header_u32(&headers, headers::ATTEMPTS), Some(1));
    assert_eq!(
        header_str(&headers, headers::DEATH_CLASS).as_deref(),
        Some("exhausted")
    );
    assert_eq!(runs.lock().expect("log").len(), 1, "one run only");
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_goes_to_the_dlq_at_once_with_a_reason() {
    let mut fixture = Fixture::without_database(support::fast_retry(5)).await;
    let consumer = fixture.consume(Rejects, options());
    // No message id and no type: rejected by the runtime before any handler.
    fixture
        .channel()
        .basic_publish(
            fixture.names.exchange.as_str().into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"\xff\xfe garbage",
            BasicProperties::default().with_headers(FieldTable::default()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    // A well-formed envelope that the handler finds undecodable.
    fixture
        .publisher()
        .publish(&OutgoingMessage::new(
            &fixture.names.exchange,
            "k",
            "shop.Unknown",
            b"?".to_vec(),
        ))
        .await
        .expect("publish");

    let mut reasons = Vec::new();
    for _ in 0..2 {
        let dead = testkit::wait_for(
            "a poison message in the DLQ",
            Duration::from_secs(10),
            || async { fixture.get_dead().await },
        )
        .await;
        let headers = dead.delivery.properties.headers().clone().expect("headers");
        reasons.push(header_str(&headers, headers::DEATH_REASON).expect("reason"));
    }
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            "missing message_id".to_owned(),
            "undecodable payload of shop.Unknown".to_owned()
        ]
    );
    let stats = consumer.stats;
    // The counter moves just after the broker confirmed the DLQ copy.
    testkit::wait_until("both counted", Duration::from_secs(10), || async {
        stats.dead_lettered.load(Ordering::Relaxed) == 2
    })
    .await;
    assert_eq!(stats.retried.load(Ordering::Relaxed), 0, "never retried");
    fixture.finish().await;
}

/// Holds each message for a while, so shutdown finds handlers in flight.
struct Slow {
    started: Arc<AtomicU32>,
    finished: Arc<AtomicU32>,
}

impl Handler for Slow {
    async fn handle(&self, _message: IncomingMessage) -> Outcome {
        self.started.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(700)).await;
        self.finished.fetch_add(1, Ordering::SeqCst);
        Outcome::Ack
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_lets_in_flight_handlers_finish_and_ack_and_leaves_the_rest_queued() {
    let mut fixture = Fixture::without_database(support::fast_retry(3)).await;
    let batch: Vec<_> = (0..10)
        .map(|_| OutgoingMessage::new(&fixture.names.exchange, "k", "t", b"x".to_vec()))
        .collect();
    assert!(
        fixture
            .publisher()
            .publish_batch(&batch)
            .await
            .iter()
            .all(Result::is_ok)
    );
    let started = Arc::new(AtomicU32::new(0));
    let finished = Arc::new(AtomicU32::new(0));
    fixture.consume(
        Slow {
            started: started.clone(),
            finished: finished.clone(),
        },
        ConsumerOptions {
            prefetch: 10,
            concurrency: 4,
            app_id: "test".into(),
            ..Default::default()
        },
    );
    testkit::wait_until("four handlers running", Duration::from_secs(10), || async {
        started.load(Ordering::SeqCst) == 4
    })
    .await;

    fixture.stop().await;

    assert_eq!(
        finished.load(Ordering::SeqCst),
        4,
        "every started handler finished"
    );
    let stats_acked = 4;
    // The four in flight were acked; the six prefetched but not started are back.
    testkit::wait_until(
        "the unstarted messages requeued",
        Duration::from_secs(10),
        || async { fixture.ready().await == 10 - stats_acked },
    )
    .await;
    fixture.finish().await;
}

/// Records whether each message arrived with a valid parent trace context.
struct TraceSeen(Log<bool>);

impl Handler for TraceSeen {
    async fn handle(&self, message: IncomingMessage) -> Outcome {
        use opentelemetry::trace::TraceContextExt;
        let valid = message.trace_context.span().span_context().is_valid();
        self.0.lock().expect("log").push(valid);
        Outcome::Ack
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_traceparent_never_fails_the_message() {
    let mut fixture = Fixture::without_database(support::fast_retry(3)).await;
    let seen = support::log();
    let consumer = fixture.consume(TraceSeen(seen.clone()), options());
    let mut message = OutgoingMessage::new(&fixture.names.exchange, "k", "t", b"x".to_vec());
    // Published with a raw client so the publisher does not overwrite the header.
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        lapin::types::AMQPValue::LongString("00-garbage-!!-zz".into()),
    );
    message.headers = headers.clone();
    fixture
        .channel()
        .basic_publish(
            fixture.names.exchange.as_str().into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default()
                .with_message_id(uuid::Uuid::new_v4().to_string().into())
                .with_type("t".into())
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");

    testkit::wait_until("the message handled", Duration::from_secs(10), || async {
        !seen.lock().expect("log").is_empty()
    })
    .await;

    assert_eq!(
        *seen.lock().expect("log"),
        vec![false],
        "handled, as a new trace"
    );
    // The handler logs before the runtime acks: wait for the ack, do not race it.
    let stats = consumer.stats;
    testkit::wait_until("the message acked", Duration::from_secs(10), || async {
        stats.acked.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(fixture.dlq_ready().await, 0);
    fixture.finish().await;
}
