//! Deliveries that arrived together, handled together: one
//! [`Handler::handle_batch`] call, then one `basic.ack(multiple)` for every
//! message it acknowledged.
//!
//! ```text
//!  deliveries ─▶ envelope check ──bad──▶ DLQ, alone
//!                 │ ok
//!                 ▼
//!        handle_batch (deadline) ── panic / deadline / wrong count ──▶ each alone (process)
//!                 │ one Outcome per message
//!     Ack ─────────────▶ one multi-ack (or single acks when another task holds a lower tag)
//!     Retry / Reject ──▶ settled alone, as after a single run
//!     Unavailable ─────▶ run alone again (process), which pauses the consumer
//! ```
//!
//! Anything the batch cannot answer for every message is handled one by one,
//! so a batch changes how many transactions and frames a message costs, never
//! what happens to it.

use std::{panic::AssertUnwindSafe, sync::atomic::Ordering, time::Instant};

use futures_util::FutureExt;
use lapin::{message::Delivery, options::BasicAckOptions};
use tracing::Instrument;

use super::{
    DeathClass, Gate, Handler, Outcome, Runtime, SETTLE_TIMEOUT, Verdict, unsettled::Subscription,
};

impl<H: Handler> Runtime<H> {
    pub(super) async fn process_batch(
        self: &std::sync::Arc<Self>,
        deliveries: Vec<Delivery>,
        subscription: &Subscription,
    ) {
        if !matches!(self.resumed(subscription.generation).await, Gate::Open) {
            return;
        }
        let mut taken = Vec::with_capacity(deliveries.len());
        let mut messages = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match self.envelope(&delivery) {
                Ok(message) => {
                    taken.push(delivery);
                    messages.push(message);
                }
                Err(reason) => {
                    tracing::warn!(queue = %self.queue.name, %reason, "poison message; dead-lettering");
                    self.dead_letter(
                        &delivery,
                        &reason.to_string(),
                        0,
                        DeathClass::Poison,
                        subscription,
                    )
                    .await;
                }
            }
        }
        if taken.len() <= 1 {
            // Alone: its envelope is checked already, its body copied once.
            for (delivery, message) in taken.iter().zip(messages) {
                self.process_checked(delivery, message, subscription).await;
            }
            return;
        }
        for message in &messages {
            self.count_redriven(message);
        }
        let runs: Vec<_> = messages
            .iter()
            .map(|m| (m.span.clone(), m.attempt))
            .collect();
        let count = messages.len();
        let started = Instant::now();
        let run = AssertUnwindSafe(self.handler.handle_batch(messages)).catch_unwind();
        let deadline = self.options.handler_timeout;
        let outcomes = match tokio::time::timeout(deadline, run).await {
            Ok(Ok(outcomes)) if outcomes.len() == count => Some(outcomes),
            Ok(Ok(outcomes)) => {
                tracing::error!(queue = %self.queue.name, count, answered = outcomes.len(), "the batch handler did not answer once per message; handling them one by one");
                None
            }
            Ok(Err(_)) => {
                tracing::warn!(queue = %self.queue.name, count, "the batch handler panicked; handling the messages one by one");
                None
            }
            Err(_) => {
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(queue = %self.queue.name, count, ?deadline, "batch deadline passed; abandoning the run, handling the messages one by one");
                None
            }
        };
        let elapsed = started.elapsed().as_secs_f64();
        for _ in 0..count {
            self.stats.handler_duration.observe(elapsed);
        }
        let Some(outcomes) = outcomes else {
            for delivery in &taken {
                self.process(delivery, subscription, false).await;
            }
            return;
        };
        let mut acks = Vec::with_capacity(count);
        let mut again = Vec::new();
        for ((delivery, outcome), (span, attempt)) in taken.iter().zip(outcomes).zip(runs) {
            let verdict = match outcome {
                Outcome::Ack => {
                    span.record("message.outcome", "ack");
                    acks.push(delivery);
                    continue;
                }
                // Alone, the run that meets the outage pauses the consumer.
                Outcome::Unavailable(_) => {
                    again.push(delivery);
                    continue;
                }
                Outcome::Retry(reason) => Verdict::Retry(reason),
                Outcome::Reject(reason) => Verdict::Reject(reason),
            };
            self.settle(delivery, verdict, attempt, subscription)
                .instrument(span)
                .await;
        }
        self.ack_together(&acks, subscription).await;
        for delivery in again {
            self.process(delivery, subscription, false).await;
        }
    }

    /// Acknowledges `deliveries` with one `basic.ack(multiple)` when that frame
    /// acknowledges nothing else on the channel, else one by one.
    async fn ack_together(&self, deliveries: &[&Delivery], subscription: &Subscription) {
        let Some(last) = deliveries.iter().max_by_key(|d| d.delivery_tag) else {
            return;
        };
        crate::crash_point!(crate::faults::points::CONSUMER_BEFORE_ACK);
        let mut tags: Vec<u64> = deliveries.iter().map(|d| d.delivery_tag).collect();
        tags.sort_unstable();
        if !subscription.multi_ack_covers(&tags) {
            let acks = deliveries.iter().map(|d| self.ack(d, subscription));
            futures_util::future::join_all(acks).await;
            return;
        }
        let ack = last.acker.ack(BasicAckOptions { multiple: true });
        match tokio::time::timeout(SETTLE_TIMEOUT, ack).await {
            Ok(Ok(true)) => {
                subscription.settled(tags);
                self.stats
                    .acked
                    .fetch_add(deliveries.len() as u64, Ordering::Relaxed);
            }
            Ok(Ok(false)) => tracing::warn!(
                queue = %self.queue.name, count = deliveries.len(),
                "channel closed before the batch's ack; the broker redelivers its messages"
            ),
            Ok(Err(error)) => tracing::warn!(
                queue = %self.queue.name, count = deliveries.len(), %error,
                "ack of a batch failed; the broker redelivers its messages once their channel closes"
            ),
            Err(_) => tracing::warn!(
                queue = %self.queue.name, count = deliveries.len(),
                "ack of a batch timed out; the broker redelivers its messages once their channel closes"
            ),
        }
    }
}
