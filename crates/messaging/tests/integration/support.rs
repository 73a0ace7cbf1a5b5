use std::{
    future::Future,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use lapin::options::QueueDeclareOptions;
use messaging::{
    AmqpSettings, Backoff, Broker, ConnectError, ConsumerHandle, ConsumerOptions, ConsumerProbe,
    FieldTable, Handler, OutgoingMessage, Publisher, QueueSpec, RelayHandle, RelayOptions,
    RelayProbe, RetryPolicy, Topology, spawn_consumer, spawn_relay,
};
use opentelemetry::trace::TracerProvider as _;
use tokio_util::sync::CancellationToken;
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
        delete_topology(&self.topology()).await;
    }
}

/// Deletes the queues (with their retry queues and DLQ) and exchanges of
/// `topology` over a connection of its own; what is already gone is no error.
/// Deletes what `topology` declared, giving up after 10 s (a broker that stopped
/// answering must not hang a failing test's cleanup).
async fn delete_topology(topology: &Topology) {
    let delete = async {
        let conn = lapin::Connection::connect(&testkit::amqp_url(), Default::default())
            .await
            .ok()?;
        let ch = conn.create_channel().await.ok()?;
        let _ = topology.delete(&ch).await;
        let _ = conn.close(200, "bye".into()).await;
        Some(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), delete).await;
}

pub fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        delays: vec![Duration::from_millis(200), Duration::from_millis(400)],
        max_attempts,
    }
}

/// A plain client connection for looking at queues from the outside.
pub async fn raw_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(&testkit::amqp_url(), Default::default())
        .await
        .expect("raw connect");
    let ch = conn.create_channel().await.expect("raw channel");
    (conn, ch)
}

/// Messages ready in `queue` (passive declare). Panics when it cannot tell
/// (no such queue, a closed channel): a 0 read from nowhere would pass any
/// "nothing left" assertion.
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
    .unwrap_or_else(|e| panic!("cannot read the depth of {queue}: {e}"))
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

/// Consumer options with the tests' app id and the defaults otherwise.
pub fn consumer_options() -> ConsumerOptions {
    ConsumerOptions {
        app_id: "test".into(),
        ..Default::default()
    }
}

/// One test's world, after zero2prod's `TestApp`: a scratch database with the
/// messaging tables and `effects` (unless made [`without_database`]), a private
/// topology ([`Names`]), a broker connection that declared it, a plain channel
/// for looking at its queues from the outside, and every relay, consumer and
/// further broker connection the test starts through it, all stopped by one
/// shutdown token.
///
/// A test ends with [`Fixture::finish`]. One that panics before leaves nothing
/// behind either: `Drop` stops what runs, closes the connections and deletes
/// the exchanges and queues (retry queues and DLQ included), and the database
/// goes with [`testkit::TestDb`]'s own `Drop`. Tests run on the multi-thread
/// runtime: on a current-thread one the relays and consumers cannot stop while
/// `Drop` waits for them, and it gives up on them after 10 s.
///
/// [`without_database`]: Fixture::without_database
pub struct Fixture {
    pub names: Names,
    /// The connection the fixture's relays and consumers use unless told
    /// otherwise.
    pub broker: Broker,
    /// `None` without a database, and once finished.
    db: Option<testkit::TestDb>,
    shutdown: CancellationToken,
    raw: lapin::Connection,
    channel: lapin::Channel,
    /// Further connections for `names`, closed at the end.
    brokers: Vec<Broker>,
    relays: Vec<RelayHandle>,
    consumers: Vec<ConsumerHandle>,
    finished: bool,
}

impl Fixture {
    /// A fresh database and a private topology whose queue retries by `retry`.
    pub async fn new(retry: RetryPolicy) -> Self {
        Self::start(Names::new(retry), true).await
    }

