//! The depth of a DLQ, watched for metrics.

use super::channel::{bounded, close, declare_passive};
use super::*;

/// The depth of one DLQ, read every `every` on `broker`'s connection (for
/// metrics); made by [`watch_depth`].
#[derive(Clone, Debug)]
pub struct DepthProbe {
    /// The consumer queue whose DLQ is watched (not the DLQ's own name).
    pub queue: String,
    depth: Arc<AtomicI64>,
}

impl DepthProbe {
    /// Ready messages in the DLQ at the last read; `None` until the first read
    /// and while it cannot be read (no connection, no such DLQ).
    pub fn depth(&self) -> Option<u64> {
        u64::try_from(self.depth.load(Ordering::Relaxed)).ok()
    }
}

/// Watches the depth of the DLQ of `queue` until `shutdown`.
pub fn watch_depth(
    broker: Broker,
    queue: &str,
    every: Duration,
    shutdown: CancellationToken,
) -> (DepthProbe, tokio::task::JoinHandle<()>) {
    let probe = DepthProbe {
        queue: queue.to_owned(),
        depth: Arc::new(AtomicI64::new(-1)),
    };
    let dlq = dlq_name(queue);
    let depth = probe.depth.clone();
    let task = tokio::spawn(async move {
        let mut channel: Option<Channel> = None;
        loop {
            let link = broker.current();
            if channel.as_ref().is_none_or(|c| !c.status().connected())
                && let Some(connection) = link.connection.filter(|c| c.status().connected())
            {
                channel = bounded(connection.create_channel()).await.ok();
            }
            let read = match &channel {
                Some(c) => declare_passive(c, &dlq).await.ok(),
                None => None,
            };
            depth.store(read.map_or(-1, i64::from), Ordering::Relaxed);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
        }
        if let Some(c) = channel {
            close(&c).await;
        }
    });
    (probe, task)
}
