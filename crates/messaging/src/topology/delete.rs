//! Tearing a scratch topology down again: every queue and exchange that
//! declaring created, with their messages.

use lapin::{
    Channel,
    options::{ExchangeDeleteOptions, QueueDeleteOptions},
};

use super::Topology;

impl Topology {
    /// Deletes every queue and exchange [`declare`](Self::declare) creates, with
    /// their messages: the teardown of a scratch topology.
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        for queue in &self.queues {
            for name in queue.queue_names() {
                channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await?;
            }
        }
        for exchange in &self.exchanges {
            channel
                .exchange_delete(
                    exchange.name.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await?;
        }
        Ok(())
    }
}
