//! The pieces every service runs around its domain, started and stopped in one
//! place:
//!
//! ```text
//!  start:  database (pool + migrations) ─▶ broker connections (preflight + topology)
//!          ─▶ outbox relay ─▶ inbox cleanup      consume(): the service's own queue
//!  serve:  HTTP (domain routes + /healthz /readyz /metrics) until the shutdown token
//!  stop:   stop accepting, finish in-flight requests ─▶ consumers finish and ack
//!          ─▶ consume connection closed ─▶ relay finishes its batch
//!          ─▶ publish connection closed
//! ```
//!
//! Publishing and consuming use separate connections, as RabbitMQ advises: under
//! a resource alarm the broker stops reading from connections that publish, and
//! a consumer sharing that connection could not ack either. Everything that
//! publishes (the relay, and the consumers' retry and dead-letter copies) uses
//! the publish connection; the consume connection only receives and acks. So
//! the saga keeps consuming (which drains the queues the alarm is about) while
//! the relay waits.

use std::{future::Future, net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use axum::{Router, extract::DefaultBodyLimit, middleware, serve::ListenerExt};
use contracts::topology::{self, Owner};
use messaging::{
    Broker, ConnectError, ConsumerHandle, ConsumerOptions, Handler, Inbox, InboxConsumer,
    InboxHandler, Publisher, QueueSpec, RelayHandle, RelayOptions, spawn_consumer, spawn_relay,
};
use sqlx::PgPool;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Common, ConfigError, LogFormat, ProcessEnv},
    database::{self, DatabaseError},
    health::Health,
    metrics::{self, Metrics},
    problem,
};

/// The span attribute naming the order a span concerns; messages carry the order
/// id as their correlation id, so messaging spans get it too.
pub const ORDER_ID_ATTRIBUTE: &str = "shop.order_id";

/// Bound of each closing step at shutdown (pool, broker connections).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often each service reads the depth of its DLQ (for metrics).
const DLQ_DEPTH_EVERY: Duration = Duration::from_secs(5);

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Why a service could not start or run; each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error(transparent)]
    Broker(#[from] ConnectError),
    #[error("cannot listen on {addr} (HTTP_ADDR): {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("HTTP server failed: {0}")]
    Serve(String),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
}

/// What a service declares about itself.
#[derive(Debug)]
pub struct Spec {
    pub name: &'static str,
    /// Which of the shop's queues the service consumes. It declares the whole
    /// topology (see `contracts::topology`), with retry queues for its own queue.
    pub owner: Owner,
    pub common: Common,
    pub migrations: &'static [(i64, &'static str, &'static str)],
}

#[derive(Debug)]
pub struct Platform {
    pub name: &'static str,
    pub pool: PgPool,
    /// The connection the relay publishes on.
    pub broker: Broker,
    /// The connection consumers receive and ack on.
    pub consumer_broker: Broker,
    /// Publishes on `broker`: the relay's rows, and the consumers' retries and
    /// dead letters (so an alarm blocking publishers never blocks an ack).
    publisher: Publisher,
    pub shutdown: CancellationToken,
    pub metrics: Arc<Metrics>,
    common: Common,
    /// The queue this service consumes.
    queue: QueueSpec,
    relay: RelayHandle,
    consumers: Vec<ConsumerHandle>,
    dlq_depths: Vec<messaging::dead_letters::DepthProbe>,
    tasks: Vec<JoinHandle<()>>,
}

