//! Stock in PostgreSQL. A reservation takes all items of an order or none; stock
//! never goes below zero (and the table's CHECK would refuse it if the code were
//! wrong). Reservations and releases first lock their SKU rows through
//! `lock_stock`, in byte order of the SKU (`COLLATE "C"`) whatever the
//! database's collation, so concurrent ones always lock in the same order and
//! cannot deadlock. Every event is written to the outbox and to the order's
//! history (`service_kit::history`) in the transaction of its state change.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use contracts::{
    decode::{now, outgoing},
    events::v1::{OrderItem, OrderPlaced, Shortage, StockRejected, StockReleased, StockReserved},
    names::keys,
};
use serde::Serialize;
use service_kit::history;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

/// A SKU's stock.
#[derive(Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct StockView {
    pub sku: String,
    pub available: i64,
    pub reserved: i64,
}

pub async fn get(pool: &PgPool, sku: &str) -> Result<Option<StockView>, sqlx::Error> {
    let row = sqlx::query("SELECT sku, available, reserved FROM stock WHERE sku = $1")
        .bind(sku)
        .fetch_optional(pool)
        .await?;
    row.map(|r| view(&r)).transpose()
}

/// SKUs in order, after `after`; returns one page and whether more follow.
pub async fn list(
    pool: &PgPool,
    after: Option<&str>,
    limit: i64,
) -> Result<(Vec<StockView>, bool), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT sku, available, reserved FROM stock WHERE ($1::text IS NULL OR sku > $1) ORDER BY sku LIMIT $2",
    )
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let views = rows
        .iter()
        .take(usize::try_from(limit).unwrap_or(0))
        .map(view)
        .collect::<Result<_, _>>()?;
    Ok((views, more))
}

/// Sets `available` (creating the SKU); `reserved` is left as it is.
pub async fn set_available(
    pool: &PgPool,
    sku: &str,
    available: i64,
) -> Result<StockView, sqlx::Error> {
    let row = sqlx::query(
        "INSERT INTO stock (sku, available) VALUES ($1, $2)
         ON CONFLICT (sku) DO UPDATE SET available = EXCLUDED.available, updated_at = now()
         RETURNING sku, available, reserved",
    )
    .bind(sku)
    .bind(available)
    .fetch_one(pool)
    .await?;
    view(&row)
}

fn view(row: &sqlx::postgres::PgRow) -> Result<StockView, sqlx::Error> {
    Ok(StockView {
        sku: row.try_get("sku")?,
        available: row.try_get("available")?,
        reserved: row.try_get("reserved")?,
    })
}

/// Inventory's row for an order.
/// One line of a reservation, as stored.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)] // The shape of the stored JSON, for the API document.
pub struct ReservedLine {
    pub sku: String,
    pub quantity: u32,
}

/// What inventory holds for an order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReservationView {
    pub order_id: Uuid,
    /// `reserved`, `rejected`, `released`, or `cancelled` (the cancellation
    /// arrived before the order).
    pub state: String,
    /// The merged lines as reserved (or asked for, when rejected).
    #[schema(value_type = Vec<ReservedLine>)]
    pub items: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub async fn reservation(
    pool: &PgPool,
    order_id: Uuid,
) -> Result<Option<ReservationView>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT order_id, state, items, created_at, updated_at FROM reservations WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(ReservationView {
            order_id: r.try_get("order_id")?,
            state: r.try_get("state")?,
            items: r.try_get("items")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    })
    .transpose()
}

/// What inventory did with an order.
#[derive(Debug, PartialEq, Eq)]
pub enum Reservation {
    Reserved,
    Rejected(usize),
    /// Cancelled before it arrived: nothing reserved.
    AlreadyCancelled,
    /// Seen before (a redelivery under another message id): nothing to do.
    AlreadyHandled,
}

