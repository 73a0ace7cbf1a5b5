//! `GET /notifications?order_id=`: what was sent about an order.

use axum::{
    Json,
    extract::State,
    response::{IntoResponse, Response},
};
use chrono::DateTime;
use serde::{Deserialize, Serialize};
use service_kit::{
    auth::{OPS, Principal},
    openapi::ProblemDetails,
    problem::{ApiQuery, Problem},
};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::AppState;
use crate::store;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// The order the notifications are about (required).
    #[param(required = true, value_type = Uuid)]
    order_id: Option<String>,
    /// Notifications per page.
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<i64>,
    /// The `next` of the previous page (empty: the first page).
    #[param(
        pattern = r"^(-?[0-9]{1,16}_[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$"
    )]
    cursor: Option<String>,
}

/// One page of an order's notifications, oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct NotificationPage {
    items: Vec<store::NotificationView>,
    /// Pass as `cursor` for the next page; null on the last.
    next: Option<String>,
}

/// What was sent about an order, oldest first.
#[utoipa::path(
    get,
    path = "/notifications",
    operation_id = "list_notifications",
    tag = "notifications",
    params(ListQuery),
    responses(
        (status = 200, description = "One page", body = NotificationPage),
        (status = 400, description = "order_id missing or not a UUID, or an invalid or unknown parameter", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the scope ops", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]

async fn list(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, Problem> {
    principal.require(OPS)?;
    let raw = query
        .order_id
        .ok_or_else(|| Problem::bad_request("order_id is required"))?;
    let order_id =
        Uuid::parse_str(&raw).map_err(|_| Problem::bad_request("order_id must be a UUID"))?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(Problem::bad_request("limit must be between 1 and 500"));
    }
    let invalid =
        || Problem::bad_request("cursor is invalid; pass the `next` value of a previous page");
    let after = match query.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => {
            let (micros, id) = c.split_once('_').ok_or_else(invalid)?;
            if micros.trim_start_matches('-').len() > 16 || id.len() != 36 {
                return Err(invalid());
            }
            let at = micros
                .parse()
                .ok()
                .and_then(DateTime::from_timestamp_micros)
                .ok_or_else(invalid)?;
            Some((at, Uuid::parse_str(id).map_err(|_| invalid())?))
        }
    };
    let (items, more) = store::list(&state.pool, order_id, after, limit).await?;
    let next = more
        .then(|| {
            items
                .last()
                .map(|n| format!("{}_{}", n.created_at.timestamp_micros(), n.id))
        })
        .flatten();
    Ok(Json(NotificationPage { items, next }).into_response())
}
