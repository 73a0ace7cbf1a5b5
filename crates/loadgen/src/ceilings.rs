//! What the database and the broker allow on this machine, measured with the
//! same code paths the services use:
//!
//! - database: order-service's own `store::place` transaction (order, items,
//!   outbox row) straight against a scratch database at the same concurrency;
//! - broker: confirmed publishing with the messaging `Publisher` (same window as
//!   the relay's batch, same payload size, quorum queue), and consume-with-ack
//!   with the messaging consumer runtime;
//! - relay: the messaging relay draining a pre-filled scratch outbox.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use contracts::{
    Message,
    events::v1::{OrderItem, OrderPlaced},
};
use messaging::{
    AmqpSettings, Broker, ConsumerOptions, Handler, IncomingMessage, Outcome, OutgoingMessage,
    Publisher, QueueSpec, RelayOptions, Topology, spawn_consumer, spawn_relay,
};
use tokio_util::sync::CancellationToken;

/// A W3C trace context as the outbox stores it.
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A payload of the size the shop publishes.
pub fn sample_payload() -> Vec<u8> {
    OrderPlaced {
        order_id: uuid::Uuid::now_v7().to_string(),
        customer_id: "load-123456".into(),
        email: None,
        items: vec![OrderItem {
            sku: "SKU-00042".into(),
            quantity: 1,
        }],
        placed_at: contracts::decode::now(),
    }
    .encode_to_vec()
}

/// A scratch database with order-service's schema, dropped after the measure.
pub struct Scratch {
    pub pool: sqlx::PgPool,
    db: testkit::TestDb,
}

impl Scratch {
    pub async fn create(
        admin_url: &str,
        pool_size: u32,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let db = testkit::TestDb::try_create_on(admin_url, "loadgen").await?;
        let pool = service_kit::database::connect_and_migrate(
            &db.url,
            pool_size,
            std::time::Duration::from_secs(15),
            order_service::MIGRATIONS,
        )
        .await?;
        Ok(Self { pool, db })
    }

    pub async fn drop_db(self) {
        self.pool.close().await;
        self.db.drop_db().await;
    }
}

