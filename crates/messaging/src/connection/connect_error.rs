//! Why the broker could not be used at startup ([`ConnectError`]), and how a
//! client error becomes one: refused access, a missing vhost, TLS, an
//! unreachable host.

use std::time::Duration;

use lapin::{
    ErrorKind,
    protocol::{AMQPErrorKind, AMQPHardError},
};

use crate::AmqpSettings;

/// Why the broker could not be used at startup. Each variant displays as one line
/// that names what is wrong and never the password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No TCP connection: refused, timed out, host or network unreachable, or
    /// the host name does not resolve. Check the host and port of the URL and
    /// that the broker runs.
    #[error("RabbitMQ unreachable at {endpoint}: {reason}")]
    Unreachable {
        /// `host:port` that was dialled.
        endpoint: String,
        /// The client library's error.
        reason: String,
    },
    /// The broker refused the credentials (or closed the socket during login,
    /// which is how some brokers refuse them).
    #[error("RabbitMQ refused access for user '{user}' on vhost '{vhost}' at {endpoint}: {reason}")]
    AccessRefused {
        /// `host:port` of the broker.
        endpoint: String,
        /// The user name of the URL.
        user: String,
        /// The virtual host of the URL.
        vhost: String,
        /// The client library's error.
        reason: String,
    },
    /// The login worked but the virtual host cannot be opened: it does not
    /// exist, or the user has no permissions on it.
    #[error(
        "RabbitMQ at {endpoint} has no vhost '{vhost}' (or user '{user}' may not use it): {reason}"
    )]
    VhostNotFound {
        /// `host:port` of the broker.
        endpoint: String,
        /// The user name of the URL.
        user: String,
        /// The virtual host of the URL.
        vhost: String,
        /// The client library's error.
        reason: String,
    },
    /// The TLS handshake of an `amqps://` URL failed (untrusted or invalid
    /// certificate, protocol mismatch); see [`AmqpSettings::ca_file`].
    #[error("TLS connection to RabbitMQ at {endpoint} failed: {reason}")]
    Tls {
        /// `host:port` of the broker.
        endpoint: String,
        /// The client library's error.
        reason: String,
    },
    /// [`AmqpSettings::ca_file`] could not be read.
    #[error("cannot read the AMQP CA file {path}: {reason}")]
    CaFile {
        /// The file as configured.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// Connecting (TCP, TLS and the AMQP handshake) or declaring the topology
    /// took longer than [`AmqpSettings::connect_timeout`].
    #[error("RabbitMQ at {endpoint} did not complete the connection within {timeout:?}")]
    Timeout {
        /// `host:port` of the broker.
        endpoint: String,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// The broker refused part of the [`Topology`](crate::Topology), typically
    /// a queue or exchange that already exists with other arguments (406
    /// `PRECONDITION_FAILED`), or a binding to an exchange that does not exist.
    #[error("declaring the broker topology on {endpoint} failed: {reason}")]
    Topology {
        /// `host:port` of the broker.
        endpoint: String,
        /// The broker's or client library's error.
        reason: String,
    },
    /// Every node of a cluster (settings naming several) failed; each one's
    /// error, in the order tried.
    #[error("no node of the RabbitMQ cluster could be used: {}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    NoNode {
        /// What each node answered.
        errors: Vec<ConnectError>,
    },
    /// Any other failure while connecting.
    #[error("connecting to RabbitMQ at {endpoint} failed: {reason}")]
    Other {
        /// `host:port` of the broker.
        endpoint: String,
        /// The client library's error.
        reason: String,
    },
}

pub(super) fn classify(
    settings: &AmqpSettings,
    endpoint: String,
    error: &lapin::Error,
) -> ConnectError {
    let user = settings.user().to_owned();
    let vhost = settings.vhost().to_owned();
    let reason = error.to_string();
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => ConnectError::VhostNotFound {
                endpoint,
                user,
                vhost,
                reason,
            },
            _ if amqp.get_id() == 403 || reason.contains("ACCESS_REFUSED") => {
                ConnectError::AccessRefused {
                    endpoint,
                    user,
                    vhost,
                    reason,
                }
            }
            _ => ConnectError::Other { endpoint, reason },
        },
        ErrorKind::IOError(io) if settings.is_tls() && is_tls_failure(io) => {
            ConnectError::Tls { endpoint, reason }
        }
        ErrorKind::IOError(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::HostUnreachable
            | std::io::ErrorKind::NetworkUnreachable
            | std::io::ErrorKind::AddrNotAvailable
            | std::io::ErrorKind::NotFound => ConnectError::Unreachable { endpoint, reason },
            // The broker closes the socket without a reason when a login fails on
            // servers that do not send authentication_failure_close.
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::UnexpectedEof => ConnectError::AccessRefused {
                endpoint,
                user,
                vhost,
                reason: format!("{reason} (the broker closed the connection during login)"),
            },
            _ if reason.contains("failed to lookup address") => {
                ConnectError::Unreachable { endpoint, reason }
            }
            _ => ConnectError::Other { endpoint, reason },
        },
        _ => ConnectError::Other { endpoint, reason },
    }
}

fn is_tls_failure(io: &std::io::Error) -> bool {
    let text = io.to_string().to_lowercase();
    io.kind() == std::io::ErrorKind::InvalidData
        || [
            "tls",
            "certificate",
            "handshake",
            "alert",
            "corrupt message",
        ]
        .iter()
        .any(|w| text.contains(w))
}
