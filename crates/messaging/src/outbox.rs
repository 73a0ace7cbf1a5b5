//! The transactional outbox table, and every statement the writers and the relay
//! run on it (an operator's, on parked rows, are in [`crate::parked`]).
//!
//! ```text
//!  enqueue            the caller's transaction: row + NOTIFY (fires on commit)
//!  claim              the relay's round: mark ≤ N ready rows published, return them
//!  back_off / park /  the same round, before its commit: what the broker said
//!  unmark
//!  counts             backlog, oldest unpublished age, parked (status, readiness)
//!  delete_published   retention, in bounded chunks
//! ```
//!
//! Writing: the event is a row in the caller's own transaction, so it exists
//! exactly when the state change it announces commits. The row carries the trace
//! context current at write time; the relay continues that trace when it
//! publishes. A `NOTIFY` in the same transaction wakes the relay on commit
//! (Postgres delivers notifications only for committed work).

use std::{collections::HashMap, time::Duration};

use lapin::types::{AMQPValue, FieldTable, LongString};
use sqlx::{PgConnection, PgPool, Row};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::{Backoff, OutgoingMessage, propagation};

/// The `LISTEN`/`NOTIFY` channel the relay wakes on.
pub const NOTIFY_CHANNEL: &str = "messaging_outbox";

/// An event to publish once the surrounding transaction commits; store it with
/// [`enqueue`].
///
/// The broker must be able to route it when the relay publishes (the exchange
/// exists and some queue is bound for the routing key: messages go out
/// `mandatory`), else the row is refused, backs off alone and is parked after
/// [`RelayOptions::park_after`](crate::RelayOptions::park_after) refusals.
#[derive(Clone, Debug)]
pub struct NewMessage {
    /// The exchange to publish to.
    pub exchange: String,
    /// The routing key to publish with.
    pub routing_key: String,
    /// The AMQP `type` consumers dispatch on (e.g. a protobuf full name).
    pub message_type: String,
    /// The body. It goes out with the content type
    /// [`CONTENT_TYPE_PROTOBUF`](crate::CONTENT_TYPE_PROTOBUF) whatever it
    /// holds: the outbox stores no content type.
    pub payload: Vec<u8>,
    /// The AMQP `correlation_id` (e.g. the id of the order a chain of events
    /// is about); also tagged on the spans, see
    /// [`propagation::set_correlation_attribute`].
    pub correlation_id: Option<String>,
    /// Extra string headers, published as AMQP headers.
    pub headers: HashMap<String, String>,
}

impl NewMessage {
    /// A message without correlation id or extra headers.
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        message_type: impl Into<String>,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            message_type: message_type.into(),
            payload,
            correlation_id: None,
            headers: HashMap::new(),
        }
    }

    /// The same message with `correlation_id` set to `id`.
    #[must_use]
    pub fn correlated(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
}

/// Stores `message` in the caller's transaction and returns its message id.
/// Nothing is published if the transaction rolls back.
///
/// The id (a UUIDv7) becomes the AMQP `message_id`: consumers deduplicate on
/// it, and the relay publishes it under the same id however often it must.
/// The current span's trace context is stored with the row, so the consumer's
/// span continues this trace. Needs the `outbox` table ([`crate::migrations`],
/// which [`Runtime`](crate::Runtime) runs at start).
#[tracing::instrument(skip_all, fields(messaging.destination.name = %message.exchange, messaging.rabbitmq.destination.routing_key = %message.routing_key))]
pub async fn enqueue(tx: &mut PgConnection, message: NewMessage) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    propagation::tag_correlation(&tracing::Span::current(), message.correlation_id.as_deref());
    let mut headers = message.headers;
    headers.extend(propagation::inject_map(&tracing::Span::current().context()));
    // One round trip: insert, and queue the wake-up that fires on commit.
    sqlx::query(
        "WITH row AS (
             INSERT INTO outbox (id, exchange, routing_key, type, payload, headers, correlation_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             RETURNING id
         )
         SELECT pg_notify('messaging_outbox', '') FROM row",
    )
    .bind(id)
    .bind(&message.exchange)
    .bind(&message.routing_key)
    .bind(&message.message_type)
    .bind(&message.payload)
    .bind(sqlx::types::Json(&headers))
    .bind(&message.correlation_id)
    .execute(tx)
    .await?;
    Ok(id)
}

