//! Typed configuration, read once from the environment.

use std::time::Duration;

use service_kit::config::{self, Common, ConfigError, Env};

/// The variables this service reads besides the common ones; deployment files are
/// checked against [`variables`] (with [`service_kit::config::PLATFORM_VARIABLES`]).
pub const OWN_VARIABLES: &[&str] = &["NOTIFY_WEBHOOK_URL", "NOTIFY_WEBHOOK_TIMEOUT_MS"];

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
    /// Where notifications are POSTed, if anywhere.
    pub webhook: Option<reqwest::Url>,
    pub webhook_timeout: Duration,
}

impl Config {
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let common = Common::from_env(env, crate::NAME, "0.0.0.0:8082")?;
        let webhook = config::optional(env, "NOTIFY_WEBHOOK_URL")
            .map(|raw| {
                reqwest::Url::parse(&raw)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                    .ok_or_else(|| ConfigError::Invalid {
                        name: "NOTIFY_WEBHOOK_URL",
                        reason: "expected an http:// or https:// URL".into(),
                    })
            })
            .transpose()?;
        Ok(Self {
            common,
            webhook,
            webhook_timeout: Duration::from_millis(config::parsed(
                env,
                "NOTIFY_WEBHOOK_TIMEOUT_MS",
                5000,
            )?),
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
