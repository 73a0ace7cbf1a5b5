//! `/stock`: read stock levels and set what is available.

use axum::{
    Json, Router,
    extract::State,
    response::{IntoResponse, Response},
    routing::get,
};
use contracts::domain::Sku;
use serde::Deserialize;
use service_kit::problem::{ApiJson, ApiPath, ApiQuery, Problem};

use super::AppState;
use crate::store;

/// The most one SKU may hold.
pub const AVAILABLE_MAX: i64 = 1_000_000_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/stock", get(list))
        .route("/stock/{sku}", get(read).put(set))
}

fn sku(raw: &str) -> Result<Sku, Problem> {
    Sku::parse(raw)
        .map_err(|message| Problem::bad_request(format!("invalid SKU in path: {message}")))
}

async fn read(
    State(state): State<AppState>,
    ApiPath(raw): ApiPath<String>,
) -> Result<Response, Problem> {
    let sku = sku(&raw)?;
    match store::get(&state.pool, sku.as_str()).await? {
        Some(stock) => Ok(Json(stock).into_response()),
        None => Err(Problem::not_found(format!("no SKU {sku}"))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStock {
    available: i64,
}

async fn set(
    State(state): State<AppState>,
    ApiPath(raw): ApiPath<String>,
    ApiJson(body): ApiJson<SetStock>,
) -> Result<Response, Problem> {
    let sku = sku(&raw)?;
    if !(0..=AVAILABLE_MAX).contains(&body.available) {
        return Err(Problem::field(
            "available",
            format!("must be between 0 and {AVAILABLE_MAX}"),
        ));
    }
    let stock = store::set_available(&state.pool, sku.as_str(), body.available).await?;
    tracing::info!(sku = %sku, available = body.available, "stock set");
    Ok(Json(stock).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, Problem> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(Problem::bad_request("limit must be between 1 and 500"));
    }
    let after = query.cursor.as_deref().filter(|c| !c.is_empty());
    let (items, more) = store::list(&state.pool, after, limit).await?;
    let next = more.then(|| items.last().map(|s| s.sku.clone())).flatten();
    Ok(Json(serde_json::json!({ "items": items, "next": next })).into_response())
}