impl Platform {
    /// Connects database and broker (each failure one clear error), migrates, and
    /// starts the relay and the inbox cleanup.
    pub async fn start(spec: Spec, shutdown: CancellationToken) -> Result<Self, StartupError> {
        let common = spec.common;
        let pool = database::connect_and_migrate(
            common.database_url.expose(),
            common.db_pool_size,
            common.statement_timeout,
            spec.migrations,
        )
        .await?;
        let queue = topology::queue(spec.owner, common.retry.clone());
        let topology = topology::for_service(spec.owner, common.retry.clone());
        let connect = |role: &str| {
            let mut settings = common.amqp.clone();
            settings.connection_name = format!("{} {role}", settings.connection_name);
            Broker::connect(settings, topology.clone())
        };
        let broker = connect("publish").await?;
        let consumer_broker = match connect("consume").await {
            Ok(b) => b,
            Err(e) => {
                broker.close().await;
                return Err(e.into());
            }
        };
        let publisher = Publisher::new(broker.clone(), spec.name);
        let relay = spawn_relay(
            pool.clone(),
            publisher.clone(),
            RelayOptions {
                park_after: common.outbox_park_after,
                ..RelayOptions::default()
            },
            shutdown.clone(),
        );
        let cleanup = messaging::inbox::spawn_cleanup(
            pool.clone(),
            common.inbox_retention,
            Duration::from_secs(600),
            shutdown.clone(),
        );
        Ok(Self {
            name: spec.name,
            pool,
            broker,
            consumer_broker,
            publisher,
            shutdown,
            metrics: Metrics::new(),
            common,
            queue,
            relay,
            consumers: Vec::new(),
            dlq_depths: Vec::new(),
            tasks: vec![cleanup],
        })
    }

    /// The inbox of this service's queue, for its handler's exactly-once effects.
    pub fn inbox(&self) -> Inbox {
        Inbox::new(self.pool.clone(), self.queue.name.clone())
    }

    /// Starts consuming this service's queue with `handler` (prefetch and
    /// concurrency from the config).
    pub fn consume<H: Handler>(&mut self, handler: H) {
        let options = ConsumerOptions {
            prefetch: self.common.prefetch,
            concurrency: self.common.concurrency,
            batch: self.common.batch,
            app_id: self.name.to_owned(),
            handler_timeout: self.common.handler_timeout,
            publisher: Some(self.publisher.clone()),
            ..ConsumerOptions::default()
        };
        self.consumers.push(spawn_consumer(
            self.consumer_broker.clone(),
            self.queue.clone(),
            options,
            handler,
            self.shutdown.clone(),
        ));
        let (depth, task) = messaging::dead_letters::watch_depth(
            self.consumer_broker.clone(),
            &self.queue.name,
            DLQ_DEPTH_EVERY,
            self.shutdown.clone(),
        );
        self.dlq_depths.push(depth);
        self.tasks.push(task);
    }

    /// Starts consuming this service's queue through its inbox: `handler`
    /// applies each message exactly once, deliveries that arrive together share
    /// one transaction (up to `CONSUMER_BATCH`).
    pub fn consume_inbox<H: InboxHandler>(&mut self, handler: H) {
        let consumer = InboxConsumer::new(self.inbox(), handler);
        self.consume(consumer);
    }

    /// Runs `task` until shutdown (periodic maintenance of the service).
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    pub fn health(&self) -> Health {
        Health {
            pool: self.pool.clone(),
            brokers: vec![
                ("publish", self.broker.clone()),
                ("consume", self.consumer_broker.clone()),
            ],
            consumers: self.consumers.iter().map(ConsumerHandle::probe).collect(),
            dlq_depths: self.dlq_depths.clone(),
            relay: Some(self.relay.probe()),
            metrics: self.metrics.clone(),
        }
    }

