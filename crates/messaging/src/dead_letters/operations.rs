//! What an operator does with dead letters: depth, list, redrive, purge.

use super::channel::{ack, bounded, close, declare_passive, is_not_found, missing_dlq};
use super::*;

impl DeadLetters {
    /// Connects (no topology is declared: an operator tool changes none).
    pub async fn connect(settings: AmqpSettings, app_id: &str) -> Result<Self, DeadLetterError> {
        let broker = Broker::connect(settings, Topology::default()).await?;
        let publisher = Publisher::new(broker.clone(), app_id);
        Ok(Self { broker, publisher })
    }

    /// Closes the connection. Nothing is held between calls: each operation
    /// hands back what it read and did not remove before it returns.
    pub async fn close(self) {
        self.broker.close().await;
    }

    /// The number of ready messages in the DLQ of `queue`.
    pub async fn depth(&self, queue: &str) -> Result<u32, DeadLetterError> {
        let connection = self.connection().await?;
        self.check_queue(&connection, queue).await?;
        let channel = bounded(connection.create_channel()).await?;
        let depth = declare_passive(&channel, &dlq_name(queue))
            .await
            .map_err(|e| missing_dlq(e, queue))?;
        close(&channel).await;
        Ok(depth)
    }

    /// Reads up to `limit` dead letters of `queue`, oldest dead-lettered
    /// first, and leaves them all in place. `queue` is the consumer queue, not
    /// its DLQ. Reading raises each one's delivery count in the DLQ (harmless:
    /// see [`DLQ_DELIVERY_LIMIT`](crate::topology::DLQ_DELIVERY_LIMIT)).
    pub async fn list(&self, queue: &str, limit: usize) -> Result<Listing, DeadLetterError> {
        let taken = self.take(queue, limit).await?;
        close(&taken.channel).await;
        Ok(Listing {
            letters: taken.letters,
            not_read: taken.not_read,
        })
    }

    /// Sends the selected dead letters of `queue` back to `queue`, oldest
    /// dead-lettered first; with `dry_run`, only says which it would send.
    /// Refuses ([`DeadLetterError::TooMany`]) a DLQ holding more than `limit`:
    /// a quorum queue hands back read messages in no useful order, so the
    /// oldest are known only when every message was read.
    pub async fn redrive(
        &self,
        queue: &str,
        selection: &Selection,
        limit: usize,
        dry_run: bool,
        progress: Progress<'_>,
    ) -> Result<Moved, DeadLetterError> {
        let taken = self.take(queue, limit).await?;
        // Order is known only among what was read.
        if taken.not_read > 0 {
            close(&taken.channel).await;
            return Err(DeadLetterError::TooMany {
                dlq: taken.dlq.clone(),
                limit,
                not_read: taken.not_read,
            });
        }
        let (selected, mut report) = taken.choose(selection).await?;
        if dry_run {
            report.moved = selected
                .iter()
                .map(|&i| taken.letters[i].message_id.clone())
                .collect();
            close(&taken.channel).await;
            return Ok(report);
        }
        let total = selected.len();
        progress(0, total);
        for &index in &selected {
            let letter = &taken.letters[index];
            // The originals are held by this channel: once it is gone they are
            // back in the DLQ, and a copy sent now would exist twice.
            if !taken.channel.status().connected() {
                report.interrupted =
                    Some("the connection holding the dead letters was lost".to_owned());
                break;
            }
            // One copy in flight at a time: a copy the broker refuses or never
            // confirms is never overtaken by a later one, so what reaches
            // `queue` is always the oldest selected, in order.
            if let Err(error) = self.publisher.publish(&letter.redrive_copy(queue)).await {
                report.interrupted = Some(format!(
                    "publishing {} to {queue} failed: {error}",
                    letter.message_id
                ));
                break;
            }
            crate::crash_point!(crate::faults::points::REDRIVE_AFTER_CONFIRM);
            if let Err(error) = ack(&taken.channel, letter.delivery_tag).await {
                // The copy is in `queue` and the original still in the DLQ:
                // consumers deduplicate it by message id.
                report.moved.push(letter.message_id.clone());
                report.interrupted = Some(format!(
                    "removing {} from the DLQ failed (it was redriven and is still in the DLQ): {error}",
                    letter.message_id
                ));
                break;
            }
            report.moved.push(letter.message_id.clone());
            progress(report.moved.len(), total);
        }
        report.left = total - report.moved.len();
        if let Err(error) = settle_and_close(&taken).await
            && report.interrupted.is_none()
        {
            report.interrupted = Some(error);
        }
        Ok(report)
    }

