//! Typed configuration, read once from the environment.

use service_kit::config::{self, Common, ConfigError, Env};

/// The variables this service reads besides the common ones; deployment files are
/// checked against [`variables`] (with [`service_kit::config::PLATFORM_VARIABLES`]).
pub const OWN_VARIABLES: &[&str] = &[];

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
}

impl Config {
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        Ok(Self {
            common: Common::from_env(env, crate::NAME, "0.0.0.0:8081")?,
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
