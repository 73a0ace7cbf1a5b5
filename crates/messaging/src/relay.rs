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
//! - the broker or connection failed (down, blocked, timed out): the unconfirmed
//!   rows are unmarked without blame and the relay backs off. No round starts
//!   while the publish connection is down or blocked by an alarm, so no claim
//!   transaction waits on a broker that cannot answer.
//! - the broker refused one row (unroutable, nacked, or a channel error such as a
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
    Backoff, Heartbeat, OutgoingMessage, PublishError, Publisher, outbox::NOTIFY_CHANNEL,
    propagation,
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
    /// The relay reports itself stalled when the oldest unpublished row is older
    /// than this (informational: the outbox holds rows as long as it must).
    pub stall_after: Duration,
    /// Refusals of one row by the broker after which it is parked.
    pub park_after: u32,
    /// Back-off of a refused row: `initial * 2^(failures - 1)`, capped at `max`.
    pub row_backoff: Backoff,
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
            park_after: 10,
            row_backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(300),
            },
            fail_after_confirm: Arc::new(AtomicU32::new(0)),
        }
    }
}

/// What the relay knows about its table, refreshed after every round.
#[derive(Clone, Debug, Default)]
pub struct RelayStatus {
    /// Unpublished rows waiting to go out (parked ones not counted).
    pub backlog: i64,
    /// Age of the oldest unpublished, unparked row.
    pub oldest_unpublished: Option<Duration>,
    /// Rows parked after repeated refusals, waiting for the operator.
    pub parked: i64,
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
    pub fn probe(&self) -> RelayProbe {
        RelayProbe {
            status: self.status.clone(),
            published: self.published.clone(),
            stall_after: self.stall_after,
            heartbeat: self.heartbeat.clone(),
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
    heartbeat: Heartbeat,
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
enum RoundError {
    Database(sqlx::Error),
    Broker(PublishError),
    /// No round was started: the publish connection is down or blocked.
    Waiting(PublishError),
    Injected,
}

impl std::fmt::Display for RoundError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Database(e) => write!(f, "database: {e}"),
            Self::Broker(e) | Self::Waiting(e) => write!(f, "broker: {e}"),
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
            self.heartbeat.beat();
            let result = match self.broker_state() {
                Some(waiting) => Err(RoundError::Waiting(waiting)),
                None => self.drain(&shutdown).await,
            };
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
                // Waiting for the broker: look again soon, with no claim and no
                // transaction meanwhile.
                Err(RoundError::Waiting(_)) => Some(Duration::from_millis(250)),
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
                () = self.heartbeat.sleep(wait) => {}
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
                self.heartbeat.beat();
                if let Some(waiting) = self.broker_state() {
                    return Err(RoundError::Waiting(waiting));
                }
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

    /// Why no round should start now: the publish connection is down or the
    /// broker blocks it.
    fn broker_state(&self) -> Option<PublishError> {
        if !self.publisher.is_connected() {
            Some(PublishError::NotConnected)
        } else if self.publisher.is_blocked() {
            Some(PublishError::Blocked)
        } else {
            None
        }
    }

    /// One batch: claim, publish, settle. Returns how many rows were claimed.
    ///
    /// The claim marks the rows published in the batch's open transaction, one
    /// write per row, and the commit after the confirms makes it true. Rows the
    /// broker did not confirm are unmarked in the same transaction before the
    /// commit; a crash anywhere before the commit rolls every mark back, so a row
    /// is never published-in-the-table without its confirm. The publisher bounds
    /// the batch (one deadline, abandoned on an alarm), so the transaction is
    /// never held open for longer than its confirm timeout plus the settling.
    /// (No span of its own: each publish span continues its row's stored trace,
    /// and a span per poll would be a root trace of its own.)
    async fn round(&self) -> Result<i64, RoundError> {
        let mut tx = self.pool.begin().await?;
        let mut rows = sqlx::query(
            "UPDATE outbox SET published_at = now(), attempts = attempts + 1, last_error = NULL
             WHERE seq IN (
                 SELECT seq FROM outbox
                 WHERE published_at IS NULL AND parked_at IS NULL
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
        let claimed = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        // RETURNING has no order: publish in commit order.
        rows.sort_by_cached_key(|row| row.try_get::<i64, _>("seq").unwrap_or(i64::MAX));
        let mut settle = Settle::default();
        let mut seqs = Vec::with_capacity(rows.len());
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq: i64 = row.try_get("seq")?;
            match to_message(row) {
                Ok(message) => {
                    seqs.push(seq);
                    messages.push(message);
                }
                Err(e) => {
                    tracing::error!(seq, error = %e, "unreadable outbox row; parking it");
                    settle
                        .malformed
                        .push((seq, format!("unreadable outbox row: {e}")));
                }
            }
        }
        let mut results = self.publisher.publish_batch(&messages).await;
        if results.iter().any(Result::is_ok) {
            crate::faults::crash_point(crate::faults::points::RELAY_AFTER_CONFIRM);
        }

        if take_one(&self.options.fail_after_confirm) {
            // As if the process died here: the transaction rolls back, the rows
            // stay unpublished and go out again with the same ids.
            return Err(RoundError::Injected);
        }

        if messages.len() > 1
            && results
                .iter()
                .any(|r| matches!(r, Err(PublishError::ChannelClosed { .. })))
        {
            self.publish_alone(&messages, &mut results).await;
        }
        for ((seq, message), result) in seqs.iter().zip(&messages).zip(results) {
            match result {
                Ok(()) => settle.confirmed += 1,
                Err(e) if e.is_message_refused() => {
                    tracing::error!(message_id = %message.message_id, error = %e, "broker refused an outbox message; it backs off alone");
                    settle.refused.push((*seq, e.to_string()));
                }
                Err(e) => {
                    settle.unsent.push(*seq);
                    settle.broker_error.get_or_insert(e);
                }
            }
        }
        self.settle(&mut tx, &settle).await?;
        tx.commit().await?;
        self.published
            .fetch_add(settle.confirmed as u64, Ordering::Relaxed);
        match settle.broker_error {
            Some(e) => Err(RoundError::Broker(e)),
            None => Ok(claimed),
        }
    }

    /// A channel error cannot be pinned on one message of a batch: every
    /// unconfirmed message saw it. Publishes those one at a time, so the message
    /// the broker refuses is found and the others go out; stops at the first
    /// failure of the broker itself (the rest stays unsent, blamed on nobody).
    async fn publish_alone(
        &self,
        messages: &[OutgoingMessage],
        results: &mut [Result<(), PublishError>],
    ) {
        for result in results.iter_mut() {
            if matches!(result, Err(PublishError::ChannelClosed { .. })) {
                *result = Err(PublishError::NotSent);
            }
        }
        // One more batch budget for the whole search, so the claim transaction
        // stays bounded; what is left when it runs out stays unsent.
        let until = tokio::time::Instant::now() + self.publisher.confirm_timeout();
        for (message, result) in messages.iter().zip(results.iter_mut()) {
            if result.is_ok() || !matches!(result, Err(PublishError::NotSent)) {
                continue;
            }
            if tokio::time::Instant::now() >= until {
                return;
            }
            *result = self.publisher.publish(message).await;
            if matches!(result, Err(e) if !e.is_message_refused()) {
                return;
            }
        }
    }

    /// Writes what the broker said of each claimed row, before the commit.
    async fn settle(
        &self,
        tx: &mut sqlx::PgConnection,
        settle: &Settle,
    ) -> Result<(), sqlx::Error> {
        let park_after = i32::try_from(self.options.park_after.max(1)).unwrap_or(i32::MAX);
        if !settle.refused.is_empty() {
            let (seqs, errors): (Vec<i64>, Vec<String>) = settle.refused.iter().cloned().unzip();
            let parked: Vec<(String, bool)> = sqlx::query_as(
                "UPDATE outbox AS o
                 SET published_at = NULL, last_error = f.error, failures = o.failures + 1,
                     next_attempt_at = now() + make_interval(secs => LEAST($4, $3 * power(2, LEAST(o.failures, 30)))),
                     parked_at = CASE WHEN o.failures + 1 >= $5 THEN now() END
                 FROM unnest($1::bigint[], $2::text[]) AS f(seq, error)
                 WHERE o.seq = f.seq
                 RETURNING o.id::text, o.parked_at IS NOT NULL",
            )
            .bind(&seqs)
            .bind(&errors)
            .bind(self.options.row_backoff.initial.as_secs_f64())
            .bind(self.options.row_backoff.max.as_secs_f64())
            .bind(park_after)
            .fetch_all(&mut *tx)
            .await?;
            for (id, _) in parked.iter().filter(|(_, parked)| *parked) {
                tracing::error!(message_id = %id, park_after, "outbox message parked after repeated refusals; see last_error");
            }
        }
        if !settle.malformed.is_empty() {
            let (seqs, errors): (Vec<i64>, Vec<String>) = settle.malformed.iter().cloned().unzip();
            sqlx::query(
                "UPDATE outbox AS o
                 SET published_at = NULL, last_error = f.error, failures = o.failures + 1,
                     parked_at = now()
                 FROM unnest($1::bigint[], $2::text[]) AS f(seq, error)
                 WHERE o.seq = f.seq",
            )
            .bind(&seqs)
            .bind(&errors)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(error) = &settle.broker_error {
            sqlx::query(
                "UPDATE outbox SET published_at = NULL, last_error = $2 WHERE seq = ANY($1)",
            )
            .bind(&settle.unsent)
            .bind(error.to_string())
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    fn count_round(&self) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.rounds += 1;
        status.last_error = None;
    }

    async fn refresh_status(&self, error: Option<&RoundError>) {
        // Each part matches one partial index.
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM outbox
                     WHERE published_at IS NULL AND parked_at IS NULL) AS backlog,
                    (SELECT EXTRACT(EPOCH FROM now() - min(created_at))::FLOAT8 FROM outbox
                     WHERE published_at IS NULL AND parked_at IS NULL) AS oldest,
                    (SELECT count(*) FROM outbox
                     WHERE parked_at IS NOT NULL AND discarded_at IS NULL) AS parked",
        )
        .fetch_one(&self.pool)
        .await;
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.rounds += 1;
        status.last_error = error.map(ToString::to_string);
        match row {
            Ok(row) => {
                status.backlog = row.try_get("backlog").unwrap_or(0);
                status.parked = row.try_get("parked").unwrap_or(0);
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
            self.heartbeat.beat();
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

/// What one batch did to its rows.
#[derive(Default)]
struct Settle {
    confirmed: usize,
    /// Refused by the broker for what they are: back off alone, park eventually.
    refused: Vec<(i64, String)>,
    /// Unreadable: parked at once.
    malformed: Vec<(i64, String)>,
    /// Not confirmed because the broker or connection failed: unmarked, no blame.
    unsent: Vec<i64>,
    broker_error: Option<PublishError>,
}

fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// The row as a message; fails when a column cannot be read (e.g. stored headers
/// that are not a map of strings).
fn to_message(row: &sqlx::postgres::PgRow) -> Result<OutgoingMessage, sqlx::Error> {
    let id: Uuid = row.try_get("id")?;
    let sqlx::types::Json(mut stored) =
        row.try_get::<sqlx::types::Json<HashMap<String, String>>, _>("headers")?;
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
    // AMQP short strings hold at most 255 bytes; longer ones cannot be sent.
    for (what, value) in [
        ("exchange", message.exchange.as_str()),
        ("routing key", message.routing_key.as_str()),
        ("type", message.message_type.as_str()),
        (
            "correlation id",
            message.correlation_id.as_deref().unwrap_or(""),
        ),
    ] {
        if value.len() > 255 {
            return Err(sqlx::Error::Decode(
                format!(
                    "{what} of {} bytes is over the AMQP limit of 255",
                    value.len()
                )
                .into(),
            ));
        }
    }
    if let Some(key) = message
        .headers
        .inner()
        .keys()
        .find(|k| k.as_str().len() > 255)
    {
        return Err(sqlx::Error::Decode(
            format!(
                "header name of {} bytes is over the AMQP limit of 255",
                key.as_str().len()
            )
            .into(),
        ));
    }
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