    /// Like [`Self::new`] without the database, for tests of the broker alone
    /// (creating and dropping one costs about half a second).
    pub async fn without_database(retry: RetryPolicy) -> Self {
        Self::start(Names::new(retry), false).await
    }

    /// For names the test made (and perhaps prepared on the broker) itself,
    /// with a database or without.
    pub async fn start(names: Names, with_database: bool) -> Self {
        init_tracing();
        let db = if with_database {
            Some(database().await)
        } else {
            None
        };
        let broker = Broker::connect(settings(), names.topology())
            .await
            .unwrap_or_else(|e| panic!("cannot connect and declare {}: {e}", names.exchange));
        let (raw, channel) = raw_channel().await;
        Self {
            names,
            broker,
            db,
            shutdown: CancellationToken::new(),
            raw,
            channel,
            brokers: Vec::new(),
            relays: Vec::new(),
            consumers: Vec::new(),
            finished: false,
        }
    }

    pub fn db(&self) -> &testkit::TestDb {
        self.db
            .as_ref()
            .expect("a fixture made without_database has no database")
    }

    pub fn pool(&self) -> &sqlx::PgPool {
        &self.db().pool
    }

    /// A publisher on the fixture's connection, app id `test`.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.broker.clone(), "test")
    }

    /// Another direct connection for `names`.
    pub async fn connect(&mut self) -> Broker {
        self.connect_with(settings()).await.expect("connect")
    }

    /// Another connection for `names` with `settings`.
    pub async fn connect_with(&mut self, settings: AmqpSettings) -> Result<Broker, ConnectError> {
        let broker = Broker::connect(settings, self.names.topology()).await?;
        self.brokers.push(broker.clone());
        Ok(broker)
    }

    /// A proxy the test can cut, and a connection for `names` through it
    /// (`adjust` may change the settings first).
    pub async fn proxied_broker(
        &mut self,
        adjust: impl FnOnce(&mut AmqpSettings),
    ) -> (testkit::TcpProxy, Broker) {
        let proxy = testkit::TcpProxy::start("127.0.0.1:5672")
            .await
            .expect("proxy");
        let mut settings = settings().with_host_port("127.0.0.1", proxy.port());
        adjust(&mut settings);
        let broker = self.connect_with(settings).await.expect("connect");
        (proxy, broker)
    }

    /// A relay for the fixture's outbox with [`fast_relay`] options.
    pub fn relay(&mut self) -> RelayProbe {
        self.relay_with(fast_relay())
    }

    pub fn relay_with(&mut self, options: RelayOptions) -> RelayProbe {
        let broker = self.broker.clone();
        self.relay_on(broker, options)
    }

    /// A relay publishing through `broker`.
    pub fn relay_on(&mut self, broker: Broker, options: RelayOptions) -> RelayProbe {
        let relay = spawn_relay(
            self.pool().clone(),
            Publisher::new(broker, "test"),
            options,
            self.shutdown.clone(),
        );
        let probe = relay.probe();
        self.relays.push(relay);
        probe
    }

    /// Consumes the fixture's queue with `handler`.
    pub fn consume<H: Handler>(&mut self, handler: H, options: ConsumerOptions) -> ConsumerProbe {
        let broker = self.broker.clone();
        self.consume_on(broker, handler, options)
    }

    /// Consumes the fixture's queue with `handler` through `broker`.
    pub fn consume_on<H: Handler>(
        &mut self,
        broker: Broker,
        handler: H,
        options: ConsumerOptions,
    ) -> ConsumerProbe {
        let consumer = spawn_consumer(
            broker,
            self.names.queue.clone(),
            options,
            handler,
            self.shutdown.clone(),
        );
        let probe = consumer.probe();
        self.consumers.push(consumer);
        probe
    }

    /// Publishes a message of type `t` to the fixture's exchange, confirmed.
    pub async fn publish(&self, key: &str, body: &[u8]) -> OutgoingMessage {
        let message = OutgoingMessage::new(&self.names.exchange, key, "t", body.to_vec());
        self.publisher().publish(&message).await.expect("publish");
        message
    }

    /// Commits one outbox row for the fixture's exchange and returns its id.
    pub async fn commit_event(&self, key: &str) -> uuid::Uuid {
        commit_event(self.pool(), &self.names.exchange, key).await
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        count(self.pool(), sql).await
    }

    /// A plain channel, for looking at queues and publishing from the outside.
    pub fn channel(&self) -> &lapin::Channel {
        &self.channel
    }

    /// Messages ready in the fixture's queue.
    pub async fn ready(&self) -> u32 {
        ready(&self.channel, &self.names.queue.name).await
    }

    /// Messages ready in the fixture's DLQ.
    pub async fn dlq_ready(&self) -> u32 {
        ready(&self.channel, &self.names.queue.dlq_name()).await
    }

    /// Takes one message from the fixture's queue if there is one.
    pub async fn get(&self) -> Option<lapin::message::BasicGetMessage> {
        get(&self.channel, &self.names.queue.name).await
    }

    /// Takes one message from the fixture's DLQ if there is one.
    pub async fn get_dead(&self) -> Option<lapin::message::BasicGetMessage> {
        get(&self.channel, &self.names.queue.dlq_name()).await
    }

    /// Stops every relay and consumer started so far and waits for them; the
    /// connections, topology and database stay.
    pub async fn stop(&mut self) {
        std::mem::take(&mut self.shutdown).cancel();
        for consumer in std::mem::take(&mut self.consumers) {
            consumer.join().await;
        }
        for relay in std::mem::take(&mut self.relays) {
            relay.join().await;
        }
    }

    /// The end of a test: stops what runs, closes the connections, deletes the
    /// topology and drops the database.
    pub async fn finish(mut self) {
        self.stop().await;
        for broker in std::mem::take(&mut self.brokers) {
            broker.close().await;
        }
        self.broker.close().await;
        let _ = self.raw.close(200, "bye".into()).await;
        self.names.cleanup().await;
        if let Some(db) = self.db.take() {
            db.drop_db().await;
        }
        self.finished = true;
    }
}

