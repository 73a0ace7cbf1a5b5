//! Why a publish did not succeed ([`PublishError`]), and which failures are the
//! message's own fault.

use std::time::Duration;

/// Why a publish did not succeed. Only `Ok(())` means the broker has the message.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to RabbitMQ")]
    NotConnected,
    #[error(
        "message unroutable: exchange '{exchange}' has no queue bound for routing key '{routing_key}' ({reply})"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
        reply: String,
    },
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    /// The broker closed the channel with a channel-level error (e.g. 404 for a
    /// missing exchange, 406 for a body over its maximum size). Every unconfirmed
    /// message of the batch sees it: only a message published alone is known to
    /// have caused it.
    #[error("RabbitMQ closed the channel: {code} {text}")]
    ChannelClosed { code: u16, text: String },
    #[error("RabbitMQ blocked publishing on this connection (resource alarm)")]
    Blocked,
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("not sent: an earlier message of the batch could not be sent")]
    NotSent,
    /// The client library failed otherwise (connection lost mid-publish, an
    /// I/O error): the message's fate is unknown, so it is sent again.
    #[error("publish failed: {0}")]
    Broker(#[source] lapin::Error),
}

impl PublishError {
    /// True when the message itself was refused (it would fail again on a healthy
    /// broker): unroutable, or the channel closed for what the message is (404: its
    /// exchange does not exist, 406: e.g. its body is over the broker's maximum).
    /// False when the broker, the connection or a permission failed: a nack (the
    /// broker's queue could not take it, e.g. overflow), 403 and every other code
    /// concern every message alike.
    pub fn is_message_refused(&self) -> bool {
        matches!(
            self,
            Self::Unroutable { .. }
                | Self::ChannelClosed {
                    code: 404 | 406,
                    ..
                }
        )
    }

    pub(super) fn from_lapin(error: &lapin::Error) -> Self {
        if let lapin::ErrorKind::ProtocolError(amqp) = error.kind()
            && matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_))
        {
            return Self::ChannelClosed {
                code: amqp.get_id(),
                text: amqp.get_message().to_string(),
            };
        }
        Self::Broker(error.clone())
    }
}
