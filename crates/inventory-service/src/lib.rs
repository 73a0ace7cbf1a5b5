//! inventory-service: owns stock; reserves all items of a placed order or none,
//! releases reservations of cancelled orders, and answers with `inventory.*` events.
//!
//! ```text
//!  config    environment → Config
//!  store     stock and reservations in PostgreSQL (+ outbox events and history)
//!  http      /stock and /reservations routes
//!  events    consumer of inventory.order-events
//! ```

pub mod config;
pub mod events;
pub mod http;
pub mod store;

use std::process::ExitCode;

use contracts::topology::Owner;
use service_kit::platform::{Platform, Service, Spec, StartupError};
use tokio_util::sync::CancellationToken;

pub use config::Config;

pub const NAME: &str = "inventory-service";

/// The service's own migrations (the messaging tables are migrated beside them).
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "stock", include_str!("../migrations/0001_stock.sql")),
    (2, "order history", service_kit::history::MIGRATION),
];

/// Connects everything (one clear error on failure), starts consuming and binds
/// the listener; `run_until_stopped` serves.
pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Service, StartupError> {
    let spec = Spec {
        name: NAME,
        description: env!("CARGO_PKG_DESCRIPTION"),
        owner: Owner::Inventory,
        common: config.common.clone(),
        migrations: MIGRATIONS,
    };
    let mut platform = Platform::start(spec, shutdown).await?;
    platform.consume_inbox(events::OrderEvents);
    let routes = http::router(http::AppState {
        pool: platform.pool.clone(),
    });
    platform.bind(routes).await
}

/// The binary's entry point.
pub fn main() -> ExitCode {
    service_kit::platform::main(
        NAME,
        Config::from_env,
        |c| c.common.log_format,
        |config, shutdown| async move { build(config, shutdown).await?.run_until_stopped().await },
    )
}
