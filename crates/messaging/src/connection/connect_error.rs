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
    #[error("RabbitMQ unreachable at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("RabbitMQ refused access for user '{user}' on vhost '{vhost}' at {endpoint}: {reason}")]
    AccessRefused {
        endpoint: String,
        user: String,
        vhost: String,
        reason: String,
    },
    #[error(
        "RabbitMQ at {endpoint} has no vhost '{vhost}' (or user '{user}' may not use it): {reason}"
    )]
    VhostNotFound {
        endpoint: String,
        user: String,
        vhost: String,
        reason: String,
    },
    #[error("TLS connection to RabbitMQ at {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
    #[error("cannot read the AMQP CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("RabbitMQ at {endpoint} did not complete the connection within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("declaring the broker topology on {endpoint} failed: {reason}")]
    Topology { endpoint: String, reason: String },
    #[error("connecting to RabbitMQ at {endpoint} failed: {reason}")]
    Other { endpoint: String, reason: String },
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
