//! The HTTP API of inventory-service.

mod reservations;
mod stock;

use axum::Router;
use sqlx::PgPool;

#[derive(Clone, Debug)]
pub struct AppState {
    pub pool: PgPool,
}

pub fn router(state: AppState) -> Router {
    stock::router()
        .merge(reservations::router())
        .with_state(state)
}
