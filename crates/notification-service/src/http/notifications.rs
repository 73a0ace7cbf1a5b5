//! `GET /notifications?order_id=`: what was sent about an order.

use axum::{
    Json, Router,
    extract::State,
    response::{IntoResponse, Response},
    routing::get,
};
use chrono::DateTime;
use serde::Deserialize;
use service_kit::problem::{ApiQuery, Problem};
use uuid::Uuid;

use super::AppState;
use crate::store;

pub fn router() -> Router<AppState> {
    Router::new().route("/notifications", get(list))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    order_id: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, Problem> {
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
    Ok(Json(serde_json::json!({ "items": items, "next": next })).into_response())
}
