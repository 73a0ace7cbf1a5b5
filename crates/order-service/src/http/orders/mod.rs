//! `/orders`: place, read, list and cancel orders, and read an order's history
//! (`/orders/{id}/events`: what order-service emitted and applied for it).
//!
//! `POST /orders` honours `Idempotency-Key` (draft-ietf-httpapi-idempotency-key):
//! the same key with the same body replays the first response without creating a
//! second order; the same key with another body is a 422; a request arriving while
//! the first with its key is still being processed is a 409. Keys are kept 24 h
//! (`IDEMPOTENCY_RETENTION_HOURS`). While the saga cannot keep up, a new order
//! is answered 429 with `Retry-After` before any database work ([`crate::admission`]).
//!
//! One job per file: this one routes and reads; `place` takes new orders
//! (with `Idempotency-Key`), `list` pages through them.

mod list;
mod place;

use axum::{
    Json,
    extract::State,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use service_kit::{
    auth::{OPS, Principal},
    history,
    openapi::ProblemDetails,
    problem::{self, ApiPath, Problem},
};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::AppState;
use crate::{
    domain::Status,
    store::{self, Cancel},
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(place::place, list::list))
        .routes(routes!(read))
        .routes(routes!(events))
        .routes(routes!(cancel))
}

/// An order's id and where it stands.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct OrderStatus {
    id: Uuid,
    status: Status,
}

/// The order as `principal` may see it: another customer's order is answered
/// like one that does not exist (404), so its existence is not revealed.
fn visible(
    principal: &Principal,
    id: Uuid,
    order: Option<store::OrderView>,
) -> Result<store::OrderView, Problem> {
    match order {
        Some(order)
            if principal
                .customer()
                .is_none_or(|me| me == order.customer_id) =>
        {
            Ok(order)
        }
        Some(_) => {
            principal.denied("another customer's order");
            Err(Problem::not_found(format!("no order {id}")))
        }
        None => Err(Problem::not_found(format!("no order {id}"))),
    }
}

fn order_id(raw: &str) -> Result<Uuid, Problem> {
    let id = problem::path_uuid("order id", raw)?;
    tracing::Span::current().record("shop.order_id", id.to_string());
    Ok(id)
}

/// One order.
#[utoipa::path(
    get,
    path = "/orders/{id}",
    operation_id = "read_order",
    tag = "orders",
    params(("id" = Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The order", body = store::OrderView),
        (status = 400, description = "Not a UUID", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn read(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    let id = order_id(&id)?;
    let order = visible(&principal, id, store::get(&state.pool, id).await?)?;
    Ok(Json(order).into_response())
}

/// What order-service emitted and applied for one order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct OrderHistory<'a> {
    order_id: Uuid,
    /// The trace the saga runs in (of the first event that has one).
    #[schema(value_type = Option<String>)]
    trace_id: Option<&'a str>,
    #[schema(value_type = Vec<history::Entry>)]
    items: &'a [history::Entry],
}

/// What order-service emitted and applied for the order, in that order, each
/// emitted event with the state of its outbox row.
#[utoipa::path(
    get,
    path = "/orders/{id}/events",
    operation_id = "read_order_events",
    tag = "orders",
    params(("id" = Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The order's history, in the order it was written", body = OrderHistory),
        (status = 400, description = "Not a UUID", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the scope ops", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn events(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    principal.require(OPS)?;
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

/// cancelling it again answers the same.
#[utoipa::path(
    post,
    path = "/orders/{id}/cancel",
    operation_id = "cancel_order",
    tag = "orders",
    params(("id" = Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, description = "Cancelled", body = OrderStatus),
        (status = 400, description = "Not a UUID", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 409, description = "Rejected: cannot be cancelled", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn cancel(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    let id = order_id(&id)?;
    if principal.customer().is_some() {
        // A customer cancels its own orders only; an order's customer never
        // changes, so checking before the cancel is enough.
        visible(&principal, id, store::get(&state.pool, id).await?)?;
    }
    match store::cancel(&state.pool, id).await? {
        Cancel::Cancelled | Cancel::AlreadyCancelled => Ok(Json(OrderStatus {
            id,
            status: Status::Cancelled,
        })
        .into_response()),
        Cancel::NotCancellable(status) => Err(Problem::conflict(format!(
            "order {id} is {} and cannot be cancelled",
            status.as_str()
        ))),
        Cancel::NotFound => Err(Problem::not_found(format!("no order {id}"))),
    }
}