/// Reserves every item of `order` or none, and writes `StockReserved` or
/// `StockRejected` (with each short SKU) to the outbox.
pub async fn reserve(
    tx: &mut PgConnection,
    order_id: Uuid,
    order: &OrderPlaced,
) -> Result<Reservation, sqlx::Error> {
    lock_order(tx, order_id).await?;
    let existing: Option<String> =
        sqlx::query_scalar("SELECT state FROM reservations WHERE order_id = $1 FOR UPDATE")
            .bind(order_id)
            .fetch_optional(&mut *tx)
            .await?;
    match existing.as_deref() {
        Some("cancelled") => {
            sqlx::query("UPDATE reservations SET state = 'released', updated_at = now() WHERE order_id = $1")
                .bind(order_id)
                .execute(&mut *tx)
                .await?;
            return Ok(Reservation::AlreadyCancelled);
        }
        Some(_) => return Ok(Reservation::AlreadyHandled),
        None => {}
    }
    // Merge repeated SKUs (the lock order is `lock_stock`'s, not the map's).
    let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
    for item in &order.items {
        *wanted.entry(item.sku.as_str()).or_default() += i64::from(item.quantity);
    }
    let skus: Vec<&str> = wanted.keys().copied().collect();
    let on_hand = lock_stock(tx, &skus).await?;
    let shortages: Vec<Shortage> = wanted
        .iter()
        .filter_map(|(sku, qty)| {
            let available = on_hand.get(*sku).copied();
            match available {
                Some(a) if a >= *qty => None,
                _ => Some(Shortage {
                    sku: (*sku).to_owned(),
                    requested: u32::try_from(*qty).unwrap_or(u32::MAX),
                    available: u32::try_from(available.unwrap_or(0)).unwrap_or(u32::MAX),
                    known: available.is_some(),
                }),
            }
        })
        .collect();
    let items: Vec<OrderItem> = wanted
        .iter()
        .map(|(sku, qty)| OrderItem {
            sku: (*sku).to_owned(),
            quantity: u32::try_from(*qty).unwrap_or(u32::MAX),
        })
        .collect();
    let items_json = serde_json::Value::Array(
        items
            .iter()
            .map(|i| serde_json::json!({"sku": i.sku, "quantity": i.quantity}))
            .collect(),
    );
    let id = order_id.to_string();
    if shortages.is_empty() {
        let quantities: Vec<i64> = wanted.values().copied().collect();
        sqlx::query(
            "UPDATE stock AS s SET available = s.available - w.qty, reserved = s.reserved + w.qty, updated_at = now()
             FROM unnest($1::text[], $2::bigint[]) AS w(sku, qty) WHERE s.sku = w.sku",
        )
        .bind(&skus)
        .bind(&quantities)
        .execute(&mut *tx)
        .await?;
        record(tx, order_id, "reserved", &items_json).await?;
        let event = StockReserved {
            order_id: id.clone(),
            items,
            reserved_at: now(),
        };
        history::emit(tx, order_id, outgoing(keys::STOCK_RESERVED, &event, &id)).await?;
        Ok(Reservation::Reserved)
    } else {
        record(tx, order_id, "rejected", &items_json).await?;
        let count = shortages.len();
        let event = StockRejected {
            order_id: id.clone(),
            shortages,
            rejected_at: now(),
        };
        history::emit(tx, order_id, outgoing(keys::STOCK_REJECTED, &event, &id)).await?;
        Ok(Reservation::Rejected(count))
    }
}

/// Takes every lock that applying events for `orders` needs, in the one order
/// every transaction takes them: the orders' advisory locks ([`lock_order`]) by
/// key, then the stock rows of `reserving` and of what the orders hold
/// reserved ([`lock_stock`]). A transaction applying several messages (a batch)
/// would otherwise lock order by order and deadlock with another batch that
/// meets the same rows the other way round.
pub async fn lock_all(
    tx: &mut PgConnection,
    orders: &[Uuid],
    reserving: &[&str],
) -> Result<(), sqlx::Error> {
    // Volatile functions in the select list run after ORDER BY.
    sqlx::query(
        "SELECT pg_advisory_xact_lock(key) FROM (
             SELECT DISTINCT hashtextextended(id::text, 42) AS key
             FROM unnest($1::uuid[]) AS ids(id)
         ) AS keys ORDER BY key",
    )
    .bind(orders)
    .execute(&mut *tx)
    .await?;
    let reserved: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT item->>'sku' FROM reservations, jsonb_array_elements(items) AS item
         WHERE order_id = ANY($1) AND state = 'reserved' AND item->>'sku' IS NOT NULL",
    )
    .bind(orders)
    .fetch_all(&mut *tx)
    .await?;
    let mut skus: Vec<&str> = reserving
        .iter()
        .copied()
        .chain(reserved.iter().map(String::as_str))
        .collect();
    skus.sort_unstable();
    skus.dedup();
    lock_stock(tx, &skus).await?;
    Ok(())
}

