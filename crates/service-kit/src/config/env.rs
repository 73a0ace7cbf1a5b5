//! Where variables come from (the process, a map in tests) and reading one as
//! text: set or unset, required or optional.

use super::ConfigError;

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

/// An environment of these pairs (for tests).
#[cfg(test)]
pub(crate) fn from_pairs(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
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

/// Refuses `CRASH_POINT` in a build without crash points (the feature
/// `messaging/testing`): a fault test run against it could never fire, and
/// would fail late and far from the cause.
pub fn crash_point_supported(env: &impl Env) -> Result<(), ConfigError> {
    match optional(env, "CRASH_POINT") {
        Some(_) if !messaging::FAULT_INJECTION => Err(ConfigError::Invalid {
            name: "CRASH_POINT",
            reason: "set, but this build has no crash points (build with --features messaging/testing, as scripts/test does)".into(),
        }),
        _ => Ok(()),
    }
}