    /// Binds `HTTP_ADDR` (port 0 picks a free port) for `routes`: the service is
    /// then ready to run.
    pub async fn bind(self, routes: Router) -> Result<Service, StartupError> {
        let addr = self.common.http_addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| StartupError::Bind {
                addr,
                reason: e.to_string(),
            })?;
        Ok(Service {
            platform: self,
            listener,
            routes,
        })
    }

    /// Serves `routes` plus health and metrics until shutdown, then stops
    /// everything in order.
    async fn serve(self, listener: TcpListener, routes: Router) -> Result<(), StartupError> {
        let app = routes
            .merge(self.health().router())
            .fallback(problem::not_found)
            .layer(middleware::from_fn_with_state(
                self.metrics.clone(),
                metrics::track_http,
            ))
            .layer(
                tower_http::trace::TraceLayer::new_for_http()
                    .make_span_with(crate::http_span::make_span)
                    .on_response(crate::http_span::on_response)
                    // Failures are logged where they happen (Problem::internal),
                    // and a 503 from /readyz is an answer, not an error.
                    .on_failure(()),
            )
            .layer(middleware::map_response(close_after_unread_body))
            .layer(DefaultBodyLimit::max(BODY_LIMIT));
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, service = self.name, "listening");
        }
        let stop = self.shutdown.clone();
        // Small request/response exchanges must not wait on Nagle's algorithm
        // meeting the peer's delayed ACK (tens of milliseconds a time).
        let listener = listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        });
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        // The token may not have fired if the server failed on its own.
        self.shutdown.cancel();
        for consumer in self.consumers {
            consumer.join().await;
        }
        self.consumer_broker.close().await;
        self.relay.join().await;
        for task in self.tasks {
            let _ = task.await;
        }
        self.broker.close().await;
        // Waits for every connection to come back; one still being returned
        // (e.g. flushing a statement abandoned at the handler deadline) must not
        // keep the process from exiting: the server rolls back what it held when
        // the socket closes.
        if tokio::time::timeout(CLOSE_TIMEOUT, self.pool.close())
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?CLOSE_TIMEOUT, "database pool did not close in time; exiting anyway");
        }
        tracing::info!(service = self.name, "stopped");
        served.map_err(|e| StartupError::Serve(e.to_string()))
    }
}

/// A built service: connected, consuming, bound, ready to serve.
#[derive(Debug)]
pub struct Service {
    platform: Platform,
    listener: TcpListener,
    routes: Router,
}

impl Service {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until the shutdown token fires, then drains and stops.
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        self.platform.serve(self.listener, self.routes).await
    }
}

/// The whole of a service's `main`: config, telemetry, runtime, run, flush.
/// Any startup failure is one line on stderr and a non-zero exit.
pub fn main<C, Run, Fut>(
    name: &'static str,
    read_config: impl FnOnce(&ProcessEnv) -> Result<C, ConfigError>,
    log_format: impl FnOnce(&C) -> LogFormat,
    run: Run,
) -> ExitCode
where
    Run: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), StartupError>>,
{
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return crate::healthcheck::run();
    }
    crate::install_crypto_provider();
    messaging::propagation::set_correlation_attribute(ORDER_ID_ATTRIBUTE);
    let config = match read_config(&ProcessEnv) {
        Ok(c) => c,
        Err(e) => return fail(name, &e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(name, &e),
    };
    // The gRPC exporter's channel lives on the runtime: initialise inside it and
    // flush before it goes away.
    let telemetry = {
        let _inside = runtime.enter();
        match telemetry::init(name, log_format(&config)) {
            Ok(t) => t,
            Err(e) => return fail(name, &e),
        }
    };
    let result = runtime.block_on(async {
        let shutdown = crate::shutdown::on_signal();
        run(config, shutdown).await
    });
    // Flushing blocks: off the runtime's workers, while the runtime still runs.
    let _ =
        runtime.block_on(async { tokio::task::spawn_blocking(move || telemetry.shutdown()).await });
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(name, &e),
    }
}

fn fail(name: &str, error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("{name}: {error}");
    ExitCode::FAILURE
}

/// A 413 is sent before the oversized body was read; the rest of it is still on
/// the wire, so the connection cannot carry another request. Saying so
/// (`Connection: close`) stops a client from reusing it and failing its next
/// request on a reset socket.
async fn close_after_unread_body(
    mut response: axum::response::Response,
) -> axum::response::Response {
    if response.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}
