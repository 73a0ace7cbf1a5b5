//! The consumer runtime: subscribes a [`Handler`] to a queue and settles every
//! delivery exactly once according to the handler's [`Outcome`].
//!
//! ```text
//!  delivery ─▶ envelope check ──bad──▶ DLQ (reason) ─▶ ack
//!                 │ ok
//!                 ▼
//!          handler (span "process <queue>", child of the message's trace)
//!     Ack ─▶ ack
//!     Retry ─▶ attempts left? ─yes─▶ Q.retry.<ms>ms (attempt+1) ─▶ ack
//!                             └─no──▶ DLQ (reason, attempts) ─▶ ack
//!     Reject (a permanent failure) ─▶ DLQ (reason) ─▶ ack
//!     Unavailable (a dependency is down) ─▶ pause; the message waits, unsettled
//!     a panic in the handler ─▶ Retry
//!     no answer within the handler deadline ─▶ Retry (counted as timed out)
//! ```
//!
//! Pausing is a kill switch for outages: when a handler says a dependency is
//! unavailable (database unreachable, pool timed out), the runtime takes no new
//! deliveries (the rest stays in the queue, in order), holds the ones it has,
//! probes [`Handler::ready`] with backoff and, once it answers, runs the held
//! messages again and resumes. No retry budget is spent on an outage, so nothing
//! is dead-lettered because a database was away, however long.
//!
//! Moving a message (to a retry queue or the DLQ) is a confirmed publish followed
//! by the ack (published on [`ConsumerOptions::publisher`], which a
//! [`Runtime`](crate::Runtime) puts on another connection, so a broker alarm
//! that blocks publishing does not stop this one's acks), so a crash in between
//! duplicates, never loses; inbox dedup absorbs the duplicate. If the move
//! fails the delivery is nacked back to the queue, where the queue's
//! `x-delivery-limit` bounds how often that can happen.
//!
//! The runtime re-subscribes by itself after a reconnect and after a broker-side
//! cancel (queue deleted), re-declaring the queue first. On shutdown it cancels the
//! subscription, lets in-flight handlers finish and settle, then closes its channel
//! (anything prefetched but not started returns to the queue).
//!
//! One job per file: `handle` (options, counters, [`spawn_consumer`] and the
//! running consumer), `message` (what a handler sees and answers), `subscribe`
//! (the subscription loop, pause and probe), `envelope` (what every delivery
//! must carry, the consumer span, header access), `process` (one delivery's
//! runs), `batch` (deliveries that were ready together), `settle` (ack, requeue,
//! retry, dead-letter), `unsettled` (which tags a multiple ack may cover).

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Broker, Heartbeat, Publisher, QueueSpec};

mod batch;
mod envelope;
mod handle;
mod message;
mod process;
mod settle;
mod subscribe;
mod unsettled;

pub use envelope::{header_str, header_u32};
pub use handle::{ConsumerHandle, ConsumerOptions, ConsumerProbe, ConsumerStats, spawn_consumer};
pub use message::{DeathClass, Handler, IncomingMessage, Outcome};

/// Upper bound for one ack, nack or channel close: the client library can leave
/// such a call pending forever when the connection dies under it.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Upper bound for opening a channel, declaring the queue and subscribing.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound for one [`Handler::ready`] probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs of one delivery answered `Unavailable` right after a probe said the
/// dependency answers again, before the runtime stops believing it is an outage
/// and spends the message's retry budget instead (a failure that only this
/// message meets, or a probe that cannot see the problem).
const UNAVAILABLE_AFTER_RESUME: u32 = 5;

/// Header names the runtime writes when it moves a message.
pub mod headers {
    /// Handler runs that already failed (on messages in retry queues and DLQs).
    pub const RETRY_COUNT: &str = "x-retry-count";
    /// The last transient failure.
    pub const LAST_ERROR: &str = "x-last-error";
    /// Why the runtime dead-lettered the message.
    pub const DEATH_REASON: &str = "x-death-reason";
    /// Handler runs made before dead-lettering (0 for a poison message).
    pub const ATTEMPTS: &str = "x-attempts";
    /// The exchange the message was first published to, kept across retries,
    /// dead-lettering and redrives.
    pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
    /// The routing key the message was first published with, kept like
    /// [`ORIGINAL_EXCHANGE`].
    pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
    /// The queue whose consumer gave up on the message.
    pub const FAILED_QUEUE: &str = "x-failed-queue";
    /// When the runtime dead-lettered the message (RFC 3339, microseconds, UTC):
    /// the order of a DLQ, which a quorum queue does not keep for messages an
    /// operator looked at and returned.
    pub const DEAD_LETTERED_AT: &str = "x-dead-lettered-at";
    /// Why, as a class: `poison`, `rejected` or `exhausted` ([`super::DeathClass`]).
    pub const DEATH_CLASS: &str = "x-death-class";
    /// Times the message was sent back from its DLQ to its queue.
    pub const REDRIVE_COUNT: &str = "x-redrive-count";
}

struct Runtime<H> {
    broker: Broker,
    publisher: Publisher,
    queue: QueueSpec,
    options: ConsumerOptions,
    handler: Arc<H>,
    subscribed: Arc<AtomicBool>,
    stats: Arc<ConsumerStats>,
    shutdown: CancellationToken,
    /// `Some(reason)` while paused for an unavailable dependency.
    gate: watch::Sender<Option<String>>,
    heartbeat: Heartbeat,
}

/// Why waiting at the pause gate ended.
enum Gate {
    Open,
    Shutdown,
    /// The connection the delivery came on is gone.
    Lost,
}

/// How a delivery is settled once its handler gave a final answer.
enum Verdict {
    Ack,
    Retry(String),
    Reject(String),
}

enum End {
    Shutdown,
    /// The broker cancelled the subscription (queue deleted) or the stream ended.
    Cancelled,
    Failed(lapin::Error),
    /// The connection went away (the stream may not have noticed yet).
    Lost,
}
