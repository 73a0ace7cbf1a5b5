//! notification-service: receives every order event through the fanout exchange,
//! records one notification per (order, event), logs it and, when
//! `NOTIFY_WEBHOOK_URL` is set, POSTs it to the webhook.
//!
//! ```text
//!  config    environment → Config
//!  store     notifications in PostgreSQL
//!  http      /notifications
//!  events    consumer of notification.order-events (+ webhook delivery)
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

pub const NAME: &str = "notification-service";

const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "notifications",
    include_str!("../migrations/0001_notifications.sql"),
)];

/// Connects everything (one clear error on failure), starts consuming and binds
/// the listener; `run_until_stopped` serves.
pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Service, StartupError> {
    let webhook = config
        .webhook
        .clone()
        .map(|url| events::Webhook::new(url, config.webhook_timeout))
        .transpose()
        .map_err(|e| {
            StartupError::Config(service_kit::config::ConfigError::Invalid {
                name: "NOTIFY_WEBHOOK_URL",
                reason: e.to_string(),
            })
        })?;
    let spec = Spec {
        name: NAME,
        description: env!("CARGO_PKG_DESCRIPTION"),
        owner: Owner::Notification,
        common: config.common.clone(),
        migrations: MIGRATIONS,
    };
    let mut platform = Platform::start(spec, shutdown).await?;
    platform.consume_inbox(events::OrderEvents {
        pool: platform.pool.clone(),
        webhook,
    });
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
