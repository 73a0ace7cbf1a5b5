//! A supervised broker connection (a service runs two: one publishes, one consumes).
//!
//! [`Broker::connect`] is the startup preflight: it connects once, declares the
//! topology and turns any failure into one clear [`ConnectError`] line. It then
//! spawns a supervisor that watches the connection and, when it dies, rebuilds it
//! from scratch with [`Backoff`](crate::Backoff) (full jitter, capped) and declares
//! the topology again. Publishers and consumers follow the current connection
//! through a `watch` channel: a new *generation* means "open your channels again".
//!
//! We do not use the client's built-in recovery: it cannot recover channels closed
//! by soft errors and may never finish after a broker restart. A fresh connection is
//! simple and always works.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    Connection, ConnectionProperties, ErrorKind,
    protocol::{AMQPErrorKind, AMQPHardError},
    tcp::OwnedTLSConfig,
    types::LongString,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{AmqpSettings, Heartbeat, Topology};

/// Why the broker could not be used at startup. Each variant displays as one line
/// that names what is wrong and never the password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("RabbitMQ unreachable at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("RabbitMQ refused access for user '{user}' on vhost '{vhost}' at {endpoint}: {reason}")]
    AccessRefused {
        endpoint: String,
        user: String,
        vhost: String,
        reason: String,
    },
    #[error(
        "RabbitMQ at {endpoint} has no vhost '{vhost}' (or user '{user}' may not use it): {reason}"
    )]
    VhostNotFound {
        endpoint: String,
        user: String,
        vhost: String,
        reason: String,
    },
    #[error("TLS connection to RabbitMQ at {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
    #[error("cannot read the AMQP CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("RabbitMQ at {endpoint} did not complete the connection within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("declaring the broker topology on {endpoint} failed: {reason}")]
    Topology { endpoint: String, reason: String },
    #[error("connecting to RabbitMQ at {endpoint} failed: {reason}")]
    Other { endpoint: String, reason: String },
}

/// The current connection, if any, and how many times it was (re)built.
#[derive(Clone, Debug)]
pub(crate) struct Link {
    pub(crate) generation: u64,
    pub(crate) connection: Option<Arc<Connection>>,
}

/// A cheap-to-clone handle on the supervised connection.
#[derive(Clone, Debug)]
pub struct Broker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: AmqpSettings,
    topology: Topology,
    link: watch::Sender<Link>,
    reconnects: AtomicU64,
    blocked: AtomicBool,
    shutdown: CancellationToken,
    /// The supervisor's proof of life (liveness).
    heartbeat: Heartbeat,
}

impl Broker {
    /// Connects, declares `topology`, and starts supervising the connection.
    #[tracing::instrument(skip_all, fields(broker = %settings))]
    pub async fn connect(settings: AmqpSettings, topology: Topology) -> Result<Self, ConnectError> {
        let connection = open(&settings).await?;
        declare_bounded(&settings, &connection, &topology).await?;
        let connection = Arc::new(connection);
        let (link, _) = watch::channel(Link {
            generation: 1,
            connection: Some(connection.clone()),
        });
        let broker = Self {
            inner: Arc::new(Inner {
                settings,
                topology,
                link,
                reconnects: AtomicU64::new(0),
                blocked: AtomicBool::new(false),
                shutdown: CancellationToken::new(),
                heartbeat: Heartbeat::default(),
            }),
        };
        tokio::spawn(supervise(broker.inner.clone(), connection));
        tracing::info!("connected to RabbitMQ");
        Ok(broker)
    }

    pub fn settings(&self) -> &AmqpSettings {
        &self.inner.settings
    }

    /// True while a connection is open (for readiness).
    pub fn is_connected(&self) -> bool {
        self.inner
            .link
            .borrow()
            .connection
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// True while the broker blocks publishing (a memory or disk alarm).
    pub fn is_blocked(&self) -> bool {
        self.inner.blocked.load(Ordering::Relaxed)
    }

    /// Resolves once the broker blocks this connection (polled: the flag is set
    /// by the supervisor from the connection's events).
    pub(crate) async fn blocked_signal(&self) {
        while !self.is_blocked() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The supervisor's heartbeat: it stops only if the supervisor is wedged.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.inner.heartbeat
    }

    /// How many times the connection was rebuilt since startup.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    pub(crate) fn watch(&self) -> watch::Receiver<Link> {
        self.inner.link.subscribe()
    }

