//! The idempotent inbox: a consumer's handler runs inside one transaction that
//! first records `(consumer, message_id)`. A message seen before skips the
//! handler; the handler's own rows and outbox events commit together with the
//! record, so "consume, change state, emit the next event" is atomic. The caller
//! acks only after this returns.
//!
//! Two deliveries of one message racing each other serialize on the primary key:
//! the second insert waits for the first transaction and then finds the row (or,
//! if the first rolled back, takes over).
//!
//! [`Inbox::process_batch`] does the same for several messages in one
//! transaction: one insert records them all (in id order, so two batches that
//! share ids wait for each other on the inbox rows instead of deadlocking; the
//! handler's own locks are [`crate::InboxHandler::before`]'s to order), and the
//! work runs for the new ones.

use futures_util::future::BoxFuture;
use sqlx::{PgConnection, PgPool};

/// What happened to a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Processed<T> {
    /// The handler ran and its transaction committed.
    Done(T),
    /// The message was processed before; the handler did not run.
    Duplicate,
}

/// The inbox of one logical consumer on the service's database: commits each
/// message's work at most once per message id (the `inbox` table, created by
/// [`crate::migrations`]). Cheap to clone. Most services use it through
/// [`crate::InboxConsumer`] rather than directly.
#[derive(Clone, Debug)]
pub struct Inbox {
    pool: PgPool,
    consumer: String,
}

impl Inbox {
    /// `consumer` names the logical consumer (e.g. the queue): the same message
    /// may be processed once by each consumer.
    pub fn new(pool: PgPool, consumer: impl Into<String>) -> Self {
        Self {
            pool,
            consumer: consumer.into(),
        }
    }

    /// The database the inbox records live in.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether the database answers a trivial query (the probe of a consumer
    /// paused by an outage).
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(drop)
    }

    /// Runs `work` once per message id. On `Err` nothing of it persists (nor the
    /// inbox record), so a retry runs it again.
    #[tracing::instrument(skip_all, fields(messaging.consumer.group.name = %self.consumer, messaging.message.id = %message_id))]
    pub async fn process<T, E, F>(&self, message_id: &str, work: F) -> Result<Processed<T>, E>
    where
        E: From<sqlx::Error>,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, E>>,
    {
        let mut lease = Lease {
            connection: self.pool.acquire().await?,
            settled: false,
        };
        let result = async {
            let mut tx = sqlx::Connection::begin(&mut *lease.connection).await?;
            let fresh = sqlx::query(
                "INSERT INTO inbox (consumer, message_id) VALUES ($1, $2)
                 ON CONFLICT (consumer, message_id) DO NOTHING",
            )
            .bind(&self.consumer)
            .bind(message_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !fresh {
                tx.rollback().await?;
                tracing::debug!("duplicate message skipped");
                return Ok(Processed::Duplicate);
            }
            let value = work(&mut tx).await?;
            tx.commit().await?;
            Ok(Processed::Done(value))
        }
        .await;
        lease.settled = true;
        result
    }

    /// Runs `work` once for a batch of messages in one transaction. `work` is
    /// told which of `message_ids` are new (`fresh[i]` for `message_ids[i]`): an
    /// id processed before is not, and an id twice in the batch is new at its
    /// first place only. On `Err` nothing of it persists, no inbox record
    /// either, so each message can be run again (alone, say).
    #[tracing::instrument(skip_all, fields(messaging.consumer.group.name = %self.consumer, messaging.batch.message_count = message_ids.len()))]
    pub async fn process_batch<T, E, F>(&self, message_ids: &[&str], work: F) -> Result<T, E>
    where
        E: From<sqlx::Error>,
        F: for<'c> FnOnce(&'c mut PgConnection, Vec<bool>) -> BoxFuture<'c, Result<T, E>>,
    {
        let mut lease = Lease {
            connection: self.pool.acquire().await?,
            settled: false,
        };
        let result = async {
            let mut tx = sqlx::Connection::begin(&mut *lease.connection).await?;
            let recorded: Vec<String> = sqlx::query_scalar(
                "INSERT INTO inbox (consumer, message_id)
                 SELECT $1, id FROM unnest($2::text[]) AS ids(id) ORDER BY id
                 ON CONFLICT (consumer, message_id) DO NOTHING
                 RETURNING message_id",
            )
            .bind(&self.consumer)
            .bind(message_ids)
            .fetch_all(&mut *tx)
            .await?;
            let mut new: std::collections::HashSet<&str> =
                recorded.iter().map(String::as_str).collect();
            let fresh = message_ids.iter().map(|id| new.remove(id)).collect();
            let value = work(&mut tx, fresh).await?;
            tx.commit().await?;
            Ok(value)
        }
        .await;
        lease.settled = true;
        result
    }
}

/// The connection of one [`Inbox::process`] or [`Inbox::process_batch`] run. A run abandoned mid-statement
/// (its future dropped, e.g. at the consumer's handler deadline) leaves a query in
/// flight; returning that connection to the pool waits for the query however
/// long it blocks, and a few such runs exhaust the pool. Closing it instead is
/// bounded, and the server rolls back what it held.
struct Lease {
    connection: sqlx::pool::PoolConnection<sqlx::Postgres>,
    settled: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.settled {
            self.connection.close_on_drop();
        }
    }
}

/// Deletes inbox records older than `retention`, in bounded chunks. Keep the
/// retention longer than any redelivery can take (DLQ replays included).
pub async fn cleanup(pool: &PgPool, retention: std::time::Duration) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM inbox WHERE ctid IN (
                 SELECT ctid FROM inbox
                 WHERE processed_at < now() - make_interval(secs => $1)
                 LIMIT 5000)",
        )
        .bind(retention.as_secs_f64())
        .execute(pool)
        .await?
        .rows_affected();
        total += deleted;
        if deleted < 5000 {
            return Ok(total);
        }
    }
}

/// Runs [`cleanup`] every `every` until `shutdown` fires.
pub fn spawn_cleanup(
    pool: PgPool,
    retention: std::time::Duration,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match cleanup(&pool, retention).await {
                Ok(0) => {}
                Ok(deleted) => tracing::debug!(deleted, "inbox records past retention deleted"),
                Err(error) => tracing::warn!(%error, "inbox cleanup failed"),
            }
        }
    })
}
