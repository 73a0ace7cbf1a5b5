//! The HTTP API of order-service: one module per resource.

mod orders;

use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;

/// Shared by every handler.
#[derive(Clone, Debug)]
pub struct AppState {
    pub pool: PgPool,
    pub admission: crate::admission::Admission,
}

/// Every route of the service's API, each documented (OpenAPI).
pub fn router(state: AppState) -> OpenApiRouter {
    orders::router().with_state(state)
}
