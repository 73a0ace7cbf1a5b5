//! One delivery's handler runs, until a final answer.

use std::{
    panic::AssertUnwindSafe,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use futures_util::FutureExt;
use lapin::message::Delivery;
use tracing::Instrument;

use super::{
    DeathClass, Gate, Handler, IncomingMessage, Outcome, Runtime, UNAVAILABLE_AFTER_RESUME,
    Verdict, unsettled::Subscription,
};

impl<H: Handler> Runtime<H> {
    /// Runs one delivery's handler until it gives a final answer, then settles
    /// it. `first_run` is false when a batch already counted the run.
    pub(super) async fn process(
        self: &Arc<Self>,
        delivery: &Delivery,
        subscription: &Subscription,
        first_run: bool,
    ) {
        self.run_to_verdict(delivery, None, subscription, first_run)
            .await;
    }

    /// [`Self::process`] of a delivery whose envelope `message` the caller
    /// checked already (a first run).
    pub(super) async fn process_checked(
        self: &Arc<Self>,
        delivery: &Delivery,
        message: IncomingMessage,
        subscription: &Subscription,
    ) {
        self.run_to_verdict(delivery, Some(message), subscription, true)
            .await;
    }

    /// Checks the envelope (unless `checked` is given), runs the handler
    /// (again after a pause), and settles what it finally answered.
    async fn run_to_verdict(
        self: &Arc<Self>,
        delivery: &Delivery,
        mut checked: Option<IncomingMessage>,
        subscription: &Subscription,
        mut first_run: bool,
    ) {
        let mut unavailable_after_resume = 0u32;
        let (outcome, attempt, span) = loop {
            let waited = self.gate.borrow().is_some();
            if !matches!(self.resumed(subscription.generation).await, Gate::Open) {
                return;
            }
            let envelope = match checked.take() {
                Some(message) => Ok(message),
                None => self.envelope(delivery),
            };
            let message = match envelope {
                Ok(message) => message,
                Err(reason) => {
                    tracing::warn!(queue = %self.queue.name, %reason, "poison message; dead-lettering");
                    self.dead_letter(
                        delivery,
                        &reason.to_string(),
                        0,
                        DeathClass::Poison,
                        subscription,
                    )
                    .await;
                    return;
                }
            };
            let span = message.span.clone();
            let attempt = message.attempt;
            if std::mem::take(&mut first_run) {
                self.count_redriven(&message);
            }
            let started = Instant::now();
            let run = AssertUnwindSafe(self.handler.handle(message).instrument(span.clone()))
                .catch_unwind();
            let deadline = self.options.handler_timeout;
            let outcome = match tokio::time::timeout(deadline, run).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(_)) => Outcome::Retry("handler panicked".to_owned()),
                Err(_) => {
                    self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(parent: &span, queue = %self.queue.name, ?deadline, "handler deadline passed; abandoning the run");
                    Outcome::Retry(format!("handler did not finish within {deadline:?}"))
                }
            };
            self.stats
                .handler_duration
                .observe(started.elapsed().as_secs_f64());
            let verdict = match outcome {
                Outcome::Unavailable(reason)
                    if unavailable_after_resume < UNAVAILABLE_AFTER_RESUME =>
                {
                    unavailable_after_resume += u32::from(waited);
                    span.record("message.outcome", "paused");
                    self.pause(&reason);
                    continue;
                }
                Outcome::Unavailable(reason) => Verdict::Retry(format!(
                    "{reason} (still failing after the dependency answered again {UNAVAILABLE_AFTER_RESUME} times)"
                )),
                Outcome::Ack => Verdict::Ack,
                Outcome::Retry(reason) => Verdict::Retry(reason),
                Outcome::Reject(reason) => Verdict::Reject(reason),
            };
            break (verdict, attempt, span);
        };
        self.settle(delivery, outcome, attempt, subscription)
            .instrument(span)
            .await;
    }

    /// A first run of a message an operator sent back from the DLQ.
    pub(super) fn count_redriven(&self, message: &IncomingMessage) {
        if message.redrives > 0 && message.attempt == 1 {
            self.stats.redriven.fetch_add(1, Ordering::Relaxed);
        }
    }
}
