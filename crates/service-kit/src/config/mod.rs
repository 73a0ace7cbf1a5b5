//! Reading configuration from the environment. Every error names the variable.
//!
//! One job per file: `env` (where variables come from, reading one as text),
//! `values` (typed values and their defaults), `secrets` (values that may hold a
//! password, and the [`Secret`] that never prints one), `common` (what every
//! service's configuration holds and the variable lists), `recording` (the
//! test support proving which variables a `Config` reads).

mod common;
mod env;
mod recording;
mod secrets;
mod values;

pub use common::{COMMON_VARIABLES, Common, PLATFORM_VARIABLES};
#[cfg(test)]
pub(crate) use env::from_pairs;
pub use env::{Env, ProcessEnv, crash_point_supported, optional, required};
pub use recording::{RecordingEnv, assert_reads_exactly};
pub use secrets::{Secret, amqp, database_url, secret};
pub use telemetry::LogFormat;
pub use values::{duration, http_addr, log_format, parse_duration, parsed, retry_policy};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not set (required)")]
    Missing(&'static str),
    #[error("{name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
    /// Several variables that only work together; the text names each.
    #[error("{0}")]
    Incomplete(String),
}

#[cfg(test)]
mod tests;
