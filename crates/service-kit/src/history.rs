//! The history of each order as one service saw it: the events it emitted and
//! the events it applied, read back as the service's part of an operator's
//! timeline of the order (`shopctl order <id>`).
//!
//! ```text
//!  emit(tx, order, message)      outbox row + `emitted` row, one transaction
//!  record_applied(tx, order, m)  `applied` row, inside the inbox transaction
//!  list(pool, order)             the rows in the order they were written, emitted
//!                                ones with the state of their outbox row
//! ```
//!
//! The rows are written in the transaction of the state change they go with, so
//! the history never tells of an event that did not happen, and a duplicate
//! delivery (skipped by the inbox) records nothing. Each service that keeps a
//! history adds [`MIGRATION`] to its own migrations.

use chrono::{DateTime, Utc};
use messaging::{IncomingMessage, NewMessage};
use opentelemetry::{Context, trace::TraceContextExt};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

/// The `order_history` table (with its index on `(order_id, seq)`).
pub const MIGRATION: &str = include_str!("../migrations/order_history.sql");

/// The most rows [`list`] returns for one order. A saga writes a handful; the
/// bound keeps a pathological order (e.g. one replayed over and over under new
/// message ids) from turning one request into an unbounded read.
pub const LIST_LIMIT: i64 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Written to this service's outbox.
    Emitted,
    /// Consumed and applied by this service.
    Applied,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Emitted => "emitted",
            Self::Applied => "applied",
        }
    }
}

/// Enqueues `message` and records it as emitted for `order_id`, in the caller's
/// transaction; returns the message id.
pub async fn emit(
    tx: &mut PgConnection,
    order_id: Uuid,
    message: NewMessage,
) -> Result<Uuid, sqlx::Error> {
    let routing_key = message.routing_key.clone();
    let message_id = messaging::enqueue(tx, message).await?;
    record_emitted(tx, order_id, &routing_key, message_id).await?;
    Ok(message_id)
}

/// Records an event written to the outbox as `message_id`. The trace id is the
/// current span's, the one `messaging::enqueue` stored with the row.
pub async fn record_emitted(
    tx: &mut PgConnection,
    order_id: Uuid,
    routing_key: &str,
    message_id: Uuid,
) -> Result<(), sqlx::Error> {
    let trace_id = trace_id(&tracing::Span::current().context());
    insert(
        tx,
        order_id,
        Direction::Emitted,
        routing_key,
        &message_id.to_string(),
        trace_id.as_deref(),
    )
    .await
}

/// What the history keeps of a message being applied. Taken from the message
/// before the inbox transaction starts, because the transaction's closure must
/// own what it uses.
#[derive(Clone, Debug)]
pub struct Applied {
    /// The routing key the producer published with (retries keep it).
    event: String,
    message_id: String,
    trace_id: Option<String>,
}

impl Applied {
    pub fn of(message: &IncomingMessage) -> Self {
        Self {
            event: message.routing_key.clone(),
            message_id: message.message_id.clone(),
            trace_id: trace_id(&message.trace_context),
        }
    }
}

/// Records a consumed message as applied; call it inside the inbox transaction.
pub async fn record_applied(
    tx: &mut PgConnection,
    order_id: Uuid,
    message: &Applied,
) -> Result<(), sqlx::Error> {
    insert(
        tx,
        order_id,
        Direction::Applied,
        &message.event,
        &message.message_id,
        message.trace_id.as_deref(),
    )
    .await
}

async fn insert(
    tx: &mut PgConnection,
    order_id: Uuid,
    direction: Direction,
    event: &str,
    message_id: &str,
    trace_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO order_history (order_id, direction, event, message_id, trace_id)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(order_id)
    .bind(direction.as_str())
    .bind(event)
    .bind(message_id)
    .bind(trace_id)
    .execute(tx)
    .await?;
    Ok(())
}

/// The W3C trace id of `cx` as 32 lowercase hex digits, if it has a valid span.
fn trace_id(cx: &Context) -> Option<String> {
    let span = cx.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| format!("{:032x}", span_context.trace_id()))
}

