//! `POST /orders`: a new order, stored with its `OrderPlaced` event in one
//! transaction; `Idempotency-Key` replays the first answer.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use service_kit::{
    auth::Principal,
    openapi::ProblemDetails,
    problem::{ApiJson, Problem},
};
use sqlx::Row;
use uuid::Uuid;

use super::{AppState, OrderStatus};
use crate::{
    domain::{NewOrder, PlaceOrder, Status},
    store,
};

const IDEMPOTENCY_KEY: &str = "idempotency-key";
const KEY_MAX: usize = 255;

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

/// A customer orders for itself: its token's subject is the order's customer
/// (filled in when the body leaves it out); another customer is a 403.
fn on_own_behalf(principal: &Principal, body: &mut PlaceOrder) -> Result<(), Problem> {
    let Some(me) = principal.customer() else {
        return Ok(());
    };
    match body.customer_id.as_deref().map(str::trim) {
        None => body.customer_id = Some(me.to_owned()),
        Some(customer) if customer == me => {}
        Some(_) => {
            principal.denied("placing an order for another customer");
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "a customer places orders for itself only: customer_id must be the token's subject or left out",
            ));
        }
    }
    Ok(())
}

/// Places an order: 202 with its id once it is stored with its `OrderPlaced`
/// event; the saga runs after the answer (follow `Location`).
#[utoipa::path(
    post,
    path = "/orders",
    operation_id = "place_order",
    tag = "orders",
    request_body = PlaceOrder,
    params(
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = r"^[!-~]+$",
         description = "Replays the first answer for the same key and body (kept 24 h); another body with the same key is a 422"),
    ),
    responses(
        (status = 202, description = "Accepted, pending", body = OrderStatus,
         headers(("Location" = String, description = "The order's URL"),
                 ("Idempotent-Replayed" = String, description = "`true` on a replay of an earlier answer"))),
        (status = 400, description = "Malformed JSON or Idempotency-Key", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 403, description = "A customer's token placing an order for another customer", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 409, description = "A request with this Idempotency-Key is still being processed", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 413, description = "Body over 64 KiB", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 422, description = "A field is missing, of the wrong type, unknown or invalid (each named)", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "The shop is overloaded; retry after the given seconds", body = ProblemDetails, content_type = "application/problem+json",
         headers(("Retry-After" = u32, description = "Seconds to wait"))),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
pub(super) async fn place(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<PlaceOrder>,
) -> Result<Response, Problem> {
    // A customer's keys are its own: another customer using the same key
    // neither replays nor blocks them (a header key holds no control
    // character, so the separator cannot be forged).
    let key = idempotency_key(&headers)?.map(|key| match principal.customer() {
        Some(me) => format!("{me}\u{1f}{key}"),
        None => key,
    });
    on_own_behalf(&principal, &mut body)?;
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
    let response = serde_json::to_value(OrderStatus {
        id,
        status: Status::Pending,
    })
    .map_err(|e| Problem::internal(&e))?;
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
