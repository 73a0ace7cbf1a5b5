//! Relay throughput beside raw confirmed publishing, and commit-to-delivery
//! latency with NOTIFY. A benchmark, not a test: it reports figures and asserts
//! nothing about them.
//!
//! ```sh
//! cargo bench -p messaging --bench relay            # 20 000 messages
//! BENCH_MESSAGES=50000 cargo bench -p messaging --bench relay
//! ```
//!
//! Both throughput runs use the same client, 256-byte payloads, the same confirm
//! window (the relay's batch size) and the same queue type (quorum, as deployed).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use messaging::{
    AmqpSettings, Broker, ConsumerOptions, Handler, IncomingMessage, NewMessage, Outcome,
    OutgoingMessage, Publisher, QueueSpec, RelayOptions, Topology, enqueue, spawn_consumer,
    spawn_relay,
};
use tokio_util::sync::CancellationToken;

const PAYLOAD: usize = 256;
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let messages: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let window: usize = std::env::var("BENCH_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let base = testkit::unique("bench");
    let exchange = format!("{base}.events");
    let dlx = format!("{base}.dlx");
    let queue = QueueSpec::new(format!("{base}.q"), &dlx).bind(&exchange, "#");
    let topology = Topology::single_queue(&exchange, &dlx, queue.clone());
    let settings = AmqpSettings::from_url(&testkit::amqp_url())?;
    let broker = Broker::connect(settings, topology.clone()).await?;
    let db = testkit::TestDb::create().await;
    messaging::migrations::migrate(&db.pool).await?;
    let (conn, ch) = raw().await;

    // 1 and 2, interleaved over several rounds (alternating which goes first, so
    // neither always meets a fresher broker) and reported as medians: on a small
    // machine a single run varies by a quarter.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let publisher = Publisher::new(broker.clone(), "bench");
    // The same trace header the outbox rows carry, so both runs send equal messages.
    let mut stored = std::collections::HashMap::new();
    stored.insert("traceparent".to_owned(), TRACEPARENT.to_owned());
    let parent = messaging::propagation::extract_map(&stored);
    let batch: Vec<_> = (0..window)
        .map(|_| {
            let mut m = OutgoingMessage::new(&exchange, "bench", "t", vec![0u8; PAYLOAD]);
            m.parent = Some(parent.clone());
            m
        })
        .collect();
    let sent = messages.div_ceil(window) * window;
    let shutdown = CancellationToken::new();
    let relay = spawn_relay(
        db.pool.clone(),
        Publisher::new(broker.clone(), "bench"),
        RelayOptions {
            batch_size: i64::try_from(window)?,
            ..RelayOptions::default()
        },
        shutdown.clone(),
    );
    let (mut raw_rates, mut relay_rates) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for step in 0..2 {
            if (round + step) % 2 == 0 {
                // Raw confirmed publishing, `window` confirms in flight.
                let started = Instant::now();
                for _ in 0..sent / window {
                    let results = publisher.publish_batch(&batch).await;
                    assert!(results.iter().all(Result::is_ok), "raw publish failed");
                }
                raw_rates.push(sent as f64 / started.elapsed().as_secs_f64());
            } else {
                // The relay draining a pre-filled outbox, batch = window.
                let before = relay.status().published;
                sqlx::query(
                    "INSERT INTO outbox (id, exchange, routing_key, type, payload, headers)
                     SELECT gen_random_uuid(), $1, 'bench', 't', $2, jsonb_build_object('traceparent', $4::text)
                     FROM generate_series(1, $3)",
                )
                .bind(&exchange)
                .bind(vec![0u8; PAYLOAD])
                .bind(i64::try_from(sent)?)
                .bind(TRACEPARENT)
                .execute(&db.pool)
                .await?;
                sqlx::query("SELECT pg_notify('messaging_outbox', '')")
                    .execute(&db.pool)
                    .await?;
                let started = Instant::now();
                while relay.status().published < before + sent as u64 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                relay_rates.push(sent as f64 / started.elapsed().as_secs_f64());
            }
            purge(&ch, &queue.name).await;
        }
    }
    let raw_rate = median(&mut raw_rates);
    let relay_rate = median(&mut relay_rates);

    // 3. Commit-to-delivery latency, one event at a time, relay idle between.
    struct Arrivals(Arc<Mutex<Option<tokio::sync::oneshot::Sender<Instant>>>>);
    impl Handler for Arrivals {
        async fn handle(&self, _m: IncomingMessage) -> Outcome {
            if let Some(tx) = self.0.lock().expect("slot").take() {
                let _ = tx.send(Instant::now());
            }
            Outcome::Ack
        }
    }
    let slot = Arc::new(Mutex::new(None));
    let consumer = spawn_consumer(
        broker.clone(),
        queue.clone(),
        ConsumerOptions {
            app_id: "bench".into(),
            ..Default::default()
        },
        Arrivals(slot.clone()),
        shutdown.clone(),
    );
    while !consumer.is_subscribed() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut latencies = Vec::new();
    for i in 0..500 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        *slot.lock().expect("slot") = Some(tx);
        let mut db_tx = db.pool.begin().await?;
        enqueue(
            &mut db_tx,
            NewMessage::new(&exchange, "bench", "t", vec![0u8; PAYLOAD]),
        )
        .await?;
        db_tx.commit().await?;
        let committed = Instant::now();
        let arrived = tokio::time::timeout(Duration::from_secs(5), rx).await??;
        if i >= 20 {
            latencies.push(arrived.saturating_duration_since(committed));
        }
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];

    println!(
        "relay benchmark: {sent} messages of {PAYLOAD} B per run, confirm window {window}, quorum queue, median of {rounds} interleaved runs"
    );
    println!(
        "raw runs (msg/s): {:?}",
        raw_rates.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    println!(
        "relay runs (msg/s): {:?}",
        relay_rates.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!("| raw confirmed publish | {raw_rate:.0} msg/s |");
    println!("| relay (pre-filled outbox) | {relay_rate:.0} msg/s |");
    println!("| relay / raw | {:.2} |", relay_rate / raw_rate);
    println!(
        "| commit → delivered, p50 | {:.2} ms |",
        pct(0.5).as_secs_f64() * 1e3
    );
    println!(
        "| commit → delivered, p99 | {:.2} ms |",
        pct(0.99).as_secs_f64() * 1e3
    );
    println!(
        "| commit → delivered, max | {:.2} ms |",
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );

    shutdown.cancel();
    relay.join().await;
    consumer.join().await;
    let _ = topology.delete(&ch).await;
    let _ = conn.close(200, "bye".into()).await;
    broker.close().await;
    db.drop_db().await;
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn raw() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(&testkit::amqp_url(), Default::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

async fn purge(ch: &lapin::Channel, queue: &str) {
    ch.queue_purge(queue.into(), Default::default())
        .await
        .expect("purge");
}
