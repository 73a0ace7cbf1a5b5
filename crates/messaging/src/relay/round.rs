//! One round: claim a batch of rows, publish it with confirms, settle what the
//! broker said of each row, commit.

use std::sync::atomic::Ordering;

use super::{Relay, RoundError};
use crate::{OutgoingMessage, PublishError, outbox};

impl Relay {
    /// One batch: claim, publish, settle. Returns how many rows were claimed.
    ///
    /// The claim marks the rows published in the batch's open transaction, one
    /// write per row, and the commit after the confirms makes it true. Rows the
    /// broker did not confirm are unmarked in the same transaction before the
    /// commit; a crash anywhere before the commit rolls every mark back, so a row
    /// is never published-in-the-table without its confirm. The publisher bounds
    /// the batch (one deadline, abandoned on an alarm), so the transaction is
    /// never held open for longer than its confirm timeout plus the settling.
    /// (No span of its own: each publish span continues its row's stored trace,
    /// and a span per poll would be a root trace of its own.)
    pub(super) async fn round(&self) -> Result<i64, RoundError> {
        let mut tx = self.pool.begin().await?;
        let rows = outbox::claim(&mut tx, self.options.batch_size).await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let claimed = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        let mut settle = Settle::default();
        let mut seqs = Vec::with_capacity(rows.len());
        let mut messages = Vec::with_capacity(rows.len());
        for (seq, message) in rows {
            match message {
                Ok(message) => {
                    seqs.push(seq);
                    messages.push(message);
                }
                Err(e) => {
                    tracing::error!(seq, error = %e, "unreadable outbox row; parking it");
                    settle
                        .malformed
                        .push((seq, format!("unreadable outbox row: {e}")));
                }
            }
        }
        let mut results = self.publisher.publish_batch(&messages).await;
        crate::crash_point!(
            crate::faults::points::RELAY_AFTER_CONFIRM,
            results.iter().any(Result::is_ok)
        );
        #[cfg(feature = "testing")]
        if take_one(&self.options.fail_after_confirm) {
            // As if the process died here: the transaction rolls back, the rows
            // stay unpublished and go out again with the same ids.
            return Err(RoundError::Injected);
        }

        if messages.len() > 1
            && results
                .iter()
                .any(|r| matches!(r, Err(PublishError::ChannelClosed { .. })))
        {
            self.publish_alone(&messages, &mut results).await;
        }
        for ((seq, message), result) in seqs.iter().zip(&messages).zip(results) {
            match result {
                Ok(()) => settle.confirmed += 1,
                Err(e) if e.is_message_refused() => {
                    tracing::error!(message_id = %message.message_id, error = %e, "broker refused an outbox message; it backs off alone");
                    settle.refused.push((*seq, e.to_string()));
                }
                Err(e) => {
                    settle.unsent.push(*seq);
                    settle.broker_error.get_or_insert(e);
                }
            }
        }
        self.settle(&mut tx, &settle).await?;
        tx.commit().await?;
        self.published
            .fetch_add(settle.confirmed as u64, Ordering::Relaxed);
        match settle.broker_error {
            Some(e) => Err(RoundError::Broker(e)),
            None => Ok(claimed),
        }
    }

    /// A channel error cannot be pinned on one message of a batch: every
    /// unconfirmed message saw it. Publishes those one at a time, so the message
    /// the broker refuses is found and the others go out; stops at the first
    /// failure of the broker itself (the rest stays unsent, blamed on nobody).
    async fn publish_alone(
        &self,
        messages: &[OutgoingMessage],
        results: &mut [Result<(), PublishError>],
    ) {
        for result in results.iter_mut() {
            if matches!(result, Err(PublishError::ChannelClosed { .. })) {
                *result = Err(PublishError::NotSent);
            }
        }
        // One more batch budget for the whole search, so the claim transaction
        // stays bounded; what is left when it runs out stays unsent.
        let until = tokio::time::Instant::now() + self.publisher.confirm_timeout();
        for (message, result) in messages.iter().zip(results.iter_mut()) {
            if result.is_ok() || !matches!(result, Err(PublishError::NotSent)) {
                continue;
            }
            if tokio::time::Instant::now() >= until {
                return;
            }
            *result = self.publisher.publish(message).await;
            if matches!(result, Err(e) if !e.is_message_refused()) {
                return;
            }
        }
    }

    /// Writes what the broker said of each claimed row, before the commit.
    async fn settle(
        &self,
        tx: &mut sqlx::PgConnection,
        settle: &Settle,
    ) -> Result<(), sqlx::Error> {
        if !settle.refused.is_empty() {
            let park_after = self.options.park_after.max(1);
            let parked =
                outbox::back_off(tx, &settle.refused, self.options.row_backoff, park_after).await?;
            for id in parked {
                tracing::error!(message_id = %id, park_after, "outbox message parked after repeated refusals; see last_error");
            }
        }
        if !settle.malformed.is_empty() {
            outbox::park(tx, &settle.malformed).await?;
        }
        if let Some(error) = &settle.broker_error {
            outbox::unmark(tx, &settle.unsent, &error.to_string()).await?;
        }
        Ok(())
    }
}

/// What one batch did to its rows.
#[derive(Default)]
struct Settle {
    confirmed: usize,
    /// Refused by the broker for what they are: back off alone, park eventually.
    refused: Vec<(i64, String)>,
    /// Unreadable: parked at once.
    malformed: Vec<(i64, String)>,
    /// Not confirmed because the broker or connection failed: unmarked, no blame.
    unsent: Vec<i64>,
    broker_error: Option<PublishError>,
}

#[cfg(feature = "testing")]
fn take_one(counter: &std::sync::atomic::AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}