/// A row the relay claimed: its `seq`, and the message to publish or why the
/// row cannot be read (a column that does not decode, e.g. headers that are
/// not a string map).
pub(crate) type Claimed = (i64, Result<OutgoingMessage, sqlx::Error>);

/// Marks up to `limit` ready rows published in the caller's transaction (rows
/// other transactions hold are skipped, so relays take disjoint rows) and
/// returns them in commit order. The mark is true only if the transaction
/// commits.
pub(crate) async fn claim(tx: &mut PgConnection, limit: i64) -> Result<Vec<Claimed>, sqlx::Error> {
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
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    // RETURNING has no order: publish in commit order.
    rows.sort_by_cached_key(|row| row.try_get::<i64, _>("seq").unwrap_or(i64::MAX));
    rows.iter()
        .map(|row| {
            let seq: i64 = row.try_get("seq")?;
            Ok((seq, to_message(row)))
        })
        .collect()
}

/// Rows the broker refused, each with its reason: unmarked, and each backs off
/// alone (`initial * 2^failures`, capped at `max`); a row refused `park_after`
/// times is parked. Returns the message ids of the rows parked now.
pub(crate) async fn back_off(
    tx: &mut PgConnection,
    refused: &[(i64, String)],
    backoff: Backoff,
    park_after: u32,
) -> Result<Vec<String>, sqlx::Error> {
    let (seqs, errors): (Vec<i64>, Vec<String>) = refused.iter().cloned().unzip();
    let park_after = i32::try_from(park_after.max(1)).unwrap_or(i32::MAX);
    let rows: Vec<(String, bool)> = sqlx::query_as(
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
    .bind(backoff.initial.as_secs_f64())
    .bind(backoff.max.as_secs_f64())
    .bind(park_after)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, parked)| parked.then_some(id))
        .collect())
}

/// Rows that cannot be read, each with its reason: parked at once.
pub(crate) async fn park(tx: &mut PgConnection, rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
    let (seqs, errors): (Vec<i64>, Vec<String>) = rows.iter().cloned().unzip();
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
    Ok(())
}

/// Rows not confirmed because the broker or the connection failed: unmarked,
/// with no blame on the rows (no failure counted, no back-off).
pub(crate) async fn unmark(
    tx: &mut PgConnection,
    seqs: &[i64],
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox SET published_at = NULL, last_error = $2 WHERE seq = ANY($1)")
        .bind(seqs)
        .bind(error)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// What the relay reports of its table.
pub(crate) struct Counts {
    /// Unpublished rows, parked ones not counted.
    pub backlog: i64,
    /// Age of the oldest unpublished, unparked row.
    pub oldest: Option<Duration>,
    /// Parked rows not discarded by an operator.
    pub parked: i64,
}

pub(crate) async fn counts(pool: &PgPool) -> Result<Counts, sqlx::Error> {
    // Each part matches one partial index.
    let row = sqlx::query(
        "SELECT (SELECT count(*) FROM outbox
                 WHERE published_at IS NULL AND parked_at IS NULL) AS backlog,
                (SELECT EXTRACT(EPOCH FROM now() - min(created_at))::FLOAT8 FROM outbox
                 WHERE published_at IS NULL AND parked_at IS NULL) AS oldest,
                (SELECT count(*) FROM outbox
                 WHERE parked_at IS NOT NULL AND discarded_at IS NULL) AS parked",
    )
    .fetch_one(pool)
    .await?;
    Ok(Counts {
        backlog: row.try_get("backlog").unwrap_or(0),
        parked: row.try_get("parked").unwrap_or(0),
        oldest: row
            .try_get::<Option<f64>, _>("oldest")
            .ok()
            .flatten()
            .map(|s| Duration::from_secs_f64(s.max(0.0))),
    })
}

/// Deletes at most `limit` rows published longer than `retention` ago; returns
/// how many it deleted.
pub(crate) async fn delete_published(
    pool: &PgPool,
    retention: Duration,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let deleted = sqlx::query(
        "DELETE FROM outbox WHERE seq IN (
             SELECT seq FROM outbox
             WHERE published_at < now() - make_interval(secs => $1)
             LIMIT $2)",
    )
    .bind(retention.as_secs_f64())
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
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