    /// The current connection, if there is one right now.
    pub(crate) fn current(&self) -> Link {
        self.inner.link.borrow().clone()
    }

    /// Waits for a live connection; `None` once the broker handle was closed.
    pub(crate) async fn connected(&self) -> Option<Link> {
        let mut rx = self.watch();
        loop {
            {
                let link = rx.borrow_and_update();
                if link
                    .connection
                    .as_ref()
                    .is_some_and(|c| c.status().connected())
                {
                    return Some(link.clone());
                }
            }
            tokio::select! {
                () = self.inner.shutdown.cancelled() => return None,
                changed = rx.changed() => changed.ok()?,
            }
        }
    }

    /// Resolves once the connection of `generation` is gone (closed, replaced, or
    /// the broker handle shut down). Work tied to a connection races this, since
    /// calls on a connection that dies under them may never return.
    pub(crate) async fn lost(&self, generation: u64) {
        let mut rx = self.watch();
        let mut poll = tokio::time::interval(Duration::from_millis(250));
        loop {
            {
                let link = rx.borrow_and_update();
                let alive = link.generation == generation
                    && link
                        .connection
                        .as_ref()
                        .is_some_and(|c| c.status().connected());
                if !alive {
                    return;
                }
            }
            tokio::select! {
                () = self.inner.shutdown.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
                _ = poll.tick() => {}
            }
        }
    }

    /// Stops supervising and closes the connection. Call after consumers stopped.
    pub async fn close(&self) {
        self.inner.shutdown.cancel();
        let link = self.current();
        if let Some(connection) = link.connection
            && connection.status().connected()
        {
            // Bounded: the client library can leave a close pending forever
            // when the peer stops answering.
            let closed = tokio::time::timeout(
                Duration::from_secs(5),
                connection.close(200, "shutdown".into()),
            )
            .await;
            if closed.is_err() {
                tracing::warn!("RabbitMQ connection did not close within 5 s; dropping it");
            }
        }
        self.inner.link.send_modify(|l| l.connection = None);
    }
}

/// Watches the connection; when it dies, rebuilds it until it works again.
async fn supervise(inner: Arc<Inner>, mut connection: Arc<Connection>) {
    loop {
        wait_until_dead(&inner, &connection).await;
        inner.blocked.store(false, Ordering::Relaxed);
        inner.link.send_modify(|l| l.connection = None);
        if inner.shutdown.is_cancelled() {
            return;
        }
        tracing::warn!(broker = %inner.settings, "RabbitMQ connection lost; reconnecting");
        let mut attempt = 0u32;
        connection = loop {
            tokio::select! {
                () = inner.shutdown.cancelled() => return,
                () = inner.heartbeat.sleep(inner.settings.backoff.delay(attempt)) => {}
            }
            inner.heartbeat.beat();
            // Opening and declaring are both bounded (a connection that dies
            // mid-declare can leave the declare pending forever) and give way to
            // shutdown.
            let attempt_result = async {
                let c = open(&inner.settings).await?;
                match declare_bounded(&inner.settings, &c, &inner.topology).await {
                    Ok(()) => Ok(c),
                    Err(e) => {
                        // Do not leave a half-declared connection behind.
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            c.close(200, "topology declaration failed".into()),
                        )
                        .await;
                        Err(e)
                    }
                }
            };
            let result = tokio::select! {
                () = inner.shutdown.cancelled() => return,
                result = attempt_result => result,
            };
            match result {
                Ok(c) => break Arc::new(c),
                Err(error) => {
                    tracing::warn!(%error, attempt, "reconnect attempt failed");
                    attempt = attempt.saturating_add(1);
                }
            }
        };
        inner.reconnects.fetch_add(1, Ordering::Relaxed);
        inner.link.send_modify(|l| {
            l.generation += 1;
            l.connection = Some(connection.clone());
        });
        tracing::info!(broker = %inner.settings, "RabbitMQ connection re-established");
    }
}