/// One event of an order's history.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Entry {
    /// The event's routing key, e.g. `order.placed`.
    pub event: String,
    pub direction: Direction,
    pub message_id: String,
    /// The W3C trace id it ran in (32 hex digits), when it had one.
    pub trace_id: Option<String>,
    pub at: DateTime<Utc>,
    /// Emitted events only: how far the relay got with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub outbox: Option<Outbox>,
}

/// The outbox row of an emitted event.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Outbox {
    pub state: OutboxState,
    /// Null while pending or parked, and for a row retention deleted.
    pub published_at: Option<DateTime<Utc>>,
    /// 0 for a row retention deleted (its count went with it).
    pub attempts: i32,
    pub last_error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutboxState {
    /// Confirmed by the broker.
    Published,
    /// Waiting for the relay.
    Pending,
    /// Refused by the broker too often; waits for an operator.
    Parked,
    /// Parked, then discarded by an operator: never published.
    Discarded,
}

/// The history of `order_id` in the order it was written (at most
/// [`LIST_LIMIT`] rows); empty for an order this service never saw.
#[tracing::instrument(skip_all, fields(shop.order_id = %order_id))]
pub async fn list(pool: &PgPool, order_id: Uuid) -> Result<Vec<Entry>, sqlx::Error> {
    // The CASE keeps the cast away from applied rows, whose message ids are the
    // producer's and need not be UUIDs; the outbox is found by its unique id.
    // A published row that retention deleted is simply absent (discarded rows
    // are kept, marked).
    let rows = sqlx::query(
        "SELECT h.event, h.direction, h.message_id, h.trace_id, h.at,
                o.id IS NOT NULL AS in_outbox, o.published_at, o.parked_at, o.discarded_at,
                o.attempts, o.last_error
         FROM order_history h
         LEFT JOIN outbox o
                ON o.id = CASE WHEN h.direction = 'emitted' THEN h.message_id::uuid END
         WHERE h.order_id = $1
         ORDER BY h.seq
         LIMIT $2",
    )
    .bind(order_id)
    .bind(LIST_LIMIT)
    .fetch_all(pool)
    .await?;
    rows.iter().map(entry).collect()
}

fn entry(row: &sqlx::postgres::PgRow) -> Result<Entry, sqlx::Error> {
    let direction = match row.try_get::<&str, _>("direction")? {
        "emitted" => Direction::Emitted,
        _ => Direction::Applied,
    };
    let outbox = match direction {
        Direction::Applied => None,
        Direction::Emitted if !row.try_get::<bool, _>("in_outbox")? => Some(Outbox {
            state: OutboxState::Published,
            published_at: None,
            attempts: 0,
            last_error: None,
        }),
        Direction::Emitted => {
            let published_at: Option<DateTime<Utc>> = row.try_get("published_at")?;
            let parked_at: Option<DateTime<Utc>> = row.try_get("parked_at")?;
            let discarded_at: Option<DateTime<Utc>> = row.try_get("discarded_at")?;
            Some(Outbox {
                state: match (published_at, parked_at, discarded_at) {
                    (Some(_), _, _) => OutboxState::Published,
                    (None, Some(_), Some(_)) => OutboxState::Discarded,
                    (None, Some(_), None) => OutboxState::Parked,
                    (None, None, _) => OutboxState::Pending,
                },
                published_at,
                attempts: row.try_get("attempts")?,
                last_error: row.try_get("last_error")?,
            })
        }
    };
    Ok(Entry {
        event: row.try_get("event")?,
        direction,
        message_id: row.try_get("message_id")?,
        trace_id: row.try_get("trace_id")?,
        at: row.try_get("at")?,
        outbox,
    })
}

/// The trace id of the first event that has one: the trace the order's saga runs in.
pub fn first_trace_id(entries: &[Entry]) -> Option<&str> {
    entries.iter().find_map(|e| e.trace_id.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    #[test]
    fn a_trace_id_is_32_lowercase_hex_digits_and_absent_without_a_span() {
        let cx = Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c_u128),
            SpanId::from(0xb7ad_6b71_6920_3331_u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ));
        assert_eq!(
            trace_id(&cx).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        let small = Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(1_u128),
            SpanId::from(1_u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ));
        assert_eq!(
            trace_id(&small).as_deref(),
            Some("00000000000000000000000000000001")
        );
        assert_eq!(trace_id(&Context::new()), None);
    }
}
