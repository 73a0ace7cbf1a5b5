//! Why a publish did not succeed ([`PublishError`]), and which failures are the
//! message's own fault.

use std::time::Duration;

/// Why a publish did not succeed. Only `Ok(())` means the broker has the message.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PublishError {
    /// The publish connection is down (reconnecting, or closed); nothing was
    /// sent. Try again once [`Publisher::is_connected`](crate::Publisher::is_connected).
    #[error("not connected to RabbitMQ")]
    NotConnected,
    /// The broker returned the message: no queue is bound for its routing key
    /// (every message goes out `mandatory`), so it reached no queue.
    #[error(
        "message unroutable: exchange '{exchange}' has no queue bound for routing key '{routing_key}' ({reply})"
    )]
    Unroutable {
        /// The exchange it was published to.
        exchange: String,
        /// Its routing key.
        routing_key: String,
        /// The broker's reply code and text (e.g. `312 NO_ROUTE`).
        reply: String,
    },
    /// The broker confirmed with a nack: a queue could not take the message
    /// (e.g. one at its length limit, which rejects publishes).
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    /// The broker closed the channel with a channel-level error (e.g. 404 for a
    /// missing exchange, 406 for a body over its maximum size). Every unconfirmed
    /// message of the batch sees it: only a message published alone is known to
    /// have caused it.
    #[error("RabbitMQ closed the channel: {code} {text}")]
    ChannelClosed {
        /// The AMQP reply code.
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// The broker blocks the connection (a memory or disk alarm): the publish
    /// failed at once, or the batch was abandoned when the alarm came. Some of
    /// its messages may have reached the broker anyway; publishing them again
    /// under the same ids is safe where consumers deduplicate.
    #[error("RabbitMQ blocked publishing on this connection (resource alarm)")]
    Blocked,
    /// No confirm within the publisher's
    /// [`confirm_timeout`](crate::Publisher::confirm_timeout) (the whole
    /// batch's deadline); the broker may or may not have the message.
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
    /// Not sent, because an earlier message of the same batch could not be.
    #[error("not sent: an earlier message of the batch could not be sent")]
    NotSent,
    /// Any other client or connection failure (connection lost mid-publish, an
    /// I/O error): the broker may or may not have the message.
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
