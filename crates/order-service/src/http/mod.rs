//! The HTTP API of order-service: one module per resource.

mod orders;

use axum::Router;
use sqlx::PgPool;

/// Shared by every handler.
#[derive(Clone, Debug)]
pub struct AppState {
    pub pool: PgPool,
    pub admission: crate::admission::Admission,
}

pub fn router(state: AppState) -> Router {
    orders::router().with_state(state)
}
