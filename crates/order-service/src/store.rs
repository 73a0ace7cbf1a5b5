//! Orders in PostgreSQL. Every state change writes its event to the outbox in the
//! same transaction (and to the order's history, `service_kit::history`), and
//! every transition is guarded by the status it leaves, so a late or repeated
//! event never moves an order backwards.

use chrono::{DateTime, Utc};
use contracts::{
    decode::{now, outgoing},
    events::v1::{OrderCancelled, OrderConfirmed, OrderItem, OrderPlaced, OrderRejected, Shortage},
    names::keys,
};
use serde::Serialize;
use service_kit::history;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::domain::{NewOrder, Status};

/// An order as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrderView {
    pub id: Uuid,
    pub customer_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub email: Option<String>,
    pub status: Status,
    pub items: Vec<ItemView>,
    /// Why it was rejected (rejected orders only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reason: Option<String>,
    /// What was missing (rejected orders only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<ShortageView>>, nullable = false)]
    pub shortages: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A SKU that could not be reserved.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)] // The shape of the stored JSON, for the API document.
pub struct ShortageView {
    pub sku: String,
    pub requested: u32,
    pub available: u32,
    /// False when inventory-service has never heard of the SKU.
    pub known: bool,
}

/// One line of an order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ItemView {
    pub sku: String,
    pub quantity: i32,
}

/// Inserts a pending order and its `OrderPlaced` event.
pub async fn place(tx: &mut PgConnection, id: Uuid, order: &NewOrder) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO orders (id, customer_id, email, status) VALUES ($1, $2, $3, 'pending')",
    )
    .bind(id)
    .bind(&order.customer_id)
    .bind(&order.email)
    .execute(&mut *tx)
    .await?;
    let lines: Vec<i32> = (1..).take(order.items.len()).collect();
    let skus: Vec<&str> = order.items.iter().map(|l| l.sku.as_str()).collect();
    let quantities: Vec<i32> = order
        .items
        .iter()
        .map(|l| i32::try_from(l.quantity).unwrap_or(i32::MAX))
        .collect();
    sqlx::query(
        "INSERT INTO order_items (order_id, line, sku, quantity)
         SELECT $1, * FROM unnest($2::int[], $3::text[], $4::int[])",
    )
    .bind(id)
    .bind(&lines)
    .bind(&skus)
    .bind(&quantities)
    .execute(&mut *tx)
    .await?;
    let event = OrderPlaced {
        order_id: id.to_string(),
        customer_id: order.customer_id.clone(),
        email: order.email.clone(),
        items: order
            .items
            .iter()
            .map(|l| OrderItem {
                sku: l.sku.clone(),
                quantity: l.quantity,
            })
            .collect(),
        placed_at: now(),
    };
    history::emit(
        tx,
        id,
        outgoing(keys::ORDER_PLACED, &event, &event.order_id),
    )
    .await?;
    Ok(())
}

/// Whether the order exists.
pub async fn exists(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
}

pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<OrderView>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, customer_id, email, status, reason, shortages, created_at, updated_at
         FROM orders WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let mut views = with_items(pool, vec![row]).await?;
    Ok(views.pop())
}

/// Filters of `GET /orders`.
#[derive(Debug, Default)]
pub struct Filter {
    pub customer_id: Option<String>,
    pub status: Option<Status>,
    /// Only orders created strictly before this instant.
    pub created_before: Option<DateTime<Utc>>,
    pub limit: i64,
    /// Continue after this (created_at, id).
    pub after: Option<(DateTime<Utc>, Uuid)>,
}

/// Newest first; returns one page and whether more follow.
pub async fn list(pool: &PgPool, filter: &Filter) -> Result<(Vec<OrderView>, bool), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, customer_id, email, status, reason, shortages, created_at, updated_at
         FROM orders
         WHERE ($1::text IS NULL OR customer_id = $1)
           AND ($2::text IS NULL OR status = $2)
           AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
           AND ($5::timestamptz IS NULL OR created_at < $5)
         ORDER BY created_at DESC, id DESC
         LIMIT $6",
    )
    .bind(&filter.customer_id)
    .bind(filter.status.map(Status::as_str))
    .bind(filter.after.map(|a| a.0))
    .bind(filter.after.map(|a| a.1))
    .bind(filter.created_before)
    .bind(filter.limit + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() as i64 > filter.limit;
    let rows = rows
        .into_iter()
        .take(usize::try_from(filter.limit).unwrap_or(0))
        .collect();
    Ok((with_items(pool, rows).await?, more))
}

