//! What every service's configuration holds ([`Common`]), the variables it is
//! read from, and the variables the platform reads besides.

use std::{net::SocketAddr, time::Duration};

use telemetry::LogFormat;

use super::{
    ConfigError, Env, Secret, amqp, database_url, duration, http_addr, log_format, parsed,
    retry_policy,
};

/// What every service's configuration holds.
#[derive(Clone, Debug)]
pub struct Common {
    /// The database URL; it may hold a password, so it is a [`Secret`].
    pub database_url: Secret,
    pub amqp: messaging::AmqpSettings,
    pub http_addr: SocketAddr,
    pub log_format: LogFormat,
    pub retry: messaging::RetryPolicy,
    pub prefetch: u16,
    pub concurrency: usize,
    /// Deliveries that arrived together handled in one transaction (`CONSUMER_BATCH`).
    pub batch: usize,
    pub db_pool_size: u32,
    pub inbox_retention: Duration,
    /// Server-side bound of one statement (`DATABASE_STATEMENT_TIMEOUT`); twice
    /// it (at least 30 s) bounds a transaction left idle.
    pub statement_timeout: Duration,
    /// A handler run taking longer is abandoned and retried (`HANDLER_TIMEOUT`).
    pub handler_timeout: Duration,
    /// Refusals of one outbox row by the broker before it is parked
    /// (`OUTBOX_PARK_AFTER`).
    pub outbox_park_after: u32,
    /// Nodes holding each queue's replicas when the queue is created
    /// (`AMQP_QUORUM_INITIAL_GROUP_SIZE`); `None` leaves it to RabbitMQ.
    pub quorum_group_size: Option<std::num::NonZeroU32>,
    /// Bearer tokens on the API (`AUTH_*`), or none (`AUTH_MODE=off`).
    pub auth: crate::auth::AuthConfig,
}

/// The variables [`Common::from_env`] reads.
pub const COMMON_VARIABLES: &[&str] = &[
    "AMQP_URL",
    "AMQP_URL_FILE",
    "AMQP_CA_FILE",
    "DATABASE_URL",
    "DATABASE_URL_FILE",
    "HTTP_ADDR",
    "LOG_FORMAT",
    "RETRY_DELAYS",
    "RETRY_MAX_ATTEMPTS",
    "HANDLER_TIMEOUT",
    "DATABASE_STATEMENT_TIMEOUT",
    "OUTBOX_PARK_AFTER",
    "AMQP_PREFETCH",
    "AMQP_QUORUM_INITIAL_GROUP_SIZE",
    "CONSUMER_CONCURRENCY",
    "CONSUMER_BATCH",
    "DATABASE_POOL_SIZE",
    "AUTH_MODE",
    "AUTH_JWKS_URL",
    "AUTH_JWKS_FILE",
    "AUTH_ISSUER",
    "AUTH_AUDIENCE",
];

impl Common {
    /// `service` names the broker connection; `default_addr` is the HTTP default.
    pub fn from_env(
        env: &impl Env,
        service: &str,
        default_addr: &str,
    ) -> Result<Self, ConfigError> {
        let mut amqp = amqp(env)?;
        service.clone_into(&mut amqp.connection_name);
        let outbox_park_after = parsed(env, "OUTBOX_PARK_AFTER", 10u32)?;
        if outbox_park_after == 0 {
            return Err(ConfigError::Invalid {
                name: "OUTBOX_PARK_AFTER",
                reason: "0 (at least one attempt)".into(),
            });
        }
        // Few slots, large batches: deliveries pile up while the slots are
        // busy, and a batch costs one transaction (BENCHMARKS.md measures 1, 2,
        // 4 and 16). Two, so one slow message never holds up the queue.
        let concurrency = parsed(env, "CONSUMER_CONCURRENCY", 2usize)?;
        let batch = parsed(env, "CONSUMER_BATCH", 32usize)?;
        for (name, value) in [
            ("CONSUMER_CONCURRENCY", concurrency),
            ("CONSUMER_BATCH", batch),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    name,
                    reason: "0 (at least 1)".into(),
                });
            }
        }
        let quorum_group_size = match super::optional(env, "AMQP_QUORUM_INITIAL_GROUP_SIZE") {
            None => None,
            Some(raw) => match raw.parse::<std::num::NonZeroU32>() {
                Ok(size) => Some(size),
                Err(_) => {
                    return Err(ConfigError::Invalid {
                        name: "AMQP_QUORUM_INITIAL_GROUP_SIZE",
                        reason: format!("'{raw}' is not a number of nodes (1 or more)"),
                    });
                }
            },
        };
        Ok(Self {
            database_url: Secret::new(database_url(env)?),
            amqp,
            http_addr: http_addr(env, default_addr)?,
            log_format: log_format(env)?,
            retry: retry_policy(env)?,
            prefetch: parsed(env, "AMQP_PREFETCH", 64)?,
            concurrency,
            batch,
            db_pool_size: parsed(env, "DATABASE_POOL_SIZE", 20)?,
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            statement_timeout: duration(
                env,
                "DATABASE_STATEMENT_TIMEOUT",
                Duration::from_secs(15),
            )?,
            handler_timeout: duration(env, "HANDLER_TIMEOUT", Duration::from_secs(30))?,
            outbox_park_after,
            quorum_group_size,
            auth: crate::auth::AuthConfig::from_env(env)?,
        })
    }
}

/// Variables every service reads through [`crate::platform`] and telemetry, besides
/// its own `Config`.
pub const PLATFORM_VARIABLES: &[&str] = &[
    "RUST_LOG",
    "OTEL_SERVICE_NAME",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    // Fault injection only (messaging::faults).
    "CRASH_POINT",
    "CRASH_MARKER",
];
