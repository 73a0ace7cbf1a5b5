//! Reading configuration from the environment. Every error names the variable.

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not set (required)")]
    Missing(&'static str),
    #[error("{name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// A source of variables: the process environment, or a map in tests.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for std::collections::HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// A set, non-empty variable.
pub fn required(env: &impl Env, name: &'static str) -> Result<String, ConfigError> {
    optional(env, name).ok_or(ConfigError::Missing(name))
}

/// A variable that may be unset; empty counts as unset.
pub fn optional(env: &impl Env, name: &'static str) -> Option<String> {
    env.get(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// A parsed variable with a default.
pub fn parsed<T>(env: &impl Env, name: &'static str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    match optional(env, name) {
        None => Ok(default),
        Some(raw) => raw.parse().map_err(|e: T::Err| ConfigError::Invalid {
            name,
            reason: format!("'{raw}': {e}"),
        }),
    }
}

/// `HTTP_ADDR`, defaulting to `default`.
pub fn http_addr(env: &impl Env, default: &str) -> Result<SocketAddr, ConfigError> {
    let raw = optional(env, "HTTP_ADDR").unwrap_or_else(|| default.to_owned());
    raw.parse().map_err(|e| ConfigError::Invalid {
        name: "HTTP_ADDR",
        reason: format!("'{raw}' is not host:port ({e})"),
    })
}

/// A secret that may come inline (`NAME`) or from a file (`NAME_FILE`, as
/// mounted by Docker/Compose secrets or Kubernetes); the file wins.
pub fn secret(
    env: &impl Env,
    name: &'static str,
    file_name: &'static str,
) -> Result<String, ConfigError> {
    match optional(env, file_name) {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Invalid {
                name: file_name,
                reason: format!("cannot read {path}: {e}"),
            })?;
            let value = text.trim().to_owned();
            if value.is_empty() {
                return Err(ConfigError::Invalid {
                    name: file_name,
                    reason: format!("{path} is empty"),
                });
            }
            Ok(value)
        }
        None => required(env, name).map_err(|_| ConfigError::Missing(name)),
    }
}

/// `DATABASE_URL` (or `DATABASE_URL_FILE`).
pub fn database_url(env: &impl Env) -> Result<String, ConfigError> {
    secret(env, "DATABASE_URL", "DATABASE_URL_FILE")
}

/// `AMQP_URL` (or `AMQP_URL_FILE`), parsed (the error never shows the password).
pub fn amqp(env: &impl Env) -> Result<messaging::AmqpSettings, ConfigError> {
    let url = secret(env, "AMQP_URL", "AMQP_URL_FILE")?;
    let mut settings =
        messaging::AmqpSettings::from_url(&url).map_err(|e| ConfigError::Invalid {
            name: "AMQP_URL",
            reason: e.to_string(),
        })?;
    if let Some(path) = optional(env, "AMQP_CA_FILE") {
        settings.ca_file = Some(path.into());
    }
    Ok(settings)
}

pub use telemetry::LogFormat;

/// A duration as written in configuration: a positive number with a unit, `ms`,
/// `s`, `m` or `h` (`250ms`, `5s`, `2m`).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("'{raw}' has no unit (ms, s, m or h)"))?;
    let (number, unit) = raw.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{raw}' does not start with a whole number"))?;
    let duration = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => {
            return Err(format!(
                "'{raw}' has an unknown unit '{other}' (ms, s, m or h)"
            ));
        }
    };
    if duration.is_zero() {
        return Err(format!("'{raw}' is zero"));
    }
    Ok(duration)
}

/// A duration variable with a default.
pub fn duration(
    env: &impl Env,
    name: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match optional(env, name) {
        None => Ok(default),
        Some(raw) => parse_duration(&raw).map_err(|reason| ConfigError::Invalid { name, reason }),
    }
}