    /// Deletes the selected dead letters of `queue` among the first `limit`
    /// read (the rest stay). `Moved::moved` lists the deleted ids;
    /// `Moved::interrupted` says why it stopped early, if it did.
    pub async fn purge(
        &self,
        queue: &str,
        selection: &Selection,
        limit: usize,
    ) -> Result<Moved, DeadLetterError> {
        let taken = self.take(queue, limit).await?;
        let (selected, mut report) = taken.choose(selection).await?;
        for &index in &selected {
            let letter = &taken.letters[index];
            if let Err(error) = ack(&taken.channel, letter.delivery_tag).await {
                report.interrupted =
                    Some(format!("removing {} failed: {error}", letter.message_id));
                break;
            }
            report.moved.push(letter.message_id.clone());
        }
        report.left = selected.len() - report.moved.len();
        if let Err(error) = settle_and_close(&taken).await
            && report.interrupted.is_none()
        {
            report.interrupted = Some(error);
        }
        Ok(report)
    }

    async fn connection(&self) -> Result<Arc<Connection>, DeadLetterError> {
        tokio::time::timeout(OP_TIMEOUT, self.broker.connected())
            .await
            .ok()
            .flatten()
            .and_then(|link| link.connection)
            .ok_or(DeadLetterError::Timeout(OP_TIMEOUT))
    }

    /// `queue` exists (its own channel: a failed passive declare closes it).
    async fn check_queue(
        &self,
        connection: &Connection,
        queue: &str,
    ) -> Result<(), DeadLetterError> {
        let channel = bounded(connection.create_channel()).await?;
        match declare_passive(&channel, queue).await {
            Ok(_) => {
                close(&channel).await;
                Ok(())
            }
            Err(e) if is_not_found(&e) => Err(DeadLetterError::UnknownQueue(queue.to_owned())),
            Err(e) => Err(e),
        }
    }

    /// Takes up to `limit` messages of the DLQ of `queue`, unacknowledged, in
    /// dead-lettering order. They return to the DLQ when the channel closes.
    async fn take(&self, queue: &str, limit: usize) -> Result<Taken, DeadLetterError> {
        let connection = self.connection().await?;
        self.check_queue(&connection, queue).await?;
        let dlq = dlq_name(queue);
        let channel = bounded(connection.create_channel()).await?;
        declare_passive(&channel, &dlq)
            .await
            .map_err(|e| missing_dlq(e, queue))?;
        let mut letters = Vec::new();
        let mut not_read = 0;
        while letters.len() < limit {
            let got =
                bounded(channel.basic_get(dlq.as_str().into(), BasicGetOptions::default())).await;
            match got {
                Ok(Some(message)) => {
                    not_read = message.message_count;
                    letters.push(DeadLetter::from_delivery(&message.delivery));
                }
                Ok(None) => {
                    not_read = 0;
                    break;
                }
                Err(DeadLetterError::Timeout(timeout)) => {
                    close(&channel).await;
                    return Err(DeadLetterError::Unreadable {
                        dlq: dlq.clone(),
                        timeout,
                    });
                }
                Err(e) => {
                    close(&channel).await;
                    return Err(e);
                }
            }
        }
        // Stable: letters with the same time (or none) keep the order read.
        letters.sort_by_key(|l| (l.dead_lettered_at.is_none(), l.dead_lettered_at));
        Ok(Taken {
            channel,
            letters,
            not_read,
            dlq,
        })
    }
}

struct Taken {
    channel: Channel,
    letters: Vec<DeadLetter>,
    not_read: u32,
    dlq: String,
}

impl Taken {
    /// The selected letters and the report to fill in; on an error the
    /// channel is closed (everything goes back).
    async fn choose(&self, selection: &Selection) -> Result<(Vec<usize>, Moved), DeadLetterError> {
        match self.select(selection) {
            Ok(selected) => {
                let report = Moved {
                    not_selected: self.letters.len() - selected.len(),
                    not_read: self.not_read,
                    ..Moved::default()
                };
                Ok((selected, report))
            }
            Err(e) => {
                close(&self.channel).await;
                Err(e)
            }
        }
    }

    /// The indices of the selected letters, in dead-lettering order.
    fn select(&self, selection: &Selection) -> Result<Vec<usize>, DeadLetterError> {
        if let Selection::Ids(ids) = selection {
            let missing: Vec<String> = ids
                .iter()
                .filter(|id| !self.letters.iter().any(|l| &l.message_id == *id))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(DeadLetterError::UnknownIds {
                    dlq: self.dlq.clone(),
                    ids: missing,
                });
            }
        }
        Ok((0..self.letters.len())
            .filter(|&i| selection.matches(&self.letters[i]))
            .collect())
    }
}

/// Closes the channel of a take after acknowledging some of its messages. A
/// quorum queue may drop acks that arrive just before their channel closes and
/// hand those messages back too (rabbitmq-server#10327, seen here on 3.10:
/// about one close in two after a few hundred acks). A `basic.get` on the same
/// queue is a synchronous command that the queue applies after the acks sent
/// before it, so once it answers the acks are applied; what it takes goes back
/// with the rest.
async fn settle_and_close(taken: &Taken) -> Result<(), String> {
    let applied = bounded(
        taken
            .channel
            .basic_get(taken.dlq.as_str().into(), BasicGetOptions::default()),
    )
    .await;
    close(&taken.channel).await;
    applied.map(|_| ()).map_err(|error| {
        format!(
            "the DLQ did not confirm the removals ({error}): some of them may still be in {}",
            taken.dlq
        )
    })
}
