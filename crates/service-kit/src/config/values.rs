//! Variables read as typed values (numbers, addresses, durations, the retry
//! policy, the log format), with their defaults; an unparsable value is a
//! [`ConfigError::Invalid`] naming the variable and what was wrong.

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use telemetry::LogFormat;

use super::{ConfigError, Env, optional};

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
