//! order-service: takes orders over HTTP, publishes `order.*` events through the
//! outbox and follows each order through the saga from inventory's answers.
//!
//! ```text
//!  config    environment → Config
//!  domain    request parsing, order status
//!  store     orders in PostgreSQL (+ outbox events and history in the same transaction)
//!  http      /orders routes
//!  events    consumer of order.inventory-events
//!  gauges    pending orders on /metrics
//!  admission 429 for new orders while the saga cannot keep up
//! ```

pub mod admission;
pub mod config;
pub mod domain;
pub mod events;
pub mod gauges;
pub mod http;
pub mod store;

use std::{process::ExitCode, time::Duration};

use contracts::topology::Owner;
use service_kit::platform::{Platform, Service, Spec, StartupError};
use tokio_util::sync::CancellationToken;

pub use config::Config;

pub const NAME: &str = "order-service";

/// Crash point (see `messaging::crash_point!`, which exists only in builds with
/// the feature `messaging/testing`): after `POST /orders` committed.
pub const CRASH_AFTER_ORDER_COMMIT: &str = "order.after-commit";

/// The service's own migrations (the messaging tables come from `messaging`).
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "orders", include_str!("../migrations/0001_orders.sql")),
    (2, "order history", service_kit::history::MIGRATION),
];

/// Connects everything (one clear error on failure), starts consuming and binds
/// the listener; `run_until_stopped` serves.
pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Service, StartupError> {
    let spec = Spec {
        name: NAME,
        description: env!("CARGO_PKG_DESCRIPTION"),
        owner: Owner::Order,
        common: config.common.clone(),
        migrations: MIGRATIONS,
    };
    let mut platform = Platform::start(spec, shutdown.clone()).await?;
    let admission = admission::Admission::new(config.admission_target);
    platform.consume_inbox(events::InventoryEvents {
        admission: admission.clone(),
    });
    gauges::start(&mut platform, &admission);
    platform.spawn(admission::run(admission.clone(), shutdown.clone()));
    let pool = platform.pool.clone();
    let retention = config.idempotency_retention;
    platform.spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(600)) => {}
            }
            if let Err(error) = store::forget_idempotency_keys(&pool, retention).await {
                tracing::warn!(%error, "idempotency key cleanup failed");
            }
        }
    });
    let routes = http::router(http::AppState {
        pool: platform.pool.clone(),
        admission,
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
