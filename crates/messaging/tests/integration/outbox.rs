use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use messaging::{
    ConsumerOptions, Handler, Inbox, IncomingMessage, NewMessage, Outcome, RelayProbe, enqueue,
};
use opentelemetry::{
    Context,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::support::{self, Fixture};

/// Waits for three more relay rounds: whatever the relay had to publish, it
/// has published by then.
async fn three_more_rounds(relay: &RelayProbe) {
    let rounds = relay.status().rounds;
    testkit::wait_until(
        "three more relay rounds",
        Duration::from_secs(10),
        || async { relay.status().rounds >= rounds + 3 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_committed_event_is_published_once_with_the_row_id_and_the_trace_of_its_writer() {
    let mut fixture = Fixture::new(support::fast_retry(3)).await;
    let relay = fixture.relay();
    let trace_id = TraceId::from(0x5af7651916cd43dd8448eb211c80319cu128);
    let request = tracing::info_span!("POST /orders");
    let _ = request.set_parent(Context::new().with_remote_span_context(SpanContext::new(
        trace_id,
        SpanId::from(0x1111111111111111u64),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    )));

    let id = async {
        let mut tx = fixture.pool().begin().await.expect("begin");
        let id = enqueue(
            &mut tx,
            NewMessage::new(
                &fixture.names.exchange,
                "order.placed",
                "shop.T",
                b"body".to_vec(),
            )
            .correlated("o-1"),
        )
        .await
        .expect("enqueue");
        tx.commit().await.expect("commit");
        id
    }
    .instrument(request)
    .await;

    let got = testkit::wait_for("the event published", Duration::from_secs(10), || async {
        fixture.get().await
    })
    .await;
    let p = &got.delivery.properties;
    assert_eq!(
        p.message_id().as_ref().map(|s| s.to_string()),
        Some(id.to_string()),
        "message id = row id"
    );
    assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some("o-1"));
    let headers = p.headers().clone().expect("headers");
    let traceparent =
        messaging::consumer::header_str(&headers, "traceparent").expect("traceparent");
    assert_eq!(
        traceparent.split('-').nth(1),
        Some(trace_id.to_string().as_str()),
        "the writer's trace"
    );
    // Exactly once: the relay goes on polling and publishes nothing more.
    three_more_rounds(&relay).await;
    assert!(fixture.get().await.is_none(), "published twice");
    assert_eq!(
        fixture
            .count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
            .await,
        1
    );
    assert_eq!(relay.status().backlog, 0);
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolled_back_transaction_never_publishes() {
    let mut fixture = Fixture::new(support::fast_retry(3)).await;
    let relay = fixture.relay();

    let mut tx = fixture.pool().begin().await.expect("begin");
    enqueue(
        &mut tx,
        NewMessage::new(&fixture.names.exchange, "rolled.back", "t", vec![]),
    )
    .await
    .expect("enqueue");
    tx.rollback().await.expect("rollback");
    let marker = fixture.commit_event("marker").await;

    let got = testkit::wait_for("the marker published", Duration::from_secs(10), || async {
        fixture.get().await
    })
    .await;
    assert_eq!(got.delivery.routing_key.as_str(), "marker");
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        Some(marker.to_string())
    );
    three_more_rounds(&relay).await;
    assert!(
        fixture.get().await.is_none(),
        "the rolled back event was published"
    );
    assert_eq!(fixture.count("SELECT count(*) FROM outbox").await, 1);
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_broker_unreachable_the_commit_succeeds_and_the_event_goes_out_when_it_returns() {
    let mut fixture = Fixture::new(support::fast_retry(3)).await;
    let (proxy, broker) = fixture.proxied_broker(|_| {}).await;
    let relay = fixture.relay_on(broker.clone(), support::fast_relay());
    proxy.block();
    testkit::wait_until("disconnected", Duration::from_secs(10), || async {
        !broker.is_connected()
    })
    .await;

    let id = fixture.commit_event("during.outage").await;

    testkit::wait_until(
        "the relay to report the broker away and the row kept",
        Duration::from_secs(10),
        || async {
            let status = relay.status();
            status.last_error.is_some() && status.backlog == 1
        },
    )
    .await;
    // A round that checked the broker just before the cut and claimed just
    // after the row's commit may claim it once (the check and the claim are
    // not atomic); after that, while the relay knows the broker is away, it
    // claims nothing.
    let claims = || async {
        fixture
            .count("SELECT max(attempts)::bigint FROM outbox")
            .await
    };
    let during = claims().await;
    assert!(during <= 1, "claimed {during} times during the outage");
    three_more_rounds(&relay).await;
    assert_eq!(
        claims().await,
        during,
        "a row is claimed while the broker is known to be away"
    );
    proxy.restore();
    let got = testkit::wait_for(
        "published after the broker returned",
        Duration::from_secs(20),
        || async { fixture.get().await },
    )
    .await;
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        Some(id.to_string())
    );
    testkit::wait_until("marked", Duration::from_secs(10), || async {
        fixture
            .count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await
            == 0
    })
    .await;
    assert_eq!(
        claims().await,
        during + 1,
        "after the outage one claim published the row"
    );
    fixture.finish().await;
}

/// Applies each message's effect through the inbox and logs every delivery.
#[tokio::test(flavor = "multi_thread")]
async fn a_failure_between_confirm_and_mark_republishes_the_same_id_and_the_inbox_applies_it_once()
{
    let mut fixture = Fixture::new(support::fast_retry(3)).await;
    let options = support::fast_relay();
    options.fail_after_confirm.store(1, Ordering::SeqCst);
    let relay = fixture.relay_with(options.clone());
    let deliveries = Arc::new(Mutex::new(Vec::new()));
    fixture.consume(
        support::Effect {
            inbox: Inbox::new(fixture.pool().clone(), "test-consumer"),
            deliveries: deliveries.clone(),
        },
        support::consumer_options(),
    );

    let id = fixture.commit_event("k").await;

    testkit::wait_until(
        "two deliveries of the event",
        Duration::from_secs(15),
        || async { deliveries.lock().expect("log").len() >= 2 },
    )
    .await;
    assert_eq!(
        options.fail_after_confirm.load(Ordering::SeqCst),
        0,
        "the fault fired"
    );
    testkit::wait_until(
        "marked after the republish",
        Duration::from_secs(10),
        || async { relay.status().backlog == 0 },
    )
    .await;
    let seen = deliveries.lock().expect("log").clone();
    assert_eq!(
        seen,
        vec![id.to_string(), id.to_string()],
        "republished with the same id"
    );
    assert_eq!(
        fixture.count("SELECT count(*) FROM effects").await,
        1,
        "effect applied once"
    );
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_relays_on_one_table_under_load_publish_every_row_exactly_once() {
    let mut fixture = Fixture::new(support::fast_retry(3)).await;
    let mut relays = Vec::new();
    for _ in 0..2 {
        let broker = fixture.connect().await;
        let options = messaging::RelayOptions {
            batch_size: 100,
            ..support::fast_relay()
        };
        relays.push(fixture.relay_on(broker, options));
    }
    // The relays publish on connections of their own, the consumer takes the
    // fixture's.
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::new(Mutex::new(HashMap::new()));
    struct Count(Arc<Mutex<HashMap<String, u32>>>);
    impl Handler for Count {
        async fn handle(&self, message: IncomingMessage) -> Outcome {
            *self
                .0
                .lock()
                .expect("map")
                .entry(message.message_id)
                .or_default() += 1;
            Outcome::Ack
        }
    }
    fixture.consume(
        Count(seen.clone()),
        ConsumerOptions {
            prefetch: 200,
            concurrency: 16,
            app_id: "test".into(),
            ..Default::default()
        },
    );

    // Four writers commit 4 000 rows in transactions of ten while both relays run.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let pool = fixture.pool().clone();
            let exchange = fixture.names.exchange.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for t in 0..100 {
                    let mut tx = pool.begin().await.expect("begin");
                    for i in 0..10 {
                        let message = NewMessage::new(
                            &exchange,
                            format!("w{w}.t{t}.{i}"),
                            "t",
                            vec![0u8; 256],
                        );
                        ids.push(
                            enqueue(&mut tx, message)
                                .await
                                .expect("enqueue")
                                .to_string(),
                        );
                    }
                    tx.commit().await.expect("commit");
                }
                ids
            })
        })
        .collect();
    let mut expected = Vec::new();
    for writer in writers {
        expected.extend(writer.await.expect("writer"));
    }

    testkit::wait_until("every row consumed", Duration::from_secs(60), || async {
        seen.lock().expect("map").len() == expected.len()
    })
    .await;
    testkit::wait_until("both relays idle", Duration::from_secs(10), || async {
        relays.iter().all(|r| r.status().backlog == 0)
    })
    .await;
    let seen = seen.lock().expect("map").clone();
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "published more than once: {twice:?}");
    assert!(
        expected.iter().all(|id| seen.contains_key(id)),
        "a row was lost"
    );
    let published: u64 = relays.iter().map(|r| r.status().published).sum();
    assert_eq!(published, expected.len() as u64);
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn published_rows_past_retention_are_deleted_and_unpublished_ones_kept() {
    let mut fixture = Fixture::new(support::fast_retry(3)).await;
    // Rows for an exchange that does not exist stay unpublished.
    let stuck = {
        let mut tx = fixture.pool().begin().await.expect("begin");
        let message = NewMessage::new(&fixture.names.dlx, "nowhere", "t", vec![]);
        let id = enqueue(&mut tx, message).await.expect("enqueue");
        tx.commit().await.expect("commit");
        id
    };
    for _ in 0..3 {
        fixture.commit_event("k").await;
    }
    fixture.relay_with(messaging::RelayOptions {
        retention: Duration::ZERO,
        cleanup_every: Duration::from_millis(50),
        ..support::fast_relay()
    });

    testkit::wait_until(
        "published rows deleted",
        Duration::from_secs(10),
        || async { fixture.count("SELECT count(*) FROM outbox").await == 1 },
    )
    .await;
    let left: uuid::Uuid = sqlx::query_scalar("SELECT id FROM outbox")
        .fetch_one(fixture.pool())
        .await
        .expect("row");
    assert_eq!(left, stuck, "the unroutable row is kept");
    let (attempts, error): (i32, Option<String>) =
        sqlx::query_as("SELECT attempts, last_error FROM outbox")
            .fetch_one(fixture.pool())
            .await
            .expect("row");
    assert!(attempts >= 1);
    assert!(
        error.is_some_and(|e| e.contains("unroutable")),
        "the reason is recorded"
    );
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_backlog_reported_after_a_burst_comes_back_to_zero_without_another_wake_up() {
    let mut fixture = Fixture::new(support::fast_retry(3)).await;
    // No polling fallback to lean on: only the relay's own status refresh can
    // bring the figure back to zero once the last notification was handled.
    let relay = fixture.relay_with(messaging::RelayOptions {
        poll_interval: Duration::from_secs(3600),
        ..support::fast_relay()
    });
    // Many small commits in a row: many wake-ups, most of them inside the
    // status refresh interval, some while a refresh counts a fresh row.
    for i in 0..200 {
        let mut tx = fixture.pool().begin().await.expect("begin");
        enqueue(
            &mut tx,
            NewMessage::new(
                &fixture.names.exchange,
                "order.placed",
                "test.Event",
                format!("{i}").into_bytes(),
            ),
        )
        .await
        .expect("enqueue");
        tx.commit().await.expect("commit");
    }
    testkit::wait_until("all 200 published", Duration::from_secs(20), || async {
        relay.status().published == 200
    })
    .await;
    testkit::wait_until(
        "the reported backlog back at zero",
        Duration::from_secs(10),
        || async {
            let status = relay.status();
            status.backlog == 0 && status.oldest_unpublished.is_none()
        },
    )
    .await;
    fixture.finish().await;
}
