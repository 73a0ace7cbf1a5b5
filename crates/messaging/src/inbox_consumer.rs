//! A [`Handler`] made from the three steps every inbox consumer takes: decode
//! the message, apply it inside the inbox transaction (exactly once per message
//! id), and optionally act after the commit (a call to another system).
//!
//! ```text
//!  handle(message)       decode ─bad─▶ Reject
//!                          └─▶ Inbox::process(id, apply) ─▶ after ─▶ Outcome
//!  handle_batch(messages) decode each ─bad─▶ Reject (that one)
//!                          └─▶ Inbox::process_batch(ids, apply the new ones) ─▶ after each
//!                               └─ failed ─▶ each alone, as handle does
//! ```
//!
//! A batch is one transaction and one commit for all its messages. If any of
//! them fails, nothing of the batch persists and each message runs again in its
//! own transaction, so only the one at fault is retried or dead-lettered; when
//! the database is unavailable they all answer [`Outcome::Unavailable`] at once
//! (the consumer pauses), without trying each.
//!
//! Every transaction first calls [`InboxHandler::before`] with all the events
//! it will apply, so a handler whose messages lock shared rows can take every
//! lock of the batch in one global order: two batches in flight then wait for
//! each other instead of deadlocking.

use std::{future::Future, sync::Arc};

use futures_util::future::BoxFuture;
use sqlx::PgConnection;
use tracing::Instrument;

use crate::{Handler, Inbox, IncomingMessage, Outcome, Processed};

/// Why applying a message failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The database failed: retried, or the consumer pauses when the database
    /// is unavailable ([`Outcome::database`]).
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The message can never be applied (unknown order, broken invariant): it
    /// is dead-lettered with this reason.
    #[error("{0}")]
    Permanent(String),
}

/// What a service writes to consume a queue through the inbox.
pub trait InboxHandler: Send + Sync + 'static {
    /// A decoded message.
    type Event: Send + Sync + 'static;
    /// What applying a message did, for [`InboxHandler::after`].
    type Output: Send + 'static;

    /// Decodes a message; `Err(reason)` dead-letters it as rejected.
    fn decode(&self, message: &IncomingMessage) -> Result<Self::Event, String>;

    /// Runs first in each transaction, with every event it is about to apply
    /// (those not processed before): the place to lock, in one global order,
    /// the rows they all need. The default does nothing.
    fn before<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [&'a Self::Event],
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        let _ = (tx, events);
        Box::pin(async { Ok(()) })
    }

    /// Applies the message inside the inbox transaction; runs once per message
    /// id unless it fails. Its writes (state, history, outbox rows) commit with
    /// the inbox record or not at all.
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a IncomingMessage,
        event: &'a Self::Event,
    ) -> BoxFuture<'a, Result<Self::Output, ApplyError>>;

    /// Runs after the transaction committed with what `apply` gave, and also
    /// when the inbox found the message processed before (`None`): the place
    /// for work outside the database that a redelivery must try again. The
    /// default acks.
    fn after(
        &self,
        message: &IncomingMessage,
        event: &Self::Event,
        applied: Option<Self::Output>,
    ) -> impl Future<Output = Outcome> + Send {
        let _ = (message, event, applied);
        async { Outcome::Ack }
    }
}

/// Consumes with an [`InboxHandler`]; give it to [`crate::spawn_consumer`].
#[derive(Debug)]
pub struct InboxConsumer<H> {
    inbox: Inbox,
    handler: Arc<H>,
}

impl<H> InboxConsumer<H> {
    /// Consumes with `handler`, deduplicating in `inbox`. Give each queue its
    /// own inbox (named after the queue, as
    /// [`RuntimeBuilder::consume_inbox`](crate::RuntimeBuilder::consume_inbox)
    /// does): two consumers sharing one would each skip what the other did.
    pub fn new(inbox: Inbox, handler: H) -> Self {
        Self {
            inbox,
            handler: Arc::new(handler),
        }
    }
}

/// Decoded messages of one run, shared with the transaction's future.
type Items<E> = Arc<Vec<(IncomingMessage, E)>>;

