//! `/orders`: place, read, list and cancel orders, and read an order's history
//! (`/orders/{id}/events`: what order-service emitted and applied for it).
//!
//! `POST /orders` honours `Idempotency-Key` (draft-ietf-httpapi-idempotency-key):
//! the same key with the same body replays the first response without creating a
//! second order; the same key with another body is a 422; a request arriving while
//! the first with its key is still being processed is a 409. Keys are kept 24 h
//! (`IDEMPOTENCY_RETENTION_HOURS`). While the saga cannot keep up, a new order
//! is answered 429 with `Retry-After` before any database work ([`crate::admission`]).

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use service_kit::{
    history,
    problem::{self, ApiJson, ApiPath, ApiQuery, Problem},
};
use sqlx::Row;
use uuid::Uuid;

use super::AppState;
use crate::{
    domain::{NewOrder, PlaceOrder, Status},
    store::{self, Cancel, Filter},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/orders", post(place).get(list))
        .route("/orders/{id}", get(read))
        .route("/orders/{id}/events", get(events))
        .route("/orders/{id}/cancel", post(cancel))
}

const IDEMPOTENCY_KEY: &str = "idempotency-key";
const KEY_MAX: usize = 255;

fn order_id(raw: &str) -> Result<Uuid, Problem> {
    let id = problem::path_uuid("order id", raw)?;
    tracing::Span::current().record("shop.order_id", id.to_string());
    Ok(id)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= KEY_MAX && k.chars().all(|c| c.is_ascii_graphic()))
        .ok_or_else(|| {
            Problem::bad_request(format!(
                "Idempotency-Key must be 1 to {KEY_MAX} visible ASCII characters"
            ))
        })?;
    Ok(Some(key.to_owned()))
}

async fn place(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PlaceOrder>,
) -> Result<Response, Problem> {
    let key = idempotency_key(&headers)?;
    let order = NewOrder::parse(body).map_err(Problem::invalid)?;
    if let Err(shed) = state.admission.admit() {
        let mut reply = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "orders arrive faster than the shop completes them; retry after {} s",
                shed.retry_after
            ),
        )
        .into_response();
        reply
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(shed.retry_after));
        return Ok(reply);
    }
    let canonical = serde_json::to_string(&order).map_err(|e| Problem::internal(&e))?;
    let mut tx = state.pool.begin().await?;
    if let Some(key) = &key {
        // Held until commit: a second request with this key cannot overtake.
        let first: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 7))")
                .bind(key)
                .fetch_one(&mut *tx)
                .await?;
        if !first {
            return Err(Problem::conflict(
                "a request with this Idempotency-Key is still being processed; retry later",
            ));
        }
        let stored = sqlx::query(
            "SELECT request, status_code, response FROM idempotency_keys WHERE key = $1",
        )
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = stored {
            // End the transaction now, not when the pool gets to it: its
            // advisory lock would answer a 409 to the client's next request.
            tx.rollback().await?;
            let request: String = row.try_get("request")?;
            if request != canonical {
                return Err(Problem::field(
                    "Idempotency-Key",
                    "was already used with a different request body",
                ));
            }
            let status: i32 = row.try_get("status_code")?;
            let response: serde_json::Value = row.try_get("response")?;
            let status = u16::try_from(status)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::ACCEPTED);
            let mut reply = (status, Json(response)).into_response();
            reply
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(reply);
        }
    }
    let id = Uuid::now_v7();
    tracing::Span::current().record("shop.order_id", id.to_string());
    store::place(&mut tx, id, &order).await?;
    let response = serde_json::json!({ "id": id, "status": Status::Pending });
    if let Some(key) = &key {
        sqlx::query("INSERT INTO idempotency_keys (key, request, status_code, response) VALUES ($1, $2, 202, $3)")
            .bind(key)
            .bind(&canonical)
            .bind(&response)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    // Fault injection: the order and its event are committed, nothing published
    // and no response sent (a client retry with its Idempotency-Key replays).
    messaging::crash_point!(crate::CRASH_AFTER_ORDER_COMMIT);
    tracing::info!(order_id = %id, items = order.items.len(), "order placed");
    let mut reply = (StatusCode::ACCEPTED, Json(response)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/orders/{id}")) {
        reply.headers_mut().insert(header::LOCATION, location);
    }
    Ok(reply)
}

