//! Values that may hold a password: read inline or from a mounted file (the
//! database and broker URLs), and the [`Secret`] wrapper that never prints one.

use std::fmt;

use super::{ConfigError, Env, optional, required};

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
        None => required(env, name),
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
