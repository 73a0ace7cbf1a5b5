//! The relay loop: rounds on every wake-up (a `NOTIFY`, the poll interval or the
//! end of a backoff), the status refresh and the retention cleanup.

use std::{sync::Arc, time::Duration};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Relay, RoundError, STATUS_EVERY, listen::listen};
use crate::{PublishError, outbox};

impl Relay {
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(self.pool.clone(), wake.clone(), shutdown.clone()));
        let mut failures = 0u32;
        let mut last_cleanup = tokio::time::Instant::now();
        let mut last_status = tokio::time::Instant::now() - STATUS_EVERY;
        loop {
            self.heartbeat.beat();
            let result = match self.broker_state() {
                Some(waiting) => Err(RoundError::Waiting(waiting)),
                None => self.drain(&shutdown).await,
            };
            // The status query is for readiness and metrics: a few times a second
            // is plenty, not after every wake-up under load.
            // A skipped refresh is made up at most STATUS_EVERY later, so the
            // backlog gauge never stays stale for a whole poll interval.
            let mut status_due = None;
            if result.is_err() || last_status.elapsed() >= STATUS_EVERY {
                last_status = tokio::time::Instant::now();
                self.refresh_status(result.as_ref().err()).await;
            } else {
                self.count_round();
                status_due = Some(STATUS_EVERY.saturating_sub(last_status.elapsed()));
            }
            let pause = match result {
                Ok(()) => {
                    failures = 0;
                    None
                }
                // Waiting for the broker: look again soon, with no claim and no
                // transaction meanwhile.
                Err(RoundError::Waiting(_)) => Some(Duration::from_millis(250)),
                Err(error) => {
                    tracing::warn!(%error, "outbox relay round failed; backing off");
                    failures = failures.saturating_add(1);
                    Some(self.options.backoff.delay(failures))
                }
            };
            if last_cleanup.elapsed() >= self.options.cleanup_every {
                last_cleanup = tokio::time::Instant::now();
                self.cleanup().await;
            }
            let wait = match (pause, status_due) {
                (Some(pause), _) => pause,
                (None, Some(due)) => due.min(self.options.poll_interval),
                (None, None) => self.options.poll_interval,
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                // After a failure only the backoff wakes us: a notification
                // storm must not turn into a retry storm.
                () = wake.notified(), if pause.is_none() => {}
                () = self.heartbeat.sleep(wait) => {}
            }
        }
        listener.abort();
        tracing::info!("outbox relay stopped");
    }

    /// Publishes rounds on every lane until no row is ready or shutdown (checked
    /// between batches, so a batch in progress always completes).
    async fn drain(&self, shutdown: &CancellationToken) -> Result<(), RoundError> {
        let lane = || async {
            loop {
                self.heartbeat.beat();
                if let Some(waiting) = self.broker_state() {
                    return Err(RoundError::Waiting(waiting));
                }
                let claimed = self.round().await?;
                if claimed < self.options.batch_size || shutdown.is_cancelled() {
                    return Ok::<(), RoundError>(());
                }
            }
        };
        let lanes =
            futures_util::future::join_all((0..self.options.lanes.max(1)).map(|_| lane())).await;
        lanes.into_iter().collect()
    }

    /// Why no round should start now: the publish connection is down or the
    /// broker blocks it.
    fn broker_state(&self) -> Option<PublishError> {
        if !self.publisher.is_connected() {
            Some(PublishError::NotConnected)
        } else if self.publisher.is_blocked() {
            Some(PublishError::Blocked)
        } else {
            None
        }
    }

    fn count_round(&self) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.rounds += 1;
        status.last_error = None;
    }

    async fn refresh_status(&self, error: Option<&RoundError>) {
        let counts = outbox::counts(&self.pool).await;
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.rounds += 1;
        status.last_error = error.map(ToString::to_string);
        match counts {
            Ok(counts) => {
                status.backlog = counts.backlog;
                status.parked = counts.parked;
                status.oldest_unpublished = counts.oldest;
            }
            Err(e) => status.last_error = Some(format!("database: {e}")),
        }
    }

    /// Deletes published rows past retention, in bounded chunks.
    async fn cleanup(&self) {
        const CHUNK: i64 = 5000;
        loop {
            self.heartbeat.beat();
            match outbox::delete_published(&self.pool, self.options.retention, CHUNK).await {
                Ok(deleted) if deleted == CHUNK as u64 => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "outbox cleanup failed");
                    break;
                }
            }
        }
    }
}
