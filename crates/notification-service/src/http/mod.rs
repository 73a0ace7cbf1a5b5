//! The HTTP API of notification-service.

mod notifications;

use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;

#[derive(Clone, Debug)]
pub struct AppState {
    pub pool: PgPool,
}

/// Every route of the service's API, each documented (OpenAPI).
pub fn router(state: AppState) -> OpenApiRouter {
    notifications::router().with_state(state)
}
