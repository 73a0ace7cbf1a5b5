//! The `LISTEN` side: wakes the relay when a transaction that wrote to the outbox
//! commits.

use std::sync::Arc;

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{Backoff, outbox::NOTIFY_CHANNEL};

/// Forwards `NOTIFY` wake-ups; reconnects with a pause when the database is away.
pub(super) async fn listen(pool: PgPool, wake: Arc<Notify>, shutdown: CancellationToken) {
    let backoff = Backoff::default();
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(error) => {
                tracing::debug!(%error, "outbox listener cannot connect; polling meanwhile");
                failures = failures.saturating_add(1);
                tokio::time::sleep(backoff.delay(failures)).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(NOTIFY_CHANNEL).await {
            tracing::debug!(%error, "outbox LISTEN failed; polling meanwhile");
            failures = failures.saturating_add(1);
            tokio::time::sleep(backoff.delay(failures)).await;
            continue;
        }
        failures = 0;
        // Rows committed while we were not listening are found by this wake-up.
        wake.notify_one();
        loop {
            match listener.recv().await {
                Ok(_) => wake.notify_one(),
                Err(error) => {
                    tracing::debug!(%error, "outbox listener lost its connection");
                    break;
                }
            }
        }
    }
}
