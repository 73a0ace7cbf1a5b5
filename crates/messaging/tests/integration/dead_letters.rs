//! Reading, redriving and purging a DLQ against the real broker.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use messaging::{
    ConsumerOptions, ConsumerProbe, DeadLetterError, DeadLetters, DeathClass, Handler, Inbox,
    IncomingMessage, Outcome, OutgoingMessage, Selection,
};
use opentelemetry::trace::TraceContextExt;

use crate::support::{self, Fixture, Log, Names};

/// Rejects every message while `broken`, then acks; logs what it acked.
struct Switch {
    broken: Arc<AtomicBool>,
    acked: Log<Seen>,
}

#[derive(Clone, Debug)]
struct Seen {
    message_id: String,
    redrives: u32,
    attempt: u32,
    routing_key: String,
    trace_id: String,
}

impl Handler for Switch {
    async fn handle(&self, message: IncomingMessage) -> Outcome {
        if self.broken.load(Ordering::SeqCst) {
            return Outcome::Reject(format!("cannot handle {} yet", message.message_id));
        }
        self.acked.lock().expect("log").push(Seen {
            trace_id: message
                .trace_context
                .span()
                .span_context()
                .trace_id()
                .to_string(),
            message_id: message.message_id,
            redrives: message.redrives,
            attempt: message.attempt,
            routing_key: message.routing_key,
        });
        Outcome::Ack
    }
}

/// One message at a time, so dead-lettering follows the publishing order.
fn serial() -> ConsumerOptions {
    ConsumerOptions {
        prefetch: 1,
        concurrency: 1,
        app_id: "test".into(),
        ..Default::default()
    }
}

/// A queue whose consumer dead-letters everything until it is mended, and a
/// [`DeadLetters`] client to read, redrive and purge the DLQ with.
struct DeadLettered {
    app: Fixture,
    broken: Arc<AtomicBool>,
    acked: Log<Seen>,
    consumer: ConsumerProbe,
    dead_letters: DeadLetters,
}

impl DeadLettered {
    /// A consumer that dead-letters `count` published messages; returns their
    /// ids in publishing order once all are in the DLQ.
    async fn with_dead_letters(count: usize) -> (Self, Vec<String>) {
        let mut app = Fixture::without_database(support::fast_retry(2)).await;
        let broken = Arc::new(AtomicBool::new(true));
        let acked = support::log();
        let consumer = app.consume(
            Switch {
                broken: broken.clone(),
                acked: acked.clone(),
            },
            serial(),
        );
        let publisher = app.publisher();
        let mut ids = Vec::new();
        for i in 0..count {
            let message = OutgoingMessage::new(
                &app.names.exchange,
                format!("order.e{i}"),
                "t",
                format!("payload {i}").into_bytes(),
            );
            publisher.publish(&message).await.expect("publish");
            ids.push(message.message_id);
        }
        testkit::wait_until(
            "every message dead-lettered",
            Duration::from_secs(20),
            || async { app.dlq_ready().await as usize == count },
        )
        .await;
        let dead_letters = DeadLetters::connect(support::settings(), "test")
            .await
            .expect("connect");
        let fixture = Self {
            app,
            broken,
            acked,
            consumer,
            dead_letters,
        };
        (fixture, ids)
    }

    fn queue(&self) -> &str {
        &self.app.names.queue.name
    }

    async fn listed_ids(&self) -> Vec<String> {
        self.dead_letters
            .list(self.queue(), 10_000)
            .await
            .expect("list")
            .letters
            .into_iter()
            .map(|l| l.message_id)
            .collect()
    }

    fn acked_ids(&self) -> Vec<String> {
        let acked = self.acked.lock().expect("log");
        acked.iter().map(|s| s.message_id.clone()).collect()
    }

    async fn wait_acked(&self, count: usize) {
        testkit::wait_until(
            "the redriven messages handled",
            Duration::from_secs(20),
            || async { self.acked.lock().expect("log").len() >= count },
        )
        .await;
    }

    fn stats(&self) -> Arc<messaging::ConsumerStats> {
        self.consumer.stats.clone()
    }

