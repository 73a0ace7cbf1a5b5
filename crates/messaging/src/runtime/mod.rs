//! One entry point: everything a service runs around its handlers, started in
//! one call and stopped in order.
//!
//! ```text
//!  Runtime::builder(pool, amqp)
//!      .topology(t)               declared on both connections, again after reconnects
//!      .relay(options)            the outbox relay (on by default)
//!      .consume_inbox(queue, h)   exactly-once handler through the inbox (or .consume)
//!      .start(shutdown)  ─▶ migrate the messaging tables ─▶ connect "publish" and
//!                          "consume" ─▶ relay, consumers, inbox cleanup, DLQ depths
//!  runtime.probe()       ─▶ readiness and metrics (connections, consumers, relay)
//!  shutdown.cancel(); runtime.join()
//!                       ─▶ consumers finish and ack ─▶ consume connection closed
//!                          ─▶ relay finishes its batch ─▶ publish connection closed
//! ```
//!
//! Publishing and consuming use separate connections, as RabbitMQ advises: under
//! a resource alarm the broker stops reading from connections that publish, and
//! a consumer sharing that connection could not ack either. Everything that
//! publishes (the relay, and the consumers' retry and dead-letter copies) uses
//! the publish connection; the consume connection only receives and acks, so
//! the consumers keep draining queues while the relay waits out an alarm.

use std::{fmt, time::Duration};

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    AmqpSettings, Broker, ConnectError, ConsumerHandle, ConsumerOptions, Handler, Inbox,
    InboxConsumer, InboxHandler, Publisher, QueueSpec, RelayHandle, RelayOptions, Topology,
    dead_letters::DepthProbe, spawn_consumer, spawn_relay,
};

mod probe;

pub use probe::{Check, RuntimeProbe};

/// Why [`RuntimeBuilder::start`] failed; each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Migrating the `outbox` and `inbox` tables failed (the database is
    /// unreachable, or refused a migration).
    #[error("migrating the messaging tables failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A queue given to [`RuntimeBuilder::consume`] or
    /// [`RuntimeBuilder::consume_inbox`] is not in the topology.
    #[error("queue '{0}' is consumed but not declared in the topology")]
    UnknownQueue(String),
    /// The publish or the consume connection could not be made, or the
    /// broker refused the topology.
    #[error(transparent)]
    Broker(#[from] ConnectError),
}

/// A consumer to start once the connections are up.
type StartConsumer = Box<dyn FnOnce(&Wiring) -> ConsumerHandle + Send>;

/// What a consumer is started with.
struct Wiring {
    broker: Broker,
    publisher: Publisher,
    queue: QueueSpec,
    shutdown: CancellationToken,
}

/// Collects what the runtime runs; [`RuntimeBuilder::start`] starts it.
pub struct RuntimeBuilder {
    pool: PgPool,
    amqp: AmqpSettings,
    topology: Topology,
    app_id: String,
    relay: Option<RelayOptions>,
    consumer_options: ConsumerOptions,
    consumers: Vec<(String, StartConsumer)>,
    inbox_retention: Duration,
    migrate: bool,
    dlq_depth_every: Duration,
}

