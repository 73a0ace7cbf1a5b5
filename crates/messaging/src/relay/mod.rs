//! The outbox relay: publishes committed outbox rows and marks them once the
//! broker confirmed them.
//!
//! ```text
//!   NOTIFY (on commit) ─┐
//!   poll interval ──────┼─▶ BEGIN; claim ≤ batch rows by marking them: UPDATE … WHERE
//!   after an error ─────┘     seq IN (published_at IS NULL, seq order, FOR UPDATE
//!                             SKIP LOCKED) RETURNING (replicas take disjoint rows)
//!                          ─▶ publish all with confirms in flight (one batch)
//!                          ─▶ unmark what was not confirmed, record failures, COMMIT
//! ```
//!
//! The mark becomes visible only with the commit after the confirms, so a row is
//! published-in-the-table only once the broker has it. A crash between confirm
//! and commit rolls the marks back and the rows go out again with the same
//! message ids (consumers dedup through the inbox).
//!
//! Failures are told apart by kind ([`PublishError::is_message_refused`]):
//! - the broker or connection failed (down, blocked, timed out, or a nack: a
//!   queue that cannot take messages refuses every row alike): the unconfirmed
//!   rows are unmarked without blame and the relay backs off. No round starts
//!   while the publish connection is down or blocked by an alarm, so no claim
//!   transaction waits on a broker that cannot answer.
//! - the broker refused one row (unroutable, or a channel error such as a
//!   missing exchange or an oversized body): that row alone backs off
//!   (`failures`, `next_attempt_at`, `last_error`) and after
//!   [`RelayOptions::park_after`] refusals it is parked (`parked_at`): left for
//!   the operator, counted in the status, never claimed again until retried. A
//!   channel error hits every unconfirmed message of the batch, so the relay
//!   publishes those one at a time to find the row that caused it.
//! - a row that cannot be read (e.g. stored headers that are not a string map)
//!   is parked at once.
//!
//! Every other row keeps flowing: a bad row never blocks the stream.
//!
//! Files: `run` (the loop, status, cleanup), `round` (claim, publish, settle),
//! `listen` (the `NOTIFY` wake-ups). Its statements on the table are in
//! [`crate::outbox`].

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{Backoff, Heartbeat, PublishError, Publisher};

mod listen;
mod round;
mod run;

/// How often the relay counts its backlog (for readiness and metrics).
const STATUS_EVERY: Duration = Duration::from_millis(250);

/// How the outbox relay runs. The defaults: batches of 256 rows on 2 lanes, a
/// 1 s poll, published rows kept 24 h (cleaned every minute), stalled after
/// 30 s, a refused row backing off from 1 s to 5 min and parked after 10
/// refusals. Give them to [`RuntimeBuilder::relay`](crate::RuntimeBuilder::relay)
/// or [`spawn_relay`].
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// Most rows claimed and published per round trip (one transaction, one
    /// batch of confirms).
    pub batch_size: i64,
    /// Batches in progress at once. The publisher sends one batch at a time (its
    /// channel is held for a batch's publishes and confirms), so what overlaps
    /// is one lane's database work (claim, settle, commit) with another lane's
    /// publishing. Lanes claim disjoint rows (SKIP LOCKED), exactly as separate
    /// replicas do.
    pub lanes: usize,
    /// Fallback wake-up when no notification arrives (notifications are lost while
    /// the listener reconnects).
    pub poll_interval: Duration,
    /// Delay after a failed round (the database failed, or the broker failed
    /// mid-batch). While the publish connection is down or blocked the relay
    /// starts no round and looks again every 250 ms instead.
    pub backoff: Backoff,
    /// How long published rows are kept before deletion (parked and
    /// discarded rows are never deleted).
    pub retention: Duration,
    /// How often published rows past retention are deleted.
    pub cleanup_every: Duration,
    /// The relay reports itself stalled when the oldest unpublished row is older
    /// than this (informational: the outbox holds rows as long as it must).
    pub stall_after: Duration,
    /// Refusals of one row by the broker after which it is parked.
    pub park_after: u32,
    /// Back-off of a refused row: `initial * 2^(failures - 1)`, capped at `max`.
    pub row_backoff: Backoff,
    /// Fault injection for tests (feature `testing`): the next N batches are
    /// abandoned after their confirms and before marking, as if the process died
    /// there.
    #[cfg(feature = "testing")]
    pub fail_after_confirm: Arc<std::sync::atomic::AtomicU32>,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            batch_size: 256,
            lanes: 2,
            poll_interval: Duration::from_secs(1),
            backoff: Backoff::default(),
            retention: Duration::from_secs(24 * 3600),
            cleanup_every: Duration::from_secs(60),
            stall_after: Duration::from_secs(30),
            park_after: 10,
            row_backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(300),
            },
            #[cfg(feature = "testing")]
            fail_after_confirm: Arc::new(std::sync::atomic::AtomicU32::new(0)),
        }
    }
}

