//! How a consumer is started, configured, counted and watched while it runs.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{DeathClass, Handler, Runtime};
use crate::{Backoff, Broker, Heartbeat, Histogram, Publisher, QueueSpec};

/// How a consumer runs. The defaults: prefetch 32, concurrency 8, batch 1,
/// bodies up to 1 MiB, a 30 s handler deadline, the program's file name as
/// `app_id`, retries and dead letters published on the consuming connection.
/// Under a [`Runtime`](crate::Runtime), set them with
/// [`RuntimeBuilder::consumer_options`](crate::RuntimeBuilder::consumer_options)
/// (the runtime supplies `app_id` and `publisher`).
#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    /// Unacknowledged deliveries the broker may push ahead (basic.qos), held
    /// ones included (a paused consumer, a move waiting for the publisher).
    /// Keep it at least `concurrency * batch`, or handler slots sit idle.
    pub prefetch: u16,
    /// Handler runs (of one message or one batch) at once.
    pub concurrency: usize,
    /// Most deliveries handed to one [`Handler::handle_batch`]: those already
    /// received when a handler slot frees, so a batch never waits to fill up.
    /// 1 hands every delivery to [`Handler::handle`] alone.
    pub batch: usize,
    /// Names the consumer tag (`<app_id>.<queue>.<channel id>`, shown in the
    /// broker's UI) and, when `publisher` is `None`, the publisher it makes:
    /// that one stamps it on a retry or dead-letter copy whose original carried
    /// no `app_id` (default: the program's file name).
    pub app_id: String,
    /// Delay between re-subscribe attempts, and between [`Handler::ready`]
    /// probes while paused (at least 100 ms).
    pub backoff: Backoff,
    /// Largest body in bytes (default 1 MiB); larger ones are dead-lettered
    /// unread as [`DeathClass::Poison`] (no handler is asked to decode them).
    pub max_body: usize,
    /// A handler run (one message, or one batch) that takes longer is
    /// abandoned and retried (and counted in [`ConsumerStats::timed_out`]);
    /// default 30 s. Its future is dropped (an inbox transaction it held is
    /// rolled back).
    pub handler_timeout: Duration,
    /// Publishes retries and dead letters; `None` publishes on the consuming
    /// connection. Give it a publisher on another connection: a broker alarm
    /// blocks every connection that publishes, acks included.
    pub publisher: Option<Publisher>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            prefetch: 32,
            concurrency: 8,
            batch: 1,
            app_id: crate::settings::program_name(),
            backoff: Backoff::default(),
            max_body: 1024 * 1024,
            handler_timeout: Duration::from_secs(30),
            publisher: None,
        }
    }
}

/// Counters of one consumer since startup, for metrics. Read them with
/// `load(Ordering::Relaxed)`; the running consumer writes them.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Deliveries acknowledged to the broker, whatever became of them: handled
    /// ([`Outcome::Ack`](crate::Outcome::Ack)) and moved to a retry queue or
    /// the DLQ (every move ends with the ack of the original).
    pub acked: AtomicU64,
    /// Copies published to a retry queue (one per failed run with attempts left).
    pub retried: AtomicU64,
    /// Copies published to the DLQ, of every [`DeathClass`]; see
    /// [`ConsumerStats::dead_lettered_as`].
    pub dead_lettered: AtomicU64,
    /// `dead_lettered` by [`DeathClass`].
    pub(super) dead_lettered_by_class: [AtomicU64; 3],
    /// First runs of messages an operator sent back from the DLQ.
    pub redriven: AtomicU64,
    /// Deliveries sent back to the queue because settling failed.
    pub requeued: AtomicU64,
    /// Times the consumer subscribed: 1 at start, one more after each
    /// reconnect, broker-side cancel (queue deleted) or consumer stream error.
    pub subscriptions: AtomicU64,
    /// Handler runs abandoned at the handler deadline (then retried).
    pub timed_out: AtomicU64,
    /// Times the consumer paused because a dependency was unavailable.
    pub pauses: AtomicU64,
    /// Handler run times, seconds; a batch's run counts once for each of its
    /// messages.
    pub handler_duration: Histogram,
}

