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
//! message ids (consumers dedup through the inbox). On broker loss the rows are
//! unmarked, the relay backs off and resumes when the connection is back. A row
//! the broker refuses (unroutable, nacked) backs off alone through
//! `next_attempt_at`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use lapin::types::{AMQPValue, FieldTable, LongString};
use sqlx::{PgPool, Row, postgres::PgListener};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    Backoff, OutgoingMessage, PublishError, Publisher, outbox::NOTIFY_CHANNEL, propagation,
};

/// How often the relay counts its backlog (for readiness and metrics).
const STATUS_EVERY: Duration = Duration::from_millis(250);

#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// Rows claimed and published per round trip.
    pub batch_size: i64,
    /// Batches in progress at once: while one batch waits for its confirms the
    /// next is claimed, so database and broker round trips overlap. Lanes claim
    /// disjoint rows (SKIP LOCKED), exactly as separate replicas do.
    pub lanes: usize,
    /// Fallback wake-up when no notification arrives (notifications are lost while
    /// the listener reconnects).
    pub poll_interval: Duration,
    /// Delay after a failed round (broker or database unavailable).
    pub backoff: Backoff,
    /// How long published rows are kept before deletion.
    pub retention: Duration,
    /// How often published rows past retention are deleted.
    pub cleanup_every: Duration,
    /// Readiness fails when the oldest unpublished row is older than this.
    pub stall_after: Duration,
    /// Fault injection for tests: the next N batches are abandoned after their
    /// confirms and before marking, as if the process died there.
    pub fail_after_confirm: Arc<AtomicU32>,
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
            fail_after_confirm: Arc::new(AtomicU32::new(0)),
        }
    }
}

/// What the relay knows about its table, refreshed after every round.
#[derive(Clone, Debug, Default)]
pub struct RelayStatus {
    /// Unpublished rows.
    pub backlog: i64,
    /// Age of the oldest unpublished row.
    pub oldest_unpublished: Option<Duration>,
    pub last_error: Option<String>,
    /// Rows this relay published (confirmed and marked).
    pub published: u64,
    /// Completed rounds (a round ends when no more rows are ready).
    pub rounds: u64,
}

#[derive(Debug)]
pub struct RelayHandle {
    status: Arc<Mutex<RelayStatus>>,
    published: Arc<AtomicU64>,
    stall_after: Duration,
    task: tokio::task::JoinHandle<()>,
}

/// A cheap, cloneable view of a running relay (for readiness and metrics).
#[derive(Clone, Debug)]
pub struct RelayProbe {
    status: Arc<Mutex<RelayStatus>>,
    published: Arc<AtomicU64>,
    stall_after: Duration,
}

impl RelayProbe {
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
}

impl RelayHandle {
    pub fn probe(&self) -> RelayProbe {
        RelayProbe {
            status: self.status.clone(),
            published: self.published.clone(),
            stall_after: self.stall_after,
        }
    }

    pub fn status(&self) -> RelayStatus {
        self.probe().status()
    }

    /// False when the oldest unpublished row is older than `stall_after`.
    pub fn is_healthy(&self) -> bool {
        self.probe().is_healthy()
    }

    /// Waits for the relay to finish its current batch and stop.
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
}

/// Starts the relay for the `outbox` table of `pool` until `shutdown` fires.
pub fn spawn_relay(
    pool: PgPool,
    publisher: Publisher,
    options: RelayOptions,
    shutdown: CancellationToken,
) -> RelayHandle {
    let status = Arc::new(Mutex::new(RelayStatus::default()));
    let published = Arc::new(AtomicU64::new(0));
    let stall_after = options.stall_after;
    let relay = Relay {
        pool,
        publisher,
        options,
        status: status.clone(),
        published: published.clone(),
    };
    RelayHandle {
        status,
        published,
        stall_after,
        task: tokio::spawn(relay.run(shutdown)),
    }
}

/// Why a round stopped early.
enum RoundError {
    Database(sqlx::Error),
    Broker(PublishError),
    Injected,
}

impl std::fmt::Display for RoundError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Database(e) => write!(f, "database: {e}"),
            Self::Broker(e) => write!(f, "broker: {e}"),
            Self::Injected => write!(f, "injected failure after confirm"),
        }
    }
}

impl From<sqlx::Error> for RoundError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

