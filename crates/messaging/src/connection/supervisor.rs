//! The supervisor: watches the current connection (and the broker's blocked /
//! unblocked events) and, when it dies, rebuilds it with backoff until it works
//! again, publishing each new generation to the [`Broker`](super::Broker)'s
//! watchers.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures_util::StreamExt;
use lapin::Connection;

use super::{broker::Inner, open::open_and_declare};

/// Watches the connection; when it dies, rebuilds it until it works again.
pub(super) async fn supervise(inner: Arc<Inner>, mut connection: Arc<Connection>) {
    loop {
        wait_until_dead(&inner, &connection).await;
        inner.blocked.store(false, Ordering::Relaxed);
        inner.link.send_modify(|l| l.connection = None);
        if inner.shutdown.is_cancelled() {
            return;
        }
        let lost = inner.node.load(Ordering::Relaxed);
        let nodes = inner.settings.nodes();
        tracing::warn!(broker = %inner.settings.node(lost), "RabbitMQ connection lost; reconnecting");
        // Another node first, picked at random so the connections that
        // leave one node spread over the others (the lost node may be gone for
        // good); then every node in turn. A single node is tried again and again.
        let first = match nodes {
            1 => lost,
            _ => lost + 1 + rand::random_range(0..nodes - 1),
        };
        let mut attempt = 0u32;
        connection = loop {
            let node = (first + attempt as usize) % nodes;
            let settings = inner.settings.node(node);
            tokio::select! {
                () = inner.shutdown.cancelled() => return,
                () = inner.heartbeat.sleep(inner.settings.backoff.delay(attempt)) => {}
            }
            inner.heartbeat.beat();
            // Opening and declaring are both bounded (a connection that dies
            // mid-declare can leave the declare pending forever) and give way to
            // shutdown.
            let result = tokio::select! {
                () = inner.shutdown.cancelled() => return,
                result = open_and_declare(&settings, &inner.topology) => result,
            };
            match result {
                Ok(c) => {
                    inner.node.store(node, Ordering::Relaxed);
                    break Arc::new(c);
                }
                Err(error) => {
                    tracing::warn!(%error, attempt, "reconnect attempt failed");
                    attempt = attempt.saturating_add(1);
                }
            }
        };
        inner.reconnects.fetch_add(1, Ordering::Relaxed);
        inner.link.send_modify(|l| {
            l.generation += 1;
            l.connection = Some(connection.clone());
        });
        tracing::info!(broker = %inner.settings.node(inner.node.load(Ordering::Relaxed)), "RabbitMQ connection re-established");
    }
}

/// Returns when the connection is no longer usable or on shutdown.
async fn wait_until_dead(inner: &Inner, connection: &Connection) {
    let mut events = connection.events_listener();
    // The event stream reports errors at once; the poll catches anything it misses.
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        inner.heartbeat.beat();
        if !connection.status().connected() {
            return;
        }
        tokio::select! {
            () = inner.shutdown.cancelled() => return,
            _ = poll.tick() => {}
            event = events.next() => match event {
                None => return,
                Some(lapin::Event::ConnectionBlocked(reason)) => {
                    tracing::warn!(%reason, "RabbitMQ blocked publishing on this connection");
                    inner.blocked.store(true, Ordering::Relaxed);
                }
                Some(lapin::Event::ConnectionUnblocked) => {
                    tracing::info!("RabbitMQ unblocked publishing");
                    inner.blocked.store(false, Ordering::Relaxed);
                }
                // Channel errors are reported here too; the status check decides.
                Some(_) => {}
            },
        }
    }
}
