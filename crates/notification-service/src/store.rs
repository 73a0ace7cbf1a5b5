//! Notifications in PostgreSQL: one row per (order, event).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

/// A notification: what was sent, on which channel, and whether it arrived.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NotificationView {
    pub id: Uuid,
    pub order_id: Uuid,
    pub event: String,
    pub message_id: String,
    pub channel: String,
    pub created_at: DateTime<Utc>,
    /// Null until delivered.
    pub delivered_at: Option<DateTime<Utc>>,
    /// Why the last delivery failed, while it is undelivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub last_error: Option<String>,
}

/// A notification to record.
#[derive(Debug)]
pub struct New<'a> {
    pub order_id: Uuid,
    pub event: &'a str,
    pub message_id: &'a str,
    pub channel: &'a str,
    pub body: &'a serde_json::Value,
    /// Delivered on recording (the log channel).
    pub delivered: bool,
}

/// Records the notification unless one exists for (order, event); returns
/// the new row's id, `None` when one existed.
pub async fn record(tx: &mut PgConnection, new: New<'_>) -> Result<Option<Uuid>, sqlx::Error> {
    let id = Uuid::now_v7();
    let inserted = sqlx::query(
        "INSERT INTO notifications (id, order_id, event, message_id, channel, body, delivered_at)
         VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $7 THEN now() END)
         ON CONFLICT (order_id, event) DO NOTHING",
    )
    .bind(id)
    .bind(new.order_id)
    .bind(new.event)
    .bind(new.message_id)
    .bind(new.channel)
    .bind(new.body)
    .bind(new.delivered)
    .execute(tx)
    .await?
    .rows_affected()
        == 1;
    Ok(inserted.then_some(id))
}

/// A webhook notification to deliver: its row, the message id that caused it
/// (the webhook's idempotency key) and its body.
#[derive(Debug)]
pub struct Pending {
    pub id: Uuid,
    pub message_id: String,
    pub body: serde_json::Value,
}

/// The undelivered webhook notification of (order, event), if any.
pub async fn pending_webhook(
    pool: &PgPool,
    order_id: Uuid,
    event: &str,
) -> Result<Option<Pending>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, message_id, body FROM notifications
         WHERE order_id = $1 AND event = $2 AND channel = 'webhook' AND delivered_at IS NULL",
    )
    .bind(order_id)
    .bind(event)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(Pending {
            id: r.try_get("id")?,
            message_id: r.try_get("message_id")?,
            body: r.try_get("body")?,
        })
    })
    .transpose()
}

pub async fn mark_delivered(pool: &PgPool, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE notifications SET delivered_at = now(), attempts = attempts + 1, last_error = NULL WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn mark_failed(pool: &PgPool, id: Uuid, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE notifications SET attempts = attempts + 1, last_error = $2 WHERE id = $1")
        .bind(id)
        .bind(error)
        .execute(pool)
        .await?;
    Ok(())
}

/// Notifications of one order, oldest first, after `after`.
pub async fn list(
    pool: &PgPool,
    order_id: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<(Vec<NotificationView>, bool), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, order_id, event, message_id, channel, created_at, delivered_at, last_error
         FROM notifications
         WHERE order_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
         ORDER BY created_at, id LIMIT $4",
    )
    .bind(order_id)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let views = rows
        .iter()
        .take(usize::try_from(limit).unwrap_or(0))
        .map(|r| {
            Ok(NotificationView {
                id: r.try_get("id")?,
                order_id: r.try_get("order_id")?,
                event: r.try_get("event")?,
                message_id: r.try_get("message_id")?,
                channel: r.try_get("channel")?,
                created_at: r.try_get("created_at")?,
                delivered_at: r.try_get("delivered_at")?,
                last_error: r.try_get("last_error")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok((views, more))
}
