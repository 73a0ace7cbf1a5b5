//! The subscription loop: subscribe, take deliveries into handler slots,
//! re-subscribe after a reconnect or a cancel, pause and probe during an outage.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    Channel,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio::{sync::Semaphore, task::JoinSet};

use super::{
    End, Gate, Handler, PROBE_TIMEOUT, Runtime, SETTLE_TIMEOUT, SUBSCRIBE_TIMEOUT,
    unsettled::Subscription,
};

impl<H: Handler> Runtime<H> {
    pub(super) async fn run(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            self.heartbeat.beat();
            let link = loop {
                tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    link = self.broker.connected() => match link { Some(l) => break l, None => return },
                    () = self.heartbeat.sleep(Duration::from_secs(1)) => {}
                }
            };
            let Some(connection) = link.connection else {
                continue;
            };
            let generation = link.generation;
            let subscribed = tokio::select! {
                subscribed = tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.subscribe(&connection)) => match subscribed {
                    Ok(subscribed) => subscribed.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {SUBSCRIBE_TIMEOUT:?}")),
                },
                () = self.broker.lost(generation) => Err("the connection was lost while subscribing".to_owned()),
                () = self.shutdown.cancelled() => return,
            };
            match subscribed {
                Err(error) => {
                    tracing::warn!(queue = %self.queue.name, %error, "subscribe failed; retrying");
                }
                Ok((channel, consumer)) => {
                    failures = 0;
                    self.subscribed.store(true, Ordering::Relaxed);
                    self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(queue = %self.queue.name, "consumer subscribed");
                    let mut in_flight = JoinSet::new();
                    let end = tokio::select! {
                        end = self.consume(consumer, &mut in_flight, generation) => end,
                        () = self.broker.lost(generation) => End::Lost,
                    };
                    self.subscribed.store(false, Ordering::Relaxed);
                    match &end {
                        End::Shutdown => {
                            let cancel = channel.basic_cancel(
                                self.tag(&channel).as_str().into(),
                                BasicCancelOptions::default(),
                            );
                            let _ = tokio::time::timeout(SETTLE_TIMEOUT, cancel).await;
                        }
                        End::Cancelled if connection.status().connected() => tracing::warn!(
                            queue = %self.queue.name,
                            "subscription cancelled by the broker (queue deleted?); re-declaring and re-subscribing"
                        ),
                        End::Cancelled => {}
                        End::Failed(error) => {
                            tracing::warn!(queue = %self.queue.name, %error, "consumer stream failed; re-subscribing");
                        }
                        End::Lost => {
                            tracing::warn!(queue = %self.queue.name, "connection lost; re-subscribing after reconnect");
                        }
                    }
                    if matches!(end, End::Shutdown) {
                        // In-flight handlers finish and settle before the channel goes.
                        while in_flight.join_next().await.is_some() {}
                        let _ = tokio::time::timeout(
                            SETTLE_TIMEOUT,
                            channel.close(200, "consumer stopped".into()),
                        )
                        .await;
                        tracing::info!(queue = %self.queue.name, "consumer stopped");
                        return;
                    }
                    // The old channel is gone: its deliveries come back to whoever
                    // subscribes next, so do not wait for their settlement here.
                    in_flight.detach_all();
                }
            }
            let delay = self.options.backoff.delay(failures);
            failures = failures.saturating_add(1);
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = self.heartbeat.sleep(delay) => {}
            }
        }
    }

    pub(super) fn tag(&self, channel: &Channel) -> String {
        format!(
            "{}.{}.{}",
            self.options.app_id,
            self.queue.name,
            channel.id()
        )
    }

    pub(super) async fn subscribe(
        &self,
        connection: &lapin::Connection,
    ) -> lapin::Result<(Channel, lapin::Consumer)> {
        // Re-declaring makes a deleted queue come back with its bindings.
        self.queue.declare(connection).await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(self.options.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.queue.name.as_str().into(),
                self.tag(&channel).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, consumer))
    }

    pub(super) async fn consume(
        self: &Arc<Self>,
        mut consumer: lapin::Consumer,
        in_flight: &mut JoinSet<()>,
        generation: u64,
    ) -> End {
        let limit = Arc::new(Semaphore::new(self.options.concurrency.max(1)));
        let subscription = Arc::new(Subscription::new(generation));
        loop {
            self.heartbeat.beat();
            while in_flight.try_join_next().is_some() {}
            // While paused no new delivery is taken: what the broker has not
            // pushed yet stays in the queue, in order.
            match self.resumed(generation).await {
                Gate::Open => {}
                Gate::Shutdown => return End::Shutdown,
                Gate::Lost => return End::Lost,
            }
            let permit = tokio::select! {
                () = self.shutdown.cancelled() => return End::Shutdown,
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return End::Shutdown,
                },
                // Every handler slot busy is alive too.
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            };
            let next = tokio::select! {
                () = self.shutdown.cancelled() => return End::Shutdown,
                next = consumer.next() => next,
                // Idle is alive: beat, and look at the gate again.
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            };
            let first = match next {
                None => return End::Cancelled,
                Some(Err(error)) => return End::Failed(error),
                Some(Ok(delivery)) => delivery,
            };
            subscription.taken(first.delivery_tag);
            let mut deliveries = vec![first];
            // What else has arrived joins the batch; nothing is waited for.
            let mut ended = None;
            while deliveries.len() < self.options.batch {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(delivery))) => {
                        subscription.taken(delivery.delivery_tag);
                        deliveries.push(delivery);
                    }
                    Some(Some(Err(error))) => {
                        ended = Some(End::Failed(error));
                        break;
                    }
                    Some(None) => {
                        ended = Some(End::Cancelled);
                        break;
                    }
                    None => break,
                }
            }
            let runtime = self.clone();
            let subscription = subscription.clone();
            in_flight.spawn(async move {
                if deliveries.len() == 1 {
                    let delivery = deliveries.pop().expect("one delivery");
                    runtime.process(&delivery, &subscription, true).await;
                } else {
                    runtime.process_batch(deliveries, &subscription).await;
                }
                drop(permit);
            });
            if let Some(end) = ended {
                return end;
            }
        }
    }

    /// Waits while the consumer is paused. Ends early on shutdown or when the
    /// connection of `generation` is gone (a held delivery then returns to the
    /// queue when its channel closes, unsettled by us).
    pub(super) async fn resumed(&self, generation: u64) -> Gate {
        let mut gate = self.gate.subscribe();
        if gate.borrow_and_update().is_none() {
            return Gate::Open;
        }
        tokio::select! {
            () = self.shutdown.cancelled() => Gate::Shutdown,
            () = self.broker.lost(generation) => Gate::Lost,
            open = gate.wait_for(Option::is_none) => if open.is_ok() { Gate::Open } else { Gate::Shutdown },
        }
    }

    /// Closes the gate for `reason`; the first to close it starts the probe.
    pub(super) fn pause(self: &Arc<Self>, reason: &str) {
        let closed_now = self.gate.send_if_modified(|state| {
            if state.is_none() {
                *state = Some(reason.to_owned());
                true
            } else {
                false
            }
        });
        if closed_now {
            self.stats.pauses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(queue = %self.queue.name, %reason, "a dependency is unavailable; consumer paused, messages stay in the queue");
            let runtime = self.clone();
            tokio::spawn(async move { runtime.probe_until_ready().await });
        }
    }

    /// Asks [`Handler::ready`] with backoff until it answers, then reopens the gate.
    pub(super) async fn probe_until_ready(self: Arc<Self>) {
        let mut attempt = 0u32;
        loop {
            let delay = self
                .options
                .backoff
                .delay(attempt)
                .max(Duration::from_millis(100));
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = self.heartbeat.sleep(delay) => {}
            }
            match tokio::time::timeout(PROBE_TIMEOUT, self.handler.ready()).await {
                Ok(Ok(())) => {
                    self.gate.send_replace(None);
                    tracing::info!(queue = %self.queue.name, probes = attempt + 1, "dependency answers again; consumer resumed");
                    return;
                }
                Ok(Err(reason)) => {
                    tracing::debug!(queue = %self.queue.name, %reason, "dependency still unavailable");
                }
                Err(_) => {
                    tracing::debug!(queue = %self.queue.name, "dependency probe timed out");
                }
            }
            attempt = attempt.saturating_add(1);
        }
    }
}
