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
//! The messaging half (connections, relay, consumers, inbox cleanup, DLQ
//! depths) is a [`messaging::Runtime`]; this adds the database, HTTP, probes and
//! the process around it.

use std::{future::Future, net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use axum::{extract::DefaultBodyLimit, middleware, serve::ListenerExt};
use contracts::topology::{self, Owner};
use messaging::{
    ConsumerOptions, Handler, Inbox, InboxHandler, RelayOptions, Runtime, RuntimeBuilder,
    StartError,
};
use sqlx::PgPool;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;

use crate::{
    auth::{self, Auth},
    config::{Common, ConfigError, LogFormat, ProcessEnv},
    database::{self, DatabaseError},
    health::Health,
    metrics::{self, Metrics},
    openapi, problem,
};

/// The span attribute naming the order a span concerns; messages carry the order
/// id as their correlation id, so messaging spans get it too.
pub const ORDER_ID_ATTRIBUTE: &str = "shop.order_id";

/// Bound of each closing step at shutdown (pool, broker connections).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

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
    Messaging(#[from] StartError),
    #[error("cannot listen on {addr} (HTTP_ADDR): {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("HTTP server failed: {0}")]
    Serve(String),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error(transparent)]
    Auth(#[from] auth::KeysError),
}

/// What a service declares about itself.
#[derive(Debug)]
pub struct Spec {
    pub name: &'static str,
    /// What the service does, for its OpenAPI document.
    pub description: &'static str,
    /// Which of the shop's queues the service consumes. It declares the whole
    /// topology (see `contracts::topology`), with retry queues for its own queue.
    pub owner: Owner,
    pub common: Common,
    pub migrations: &'static [(i64, &'static str, &'static str)],
}

#[derive(Debug)]
pub struct Platform {
    pub name: &'static str,
    description: &'static str,
    pub pool: PgPool,
    pub shutdown: CancellationToken,
    pub metrics: Arc<Metrics>,
    /// Bearer tokens on the service's own routes (`AUTH_*`).
    auth: Arc<Auth>,
    common: Common,
    /// The queue this service consumes.
    queue: String,
    /// What the messaging runtime will run; started by [`Self::bind`].
    messaging: RuntimeBuilder,
    tasks: Vec<JoinHandle<()>>,
}

impl Platform {
    /// Connects the database (one clear error when it cannot) and migrates it;
    /// the broker is connected, and the relay and consumers started, by
    /// [`Self::bind`].
    pub async fn start(spec: Spec, shutdown: CancellationToken) -> Result<Self, StartupError> {
        let common = spec.common;
        let auth = Auth::start(common.auth.clone()).await?;
        let pool = database::connect_and_migrate(
            common.database_url.expose(),
            common.db_pool_size,
            common.statement_timeout,
            spec.migrations,
        )
        .await?;
        let messaging = Runtime::builder(pool.clone(), common.amqp.clone())
            .app_id(spec.name)
            .topology(
                topology::for_service(spec.owner, common.retry.clone())
                    .with_initial_group_size(common.quorum_group_size),
            )
            .relay(RelayOptions {
                park_after: common.outbox_park_after,
                ..RelayOptions::default()
            })
            .consumer_options(ConsumerOptions {
                prefetch: common.prefetch,
                concurrency: common.concurrency,
                batch: common.batch,
                handler_timeout: common.handler_timeout,
                ..ConsumerOptions::default()
            })
            .inbox_retention(common.inbox_retention)
            // connect_and_migrate ran them, outside the pool's statement timeout.
            .migrate(false);
        Ok(Self {
            name: spec.name,
            description: spec.description,
            pool,
            shutdown,
            metrics: Metrics::new(),
            auth,
            queue: topology::queue(spec.owner, common.retry.clone()).name,
            common,
            messaging,
            tasks: Vec::new(),
        })
    }

    /// The inbox of this service's queue, for its handler's exactly-once effects.
    pub fn inbox(&self) -> Inbox {
        Inbox::new(self.pool.clone(), self.queue.clone())
    }

    /// Consumes this service's queue with `handler` (prefetch and concurrency
    /// from the config) once the service is bound.
    pub fn consume<H: Handler>(&mut self, handler: H) {
        self.messaging = self.take_messaging().consume(self.queue.clone(), handler);
    }

    /// Consumes this service's queue through its inbox: `handler` applies each
    /// message exactly once, deliveries that arrive together share one
    /// transaction (up to `CONSUMER_BATCH`).
    pub fn consume_inbox<H: InboxHandler>(&mut self, handler: H) {
        self.messaging = self
            .take_messaging()
            .consume_inbox(self.queue.clone(), handler);
    }

    /// The runtime's builder, an empty one left in its place.
    fn take_messaging(&mut self) -> RuntimeBuilder {
        let empty = Runtime::builder(self.pool.clone(), self.common.amqp.clone());
        std::mem::replace(&mut self.messaging, empty)
    }

    /// Runs `task` until shutdown (periodic maintenance of the service).
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    /// Connects the broker and starts the messaging runtime (relay, consumers),
    /// then binds `HTTP_ADDR` (port 0 picks a free port) for `routes`: the
    /// service is then ready to run.
    pub async fn bind(mut self, routes: OpenApiRouter) -> Result<Service, StartupError> {
        let runtime = self.take_messaging().start(self.shutdown.clone()).await?;
        let addr = self.common.http_addr;
        let listener = match TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(e) => {
                // Nothing may keep consuming or relaying for a service that
                // will not run: stop it all in order first.
                self.shutdown.cancel();
                runtime.join().await;
                return Err(StartupError::Bind {
                    addr,
                    reason: e.to_string(),
                });
            }
        };
        Ok(Service {
            platform: self,
            runtime,
            listener,
            routes,
        })
    }

    /// Serves `routes` plus health and metrics until shutdown, then stops
    /// everything in order.
    async fn serve(
        self,
        runtime: Runtime,
        listener: TcpListener,
        routes: OpenApiRouter,
    ) -> Result<(), StartupError> {
        let health = Health {
            pool: self.pool.clone(),
            messaging: runtime.probe(),
            metrics: self.metrics.clone(),
            auth: self.auth.clone(),
        };
        let mut tasks = self.tasks;
        tasks.push(tokio::spawn(
            self.auth.clone().refresh_until(self.shutdown.clone()),
        ));
        // The service's own routes need a token; the probes, /metrics and
        // the document (merged after) do not.
        let mut routes = routes.route_layer(middleware::from_fn_with_state(
            self.auth.clone(),
            auth::authenticate,
        ));
        if self.auth.is_on() {
            openapi::require_bearer(routes.get_openapi_mut());
        }
        let (routes, api) = routes
            .merge(health.router())
            .merge(openapi::router())
            .split_for_parts();
        let api = openapi::document(self.name, self.description, api);
        let app = openapi::serve(routes, api)
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
        runtime.join().await;
        for task in tasks {
            let _ = task.await;
        }
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
    runtime: Runtime,
    listener: TcpListener,
    routes: OpenApiRouter,
}

impl Service {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until the shutdown token fires, then drains and stops.
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        self.platform
            .serve(self.runtime, self.listener, self.routes)
            .await
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
    let config = match crate::config::crash_point_supported(&ProcessEnv)
        .and_then(|()| read_config(&ProcessEnv))
    {
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