/// Returns when the connection is no longer usable or on shutdown.
async fn wait_until_dead(inner: &Inner, connection: &Connection) {
    let mut events = connection.events_listener();
    // The event stream reports errors at once; the poll catches anything it misses.
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        inner.heartbeat.beat();
        if !connection.status().connected() {
            return;
        }
        tokio::select! {
            () = inner.shutdown.cancelled() => return,
            _ = poll.tick() => {}
            event = events.next() => match event {
                None => return,
                Some(lapin::Event::ConnectionBlocked(reason)) => {
                    tracing::warn!(%reason, "RabbitMQ blocked publishing on this connection");
                    inner.blocked.store(true, Ordering::Relaxed);
                }
                Some(lapin::Event::ConnectionUnblocked) => {
                    tracing::info!("RabbitMQ unblocked publishing");
                    inner.blocked.store(false, Ordering::Relaxed);
                }
                // Channel errors are reported here too; the status check decides.
                Some(_) => {}
            },
        }
    }
}

/// Opens one connection, mapping failures to a clear [`ConnectError`].
pub(crate) async fn open(settings: &AmqpSettings) -> Result<Connection, ConnectError> {
    let endpoint = format!("{}:{}", settings.host(), settings.port());
    let mut tls = OwnedTLSConfig::default();
    if let Some(path) = &settings.ca_file {
        tls.cert_chain = Some(
            std::fs::read_to_string(path).map_err(|e| ConnectError::CaFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?,
        );
    }
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(settings.connection_name.as_str()));
    let builder = lapin::DefaultConnectionBuilder::new()
        .map_err(|e| ConnectError::Other {
            endpoint: endpoint.clone(),
            reason: e.to_string(),
        })?
        .with_uri(settings.uri())
        .with_properties(properties)
        .with_tls_config(tls);
    match tokio::time::timeout(settings.connect_timeout, builder.connect()).await {
        Err(_) => Err(ConnectError::Timeout {
            endpoint,
            timeout: settings.connect_timeout,
        }),
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(classify(settings, endpoint, &error)),
    }
}

/// Declares within the connect timeout: a connection dying mid-declare must not
/// leave the supervisor waiting forever.
async fn declare_bounded(
    settings: &AmqpSettings,
    connection: &Connection,
    topology: &Topology,
) -> Result<(), ConnectError> {
    match tokio::time::timeout(
        settings.connect_timeout,
        declare(settings, connection, topology),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout {
            endpoint: format!("{}:{}", settings.host(), settings.port()),
            timeout: settings.connect_timeout,
        }),
    }
}

async fn declare(
    settings: &AmqpSettings,
    connection: &Connection,
    topology: &Topology,
) -> Result<(), ConnectError> {
    let fail = |e: lapin::Error| ConnectError::Topology {
        endpoint: format!("{}:{}", settings.host(), settings.port()),
        reason: e.to_string(),
    };
    topology.declare(connection).await.map_err(fail)
}

fn classify(settings: &AmqpSettings, endpoint: String, error: &lapin::Error) -> ConnectError {
    let user = settings.user().to_owned();
    let vhost = settings.vhost().to_owned();
    let reason = error.to_string();
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => ConnectError::VhostNotFound {
                endpoint,
                user,
                vhost,
                reason,
            },
            _ if amqp.get_id() == 403 || reason.contains("ACCESS_REFUSED") => {
                ConnectError::AccessRefused {
                    endpoint,
                    user,
                    vhost,
                    reason,
                }
            }
            _ => ConnectError::Other { endpoint, reason },
        },
        ErrorKind::IOError(io) if settings.is_tls() && is_tls_failure(io) => {
            ConnectError::Tls { endpoint, reason }
        }
        ErrorKind::IOError(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::HostUnreachable
            | std::io::ErrorKind::NetworkUnreachable
            | std::io::ErrorKind::AddrNotAvailable
            | std::io::ErrorKind::NotFound => ConnectError::Unreachable { endpoint, reason },
            // The broker closes the socket without a reason when a login fails on
            // servers that do not send authentication_failure_close.
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::UnexpectedEof => ConnectError::AccessRefused {
                endpoint,
                user,
                vhost,
                reason: format!("{reason} (the broker closed the connection during login)"),
            },
            _ if reason.contains("failed to lookup address") => {
                ConnectError::Unreachable { endpoint, reason }
            }
            _ => ConnectError::Other { endpoint, reason },
        },
        _ => ConnectError::Other { endpoint, reason },
    }
}

fn is_tls_failure(io: &std::io::Error) -> bool {
    let text = io.to_string().to_lowercase();
    io.kind() == std::io::ErrorKind::InvalidData
        || [
            "tls",
            "certificate",
            "handshake",
            "alert",
            "corrupt message",
        ]
        .iter()
        .any(|w| text.contains(w))
}
