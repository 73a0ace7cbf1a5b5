//! The HTTP API of inventory-service.

mod reservations;
mod stock;

use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;

#[derive(Clone, Debug)]
pub struct AppState {
    pub pool: PgPool,
}

/// Every route of the service's API, each documented (OpenAPI).
pub fn router(state: AppState) -> OpenApiRouter {
    stock::router()
        .merge(reservations::router())
        .with_state(state)
}