/// The retry policy of a service's consumer for failures of a message itself:
/// `RETRY_DELAYS` (comma-separated durations, default `1s,5s,30s`) and
/// `RETRY_MAX_ATTEMPTS` (default 5). Outages do not spend it: they pause the
/// consumer instead.
pub fn retry_policy(env: &impl Env) -> Result<messaging::RetryPolicy, ConfigError> {
    let delays = match optional(env, "RETRY_DELAYS") {
        None => messaging::RetryPolicy::default().delays,
        Some(raw) => raw
            .split(',')
            .map(|part| {
                parse_duration(part).map_err(|reason| ConfigError::Invalid {
                    name: "RETRY_DELAYS",
                    reason: format!("{reason} (expected durations such as 1s,5s,30s)"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let max_attempts = parsed(env, "RETRY_MAX_ATTEMPTS", 5u32)?;
    if max_attempts == 0 {
        return Err(ConfigError::Invalid {
            name: "RETRY_MAX_ATTEMPTS",
            reason: "0 (at least one attempt)".into(),
        });
    }
    Ok(messaging::RetryPolicy {
        delays,
        max_attempts,
    })
}

pub fn log_format(env: &impl Env) -> Result<LogFormat, ConfigError> {
    match optional(env, "LOG_FORMAT").as_deref() {
        None | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(ConfigError::Invalid {
            name: "LOG_FORMAT",
            reason: format!("'{other}' (expected text or json)"),
        }),
    }
}

/// A value that must never be printed (it may hold a password): `Debug` and
/// `Display` show a placeholder; [`Secret::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

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
    pub inbox_retention: std::time::Duration,
    /// Server-side bound of one statement (`DATABASE_STATEMENT_TIMEOUT`); twice
    /// it (at least 30 s) bounds a transaction left idle.
    pub statement_timeout: Duration,
    /// A handler run taking longer is abandoned and retried (`HANDLER_TIMEOUT`).
    pub handler_timeout: Duration,
    /// Refusals of one outbox row by the broker before it is parked
    /// (`OUTBOX_PARK_AFTER`).
    pub outbox_park_after: u32,
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
    "CONSUMER_CONCURRENCY",
    "CONSUMER_BATCH",
    "DATABASE_POOL_SIZE",
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
        Ok(Self {
            database_url: Secret::new(database_url(env)?),
            amqp,
            http_addr: http_addr(env, default_addr)?,
            log_format: log_format(env)?,
            retry: retry_policy(env)?,
            prefetch: parsed(env, "AMQP_PREFETCH", 64)?,
            // Few slots, large batches: deliveries pile up while the slots are
            // busy, and a batch costs one transaction (BENCHMARKS.md measures 1, 2,
            // 4 and 16). Two, so one slow message never holds up the queue.
            concurrency,
            batch,
            db_pool_size: parsed(env, "DATABASE_POOL_SIZE", 20)?,
            inbox_retention: std::time::Duration::from_secs(7 * 24 * 3600),
            statement_timeout: duration(
                env,
                "DATABASE_STATEMENT_TIMEOUT",
                Duration::from_secs(15),
            )?,
            handler_timeout: duration(env, "HANDLER_TIMEOUT", Duration::from_secs(30))?,
            outbox_park_after,
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

/// An environment that records every variable asked for and answers with a
/// plausible value for the required ones, so a test can prove which variables a
/// `Config` reads.
#[derive(Debug, Default)]
pub struct RecordingEnv(pub std::cell::RefCell<std::collections::BTreeSet<String>>);

impl Env for RecordingEnv {
    fn get(&self, name: &str) -> Option<String> {
        self.0.borrow_mut().insert(name.to_owned());
        match name {
            "DATABASE_URL" => Some("postgres://postgres@127.0.0.1/db".into()),
            "AMQP_URL" => Some("amqp://guest:guest@127.0.0.1/%2f".into()),
            _ => None,
        }
    }
}

/// Asserts that `from_env` reads exactly the variables `declared` (for each
/// service's own test, so its list cannot drift from its code).
pub fn assert_reads_exactly<C, E: std::fmt::Debug>(
    from_env: impl Fn(&RecordingEnv) -> Result<C, E>,
    declared: &[&str],
) {
    let env = RecordingEnv::default();
    if let Err(e) = from_env(&env) {
        panic!("the recorded environment should give a valid config: {e:?}");
    }
    let read = env.0.into_inner();
    let declared: std::collections::BTreeSet<String> =
        declared.iter().map(|v| (*v).to_owned()).collect();
    assert_eq!(read, declared, "variables read vs declared");
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_missing_variable_is_named() {
        let err = required(&env(&[]), "DATABASE_URL").expect_err("missing");
        assert_eq!(err.to_string(), "DATABASE_URL is not set (required)");
        let err = required(&env(&[("DATABASE_URL", "  ")]), "DATABASE_URL").expect_err("blank");
        assert!(matches!(err, ConfigError::Missing("DATABASE_URL")));
    }

    #[test]
    fn an_invalid_variable_is_named_with_the_value() {
        let err = http_addr(&env(&[("HTTP_ADDR", "nope")]), "0.0.0.0:8080").expect_err("bad");
        assert!(
            err.to_string().starts_with("HTTP_ADDR is invalid: 'nope'"),
            "{err}"
        );
        let err = log_format(&env(&[("LOG_FORMAT", "xml")])).expect_err("bad");
        assert!(err.to_string().contains("LOG_FORMAT"), "{err}");
    }

    #[test]
    fn an_amqp_url_error_hides_the_password() {
        let err = amqp(&env(&[("AMQP_URL", "http://u:s3cret@h")])).expect_err("bad");
        assert!(err.to_string().starts_with("AMQP_URL is invalid"), "{err}");
        assert!(!err.to_string().contains("s3cret"));
    }

    #[test]
    fn a_secret_file_wins_and_its_errors_name_the_file_variable() {
        let dir = std::env::temp_dir().join(format!("secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("db");
        std::fs::write(&file, "postgres://from-file/db\n").expect("write");
        let path = file.display().to_string();
        let both = env(&[
            ("DATABASE_URL", "postgres://inline/db"),
            ("DATABASE_URL_FILE", &path),
        ]);
        assert_eq!(
            database_url(&both).expect("file"),
            "postgres://from-file/db"
        );
        let missing = env(&[("DATABASE_URL_FILE", "/nonexistent/secret")]);
        let err = database_url(&missing).expect_err("unreadable");
        assert!(
            err.to_string()
                .starts_with("DATABASE_URL_FILE is invalid: cannot read /nonexistent/secret"),
            "{err}"
        );
        assert!(matches!(
            database_url(&env(&[])),
            Err(ConfigError::Missing("DATABASE_URL"))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn debug_output_of_the_config_never_shows_a_password() {
        let common = Common::from_env(
            &env(&[
                ("DATABASE_URL", "postgres://shop:db-s3cret@db/orders"),
                ("AMQP_URL", "amqp://shop:mq-s3cret@mq/shop"),
            ]),
            "order-service",
            "0.0.0.0:8080",
        )
        .expect("config");
        let printed = format!("{common:?} {common:#?} {}", common.database_url);
        assert!(!printed.contains("db-s3cret"), "{printed}");
        assert!(!printed.contains("mq-s3cret"), "{printed}");
        assert_eq!(
            common.database_url.expose(),
            "postgres://shop:db-s3cret@db/orders"
        );
    }

    #[test]
    fn retry_delays_and_timeouts_take_units_and_name_the_variable_when_wrong() {
        let policy = retry_policy(&env(&[("RETRY_DELAYS", "250ms, 5s,2m")])).expect("valid");
        assert_eq!(
            policy.delays,
            [
                Duration::from_millis(250),
                Duration::from_secs(5),
                Duration::from_secs(120)
            ]
        );
        for bad in ["5", "1s,,2s", "0s", "3 days", "-1s"] {
            let err = retry_policy(&env(&[("RETRY_DELAYS", bad)])).expect_err(bad);
            assert!(
                err.to_string().starts_with("RETRY_DELAYS is invalid"),
                "{err}"
            );
        }
        let err = duration(
            &env(&[("HANDLER_TIMEOUT", "soon")]),
            "HANDLER_TIMEOUT",
            Duration::ZERO,
        )
        .expect_err("bad");
        assert!(
            err.to_string().starts_with("HANDLER_TIMEOUT is invalid"),
            "{err}"
        );
    }

    #[test]
    fn defaults_apply_when_unset() {
        assert_eq!(
            http_addr(&env(&[]), "0.0.0.0:8081")
                .expect("default")
                .port(),
            8081
        );
        assert_eq!(parsed(&env(&[]), "X", 5u32).expect("default"), 5);
        assert_eq!(log_format(&env(&[])).expect("default"), LogFormat::Text);
    }
}
