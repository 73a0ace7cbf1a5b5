//! How to reach the broker: the URL (kept secret), heartbeat, timeouts, TLS trust
//! and reconnection backoff. Parsed once at startup; errors never echo the password.

use std::{fmt, path::PathBuf, time::Duration};

use lapin::uri::{AMQPScheme, AMQPUri};

use crate::backoff::Backoff;

/// Connection settings for one process. `Debug` and `Display` redact the password.
///
/// A cluster is a list of nodes (`AMQP_URL=amqp://…@rabbit-0/shop,amqp://…@rabbit-1/shop`):
/// a [`Broker`](crate::Broker) starts at a random one, so replicas spread over
/// the cluster, and moves to another node (a random one first) when its node is lost.
#[derive(Clone)]
pub struct AmqpSettings {
    /// The first node's URL; the accessors (`host`, `port`, `user`, `vhost`) read it.
    uri: AMQPUri,
    /// Further nodes of the same cluster, in the order given.
    others: Vec<AMQPUri>,
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
    /// the `heartbeat` / `connection_timeout` query parameters), or a list of
    /// them, one per node of a cluster, separated by commas or white space
    /// (a file with one URL per line works). The nodes of a list must agree on
    /// scheme, user and vhost; the first one's query parameters apply to
    /// every node. A `,` in a password is written `%2C`.
    pub fn from_url(url: &str) -> Result<Self, InvalidUrl> {
        let mut nodes = Vec::new();
        for part in url
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|part| !part.is_empty())
        {
            let mut node = parse_node(part)?;
            if let Some(first) = nodes.first() {
                same_cluster(first, &node, nodes.len() + 1)?;
                node.query = first.query.clone();
            }
            nodes.push(node);
        }
        let mut nodes = nodes.into_iter();
        let Some(uri) = nodes.next() else {
            return Err(InvalidUrl("no URL".to_owned()));
        };
        let heartbeat = Duration::from_secs(u64::from(uri.query.heartbeat.unwrap_or(10)));
        let connect_timeout = Duration::from_millis(uri.query.connection_timeout.unwrap_or(10_000));
        Ok(Self {
            uri,
            others: nodes.collect(),
            heartbeat,
            connect_timeout,
            ca_file: None,
            backoff: Backoff::default(),
            connection_name: program_name(),
        })
    }

    /// The same settings pointed at one node, at another host and port (used by
    /// fault-injection proxies in tests and by operators' overrides).
    #[must_use]
    pub fn with_host_port(mut self, host: &str, port: u16) -> Self {
        host.clone_into(&mut self.uri.authority.host);
        self.uri.authority.port = port;
        self.others.clear();
        self
    }

    /// The same settings with further nodes of the cluster at `host:port` each
    /// (same credentials, vhost and scheme as the first).
    #[must_use]
    pub fn with_more_nodes(mut self, nodes: &[(&str, u16)]) -> Self {
        for (host, port) in nodes {
            let mut uri = self.uri.clone();
            (*host).clone_into(&mut uri.authority.host);
            uri.authority.port = *port;
            self.others.push(uri);
        }
        self
    }

    /// The same settings on another virtual host (every node).
    #[must_use]
    pub fn with_vhost(mut self, vhost: &str) -> Self {
        for uri in std::iter::once(&mut self.uri).chain(&mut self.others) {
            vhost.clone_into(&mut uri.vhost);
        }
        self
    }

    /// The same settings with another password (tests of refused credentials;
    /// every node).
    #[must_use]
    pub fn with_password(mut self, password: &str) -> Self {
        for uri in std::iter::once(&mut self.uri).chain(&mut self.others) {
            password.clone_into(&mut uri.authority.userinfo.password);
        }
        self
    }

    /// How many nodes the settings name (1 for a single URL).
    pub fn nodes(&self) -> usize {
        1 + self.others.len()
    }

    /// The same settings with node `index` (modulo [`Self::nodes`]) alone.
    pub(crate) fn node(&self, index: usize) -> Self {
        let mut one = self.clone();
        one.others.clear();
        if let Some(uri) = index
            .checked_rem(self.nodes())
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| self.others.get(i))
        {
            one.uri = uri.clone();
        }
        one
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

