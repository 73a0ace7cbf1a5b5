//! Parked outbox rows, for the operator: rows the broker refused
//! [`RelayOptions::park_after`](crate::RelayOptions::park_after) times (or that
//! cannot be read) wait here with their reason until someone decides. `retry`
//! puts them back in the relay's stream (it publishes them at its next round);
//! `discard` marks them never to be published (`discarded_at`): they stay, so
//! what was never sent stays explainable (retention deletes published rows
//! only).
//! Both act on parked rows only, in one transaction: an id that is not a parked
//! row fails the whole call and changes nothing.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Why a call on parked rows changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ParkedError {
    /// The database failed; the transaction was rolled back.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Some ids named are not parked rows (unknown, not parked, or already
    /// discarded); nothing changed.
    #[error("not a parked outbox row: {}", ids.iter().map(Uuid::to_string).collect::<Vec<_>>().join(", "))]
    NotParked {
        /// The ids that are not parked rows.
        ids: Vec<Uuid>,
    },
}

/// One parked row.
#[derive(Clone, Debug)]
pub struct ParkedRow {
    /// The row's id, which is also the message id it is published under.
    pub id: Uuid,
    /// The exchange it is for.
    pub exchange: String,
    /// The routing key it is for.
    pub routing_key: String,
    /// The AMQP `type` of the message.
    pub message_type: String,
    /// The message's correlation id, if it has one.
    pub correlation_id: Option<String>,
    /// When the row was written (its transaction's time).
    pub created_at: DateTime<Utc>,
    /// When the relay parked it.
    pub parked_at: DateTime<Utc>,
    /// Failures of this row since it was last retried: the broker's refusals,
    /// or 1 for a row parked because it cannot be read.
    pub failures: i32,
    /// The last refusal, or why the row cannot be read.
    pub last_error: Option<String>,
    /// Payload size in bytes.
    pub size: i64,
}

/// Which parked rows a call applies to.
#[derive(Clone, Debug)]
pub enum Rows {
    /// Every parked row not discarded.
    All,
    /// These rows; an id that is not a parked, undiscarded row fails the call.
    Ids(Vec<Uuid>),
}

/// Parked rows, oldest first, at most `limit`.
pub async fn list(pool: &PgPool, limit: i64) -> Result<Vec<ParkedRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, exchange, routing_key, type, correlation_id, created_at, parked_at,
                failures, last_error, octet_length(payload)::bigint AS size
         FROM outbox WHERE parked_at IS NOT NULL AND discarded_at IS NULL
         ORDER BY seq LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ParkedRow {
                id: r.try_get("id")?,
                exchange: r.try_get("exchange")?,
                routing_key: r.try_get("routing_key")?,
                message_type: r.try_get("type")?,
                correlation_id: r.try_get("correlation_id")?,
                created_at: r.try_get("created_at")?,
                parked_at: r.try_get("parked_at")?,
                failures: r.try_get("failures")?,
                last_error: r.try_get("last_error")?,
                size: r.try_get("size")?,
            })
        })
        .collect()
}

/// Unparks the rows and wakes the relay (on commit); returns their ids in
/// outbox order. Their failure count starts again, their last error stays for
/// the record.
pub async fn retry(pool: &PgPool, rows: &Rows) -> Result<Vec<Uuid>, ParkedError> {
    change(
        pool,
        rows,
        "WITH done AS (
             UPDATE outbox SET parked_at = NULL, failures = 0, next_attempt_at = NULL
             WHERE parked_at IS NOT NULL AND discarded_at IS NULL
               AND ($1::uuid[] IS NULL OR id = ANY($1))
             RETURNING id, seq
         )
         SELECT id FROM done ORDER BY seq",
        true,
    )
    .await
}

/// Marks the rows discarded: their events are never published.
pub async fn discard(pool: &PgPool, rows: &Rows) -> Result<Vec<Uuid>, ParkedError> {
    change(
        pool,
        rows,
        "WITH done AS (
             UPDATE outbox SET discarded_at = now()
             WHERE parked_at IS NOT NULL AND discarded_at IS NULL
               AND ($1::uuid[] IS NULL OR id = ANY($1))
             RETURNING id, seq
         )
         SELECT id FROM done ORDER BY seq",
        false,
    )
    .await
}

async fn change(
    pool: &PgPool,
    rows: &Rows,
    sql: &'static str,
    wake_relay: bool,
) -> Result<Vec<Uuid>, ParkedError> {
    let ids = match rows {
        Rows::All => None,
        Rows::Ids(ids) => Some(ids.clone()),
    };
    let mut tx = pool.begin().await?;
    let changed: Vec<Uuid> = sqlx::query_scalar(sql)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
    if let Some(ids) = ids {
        let missing: Vec<Uuid> = ids.into_iter().filter(|id| !changed.contains(id)).collect();
        if !missing.is_empty() {
            tx.rollback().await?;
            return Err(ParkedError::NotParked { ids: missing });
        }
    }
    if wake_relay && !changed.is_empty() {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(crate::outbox::NOTIFY_CHANNEL)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(changed)
}
