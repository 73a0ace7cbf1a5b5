//! `/reservations/{order_id}`: what inventory holds for an order, and what it
//! applied and emitted for it (the inventory part of an order's timeline).

use axum::{
    Json, Router,
    extract::State,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;
use service_kit::{
    history,
    problem::{self, ApiPath, Problem},
};

use super::AppState;
use crate::store::{self, ReservationView};

pub fn router() -> Router<AppState> {
    Router::new().route("/reservations/{order_id}", get(read))
}

#[derive(Debug, Serialize)]
struct ReservationHistory {
    #[serde(flatten)]
    reservation: ReservationView,
    events: Vec<history::Entry>,
}

async fn read(
    State(state): State<AppState>,
    ApiPath(raw): ApiPath<String>,
) -> Result<Response, Problem> {
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
