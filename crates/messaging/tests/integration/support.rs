use std::{
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use lapin::options::QueueDeclareOptions;
use messaging::{AmqpSettings, Backoff, Broker, FieldTable, QueueSpec, RetryPolicy, Topology};
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::{Layer, layer::SubscriberExt};

/// Installs a subscriber with an OpenTelemetry layer (no exporter) once, so spans
/// have real trace and span ids as in a service.
pub fn init_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let tracer = provider.tracer("messaging-tests");
        // The log filter applies to the log layer only; spans always reach OpenTelemetry.
        let logs = tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ));
        let subscriber = tracing_subscriber::registry()
            .with(logs)
            .with(tracing_opentelemetry::layer().with_tracer(tracer));
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

pub fn settings() -> AmqpSettings {
    let mut s = AmqpSettings::from_url(&testkit::amqp_url()).expect("AMQP_URL");
    s.backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    s.heartbeat = Duration::from_secs(5);
    s.connect_timeout = Duration::from_secs(5);
    s
}

/// A private topology: topic exchange, dead-letter exchange and one queue bound
/// to the exchange with `#`.
pub struct Names {
    pub exchange: String,
    pub dlx: String,
    pub queue: QueueSpec,
}

impl Names {
    pub fn new(retry: RetryPolicy) -> Self {
        let base = testkit::unique("t");
        let exchange = format!("{base}.events");
        let dlx = format!("{base}.dlx");
        let queue = QueueSpec::new(format!("{base}.q"), &dlx)
            .bind(&exchange, "#")
            .with_retry(retry)
            .with_delivery_limit(5);
        Self {
            exchange,
            dlx,
            queue,
        }
    }

    pub fn topology(&self) -> Topology {
        Topology::single_queue(&self.exchange, &self.dlx, self.queue.clone())
    }

    /// Deletes everything the topology declared.
    pub async fn cleanup(&self) {
        let Ok(conn) = lapin::Connection::connect(&testkit::amqp_url(), Default::default()).await
        else {
            return;
        };
        let Ok(ch) = conn.create_channel().await else {
            return;
        };
        let _ = self.topology().delete(&ch).await;
        let _ = conn.close(200, "bye".into()).await;
    }
}

pub fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        delays: vec![Duration::from_millis(200), Duration::from_millis(400)],
        max_attempts,
    }
}

pub async fn broker(names: &Names) -> Broker {
    init_tracing();
    Broker::connect(settings(), names.topology())
        .await
        .expect("connect")
}

/// A proxy a test can cut, and a broker connection for `names` through it
/// (`adjust` may change the settings first).
pub async fn proxied_broker(
    names: &Names,
    adjust: impl FnOnce(&mut AmqpSettings),
) -> (testkit::TcpProxy, Broker) {
    init_tracing();
    let proxy = testkit::TcpProxy::start("127.0.0.1:5672")
        .await
        .expect("proxy");
    let mut settings = settings().with_host_port("127.0.0.1", proxy.port());
    adjust(&mut settings);
    let broker = Broker::connect(settings, names.topology())
        .await
        .expect("connect");
    (proxy, broker)
}

/// A plain client connection for looking at queues from the outside.
pub async fn raw_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(&testkit::amqp_url(), Default::default())
        .await
        .expect("raw connect");
    let ch = conn.create_channel().await.expect("raw channel");
    (conn, ch)
}

/// Messages ready in `queue` (passive declare).
pub async fn ready(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map(|q| q.message_count())
    .unwrap_or(0)
}

/// Takes one message from `queue` if there is one.
pub async fn get(ch: &lapin::Channel, queue: &str) -> Option<lapin::message::BasicGetMessage> {
    ch.basic_get(
        queue.into(),
        lapin::options::BasicGetOptions { no_ack: true },
    )
    .await
    .expect("basic.get")
}

/// Records what a handler saw, shared with the test.
pub type Log<T> = Arc<Mutex<Vec<T>>>;

pub fn log<T>() -> Log<T> {
    Arc::new(Mutex::new(Vec::new()))
}

/// A fresh database with the messaging tables and a test `effects` table.
pub async fn database() -> testkit::TestDb {
    let db = testkit::TestDb::create().await;
    messaging::migrations::migrate(&db.pool)
        .await
        .expect("migrate");
    sqlx::query(
        "CREATE TABLE effects (message_id TEXT NOT NULL, applied_at TIMESTAMPTZ DEFAULT now())",
    )
    .execute(&db.pool)
    .await
    .expect("effects table");
    db
}

pub fn fast_relay() -> messaging::RelayOptions {
    messaging::RelayOptions {
        poll_interval: Duration::from_millis(100),
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(300),
        },
        ..Default::default()
    }
}

pub async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Commits one outbox row for `exchange` and returns its id.
pub async fn commit_event(pool: &sqlx::PgPool, exchange: &str, key: &str) -> uuid::Uuid {
    let mut tx = pool.begin().await.expect("begin");
    let id = messaging::enqueue(
        &mut tx,
        messaging::NewMessage::new(exchange, key, "t", vec![7u8; 16]),
    )
    .await
    .expect("enqueue");
    tx.commit().await.expect("commit");
    id
}

/// Applies each message's effect (a row in `effects`) through the inbox and
/// logs every delivery, duplicates included.
pub struct Effect {
    pub inbox: messaging::Inbox,
    pub deliveries: Log<String>,
}

impl messaging::Handler for Effect {
    async fn handle(&self, message: messaging::IncomingMessage) -> messaging::Outcome {
        self.deliveries
            .lock()
            .expect("log")
            .push(message.message_id.clone());
        let id = message.message_id.clone();
        let result = self
            .inbox
            .process(&message.message_id, |tx| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
                        .bind(id)
                        .execute(tx)
                        .await?;
                    Ok::<_, sqlx::Error>(())
                })
            })
            .await;
        match result {
            Ok(messaging::Processed::Done(()) | messaging::Processed::Duplicate) => {
                messaging::Outcome::Ack
            }
            Err(e) => messaging::Outcome::Retry(e.to_string()),
        }
    }
}
