//! The HTTP API of notification-service.

mod notifications;

use axum::Router;
use sqlx::PgPool;

#[derive(Clone, Debug)]
pub struct AppState {
    pub pool: PgPool,
}

pub fn router(state: AppState) -> Router {
    notifications::router().with_state(state)
}