impl Relay {
    async fn run(self, shutdown: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(self.pool.clone(), wake.clone(), shutdown.clone()));
        let mut failures = 0u32;
        let mut last_cleanup = tokio::time::Instant::now();
        let mut last_status = tokio::time::Instant::now() - STATUS_EVERY;
        loop {
            let result = self.drain(&shutdown).await;
            // The status query is for readiness and metrics: a few times a second
            // is plenty, not after every wake-up under load.
            // A skipped refresh is made up at most STATUS_EVERY later, so the
            // backlog gauge never stays stale for a whole poll interval.
            let mut status_due = None;
            if result.is_err() || last_status.elapsed() >= STATUS_EVERY {
                last_status = tokio::time::Instant::now();
                self.refresh_status(result.as_ref().err()).await;
            } else {
                self.count_round();
                status_due = Some(STATUS_EVERY.saturating_sub(last_status.elapsed()));
            }
            let pause = match result {
                Ok(()) => {
                    failures = 0;
                    None
                }
                Err(error) => {
                    tracing::warn!(%error, "outbox relay round failed; backing off");
                    failures = failures.saturating_add(1);
                    Some(self.options.backoff.delay(failures))
                }
            };
            if last_cleanup.elapsed() >= self.options.cleanup_every {
                last_cleanup = tokio::time::Instant::now();
                self.cleanup().await;
            }
            let wait = match (pause, status_due) {
                (Some(pause), _) => pause,
                (None, Some(due)) => due.min(self.options.poll_interval),
                (None, None) => self.options.poll_interval,
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                // After a failure only the backoff wakes us: a notification
                // storm must not turn into a retry storm.
                () = wake.notified(), if pause.is_none() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        listener.abort();
        tracing::info!("outbox relay stopped");
    }

    /// Publishes rounds on every lane until no row is ready or shutdown (checked
    /// between batches, so a batch in progress always completes).
    async fn drain(&self, shutdown: &CancellationToken) -> Result<(), RoundError> {
        let lane = || async {
            loop {
                let claimed = self.round().await?;
                if claimed < self.options.batch_size || shutdown.is_cancelled() {
                    return Ok::<(), RoundError>(());
                }
            }
        };
        let lanes =
            futures_util::future::join_all((0..self.options.lanes.max(1)).map(|_| lane())).await;
        lanes.into_iter().collect()
    }

    /// One batch: claim, publish, settle. Returns how many rows were claimed.
    ///
    /// The claim marks the rows published in the batch's open transaction, one
    /// write per row, and the commit after the confirms makes it true. Rows the
    /// broker did not confirm are unmarked in the same transaction before the
    /// commit; a crash anywhere before the commit rolls every mark back, so a row
    /// is never published-in-the-table without its confirm.
    /// (No span of its own: each publish span continues its row's stored trace,
    /// and a span per poll would be a root trace of its own.)
    async fn round(&self) -> Result<i64, RoundError> {
        let mut tx = self.pool.begin().await?;
        let mut rows = sqlx::query(
            "UPDATE outbox SET published_at = now(), attempts = attempts + 1, last_error = NULL
             WHERE seq IN (
                 SELECT seq FROM outbox
                 WHERE published_at IS NULL
                   AND (next_attempt_at IS NULL OR next_attempt_at <= now())
                 ORDER BY seq
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED)
             RETURNING seq, id, exchange, routing_key, type, payload, headers, correlation_id,
                       EXTRACT(EPOCH FROM created_at)::BIGINT AS created",
        )
        .bind(self.options.batch_size)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        // RETURNING has no order: publish in commit order.
        rows.sort_by_cached_key(|row| row.try_get::<i64, _>("seq").unwrap_or(i64::MAX));
        let mut ids = Vec::with_capacity(rows.len());
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: Uuid = row.try_get("id")?;
            let headers: sqlx::types::Json<HashMap<String, String>> = row.try_get("headers")?;
            messages.push(to_message(id, row, headers.0)?);
            ids.push(id);
        }
        let results = self.publisher.publish_batch(&messages).await;
        if results.iter().any(Result::is_ok) {
            crate::faults::crash_point(crate::faults::points::RELAY_AFTER_CONFIRM);
        }

        if take_one(&self.options.fail_after_confirm) {
            // As if the process died here: the transaction rolls back, the rows
            // stay unpublished and go out again with the same ids.
            return Err(RoundError::Injected);
        }

        let mut confirmed = 0usize;
        let mut refused = Vec::new();
        let mut refused_errors = Vec::new();
        let mut unsent = Vec::new();
        let mut broker_error = None;
        for (id, result) in ids.iter().zip(results) {
            match result {
                Ok(()) => confirmed += 1,
                Err(e @ (PublishError::Unroutable { .. } | PublishError::Nacked)) => {
                    tracing::error!(message_id = %id, error = %e, "broker refused an outbox message; it will be retried");
                    refused.push(*id);
                    refused_errors.push(e.to_string());
                }
                Err(e) => {
                    unsent.push(*id);
                    broker_error = Some(e);
                }
            }
        }
        // Every row claimed counts an attempt; those not confirmed are unmarked.
        if !refused.is_empty() {
            // Per-row backoff: 2^(attempts before this one) seconds, capped at 5 minutes.
            sqlx::query(
                "UPDATE outbox AS o
                 SET published_at = NULL, last_error = f.error,
                     next_attempt_at = now() + make_interval(secs => LEAST(300, power(2, o.attempts - 1)))
                 FROM unnest($1::uuid[], $2::text[]) AS f(id, error)
                 WHERE o.id = f.id",
            )
            .bind(&refused)
            .bind(&refused_errors)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(error) = &broker_error {
            sqlx::query(
                "UPDATE outbox SET published_at = NULL, last_error = $2 WHERE id = ANY($1)",
            )
            .bind(&unsent)
            .bind(error.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.published
            .fetch_add(confirmed as u64, Ordering::Relaxed);
        match broker_error {
            Some(e) => Err(RoundError::Broker(e)),
            None => Ok(i64::try_from(rows.len()).unwrap_or(i64::MAX)),
        }
    }

    fn count_round(&self) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.rounds += 1;
        status.last_error = None;
    }

    async fn refresh_status(&self, error: Option<&RoundError>) {
        let row = sqlx::query(
            "SELECT count(*) AS backlog,
                    EXTRACT(EPOCH FROM now() - min(created_at))::FLOAT8 AS oldest
             FROM outbox WHERE published_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await;
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.rounds += 1;
        status.last_error = error.map(ToString::to_string);
        match row {
            Ok(row) => {
                status.backlog = row.try_get("backlog").unwrap_or(0);
                status.oldest_unpublished = row
                    .try_get::<Option<f64>, _>("oldest")
                    .ok()
                    .flatten()
                    .map(|s| Duration::from_secs_f64(s.max(0.0)));
            }
            Err(e) => status.last_error = Some(format!("database: {e}")),
        }
    }

    /// Deletes published rows past retention, in bounded chunks.
    async fn cleanup(&self) {
        let retention = self.options.retention.as_secs_f64();
        loop {
            let deleted = sqlx::query(
                "DELETE FROM outbox WHERE seq IN (
                     SELECT seq FROM outbox
                     WHERE published_at < now() - make_interval(secs => $1)
                     LIMIT 5000)",
            )
            .bind(retention)
            .execute(&self.pool)
            .await;
            match deleted {
                Ok(done) if done.rows_affected() == 5000 => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "outbox cleanup failed");
                    break;
                }
            }
        }
    }
}

fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn to_message(
    id: Uuid,
    row: &sqlx::postgres::PgRow,
    mut stored: HashMap<String, String>,
) -> Result<OutgoingMessage, sqlx::Error> {
    // The trace context stored at write time becomes the producer span's parent.
    let parent = propagation::extract_map(&stored);
    stored.remove(propagation::TRACEPARENT);
    stored.remove(propagation::TRACESTATE);
    let mut headers = FieldTable::default();
    for (key, value) in stored {
        headers.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    }
    let mut message = OutgoingMessage::new(
        row.try_get::<String, _>("exchange")?,
        row.try_get::<String, _>("routing_key")?,
        row.try_get::<String, _>("type")?,
        row.try_get("payload")?,
    );
    message.message_id = id.to_string();
    message.correlation_id = row.try_get("correlation_id")?;
    message.timestamp = row
        .try_get::<i64, _>("created")
        .ok()
        .and_then(|t| u64::try_from(t).ok());
    message.headers = headers;
    message.parent = Some(parent);
    Ok(message)
}

/// Forwards `NOTIFY` wake-ups; reconnects with a pause when the database is away.
async fn listen(pool: PgPool, wake: Arc<Notify>, shutdown: CancellationToken) {
    let backoff = Backoff::default();
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(error) => {
                tracing::debug!(%error, "outbox listener cannot connect; polling meanwhile");
                failures = failures.saturating_add(1);
                tokio::time::sleep(backoff.delay(failures)).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(NOTIFY_CHANNEL).await {
            tracing::debug!(%error, "outbox LISTEN failed; polling meanwhile");
            failures = failures.saturating_add(1);
            tokio::time::sleep(backoff.delay(failures)).await;
            continue;
        }
        failures = 0;
        // Rows committed while we were not listening are found by this wake-up.
        wake.notify_one();
        loop {
            match listener.recv().await {
                Ok(_) => wake.notify_one(),
                Err(error) => {
                    tracing::debug!(%error, "outbox listener lost its connection");
                    break;
                }
            }
        }
    }
}