impl<H: InboxHandler> InboxConsumer<H> {
    /// Runs message `index` of `items` alone, in its own transaction.
    async fn one(&self, items: &Items<H::Event>, index: usize) -> Outcome {
        let handler = self.handler.clone();
        let shared = items.clone();
        let (message, event) = &items[index];
        let processed = self
            .inbox
            .process(&message.message_id, move |tx| {
                Box::pin(async move {
                    let (message, event) = &shared[index];
                    handler.before(tx, &[event]).await?;
                    handler.apply(tx, message, event).await
                })
            })
            .await;
        match processed {
            Ok(Processed::Done(output)) => self.handler.after(message, event, Some(output)).await,
            Ok(Processed::Duplicate) => self.handler.after(message, event, None).await,
            Err(ApplyError::Database(error)) => Outcome::database(&error),
            Err(ApplyError::Permanent(reason)) => Outcome::Reject(reason),
        }
    }

    /// Runs every message of `items` in one transaction; what each applied
    /// (`None` for one processed before).
    async fn together(
        &self,
        items: &Items<H::Event>,
    ) -> Result<Vec<Option<H::Output>>, ApplyError> {
        let handler = self.handler.clone();
        let shared = items.clone();
        let ids: Vec<&str> = items.iter().map(|(m, _)| m.message_id.as_str()).collect();
        self.inbox
            .process_batch(&ids, move |tx, fresh| {
                Box::pin(async move {
                    let events: Vec<&H::Event> = shared
                        .iter()
                        .zip(&fresh)
                        .filter(|(_, fresh)| **fresh)
                        .map(|((_, event), _)| event)
                        .collect();
                    handler.before(tx, &events).await?;
                    let mut outputs = Vec::with_capacity(shared.len());
                    for ((message, event), fresh) in shared.iter().zip(&fresh) {
                        outputs.push(if *fresh {
                            let apply = handler.apply(tx, message, event);
                            Some(apply.instrument(message.span.clone()).await?)
                        } else {
                            None
                        });
                    }
                    Ok(outputs)
                })
            })
            .await
    }
}

impl<H: InboxHandler> Handler for InboxConsumer<H> {
    async fn handle(&self, message: IncomingMessage) -> Outcome {
        match self.handler.decode(&message) {
            Ok(event) => self.one(&Arc::new(vec![(message, event)]), 0).await,
            Err(reason) => Outcome::Reject(reason),
        }
    }

    async fn handle_batch(&self, messages: Vec<IncomingMessage>) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; messages.len()];
        let mut places = Vec::with_capacity(messages.len());
        let mut decoded = Vec::with_capacity(messages.len());
        for (place, message) in messages.into_iter().enumerate() {
            match self.handler.decode(&message) {
                Ok(event) => {
                    places.push(place);
                    decoded.push((message, event));
                }
                Err(reason) => {
                    outcomes[place] = Some(Outcome::Reject(reason));
                }
            }
        }
        let items = Arc::new(decoded);
        match self.together(&items).await {
            Ok(outputs) => {
                // One after the other, in delivery order: with one handler slot
                // a webhook sees the messages in the queue's order.
                for ((place, (message, event)), output) in places.iter().zip(&*items).zip(outputs) {
                    let after = self.handler.after(message, event, output);
                    outcomes[*place] = Some(after.instrument(message.span.clone()).await);
                }
            }
            Err(ApplyError::Database(error)) if crate::availability::is_unavailable(&error) => {
                let outcome = Outcome::database(&error);
                for place in &places {
                    outcomes[*place] = Some(outcome.clone());
                }
            }
            Err(error) => {
                tracing::debug!(%error, count = items.len(), "batch failed; running its messages one by one");
                for (index, place) in places.iter().enumerate() {
                    let span = items[index].0.span.clone();
                    outcomes[*place] = Some(self.one(&items, index).instrument(span).await);
                }
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or_else(|| Outcome::Retry("not handled".to_owned())))
            .collect()
    }

    /// Asked while the consumer is paused after an outage: the database answers.
    async fn ready(&self) -> Result<(), String> {
        self.inbox
            .ping()
            .await
            .map_err(|e| format!("database: {e}"))
    }
}