/// Serializes everything inventory does for one order until the transaction
/// ends. Without it a reservation and a cancellation handled at the same moment
/// could both find no row, and the later insert would lose the earlier's effect.
async fn lock_order(tx: &mut PgConnection, order_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 42))")
        .bind(order_id)
        .execute(tx)
        .await?;
    Ok(())
}

/// Locks the stock rows of `skus` until the transaction ends and returns what is
/// available of each (unknown SKUs are absent). Whatever changes several stock
/// rows calls this first: the rows are locked in byte order of the SKU, as the
/// database's default collation (e.g. ICU, case-insensitive) may order `a-1`
/// before `B-1` where another statement's plan would take `B-1` first, and two
/// transactions locking the same rows in different orders can deadlock.
async fn lock_stock(
    tx: &mut PgConnection,
    skus: &[&str],
) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let rows = sqlx::query(
        r#"SELECT sku, available FROM stock WHERE sku = ANY($1) ORDER BY sku COLLATE "C" FOR UPDATE"#,
    )
    .bind(skus)
    .fetch_all(tx)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("sku")?, row.try_get("available")?)))
        .collect()
}

async fn record(
    tx: &mut PgConnection,
    order_id: Uuid,
    state: &str,
    items: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO reservations (order_id, state, items) VALUES ($1, $2, $3)")
        .bind(order_id)
        .bind(state)
        .bind(items)
        .execute(tx)
        .await?;
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
pub enum Release {
    Released,
    /// Nothing was reserved (rejected, released before, or not seen yet).
    NothingReserved,
}

/// Returns a reservation to available stock (`StockReleased`); a cancellation that
/// overtakes its order leaves a tombstone so the order is never reserved.
pub async fn release(tx: &mut PgConnection, order_id: Uuid) -> Result<Release, sqlx::Error> {
    lock_order(tx, order_id).await?;
    let row = sqlx::query("SELECT state, items FROM reservations WHERE order_id = $1 FOR UPDATE")
        .bind(order_id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(row) = row else {
        sqlx::query("INSERT INTO reservations (order_id, state) VALUES ($1, 'cancelled') ON CONFLICT DO NOTHING")
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        return Ok(Release::NothingReserved);
    };
    let state: String = row.try_get("state")?;
    if state != "reserved" {
        return Ok(Release::NothingReserved);
    }
    let items: serde_json::Value = row.try_get("items")?;
    let lines: Vec<(String, i64)> = items
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| {
                    Some((
                        i.get("sku")?.as_str()?.to_owned(),
                        i.get("quantity")?.as_i64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let skus: Vec<&str> = lines.iter().map(|l| l.0.as_str()).collect();
    let quantities: Vec<i64> = lines.iter().map(|l| l.1).collect();
    lock_stock(tx, &skus).await?;
    sqlx::query(
        "UPDATE stock AS s SET available = s.available + w.qty, reserved = s.reserved - w.qty, updated_at = now()
         FROM unnest($1::text[], $2::bigint[]) AS w(sku, qty) WHERE s.sku = w.sku",
    )
    .bind(&skus)
    .bind(&quantities)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE reservations SET state = 'released', updated_at = now() WHERE order_id = $1",
    )
    .bind(order_id)
    .execute(&mut *tx)
    .await?;
    let id = order_id.to_string();
    let event = StockReleased {
        order_id: id.clone(),
        items: lines
            .iter()
            .map(|(sku, qty)| OrderItem {
                sku: sku.clone(),
                quantity: u32::try_from(*qty).unwrap_or(u32::MAX),
            })
            .collect(),
        released_at: now(),
    };
    history::emit(tx, order_id, outgoing(keys::STOCK_RELEASED, &event, &id)).await?;
    Ok(Release::Released)
}