/// The API's order transaction straight against PostgreSQL: transactions/s.
pub async fn database(
    admin_url: &str,
    concurrency: usize,
    count: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let scratch = Scratch::create(admin_url, u32::try_from(concurrency + 2).unwrap_or(32)).await?;
    let order =
        order_service::domain::NewOrder::parse(serde_json::from_value(serde_json::json!({
            "customer_id": "load-123456", "items": [{"sku": "SKU-00042", "quantity": 1}]
        }))?)
        .map_err(|e| format!("{e:?}"))?;
    let order = Arc::new(order);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (pool, order, done) = (scratch.pool.clone(), order.clone(), done.clone());
            tokio::spawn(async move {
                while done.fetch_add(1, Ordering::Relaxed) < count as u64 {
                    let mut tx = pool.begin().await?;
                    order_service::store::place(&mut tx, uuid::Uuid::now_v7(), &order).await?;
                    tx.commit().await?;
                }
                Ok::<_, sqlx::Error>(())
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    scratch.drop_db().await;
    Ok(rate)
}

fn scratch_topology() -> (Topology, String, QueueSpec) {
    let base = format!(
        "loadgen-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let exchange = format!("{base}.events");
    let dlx = format!("{base}.dlx");
    let queue = QueueSpec::new(format!("{base}.q"), &dlx).bind(&exchange, "#");
    (
        Topology::single_queue(&exchange, &dlx, queue.clone()),
        exchange,
        queue,
    )
}

/// Removes a scratch topology.
async fn delete(amqp_url: &str, topology: &Topology) {
    let Ok(conn) = lapin::Connection::connect(amqp_url, Default::default()).await else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        let _ = topology.delete(&ch).await;
    }
    let _ = conn.close(200, "done".into()).await;
}

/// Confirmed publishing with `window` confirms in flight: messages/s.
/// Then consume-with-ack of the same messages: messages/s.
pub async fn broker(
    amqp_url: &str,
    window: usize,
    count: usize,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let (topology, exchange, queue) = scratch_topology();
    let broker = Broker::connect(AmqpSettings::from_url(amqp_url)?, topology.clone()).await?;
    let publisher = Publisher::new(broker.clone(), "loadgen");
    let payload = sample_payload();
    let parent = messaging::propagation::extract_map(&std::collections::HashMap::from([(
        "traceparent".to_owned(),
        TRACEPARENT.to_owned(),
    )]));
    let batch: Vec<OutgoingMessage> = (0..window)
        .map(|_| {
            let mut m = OutgoingMessage::new(
                &exchange,
                "order.placed",
                "shop.events.v1.OrderPlaced",
                payload.clone(),
            );
            m.correlation_id = Some(uuid::Uuid::now_v7().to_string());
            // The trace header every outbox row carries, so both sides send equal messages.
            m.parent = Some(parent.clone());
            m
        })
        .collect();
    let rounds = count.div_ceil(window);
    let started = Instant::now();
    for _ in 0..rounds {
        let results = publisher.publish_batch(&batch).await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return Err(format!("raw publish failed: {e}").into());
        }
    }
    let sent = rounds * window;
    let publish_rate = sent as f64 / started.elapsed().as_secs_f64();

    struct Count(Arc<AtomicU64>);
    impl Handler for Count {
        async fn handle(&self, _message: IncomingMessage) -> Outcome {
            self.0.fetch_add(1, Ordering::Relaxed);
            Outcome::Ack
        }
    }
    let consumed = Arc::new(AtomicU64::new(0));
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let consumer = spawn_consumer(
        broker.clone(),
        queue.clone(),
        ConsumerOptions {
            prefetch: 64,
            concurrency: 16,
            app_id: "loadgen".into(),
            ..Default::default()
        },
        Count(consumed.clone()),
        shutdown.clone(),
    );
    while consumed.load(Ordering::Relaxed) < sent as u64 {
        if started.elapsed() > Duration::from_secs(300) {
            return Err("consuming the raw messages took over 5 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let consume_rate = sent as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    consumer.join().await;
    delete(amqp_url, &topology).await;
    broker.close().await;
    Ok((publish_rate, consume_rate))
}

/// The relay draining `count` pre-filled outbox rows: rows/s.
pub async fn relay(
    admin_url: &str,
    amqp_url: &str,
    window: usize,
    count: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let scratch = Scratch::create(admin_url, 8).await?;
    let (topology, exchange, _) = scratch_topology();
    let broker = Broker::connect(AmqpSettings::from_url(amqp_url)?, topology.clone()).await?;
    sqlx::query(
        "INSERT INTO outbox (id, exchange, routing_key, type, payload, headers, correlation_id)
         SELECT gen_random_uuid(), $1, 'order.placed', 'shop.events.v1.OrderPlaced', $2,
                jsonb_build_object('traceparent', $4::text),
                gen_random_uuid()::text
         FROM generate_series(1, $3)",
    )
    .bind(&exchange)
    .bind(sample_payload())
    .bind(i64::try_from(count)?)
    .bind(TRACEPARENT)
    .execute(&scratch.pool)
    .await?;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let handle = spawn_relay(
        scratch.pool.clone(),
        Publisher::new(broker.clone(), "loadgen"),
        RelayOptions {
            batch_size: i64::try_from(window)?,
            ..RelayOptions::default()
        },
        shutdown.clone(),
    );
    while handle.status().published < count as u64 {
        if started.elapsed() > Duration::from_secs(300) {
            return Err("the relay took over 5 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    handle.join().await;
    delete(amqp_url, &topology).await;
    broker.close().await;
    scratch.drop_db().await;
    Ok(rate)
}