/// What the relay knows about its table. The counts are refreshed at most
/// every 250 ms (and after every failed round), so they may lag a little.
#[derive(Clone, Debug, Default)]
pub struct RelayStatus {
    /// Unpublished rows waiting to go out (parked ones not counted).
    pub backlog: i64,
    /// Age of the oldest unpublished, unparked row.
    pub oldest_unpublished: Option<Duration>,
    /// Rows parked (after repeated refusals, or unreadable) and not discarded,
    /// waiting for the operator ([`crate::parked`]).
    pub parked: i64,
    /// Why the last round failed or did not start (`broker: …` or
    /// `database: …`); `None` after a round without error.
    pub last_error: Option<String>,
    /// Rows this relay published (confirmed and marked).
    pub published: u64,
    /// Turns of the relay loop since start: each wake-up counts once, whether
    /// it published every ready row, failed, or found the broker unavailable.
    pub rounds: u64,
}

/// A running relay, returned by [`spawn_relay`].
#[derive(Debug)]
pub struct RelayHandle {
    status: Arc<Mutex<RelayStatus>>,
    published: Arc<AtomicU64>,
    stall_after: Duration,
    heartbeat: Heartbeat,
    task: tokio::task::JoinHandle<()>,
}

/// A cheap, cloneable view of a running relay (for readiness and metrics).
#[derive(Clone, Debug)]
pub struct RelayProbe {
    status: Arc<Mutex<RelayStatus>>,
    published: Arc<AtomicU64>,
    stall_after: Duration,
    heartbeat: Heartbeat,
}

impl RelayProbe {
    /// A snapshot of the relay's status.
    pub fn status(&self) -> RelayStatus {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        status.published = self.published.load(Ordering::Relaxed);
        status
    }

    /// False when the oldest unpublished row is older than `stall_after`.
    pub fn is_healthy(&self) -> bool {
        self.status()
            .oldest_unpublished
            .is_none_or(|age| age < self.stall_after)
    }

    /// The relay loop's proof of life (liveness, not readiness).
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }
}

impl RelayHandle {
    /// A cloneable view of this relay, for readiness and metrics; it stays
    /// valid after [`RelayHandle::join`] took the handle.
    pub fn probe(&self) -> RelayProbe {
        RelayProbe {
            status: self.status.clone(),
            published: self.published.clone(),
            stall_after: self.stall_after,
            heartbeat: self.heartbeat.clone(),
        }
    }

    /// A snapshot of the relay's status.
    pub fn status(&self) -> RelayStatus {
        self.probe().status()
    }

    /// False when the oldest unpublished row is older than `stall_after`.
    pub fn is_healthy(&self) -> bool {
        self.probe().is_healthy()
    }

    /// Waits for the relay to finish its current batch and stop. It stops only
    /// once its shutdown token fired; this does not fire it.
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

struct Relay {
    pool: PgPool,
    publisher: Publisher,
    options: RelayOptions,
    status: Arc<Mutex<RelayStatus>>,
    published: Arc<AtomicU64>,
    heartbeat: Heartbeat,
}

/// Starts the relay for the `outbox` table of `pool` until `shutdown` fires:
/// the low-level entry point that [`Runtime`](crate::Runtime) uses. Run one per
/// database or several (replicas claim disjoint rows). Give it a publisher on a
/// connection that consumes nothing: a broker alarm blocks a connection that
/// publishes, its consumers' acks included.
pub fn spawn_relay(
    pool: PgPool,
    publisher: Publisher,
    options: RelayOptions,
    shutdown: CancellationToken,
) -> RelayHandle {
    let status = Arc::new(Mutex::new(RelayStatus::default()));
    let published = Arc::new(AtomicU64::new(0));
    let stall_after = options.stall_after;
    let heartbeat = Heartbeat::default();
    let relay = Relay {
        pool,
        publisher,
        options,
        status: status.clone(),
        published: published.clone(),
        heartbeat: heartbeat.clone(),
    };
    RelayHandle {
        status,
        published,
        stall_after,
        heartbeat,
        task: tokio::spawn(relay.run(shutdown)),
    }
}

/// Why a round stopped early.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(#[source] PublishError),
    /// No round was started: the publish connection is down or blocked.
    #[error("broker: {0}")]
    Waiting(#[source] PublishError),
    #[cfg(feature = "testing")]
    #[error("injected failure after confirm")]
    Injected,
}
