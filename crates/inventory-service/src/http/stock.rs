//! `/stock`: read stock levels and set what is available.

use axum::{
    Json,
    extract::{FromRequest, State},
    response::{IntoResponse, Response},
};
use contracts::domain::Sku;
use serde::{Deserialize, Serialize};
use service_kit::{
    auth::{Principal, STOCK_WRITE},
    openapi::ProblemDetails,
    problem::{ApiJson, ApiPath, ApiQuery, Problem},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use crate::store;

/// The most one SKU may hold.
pub const AVAILABLE_MAX: i64 = 1_000_000_000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(read, set))
}

/// One page of stock levels, by SKU.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct StockPage {
    items: Vec<store::StockView>,
    /// Pass as `cursor` for the next page; null on the last.
    next: Option<String>,
}

fn sku(raw: &str) -> Result<Sku, Problem> {
    Sku::parse(raw)
        .map_err(|message| Problem::bad_request(format!("invalid SKU in path: {message}")))
}

/// One SKU's stock.
#[utoipa::path(
    get,
    path = "/stock/{sku}",
    operation_id = "read_stock",
    tag = "stock",
    params(("sku" = String, Path, pattern = r"^[A-Za-z0-9._-]{1,64}$", description = "The SKU")),
    responses(
        (status = 200, description = "Its stock", body = store::StockView),
        (status = 400, description = "Not a valid SKU", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "No such SKU", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
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

/// What a SKU has available (reservations come on top of it).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SetStock {
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    available: i64,
}

/// Sets what a SKU has available (creating the SKU).
#[utoipa::path(
    put,
    path = "/stock/{sku}",
    operation_id = "set_stock",
    tag = "stock",
    params(("sku" = String, Path, pattern = r"^[A-Za-z0-9._-]{1,64}$", description = "The SKU")),
    request_body = SetStock,
    responses(
        (status = 200, description = "Its stock now", body = store::StockView),
        (status = 400, description = "Not a valid SKU, or malformed JSON", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the scope stock:write", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 413, description = "Body over 64 KiB", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 422, description = "`available` missing, of the wrong type or out of range", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn set(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
    request: axum::extract::Request,
) -> Result<Response, Problem> {
    // The scope first: without it, nothing of the request is looked at.
    principal.require(STOCK_WRITE)?;
    let ApiJson(body) = ApiJson::<SetStock>::from_request(request, &()).await?;
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// SKUs per page.
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<i64>,
    /// The `next` of the previous page (a SKU).
    #[param(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    cursor: Option<String>,
}

/// Stock levels by SKU, a page at a time.
#[utoipa::path(
    get,
    path = "/stock",
    operation_id = "list_stock",
    tag = "stock",
    params(ListQuery),
    responses(
        (status = 200, description = "One page", body = StockPage),
        (status = 400, description = "An invalid or unknown parameter", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, Problem> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(Problem::bad_request("limit must be between 1 and 500"));
    }
    let after = match query.cursor.as_deref() {
        None => None,
        Some(raw) => Some(Sku::parse(raw).map_err(|message| {
            Problem::bad_request(format!(
                "cursor is invalid ({message}); pass the `next` value of a previous page"
            ))
        })?),
    };
    let (items, more) = store::list(&state.pool, after.as_ref().map(Sku::as_str), limit).await?;
    let next = more.then(|| items.last().map(|s| s.sku.clone())).flatten();
    Ok(Json(StockPage { items, next }).into_response())
}