impl Drop for Fixture {
    /// A test that did not reach `finish` (it panicked): the same cleanup, from
    /// a thread of its own.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.shutdown.cancel();
        let consumers = std::mem::take(&mut self.consumers);
        let relays = std::mem::take(&mut self.relays);
        let mut brokers = std::mem::take(&mut self.brokers);
        brokers.push(self.broker.clone());
        let topology = self.names.topology();
        // Dropped after the topology is gone, by TestDb's Drop (which does not
        // touch the pool, whose connections belong to the test's runtime).
        let db = self.db.take();
        aside(move || async move {
            let stopped = async {
                for consumer in consumers {
                    consumer.join().await;
                }
                for relay in relays {
                    relay.join().await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), stopped).await;
            // Closed, no connection can declare the topology again.
            for broker in brokers {
                broker.close().await;
            }
            delete_topology(&topology).await;
            drop(db);
        });
    }
}

/// Runs `work` to its end on a thread of its own with a small current-thread
/// runtime: there is no async in `Drop`, and a runtime cannot be started on a
/// thread that runs one. On a worker of a multi-thread runtime the wait goes
/// through `block_in_place`, so the tasks `work` waits for can still run.
fn aside<F, Fut>(work: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let run = move || {
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(work());
            }
        })
        .join();
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(run);
        }
        _ => run(),
    }
}

/// What the broker reports of `queue` for one `list_queues` info item
/// (`arguments`, `messages_unacknowledged`, …).
pub fn queue_info(queue: &str, item: &str) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", item])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{queue}\t")).map(str::to_owned))
}

/// A queue's arguments as the broker reports them.
pub fn queue_arguments(queue: &str) -> Option<String> {
    queue_info(queue, "arguments")
}
