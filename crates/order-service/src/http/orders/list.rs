//! `GET /orders`: orders newest first, a page at a time, behind an opaque
//! cursor.

use axum::{
    Json,
    extract::State,
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use service_kit::{
    auth::Principal,
    openapi::ProblemDetails,
    problem::{ApiQuery, Problem},
};
use uuid::Uuid;

use super::AppState;
use crate::{
    domain::Status,
    store::{self, Filter},
};

/// One page of orders, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct OrderPage {
    items: Vec<store::OrderView>,
    /// Pass as `cursor` for the next page; null on the last.
    next: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Only this customer's orders. A customer's token sees its own orders
    /// only: this may be left out or be the token's subject.
    customer_id: Option<String>,
    /// Only orders in this state (empty: any).
    #[param(pattern = r"^(pending|confirmed|rejected|cancelled)?$")]
    status: Option<String>,
    /// RFC 3339, e.g. `2025-01-31T12:00:00Z`; only orders created strictly
    /// before it (empty: no bound).
    created_before: Option<String>,
    /// Orders per page.
    #[param(minimum = 1, maximum = 100, default = 20)]
    limit: Option<i64>,
    /// The `next` of the previous page (empty: the first page).
    #[param(
        pattern = r"^(-?[0-9]{1,16}_[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$"
    )]
    cursor: Option<String>,
}

const LIMIT_DEFAULT: i64 = 20;
const LIMIT_MAX: i64 = 100;

/// Orders, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/orders",
    operation_id = "list_orders",
    tag = "orders",
    params(ListQuery),
    responses(
        (status = 200, description = "One page", body = OrderPage),
        (status = 400, description = "An invalid or unknown parameter", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "A customer's token asking for another customer's orders", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
pub(super) async fn list(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, Problem> {
    let mut customer_id = query.customer_id.filter(|c| !c.is_empty());
    if let Some(me) = principal.customer() {
        match customer_id.as_deref() {
            None => customer_id = Some(me.to_owned()),
            Some(asked) if asked == me => {}
            Some(_) => {
                // Answered like a customer without orders would not be: not
                // at all, so nothing about the other customer shows.
                principal.denied("another customer's orders");
                return Err(Problem::not_found("no such customer"));
            }
        }
    }
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
        customer_id,
        status,
        created_before,
        limit,
        after,
    };
    let (orders, more) = store::list(&state.pool, &filter).await?;
    let next = more
        .then(|| orders.last().map(|o| cursor(o.created_at, o.id)))
        .flatten();
    Ok(Json(OrderPage {
        items: orders,
        next,
    })
    .into_response())
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
    if micros.trim_start_matches('-').len() > 16 || id.len() != 36 {
        return Err(invalid());
    }
    let micros: i64 = micros.parse().map_err(|_| invalid())?;
    let at = DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| invalid())?))
}