    async fn stop_consuming(&mut self) {
        self.app.stop().await;
    }

    async fn stop(mut self) {
        self.stop_consuming().await;
        self.dead_letters.close().await;
        self.app.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_in_dead_lettering_order_with_their_reason_and_stay_however_often_they_are_read()
 {
    let (fixture, ids) = DeadLettered::with_dead_letters(12).await;

    // Reading takes the messages and hands them back: a quorum queue mixes up
    // the position of returned messages, the listing order must not change.
    for _ in 0..4 {
        assert_eq!(fixture.listed_ids().await, ids, "dead-lettering order");
    }
    let listing = fixture
        .dead_letters
        .list(fixture.queue(), 10_000)
        .await
        .expect("list");
    let first = &listing.letters[0];
    assert_eq!(
        first.reason.as_deref(),
        Some(format!("cannot handle {} yet", ids[0]).as_str())
    );
    assert_eq!(first.class, Some(DeathClass::Rejected));
    assert_eq!(first.attempts, Some(1));
    assert_eq!(first.original_routing_key.as_deref(), Some("order.e0"));
    assert_eq!(first.payload, b"payload 0");
    assert!(
        listing
            .letters
            .windows(2)
            .all(|w| w[0].dead_lettered_at <= w[1].dead_lettered_at),
        "dead-lettering times in order"
    );
    // The listing's channel is closed; the broker hands its messages back to
    // the ready ones a moment later.
    testkit::wait_until(
        "all 12 ready in the DLQ again (nothing left it)",
        Duration::from_secs(10),
        || async { fixture.app.dlq_ready().await == 12 },
    )
    .await;
    assert_eq!(fixture.stats().dead_lettered_as(DeathClass::Rejected), 12);
    let limited = fixture
        .dead_letters
        .list(fixture.queue(), 5)
        .await
        .expect("list");
    assert_eq!(
        (limited.letters.len(), limited.not_read),
        (5, 7),
        "a limited read says how many it did not read"
    );
    // The oldest five cannot be known from five read: a redrive refuses.
    let refused = fixture
        .dead_letters
        .redrive(fixture.queue(), &Selection::All, 5, false, &mut |_, _| {})
        .await;
    assert!(
        matches!(
            refused,
            Err(DeadLetterError::TooMany {
                limit: 5,
                not_read: 7,
                ..
            })
        ),
        "{refused:?}"
    );
    assert_eq!(fixture.listed_ids().await, ids, "nothing moved");
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_sends_the_chosen_dead_letters_back_once_in_dead_lettering_order_with_their_envelope_and_trace()
 {
    let (fixture, ids) = DeadLettered::with_dead_letters(6).await;
    let before = fixture
        .dead_letters
        .list(fixture.queue(), 10_000)
        .await
        .expect("list");
    fixture.broken.store(false, Ordering::SeqCst);
    let mut no_progress = |_: usize, _: usize| {};

    // A dry run and an unknown id move nothing.
    let dry = fixture
        .dead_letters
        .redrive(
            fixture.queue(),
            &Selection::All,
            10_000,
            true,
            &mut no_progress,
        )
        .await
        .expect("dry run");
    assert_eq!(dry.moved, ids);
    let unknown = fixture
        .dead_letters
        .redrive(
            fixture.queue(),
            &Selection::Ids(vec![ids[1].clone(), "no-such-id".into()]),
            10_000,
            false,
            &mut no_progress,
        )
        .await;
    assert!(
        matches!(&unknown, Err(DeadLetterError::UnknownIds { ids, .. }) if ids == &["no-such-id"]),
        "{unknown:?}"
    );
    assert_eq!(fixture.listed_ids().await, ids, "still all there, in order");
    assert!(fixture.acked_ids().is_empty(), "nothing was redriven");

    // Two chosen by id, then the rest.
    let chosen = vec![ids[3].clone(), ids[1].clone()];
    let moved = fixture
        .dead_letters
        .redrive(
            fixture.queue(),
            &Selection::Ids(chosen),
            10_000,
            false,
            &mut no_progress,
        )
        .await
        .expect("redrive by id");
    assert_eq!(moved.moved, vec![ids[1].clone(), ids[3].clone()]);
    assert_eq!((moved.not_selected, moved.left), (4, 0));
    fixture.wait_acked(2).await;
    let rest: Vec<String> = [0, 2, 4, 5].iter().map(|i| ids[*i].clone()).collect();
    assert_eq!(
        fixture.listed_ids().await,
        rest,
        "the others keep their order"
    );
    let mut progress = Vec::new();
    let mut record = |done: usize, total: usize| progress.push((done, total));
    fixture
        .dead_letters
        .redrive(fixture.queue(), &Selection::All, 10_000, false, &mut record)
        .await
        .expect("redrive all");
    assert_eq!(progress.last(), Some(&(4, 4)));
    fixture.wait_acked(6).await;

    let acked = fixture.acked.lock().expect("log").clone();
    let order: Vec<String> = acked.iter().map(|s| s.message_id.clone()).collect();
    assert_eq!(
        order,
        [1, 3, 0, 2, 4, 5]
            .iter()
            .map(|i| ids[*i].clone())
            .collect::<Vec<_>>(),
        "each once, in dead-lettering order within each redrive"
    );
    for seen in &acked {
        let letter = before
            .letters
            .iter()
            .find(|l| l.message_id == seen.message_id)
            .expect("a listed letter");
        assert_eq!(seen.redrives, 1, "the redrive is counted");
        assert_eq!(seen.attempt, 1, "retries start afresh");
        assert_eq!(
            Some(seen.routing_key.as_str()),
            letter.original_routing_key.as_deref(),
            "the original routing key"
        );
        let traceparent =
            messaging::consumer::header_str(&letter.headers, "traceparent").expect("traceparent");
        assert_eq!(
            traceparent.split('-').nth(1),
            Some(seen.trace_id.as_str()),
            "the trace goes on"
        );
    }
    assert!(fixture.listed_ids().await.is_empty(), "the DLQ is empty");
    assert_eq!(
        fixture
            .stats()
            .redriven
            .load(std::sync::atomic::Ordering::Relaxed),
        6
    );
    let missing = fixture
        .dead_letters
        .redrive(
            "no-such-queue",
            &Selection::All,
            10,
            false,
            &mut no_progress,
        )
        .await;
    assert!(
        matches!(missing, Err(DeadLetterError::UnknownQueue(ref q)) if q == "no-such-queue"),
        "{missing:?}"
    );
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_purge_deletes_only_the_chosen_dead_letters() {
    // Hundreds of acks before the channel closes: where a quorum queue drops
    // some unless the close waits for them (rabbitmq-server#10327).
    let (fixture, ids) = DeadLettered::with_dead_letters(300).await;
    let purged = fixture
        .dead_letters
        .purge(
            fixture.queue(),
            &Selection::Ids(vec![ids[2].clone()]),
            10_000,
        )
        .await
        .expect("purge one");
    assert_eq!(purged.moved, vec![ids[2].clone()]);
    let mut rest = ids.clone();
    rest.remove(2);
    assert_eq!(fixture.listed_ids().await, rest);
    let unknown = fixture
        .dead_letters
        .purge(
            fixture.queue(),
            &Selection::Ids(vec![ids[2].clone()]),
            10_000,
        )
        .await;
    assert!(
        matches!(unknown, Err(DeadLetterError::UnknownIds { .. })),
        "{unknown:?}"
    );
    let all = fixture
        .dead_letters
        .purge(fixture.queue(), &Selection::All, 10_000)
        .await
        .expect("purge all");
    assert_eq!(all.moved.len(), 299);
    assert!(fixture.listed_ids().await.is_empty());
    assert!(
        fixture.acked_ids().is_empty(),
        "nothing went back to the queue"
    );
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_cut_off_by_a_lost_connection_loses_nothing_and_a_second_run_applies_each_once() {
    const COUNT: usize = 300;
    let mut fixture = Fixture::new(support::fast_retry(2)).await;
    let names = &fixture.names;
    // Dead letters written straight to the DLQ, as the runtime writes them.
    let publisher = fixture.publisher();
    let mut ids = Vec::new();
    for chunk in 0..COUNT / 50 {
        let batch: Vec<OutgoingMessage> = (0..50)
            .map(|i| {
                let mut m =
                    OutgoingMessage::new(&names.dlx, names.queue.name.as_str(), "t", vec![1u8; 8]);
                m.headers.insert(
                    messaging::consumer::headers::DEAD_LETTERED_AT.into(),
                    messaging::AMQPValue::LongString(
                        format!("2026-01-01T00:00:{:02}.{:06}Z", chunk, i).into(),
                    ),
                );
                m
            })
            .collect();
        for (m, r) in batch.iter().zip(publisher.publish_batch(&batch).await) {
            r.expect("dead letter published");
            ids.push(m.message_id.clone());
        }
    }
    let proxy = testkit::TcpProxy::start("127.0.0.1:5672")
        .await
        .expect("proxy");
    let settings = support::settings().with_host_port("127.0.0.1", proxy.port());
    let dead_letters = DeadLetters::connect(settings, "test")
        .await
        .expect("connect");

    // Cut the connection once two batches are through.
    let mut cut = |done: usize, _total: usize| {
        if done >= 100 {
            proxy.sever();
        }
    };
    let first = dead_letters
        .redrive(&names.queue.name, &Selection::All, 10_000, false, &mut cut)
        .await;
    let interrupted = match &first {
        Ok(report) => report.interrupted.is_some(),
        Err(_) => true,
    };
    assert!(interrupted, "the cut stopped the redrive: {first:?}");

    // Every message is in the queue, the DLQ, or both.
    let in_queue = fixture.ready().await as usize;
    let dlq = names.queue.dlq_name();
    // The broker hands back what the cut connection held once it notices.
    testkit::wait_until(
        "the held dead letters returned",
        Duration::from_secs(30),
        || async { unacknowledged(&dlq) == Some(0) },
    )
    .await;
    let in_dlq = fixture.dlq_ready().await as usize;
    assert!(
        in_queue + in_dlq >= COUNT,
        "each is in the queue or the DLQ: {in_queue} + {in_dlq}"
    );
    assert!(in_queue >= 100, "the first batches arrived: {in_queue}");

    // The second run goes through; consumers apply each message once.
    let started = std::time::Instant::now();
    let second = dead_letters
        .redrive(
            &fixture.names.queue.name,
            &Selection::All,
            10_000,
            false,
            &mut |_, _| {},
        )
        .await
        .expect("second redrive");
    assert!(second.interrupted.is_none(), "{second:?}");
    println!(
        "redrive: {} messages in {:.0} ms",
        second.moved.len(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    let runs = support::log();
    fixture.consume(
        support::Effect {
            inbox: Inbox::new(fixture.pool().clone(), "c"),
            deliveries: runs.clone(),
        },
        support::consumer_options(),
    );
    testkit::wait_until("every effect applied", Duration::from_secs(30), || async {
        fixture
            .count("SELECT count(DISTINCT message_id) FROM effects")
            .await
            == COUNT as i64
    })
    .await;
    testkit::wait_until("the queue drained", Duration::from_secs(30), || async {
        fixture.ready().await == 0
    })
    .await;
    let effects: Vec<String> = sqlx::query_scalar("SELECT message_id FROM effects")
        .fetch_all(fixture.pool())
        .await
        .expect("effects");
    assert_eq!(effects.len(), COUNT, "no effect twice");
    assert_eq!(
        effects.into_iter().collect::<HashSet<_>>(),
        ids.into_iter().collect::<HashSet<_>>(),
        "none lost"
    );
    let left = dead_letters
        .list(&fixture.names.queue.name, 10)
        .await
        .expect("list")
        .letters;
    assert!(
        left.is_empty(),
        "the DLQ is empty: {:?}",
        left.iter().map(|l| &l.message_id).collect::<Vec<_>>()
    );
    println!(
        "redrive cut: {} runs for {COUNT} messages (copies in both places were deduplicated)",
        runs.lock().expect("log").len()
    );
    dead_letters.close().await;
    fixture.finish().await;
}

/// Messages of `queue` delivered and not yet acknowledged, per the broker.
fn unacknowledged(queue: &str) -> Option<u64> {
    support::queue_info(queue, "messages_unacknowledged")?
        .trim()
        .parse()
        .ok()
}

/// A policy on one queue, cleared on drop (also when the test fails).
struct Policy(String);

impl Policy {
    fn set(name: &str, pattern: &str, definition: &str) -> Self {
        let status = std::process::Command::new("rabbitmqctl")
            .args([
                "set_policy",
                name,
                pattern,
                definition,
                "--apply-to",
                "queues",
            ])
            .output()
            .expect("rabbitmqctl");
        assert!(status.status.success(), "set_policy: {status:?}");
        Self(name.to_owned())
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["clear_policy", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_the_broker_refuses_part_way_leaves_every_unsent_message_in_the_dlq_in_order() {
    const COUNT: usize = 120;
    let (mut fixture, ids) = DeadLettered::with_dead_letters(COUNT).await;
    fixture.stop_consuming().await;
    // The queue takes a few messages, then refuses more (reject-publish).
    let _policy = Policy::set(
        &testkit::unique("max3"),
        &format!("^{}$", fixture.queue().replace('.', "\\.")),
        r#"{"max-length": 3}"#,
    );
    testkit::wait_until("the policy applies", Duration::from_secs(10), || async {
        let info = std::process::Command::new("rabbitmqctl")
            .args(["list_queues", "name", "policy"])
            .output()
            .expect("rabbitmqctl");
        String::from_utf8_lossy(&info.stdout)
            .lines()
            .any(|l| l.starts_with(fixture.queue()) && l.contains("max3"))
    })
    .await;

    let report = fixture
        .dead_letters
        .redrive(
            fixture.queue(),
            &Selection::All,
            10_000,
            false,
            &mut |_, _| {},
        )
        .await
        .expect("redrive");
    // A quorum queue enforces its length loosely (copies in flight together,
    // one batch, may pass it): some went, oldest first, and not all.
    let sent = report.moved.len();
    assert!((3..COUNT).contains(&sent), "{report:?}");
    assert_eq!(report.moved, ids[..sent].to_vec(), "the oldest went");
    assert_eq!(report.left, COUNT - sent);
    let why = report.interrupted.expect("interrupted");
    assert!(why.contains("refused"), "{why}");
    assert_eq!(
        fixture.listed_ids().await,
        ids[sent..].to_vec(),
        "the rest stayed, in order"
    );
    assert_eq!(fixture.app.ready().await as usize, sent);
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dlq_made_before_dlqs_had_a_delivery_limit_is_kept_and_the_service_still_connects() {
    let names = Names::new(support::fast_retry(2));
    let (_conn, ch) = support::raw_channel().await;
    // As an earlier version declared it: quorum, no delivery limit.
    let mut old = messaging::FieldTable::default();
    for (k, v) in [
        ("x-queue-type", "quorum"),
        ("x-dead-letter-strategy", "at-least-once"),
        ("x-overflow", "reject-publish"),
    ] {
        old.insert(k.into(), messaging::AMQPValue::LongString(v.into()));
    }
    ch.queue_declare(
        names.queue.dlq_name().as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        old,
    )
    .await
    .expect("the old DLQ");

    // Connects over the old DLQ (or panics saying why).
    let old = Fixture::start(names, false).await;
    let names = &old.names;
    let args = support::queue_arguments(&names.queue.dlq_name()).expect("the DLQ exists");
    assert!(!args.contains("x-delivery-limit"), "kept as it was: {args}");
    let queue_args = support::queue_arguments(&names.queue.name).expect("the queue was declared");
    assert!(queue_args.contains("x-delivery-limit"), "{queue_args}");
    old.finish().await;

    // A fresh one gets the limit.
    let fresh = Fixture::without_database(support::fast_retry(2)).await;
    let args = support::queue_arguments(&fresh.names.queue.dlq_name()).expect("the DLQ exists");
    assert!(
        args.contains("x-delivery-limit") && args.contains("1000000"),
        "{args}"
    );
    fresh.finish().await;
}