impl ConsumerStats {
    /// Messages dead-lettered for `class` since startup.
    pub fn dead_lettered_as(&self, class: DeathClass) -> u64 {
        self.dead_lettered_by_class[class.index()].load(Ordering::Relaxed)
    }
}

/// A running consumer.
#[derive(Debug)]
pub struct ConsumerHandle {
    queue: String,
    subscribed: Arc<AtomicBool>,
    stats: Arc<ConsumerStats>,
    gate: watch::Receiver<Option<String>>,
    heartbeat: Heartbeat,
    task: tokio::task::JoinHandle<()>,
}

/// A cheap, cloneable view of a running consumer (for readiness and metrics).
#[derive(Clone, Debug)]
pub struct ConsumerProbe {
    /// The consumed queue's name.
    pub queue: String,
    subscribed: Arc<AtomicBool>,
    /// The consumer's live counters.
    pub stats: Arc<ConsumerStats>,
    gate: watch::Receiver<Option<String>>,
    heartbeat: Heartbeat,
}

impl ConsumerProbe {
    /// True while subscribed to its queue; false while (re)subscribing, e.g.
    /// after a reconnect, and once stopped.
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
    }

    /// Why the consumer is paused (the [`Outcome::Unavailable`](crate::Outcome::Unavailable)
    /// reason that paused it), while it is; `None` while it takes deliveries.
    pub fn paused(&self) -> Option<String> {
        self.gate.borrow().clone()
    }

    /// The consumer loop's proof of life (liveness, not readiness).
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }
}

impl ConsumerHandle {
    /// A cloneable view of this consumer, for readiness and metrics; it stays
    /// valid after [`ConsumerHandle::join`] took the handle.
    pub fn probe(&self) -> ConsumerProbe {
        ConsumerProbe {
            queue: self.queue.clone(),
            subscribed: self.subscribed.clone(),
            stats: self.stats.clone(),
            gate: self.gate.clone(),
            heartbeat: self.heartbeat.clone(),
        }
    }

    /// True while subscribed to its queue (for readiness).
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
    }

    /// The consumer's live counters.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    /// Waits until the consumer stopped: its subscription cancelled and its
    /// in-flight handlers settled. It stops only once its shutdown token fired;
    /// this does not fire it.
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// Starts consuming `queue` with `handler` until `shutdown` fires: the
/// low-level entry point that [`RuntimeBuilder::consume`](crate::RuntimeBuilder::consume)
/// uses. `queue` is declared again before every subscription; the exchanges it
/// binds to and its dead-letter exchange must already exist (declare the whole
/// [`Topology`](crate::Topology) with [`Broker::connect`]). Returns at once;
/// the consumer subscribes in the background and keeps trying until it can.
pub fn spawn_consumer<H: Handler>(
    broker: Broker,
    queue: QueueSpec,
    options: ConsumerOptions,
    handler: H,
    shutdown: CancellationToken,
) -> ConsumerHandle {
    let subscribed = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(ConsumerStats::default());
    let (gate, gate_view) = watch::channel(None);
    let heartbeat = Heartbeat::default();
    let runtime = Arc::new(Runtime {
        publisher: options
            .publisher
            .clone()
            .unwrap_or_else(|| Publisher::new(broker.clone(), options.app_id.clone())),
        broker,
        queue: queue.clone(),
        options,
        handler: Arc::new(handler),
        subscribed: subscribed.clone(),
        stats: stats.clone(),
        shutdown,
        gate,
        heartbeat: heartbeat.clone(),
    });
    ConsumerHandle {
        queue: queue.name,
        subscribed,
        stats,
        gate: gate_view,
        heartbeat,
        task: tokio::spawn(runtime.run()),
    }
}
