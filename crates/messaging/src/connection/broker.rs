//! The [`Broker`] handle: connecting at startup, and what publishers, consumers
//! and readiness ask of the supervised connection (the current link, waiting
//! for a live one, noticing it is lost, closing it).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use lapin::Connection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{connect_error::ConnectError, open::open_and_declare, supervisor::supervise};
use crate::{AmqpSettings, Heartbeat, Topology};

/// The current connection, if any, and how many times it was (re)built.
#[derive(Clone, Debug)]
pub(crate) struct Link {
    pub(crate) generation: u64,
    pub(crate) connection: Option<Arc<Connection>>,
}

/// A cheap-to-clone handle on the supervised connection. Clones share the
/// connection and its supervisor; [`Broker::close`] stops both for every clone.
/// A service built on [`Runtime`](crate::Runtime) never makes one itself (the
/// runtime opens a publish and a consume `Broker`); the low-level API
/// ([`Publisher::new`](crate::Publisher::new), [`spawn_consumer`](crate::spawn_consumer))
/// takes one.
#[derive(Clone, Debug)]
pub struct Broker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) settings: AmqpSettings,
    /// The node of `settings` the current (or last) connection is to.
    pub(super) node: AtomicUsize,
    pub(super) topology: Topology,
    pub(super) link: watch::Sender<Link>,
    pub(super) reconnects: AtomicU64,
    pub(super) blocked: AtomicBool,
    pub(super) shutdown: CancellationToken,
    /// The supervisor's proof of life (liveness).
    pub(super) heartbeat: Heartbeat,
}

impl Broker {
    /// Connects, declares `topology`, and starts supervising the connection.
    ///
    /// This is the startup preflight: any failure (broker unreachable, refused
    /// credentials, missing vhost, TLS, a topology the broker rejects, no answer
    /// within [`AmqpSettings::connect_timeout`]) is returned at once as one
    /// [`ConnectError`], and nothing is retried. Once connected, a lost
    /// connection is rebuilt in the background with [`AmqpSettings::backoff`]
    /// and the topology declared again on it, for as long as it takes.
    ///
    /// Settings naming several nodes of a cluster are tried from a random one
    /// on (replicas spread over the cluster); the error is
    /// [`ConnectError::NoNode`] only when every node failed.
    #[tracing::instrument(skip_all, fields(broker = %settings))]
    pub async fn connect(settings: AmqpSettings, topology: Topology) -> Result<Self, ConnectError> {
        let nodes = settings.nodes();
        let start = rand::random_range(0..nodes);
        let mut errors = Vec::new();
        let mut connected = None;
        for node in (start..start + nodes).map(|i| i % nodes) {
            match open_and_declare(&settings.node(node), &topology).await {
                Ok(connection) => {
                    connected = Some((node, connection));
                    break;
                }
                Err(error) => {
                    if nodes > 1 {
                        tracing::warn!(%error, "RabbitMQ node unusable; trying the next");
                    }
                    errors.push(error);
                }
            }
        }
        let Some((node, connection)) = connected else {
            return Err(match errors.len() {
                1 => errors.remove(0),
                _ => ConnectError::NoNode { errors },
            });
        };
        let connection = Arc::new(connection);
        let (link, _) = watch::channel(Link {
            generation: 1,
            connection: Some(connection.clone()),
        });
        let broker = Self {
            inner: Arc::new(Inner {
                settings,
                node: AtomicUsize::new(node),
                topology,
                link,
                reconnects: AtomicU64::new(0),
                blocked: AtomicBool::new(false),
                shutdown: CancellationToken::new(),
                heartbeat: Heartbeat::default(),
            }),
        };
        tokio::spawn(supervise(broker.inner.clone(), connection));
        tracing::info!(node = %broker.node(), "connected to RabbitMQ");
        Ok(broker)
    }

    /// `host:port` of the node the current (or last) connection is to.
    pub fn node(&self) -> String {
        let node = self
            .inner
            .settings
            .node(self.inner.node.load(Ordering::Relaxed));
        format!("{}:{}", node.host(), node.port())
    }

    /// The settings this broker connects with (`Display` shows them without
    /// the password).
    pub fn settings(&self) -> &AmqpSettings {
        &self.inner.settings
    }

    /// True while a connection is open (for readiness). False while the
    /// supervisor is reconnecting and after [`Broker::close`].
    pub fn is_connected(&self) -> bool {
        self.inner
            .link
            .borrow()
            .connection
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// True while the broker blocks publishing on this connection (a memory or
    /// disk alarm); reset when the connection is lost. Publishing on a blocked
    /// connection fails at once with [`PublishError::Blocked`](crate::PublishError::Blocked).
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

    /// The supervisor's heartbeat (liveness): it beats while the connection is
    /// up and while reconnecting, and stops only if the supervisor is wedged.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.inner.heartbeat
    }

    /// How many times the connection was rebuilt since [`Broker::connect`]
    /// (0 while the first connection holds).
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

    /// Stops supervising and closes the connection (waiting at most 5 s for the
    /// broker to confirm the close). Call after the consumers on it stopped:
    /// their unsettled deliveries go back to the queue when it closes. Every
    /// clone of this handle is closed with it.
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
