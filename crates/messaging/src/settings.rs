//! How to reach the broker: the URL (kept secret), heartbeat, timeouts, TLS trust
//! and reconnection backoff. Parsed once at startup; errors never echo the password.

use std::{fmt, path::PathBuf, time::Duration};

use lapin::uri::{AMQPScheme, AMQPUri};

use crate::backoff::Backoff;

/// Connection settings for one process. `Debug` and `Display` redact the password.
#[derive(Clone)]
pub struct AmqpSettings {
    uri: AMQPUri,
    /// The AMQP heartbeat timeout proposed to the broker, in whole seconds (the
    /// URL's `heartbeat`, default 10 s). Heartbeat frames go out every half of
    /// it, and a peer silent for twice it is taken for dead: the connection is
    /// dropped and rebuilt.
    pub heartbeat: Duration,
    /// Bounds the whole connect (TCP, TLS and AMQP handshake), not only the TCP
    /// part, and then the topology declaration on the new connection (the URL's
    /// `connection_timeout` in milliseconds, default 10 s).
    pub connect_timeout: Duration,
    /// PEM file with the CA certificates to trust for `amqps://`; the platform's
    /// roots are used when unset.
    pub ca_file: Option<PathBuf>,
    /// Delay between reconnection attempts (default 100 ms doubling up to 10 s,
    /// jittered).
    pub backoff: Backoff,
    /// Shown in the RabbitMQ management UI, so operators can tell processes apart
    /// (default: the program's file name).
    pub connection_name: String,
}

/// The URL could not be used; the message never contains the password.
#[derive(Debug, thiserror::Error)]
#[error("invalid AMQP URL: {0}")]
pub struct InvalidUrl(String);

impl AmqpSettings {
    /// Parses an `amqp://` or `amqps://` URL (user, password, host, port, vhost and
    /// the `heartbeat` / `connection_timeout` query parameters).
    pub fn from_url(url: &str) -> Result<Self, InvalidUrl> {
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(InvalidUrl(
                "the scheme must be amqp:// or amqps://".to_owned(),
            ));
        }
        let uri: AMQPUri = url.parse().map_err(|e: String| {
            // The parser's message may quote the input; keep only its first words.
            InvalidUrl(redact(&e, url))
        })?;
        let heartbeat = Duration::from_secs(u64::from(uri.query.heartbeat.unwrap_or(10)));
        let connect_timeout = Duration::from_millis(uri.query.connection_timeout.unwrap_or(10_000));
        Ok(Self {
            uri,
            heartbeat,
            connect_timeout,
            ca_file: None,
            backoff: Backoff::default(),
            connection_name: program_name(),
        })
    }

    /// The same settings pointed at another host and port (used by fault-injection
    /// proxies in tests and by operators' overrides).
    #[must_use]
    pub fn with_host_port(mut self, host: &str, port: u16) -> Self {
        host.clone_into(&mut self.uri.authority.host);
        self.uri.authority.port = port;
        self
    }

    /// The same settings on another virtual host.
    #[must_use]
    pub fn with_vhost(mut self, vhost: &str) -> Self {
        vhost.clone_into(&mut self.uri.vhost);
        self
    }

    /// The same settings with another password (tests of refused credentials).
    #[must_use]
    pub fn with_password(mut self, password: &str) -> Self {
        password.clone_into(&mut self.uri.authority.userinfo.password);
        self
    }

    /// The user name of the URL.
    pub fn user(&self) -> &str {
        &self.uri.authority.userinfo.username
    }

    /// The virtual host of the URL, percent-decoded (`/` is written `%2f`).
    pub fn vhost(&self) -> &str {
        &self.uri.vhost
    }

    /// The broker's host.
    pub fn host(&self) -> &str {
        &self.uri.authority.host
    }

    /// The broker's port (5672 for `amqp://`, 5671 for `amqps://` when the URL
    /// names none).
    pub fn port(&self) -> u16 {
        self.uri.authority.port
    }

    /// True for an `amqps://` URL.
    pub fn is_tls(&self) -> bool {
        self.uri.scheme == AMQPScheme::AMQPS
    }

    /// The URI handed to the client library, with heartbeat and TCP timeout applied.
    pub(crate) fn uri(&self) -> AMQPUri {
        let mut uri = self.uri.clone();
        uri.query.heartbeat = Some(u16::try_from(self.heartbeat.as_secs()).unwrap_or(u16::MAX));
        uri.query.connection_timeout =
            Some(u64::try_from(self.connect_timeout.as_millis()).unwrap_or(u64::MAX));
        uri
    }
}

/// Removes the password from a message that might quote the URL.
fn redact(message: &str, url: &str) -> String {
    match url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
    {
        Some((userinfo, _)) => match userinfo.split_once(':') {
            Some((_, password)) if !password.is_empty() => message.replace(password, "***"),
            _ => message.to_owned(),
        },
        None => message.to_owned(),
    }
}

impl fmt::Display for AmqpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.is_tls() { "amqps" } else { "amqp" };
        write!(
            f,
            "{scheme}://{}@{}:{}/{}",
            self.user(),
            self.host(),
            self.port(),
            self.vhost()
        )
    }
}

impl fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("endpoint", &self.to_string())
            .field("heartbeat", &self.heartbeat)
            .field("connect_timeout", &self.connect_timeout)
            .field("ca_file", &self.ca_file)
            .field("backoff", &self.backoff)
            .field("connection_name", &self.connection_name)
            .finish()
    }
}

/// The running program's file name (e.g. `order-service`): the default name of
/// its connections in the broker's UI and of the `app_id` on what it publishes.
pub(crate) fn program_name() -> String {
    std::env::args_os()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(std::path::Path::file_name)
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "messaging".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vhost_heartbeat_and_timeout() {
        let s = AmqpSettings::from_url(
            "amqp://u:secret@h:5673/shop?heartbeat=5&connection_timeout=2000",
        )
        .expect("valid url");
        assert_eq!(s.user(), "u");
        assert_eq!(s.vhost(), "shop");
        assert_eq!(s.port(), 5673);
        assert_eq!(s.heartbeat, Duration::from_secs(5));
        assert_eq!(s.connect_timeout, Duration::from_secs(2));
    }

    #[test]
    fn never_prints_the_password() {
        let s = AmqpSettings::from_url("amqps://u:hunter2@h/v").expect("valid url");
        assert!(s.is_tls());
        assert!(!format!("{s} {s:?}").contains("hunter2"));
    }

    #[test]
    fn rejects_other_schemes_without_echoing_secrets() {
        let err = AmqpSettings::from_url("http://u:hunter2@h").expect_err("bad scheme");
        assert!(!err.to_string().contains("hunter2"));
        let err = AmqpSettings::from_url("amqp://u:hunter2@h:notaport").expect_err("bad port");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
