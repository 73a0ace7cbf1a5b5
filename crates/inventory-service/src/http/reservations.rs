//! `/reservations/{order_id}`: what inventory holds for an order, and what it
//! applied and emitted for it (the inventory part of an order's timeline).

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

use super::AppState;
use crate::store::{self, ReservationView};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(read))
}

/// An order's reservation and what inventory applied and emitted for it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ReservationHistory {
    #[serde(flatten)]
    reservation: ReservationView,
    events: Vec<history::Entry>,
}

/// What inventory holds for an order, and what it applied and emitted for it.
#[utoipa::path(
    get,
    path = "/reservations/{order_id}",
    operation_id = "read_reservation",
    tag = "reservations",
    params(("order_id" = Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The reservation and its history", body = ReservationHistory),
        (status = 400, description = "Not a UUID", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the scope ops", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "Inventory has no reservation for the order", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn read(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
) -> Result<Response, Problem> {
    principal.require(OPS)?;
    let order_id = problem::path_uuid("order id", &raw)?;
    tracing::Span::current().record("shop.order_id", order_id.to_string());
    let Some(reservation) = store::reservation(&state.pool, order_id).await? else {
        return Err(Problem::not_found(format!(
            "inventory has no reservation for order {order_id}"
        )));
    };
    let events = history::list(&state.pool, order_id).await?;
    Ok(Json(ReservationHistory {
        reservation,
        events,
    })
    .into_response())
}
