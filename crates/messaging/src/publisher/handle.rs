//! The [`Publisher`] handle: building one, publishing a single message, and
//! what callers may ask of it (blocked, connected, its confirm timeout).

use std::{sync::Arc, time::Duration};

use lapin::Channel;
use tokio::sync::Mutex;

use super::{OutgoingMessage, PublishError};
use crate::Broker;

/// How long a whole batch may take, sends and confirms: under the
/// `idle_in_transaction` and statement bounds of a caller's transaction.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes with confirms on its own channel, reopened after reconnects.
/// Clones share the channel.
#[derive(Clone, Debug)]
pub struct Publisher {
    pub(super) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) broker: Broker,
    pub(super) app_id: String,
    pub(super) confirm_timeout: Duration,
    pub(super) channel: Mutex<Option<(u64, Channel)>>,
}

impl Publisher {
    /// A publisher on `broker`'s connection, with [`DEFAULT_CONFIRM_TIMEOUT`].
    /// `app_id` is the producing service's name, stamped on every message that
    /// does not name its own ([`OutgoingMessage::app_id`]).
    pub fn new(broker: Broker, app_id: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                broker,
                app_id: app_id.into(),
                confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
                channel: Mutex::new(None),
            }),
        }
    }

    /// The same publisher with another confirm timeout (on a fresh channel).
    #[must_use]
    pub fn with_confirm_timeout(self, timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                broker: self.inner.broker.clone(),
                app_id: self.inner.app_id.clone(),
                confirm_timeout: timeout,
                channel: Mutex::new(None),
            }),
        }
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        self.publish_batch(std::slice::from_ref(message))
            .await
            .pop()
            .unwrap_or(Err(PublishError::NotConnected))
    }

    /// True while the broker blocks this publisher's connection (an alarm).
    pub fn is_blocked(&self) -> bool {
        self.inner.broker.is_blocked()
    }

    /// How long one batch may take (sends and confirms).
    pub fn confirm_timeout(&self) -> Duration {
        self.inner.confirm_timeout
    }

    /// True while this publisher's connection is open.
    pub fn is_connected(&self) -> bool {
        self.inner.broker.is_connected()
    }
}