async fn read(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    let id = order_id(&id)?;
    match store::get(&state.pool, id).await? {
        Some(order) => Ok(Json(order).into_response()),
        None => Err(Problem::not_found(format!("no order {id}"))),
    }
}

#[derive(Debug, Serialize)]
struct OrderHistory<'a> {
    order_id: Uuid,
    /// The trace the saga runs in (of the first event that has one).
    trace_id: Option<&'a str>,
    items: &'a [history::Entry],
}

/// What order-service emitted and applied for the order, in that order, each
/// emitted event with the state of its outbox row.
async fn events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    let id = order_id(&id)?;
    if !store::exists(&state.pool, id).await? {
        return Err(Problem::not_found(format!("no order {id}")));
    }
    let items = history::list(&state.pool, id).await?;
    Ok(Json(OrderHistory {
        order_id: id,
        trace_id: history::first_trace_id(&items),
        items: &items,
    })
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    customer_id: Option<String>,
    status: Option<String>,
    /// RFC 3339; only orders created strictly before it.
    created_before: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

const LIMIT_DEFAULT: i64 = 20;
const LIMIT_MAX: i64 = 100;

async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, Problem> {
    let status = match query.status.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(Status::parse(raw).ok_or_else(|| {
            Problem::bad_request("status must be one of pending, confirmed, rejected, cancelled")
        })?),
    };
    let limit = query.limit.unwrap_or(LIMIT_DEFAULT);
    if !(1..=LIMIT_MAX).contains(&limit) {
        return Err(Problem::bad_request(format!(
            "limit must be between 1 and {LIMIT_MAX}"
        )));
    }
    let created_before = query
        .created_before
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(parse_instant)
        .transpose()?;
    let after = query
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(parse_cursor)
        .transpose()?;
    let filter = Filter {
        customer_id: query.customer_id.filter(|c| !c.is_empty()),
        status,
        created_before,
        limit,
        after,
    };
    let (orders, more) = store::list(&state.pool, &filter).await?;
    let next = more
        .then(|| orders.last().map(|o| cursor(o.created_at, o.id)))
        .flatten();
    Ok(Json(serde_json::json!({ "items": orders, "next": next })).into_response())
}

fn parse_instant(raw: &str) -> Result<DateTime<Utc>, Problem> {
    DateTime::parse_from_rfc3339(raw)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|e| {
            Problem::bad_request(format!(
                "created_before must be an RFC 3339 timestamp such as 2025-01-31T12:00:00Z ({e}); \
                 got '{}'",
                raw.chars().take(64).collect::<String>()
            ))
        })
}

/// `<microseconds since epoch>_<uuid>` of the last order on a page.
fn cursor(created_at: DateTime<Utc>, id: Uuid) -> String {
    format!("{}_{}", created_at.timestamp_micros(), id)
}

fn parse_cursor(raw: &str) -> Result<(DateTime<Utc>, Uuid), Problem> {
    let invalid =
        || Problem::bad_request("cursor is invalid; pass the `next` value of a previous page");
    let (micros, id) = raw.split_once('_').ok_or_else(invalid)?;
    let micros: i64 = micros.parse().map_err(|_| invalid())?;
    let at = DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| invalid())?))
}

async fn cancel(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    let id = order_id(&id)?;
    match store::cancel(&state.pool, id).await? {
        Cancel::Cancelled | Cancel::AlreadyCancelled => {
            Ok(Json(serde_json::json!({ "id": id, "status": Status::Cancelled })).into_response())
        }
        Cancel::NotCancellable(status) => Err(Problem::conflict(format!(
            "order {id} is {} and cannot be cancelled",
            status.as_str()
        ))),
        Cancel::NotFound => Err(Problem::not_found(format!("no order {id}"))),
    }
}
