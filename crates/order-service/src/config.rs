//! Typed configuration, read once from the environment.

use std::time::Duration;

use service_kit::config::{self, Common, ConfigError, Env};

/// The variables this service reads besides the common ones; deployment files are
/// checked against [`variables`] (with [`service_kit::config::PLATFORM_VARIABLES`]).
pub const OWN_VARIABLES: &[&str] = &["IDEMPOTENCY_RETENTION_HOURS", "ADMISSION_TARGET"];

/// Every variable `Config::from_env` reads.
pub fn variables() -> Vec<&'static str> {
    config::COMMON_VARIABLES
        .iter()
        .chain(OWN_VARIABLES)
        .copied()
        .collect()
}

#[derive(Clone, Debug)]
pub struct Config {
    pub common: Common,
    /// How long Idempotency-Keys are remembered (at least 24 h).
    pub idempotency_retention: Duration,
    /// Median wait of completing orders above which `POST /orders` answers
    /// 429 (`ADMISSION_TARGET`); `None` never does.
    pub admission_target: Option<Duration>,
}

impl Config {
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let common = Common::from_env(env, crate::NAME, "0.0.0.0:8080")?;
        let hours: u64 = config::parsed(env, "IDEMPOTENCY_RETENTION_HOURS", 24)?;
        if hours < 24 {
            return Err(ConfigError::Invalid {
                name: "IDEMPOTENCY_RETENTION_HOURS",
                reason: format!("{hours} (keys are kept at least 24 hours)"),
            });
        }
        let target = match config::optional(env, "ADMISSION_TARGET").as_deref() {
            None => Some(Duration::from_millis(500)),
            Some("off") => None,
            Some(raw) => {
                Some(
                    config::parse_duration(raw).map_err(|reason| ConfigError::Invalid {
                        name: "ADMISSION_TARGET",
                        reason: format!("{reason} (a duration such as 500ms, or off)"),
                    })?,
                )
            }
        };
        Ok(Self {
            common,
            idempotency_retention: Duration::from_secs(hours * 3600),
            admission_target: target,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_exactly_the_declared_variables() {
        config::assert_reads_exactly(Config::from_env, &variables());
    }
}