async fn with_items(
    pool: &PgPool,
    rows: Vec<sqlx::postgres::PgRow>,
) -> Result<Vec<OrderView>, sqlx::Error> {
    let ids: Vec<Uuid> = rows
        .iter()
        .map(|r| r.try_get("id"))
        .collect::<Result<_, _>>()?;
    let items = sqlx::query(
        "SELECT order_id, sku, quantity FROM order_items WHERE order_id = ANY($1) ORDER BY order_id, line",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let mut views = Vec::with_capacity(rows.len());
    for row in rows {
        let id: Uuid = row.try_get("id")?;
        let status: String = row.try_get("status")?;
        views.push(OrderView {
            id,
            customer_id: row.try_get("customer_id")?,
            email: row.try_get("email")?,
            status: Status::parse(&status).unwrap_or(Status::Pending),
            items: items
                .iter()
                .filter(|i| i.try_get::<Uuid, _>("order_id").ok() == Some(id))
                .map(|i| {
                    Ok(ItemView {
                        sku: i.try_get("sku")?,
                        quantity: i.try_get("quantity")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()?,
            reason: row.try_get("reason")?,
            shortages: row.try_get("shortages")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        });
    }
    Ok(views)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Cancel {
    Cancelled,
    AlreadyCancelled,
    NotCancellable(Status),
    NotFound,
}

/// `pending | confirmed → cancelled`, with `OrderCancelled`; repeating it is a no-op.
pub async fn cancel(pool: &PgPool, id: Uuid) -> Result<Cancel, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM orders WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let outcome = match status.as_deref().and_then(Status::parse) {
        None => Cancel::NotFound,
        Some(Status::Cancelled) => Cancel::AlreadyCancelled,
        Some(s @ Status::Rejected) => Cancel::NotCancellable(s),
        Some(Status::Pending | Status::Confirmed) => {
            sqlx::query("UPDATE orders SET status = 'cancelled', updated_at = now() WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let event = OrderCancelled {
                order_id: id.to_string(),
                reason: "cancelled by the customer".into(),
                cancelled_at: now(),
            };
            history::emit(
                &mut tx,
                id,
                outgoing(keys::ORDER_CANCELLED, &event, &event.order_id),
            )
            .await?;
            Cancel::Cancelled
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// What an inventory result did to the order.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Left `pending`, this long after the order was placed (by the
    /// database's clock, which also stamped `created_at`).
    Moved(Status, std::time::Duration),
    /// The order had already left `pending` (cancelled, or a repeat).
    Unchanged,
    UnknownOrder,
}

fn seconds(value: f64) -> std::time::Duration {
    std::time::Duration::try_from_secs_f64(value.max(0.0)).unwrap_or_default()
}

/// `pending → confirmed`, with `OrderConfirmed`.
pub async fn confirm(tx: &mut PgConnection, id: Uuid) -> Result<Applied, sqlx::Error> {
    let moved: Option<f64> = sqlx::query_scalar(
        "UPDATE orders SET status = 'confirmed', updated_at = now() WHERE id = $1 AND status = 'pending'
         RETURNING EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(waited) = moved else {
        return unchanged(tx, id).await;
    };
    let event = OrderConfirmed {
        order_id: id.to_string(),
        confirmed_at: now(),
    };
    history::emit(
        tx,
        id,
        outgoing(keys::ORDER_CONFIRMED, &event, &event.order_id),
    )
    .await?;
    Ok(Applied::Moved(Status::Confirmed, seconds(waited)))
}

/// `pending → rejected` with the shortages, and `OrderRejected`.
pub async fn reject(
    tx: &mut PgConnection,
    id: Uuid,
    shortages: &[Shortage],
) -> Result<Applied, sqlx::Error> {
    let reason = rejection_reason(shortages);
    let json: Vec<serde_json::Value> = shortages
        .iter()
        .map(|s| {
            serde_json::json!({
                "sku": s.sku, "requested": s.requested, "available": s.available, "known": s.known
            })
        })
        .collect();
    let moved: Option<f64> = sqlx::query_scalar(
        "UPDATE orders SET status = 'rejected', reason = $2, shortages = $3, updated_at = now()
         WHERE id = $1 AND status = 'pending'
         RETURNING EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8",
    )
    .bind(id)
    .bind(&reason)
    .bind(serde_json::Value::Array(json))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(waited) = moved else {
        return unchanged(tx, id).await;
    };
    let event = OrderRejected {
        order_id: id.to_string(),
        reason,
        shortages: shortages.to_vec(),
        rejected_at: now(),
    };
    history::emit(
        tx,
        id,
        outgoing(keys::ORDER_REJECTED, &event, &event.order_id),
    )
    .await?;
    Ok(Applied::Moved(Status::Rejected, seconds(waited)))
}

async fn unchanged(tx: &mut PgConnection, id: Uuid) -> Result<Applied, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1)")
        .bind(id)
        .fetch_one(tx)
        .await?;
    Ok(if exists {
        Applied::Unchanged
    } else {
        Applied::UnknownOrder
    })
}

/// "insufficient stock: SKU-1 requested 5, available 3; unknown SKU NOPE"
pub fn rejection_reason(shortages: &[Shortage]) -> String {
    let parts: Vec<String> = shortages
        .iter()
        .map(|s| {
            if s.known {
                format!(
                    "{} requested {}, available {}",
                    s.sku, s.requested, s.available
                )
            } else {
                format!("unknown SKU {}", s.sku)
            }
        })
        .collect();
    if parts.is_empty() {
        "insufficient stock".into()
    } else {
        format!("insufficient stock: {}", parts.join("; "))
    }
}

/// Deletes Idempotency-Keys older than `retention`.
pub async fn forget_idempotency_keys(
    pool: &PgPool,
    retention: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(retention.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected())
}

/// The orders still `pending`: how many, and the age of the oldest in seconds
/// (0 when there is none).
pub async fn pending_summary(pool: &PgPool) -> Result<(i64, f64), sqlx::Error> {
    let row = sqlx::query(
        "SELECT count(*) AS pending,
                COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS oldest
         FROM orders WHERE status = 'pending'",
    )
    .fetch_one(pool)
    .await?;
    Ok((row.try_get("pending")?, row.try_get("oldest")?))
}