impl fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("amqp", &self.amqp)
            .field("topology", &self.topology)
            .field("app_id", &self.app_id)
            .field("relay", &self.relay)
            .field(
                "consumers",
                &self.consumers.iter().map(|(q, _)| q).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl RuntimeBuilder {
    /// Declares `topology` (exchanges, queues with their retry and dead-letter
    /// queues) on both connections, at start and after every reconnect.
    #[must_use]
    pub fn topology(mut self, topology: Topology) -> Self {
        self.topology = topology;
        self
    }

    /// The name stamped as `app_id` on what the runtime publishes without one
    /// (every outbox event; a retry or dead-letter copy keeps its original's)
    /// and in the consumer tags of the consumers added after this call
    /// (default: the program's file name). The
    /// connections are named after [`AmqpSettings::connection_name`] and their
    /// role.
    #[must_use]
    pub fn app_id(mut self, app_id: impl Into<String>) -> Self {
        self.app_id = app_id.into();
        self.consumer_options.app_id.clone_from(&self.app_id);
        self
    }

    /// The outbox relay's options (the relay runs by default, with
    /// [`RelayOptions::default`]).
    #[must_use]
    pub fn relay(mut self, options: RelayOptions) -> Self {
        self.relay = Some(options);
        self
    }

    /// No outbox relay (a process that only consumes, or a second process
    /// whose relay runs elsewhere).
    #[must_use]
    pub fn without_relay(mut self) -> Self {
        self.relay = None;
        self
    }

    /// Options of the consumers added after this call (prefetch, concurrency,
    /// batch, handler deadline); `publisher` and `app_id` are the runtime's.
    #[must_use]
    pub fn consumer_options(mut self, options: ConsumerOptions) -> Self {
        self.consumer_options = ConsumerOptions {
            app_id: self.app_id.clone(),
            publisher: None,
            ..options
        };
        self
    }

    /// How long inbox records are kept (deduplication window), default 7 days.
    #[must_use]
    pub fn inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention;
        self
    }

    /// Whether [`Self::start`] migrates the messaging tables (`outbox`,
    /// `inbox`) first; on by default. Turn it off where migrations run apart.
    #[must_use]
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Consumes `queue` (declared in the topology) with `handler`: its outcome
    /// acks, retries later or dead-letters each message.
    #[must_use]
    pub fn consume<H: Handler>(mut self, queue: impl Into<String>, handler: H) -> Self {
        let options = self.consumer_options.clone();
        let start: StartConsumer = Box::new(move |wiring: &Wiring| {
            spawn_consumer(
                wiring.broker.clone(),
                wiring.queue.clone(),
                ConsumerOptions {
                    publisher: Some(wiring.publisher.clone()),
                    ..options
                },
                handler,
                wiring.shutdown.clone(),
            )
        });
        self.consumers.push((queue.into(), start));
        self
    }

    /// Consumes `queue` through its inbox: `handler` applies each message
    /// exactly once, in a transaction with the inbox record; deliveries that
    /// arrive together share one transaction (up to the consumer's `batch`).
    #[must_use]
    pub fn consume_inbox<H: InboxHandler>(self, queue: impl Into<String>, handler: H) -> Self {
        let queue = queue.into();
        let inbox = Inbox::new(self.pool.clone(), queue.clone());
        self.consume(queue, InboxConsumer::new(inbox, handler))
    }

    /// Migrates, connects and starts everything; each failure is one clear
    /// error. Everything stops when `shutdown` fires; [`Runtime::join`] waits
    /// for it.
    pub async fn start(self, shutdown: CancellationToken) -> Result<Runtime, StartError> {
        if self.migrate {
            crate::migrations::migrate(&self.pool)
                .await
                .map_err(StartError::Migrate)?;
        }
        let mut queues = Vec::with_capacity(self.consumers.len());
        for (name, _) in &self.consumers {
            let spec = self.topology.queues.iter().find(|q| &q.name == name);
            queues.push(
                spec.cloned()
                    .ok_or_else(|| StartError::UnknownQueue(name.clone()))?,
            );
        }
        let connect = |role: &str| {
            let mut settings = self.amqp.clone();
            settings.connection_name = format!("{} {role}", self.amqp.connection_name);
            Broker::connect(settings, self.topology.clone())
        };
        let publish = connect("publish").await?;
        let consume = match connect("consume").await {
            Ok(broker) => broker,
            Err(error) => {
                publish.close().await;
                return Err(error.into());
            }
        };
        let publisher = Publisher::new(publish.clone(), self.app_id.clone());
        let relay = self.relay.map(|options| {
            spawn_relay(
                self.pool.clone(),
                publisher.clone(),
                options,
                shutdown.clone(),
            )
        });
        let mut tasks = vec![crate::inbox::spawn_cleanup(
            self.pool.clone(),
            self.inbox_retention,
            Duration::from_secs(600),
            shutdown.clone(),
        )];
        let mut consumers = Vec::with_capacity(queues.len());
        let mut dlq_depths = Vec::with_capacity(queues.len());
        for ((_, start), queue) in self.consumers.into_iter().zip(queues) {
            let (depth, task) = crate::dead_letters::watch_depth(
                consume.clone(),
                &queue.name,
                self.dlq_depth_every,
                shutdown.clone(),
            );
            dlq_depths.push(depth);
            tasks.push(task);
            consumers.push(start(&Wiring {
                broker: consume.clone(),
                publisher: publisher.clone(),
                queue,
                shutdown: shutdown.clone(),
            }));
        }
        Ok(Runtime {
            pool: self.pool,
            publish,
            consume,
            publisher,
            relay,
            consumers,
            dlq_depths,
            tasks,
            shutdown,
        })
    }
}

/// The running messaging of one process.
#[derive(Debug)]
pub struct Runtime {
    pool: PgPool,
    publish: Broker,
    consume: Broker,
    publisher: Publisher,
    relay: Option<RelayHandle>,
    consumers: Vec<ConsumerHandle>,
    dlq_depths: Vec<DepthProbe>,
    tasks: Vec<JoinHandle<()>>,
    shutdown: CancellationToken,
}

impl Runtime {
    /// Collects what to run on `pool` (the process's own database, where the
    /// outbox and inbox tables live) and the broker of `amqp`.
    pub fn builder(pool: PgPool, amqp: AmqpSettings) -> RuntimeBuilder {
        let app_id = crate::settings::program_name();
        RuntimeBuilder {
            pool,
            amqp,
            topology: Topology::default(),
            consumer_options: ConsumerOptions {
                app_id: app_id.clone(),
                ..ConsumerOptions::default()
            },
            app_id,
            relay: Some(RelayOptions::default()),
            consumers: Vec::new(),
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            migrate: true,
            dlq_depth_every: Duration::from_secs(5),
        }
    }

    /// The database the runtime's outbox and inbox live in.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Publishes directly (confirmed, on the publish connection). Business
    /// events belong in the outbox ([`crate::enqueue`]) instead, so they
    /// commit or roll back with the work that caused them.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// A cheap view of everything running, for readiness and metrics.
    pub fn probe(&self) -> RuntimeProbe {
        RuntimeProbe {
            brokers: vec![
                ("publish", self.publish.clone()),
                ("consume", self.consume.clone()),
            ],
            consumers: self.consumers.iter().map(ConsumerHandle::probe).collect(),
            dlq_depths: self.dlq_depths.clone(),
            relay: self.relay.as_ref().map(RelayHandle::probe),
        }
    }

    /// Waits until everything stopped after the shutdown token fired (fires it
    /// if it has not): consumers finish and ack, the consume connection closes,
    /// the relay finishes its batch, the publish connection closes.
    pub async fn join(self) {
        self.shutdown.cancel();
        for consumer in self.consumers {
            consumer.join().await;
        }
        self.consume.close().await;
        if let Some(relay) = self.relay {
            relay.join().await;
        }
        for task in self.tasks {
            let _ = task.await;
        }
        self.publish.close().await;
    }
}
