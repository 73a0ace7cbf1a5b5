//! The publisher's one confirm-mode channel: opened on first use and after every
//! reconnect or channel error, and discarded (closed in the background) after a
//! batch that did not settle completely or saw a nack.

use std::time::Duration;

use lapin::{Channel, options::ConfirmSelectOptions};

use super::{PublishError, Publisher};

impl Publisher {
    /// Forgets the channel and closes it in the background: its unsettled
    /// confirms and returns must not reach a later batch.
    pub(super) fn discard(slot: &mut Option<(u64, Channel)>) {
        if let Some((_, channel)) = slot.take() {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    channel.close(200, "discarded after an unsettled batch".into()),
                )
                .await;
            });
        }
    }

    /// The confirm-mode channel of the current connection, opened on first use and
    /// after every reconnect or channel error.
    pub(super) async fn channel(
        &self,
        slot: &mut Option<(u64, Channel)>,
    ) -> Result<Channel, PublishError> {
        let link = self.inner.broker.current();
        if let Some((generation, channel)) = slot.as_ref()
            && *generation == link.generation
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        *slot = None;
        let connection = link
            .connection
            .filter(|c| c.status().connected())
            .ok_or(PublishError::NotConnected)?;
        let open = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>(channel)
        };
        let channel = tokio::time::timeout(self.inner.confirm_timeout, open)
            .await
            .map_err(|_| PublishError::ConfirmTimeout(self.inner.confirm_timeout))?
            .map_err(|e| PublishError::from_lapin(&e))?;
        *slot = Some((link.generation, channel.clone()));
        Ok(channel)
    }
}