/// Node `number` (1-based) of a list must reach the same cluster the same way
/// as the first: a list mixing `amqp://` and `amqps://` would send the
/// credentials in clear to some nodes.
fn same_cluster(first: &AMQPUri, node: &AMQPUri, number: usize) -> Result<(), InvalidUrl> {
    let differs = if node.scheme != first.scheme {
        Some("scheme (amqp:// or amqps://)")
    } else if node.authority.userinfo != first.authority.userinfo {
        Some("user or password")
    } else if node.vhost != first.vhost {
        Some("vhost")
    } else {
        None
    };
    match differs {
        Some(what) => Err(InvalidUrl(format!(
            "node {number} of the list differs from the first in its {what}: the nodes of one cluster take the same"
        ))),
        None => Ok(()),
    }
}

/// One node's URL.
fn parse_node(url: &str) -> Result<AMQPUri, InvalidUrl> {
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(InvalidUrl(
            "the scheme must be amqp:// or amqps://".to_owned(),
        ));
    }
    url.parse().map_err(|e: String| {
        // The parser's message may quote the input; keep only its first words.
        InvalidUrl(redact(&e, url))
    })
}

impl fmt::Display for AmqpSettings {
    /// `amqp://user@host:port/vhost`, each node's, comma-separated; never the
    /// password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, uri) in std::iter::once(&self.uri).chain(&self.others).enumerate() {
            let scheme = if uri.scheme == AMQPScheme::AMQPS {
                "amqps"
            } else {
                "amqp"
            };
            if index > 0 {
                f.write_str(",")?;
            }
            write!(
                f,
                "{scheme}://{}@{}:{}/{}",
                uri.authority.userinfo.username, uri.authority.host, uri.authority.port, uri.vhost
            )?;
        }
        Ok(())
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

    #[test]
    fn a_comma_separated_list_names_the_nodes_of_a_cluster() {
        let s = AmqpSettings::from_url(
            "amqp://u:secret@rabbit-0:5672/shop?heartbeat=5, amqp://u:secret@rabbit-1:5673/shop",
        )
        .expect("valid list");
        assert_eq!(s.nodes(), 2);
        assert_eq!(s.heartbeat, Duration::from_secs(5));
        assert_eq!((s.node(0).host(), s.node(0).port()), ("rabbit-0", 5672));
        assert_eq!((s.node(1).host(), s.node(1).port()), ("rabbit-1", 5673));
        assert_eq!(s.node(3).host(), "rabbit-1", "the index wraps around");
        assert_eq!(s.node(1).nodes(), 1);
        assert_eq!(
            s.to_string(),
            "amqp://u@rabbit-0:5672/shop,amqp://u@rabbit-1:5673/shop"
        );
        assert!(!format!("{s:?}").contains("secret"));
    }

    #[test]
    fn a_list_may_be_one_url_per_line_and_a_stray_comma_is_no_node() {
        let s =
            AmqpSettings::from_url("amqp://u:secret@a:5672/shop\namqp://u:secret@b:5672/shop,\n")
                .expect("a file with a URL per line");
        assert_eq!(s.nodes(), 2);
        assert_eq!(s.node(1).host(), "b");
        assert_eq!(s.node(1).vhost(), "shop", "not the next line glued on");
        assert!(!s.to_string().contains("secret"));
    }

    #[test]
    fn the_first_nodes_query_applies_to_every_node() {
        let s = AmqpSettings::from_url("amqp://u:p@a/v?frame_max=8192,amqp://u:p@b/v?frame_max=1")
            .expect("valid");
        assert_eq!(s.node(1).uri().query.frame_max, Some(8192));
    }

    #[test]
    fn nodes_that_differ_in_scheme_user_or_vhost_are_refused_without_the_password() {
        for (list, what) in [
            ("amqps://u:hunter2@a/v,amqp://u:hunter2@b/v", "scheme"),
            ("amqp://u:hunter2@a/v,amqp://w:hunter2@b/v", "user"),
            ("amqp://u:hunter2@a/v,amqp://u:other@b/v", "password"),
            ("amqp://u:hunter2@a/v,amqp://u:hunter2@b/w", "vhost"),
        ] {
            let err = AmqpSettings::from_url(list).expect_err(what).to_string();
            assert!(
                err.contains("node 2") && err.contains(what),
                "{what}: {err}"
            );
            assert!(!err.contains("hunter2"), "{err}");
        }
        let err = AmqpSettings::from_url("amqp://u:hunter2@a/v,http://u:hunter2@b")
            .expect_err("bad scheme");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(AmqpSettings::from_url(" , ").is_err(), "no URL at all");
    }
}
