//! What a handler sees and answers: the message, the outcome, the handler trait.

use std::future::Future;

use lapin::types::FieldTable;
use opentelemetry::Context;
use tracing::Instrument;

/// Why a message was dead-lettered, in the few classes an operator acts on.
/// Written on each dead letter as the `x-death-class` header
/// ([`headers::DEATH_CLASS`](crate::consumer::headers::DEATH_CLASS)) and
/// counted by [`ConsumerStats::dead_lettered_as`](crate::ConsumerStats::dead_lettered_as).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeathClass {
    /// The envelope itself is unusable (no message id or type, body too large).
    Poison,
    /// The handler refused it as permanently wrong (bad payload, unknown type,
    /// broken invariant).
    Rejected,
    /// Transient failures used up every retry. A [`DeadLetter`](crate::DeadLetter)
    /// also has this class when the broker itself dead-lettered it at the
    /// queue's delivery limit.
    Exhausted,
}

impl DeathClass {
    /// Every class, e.g. to export one metric series per class.
    pub const ALL: [Self; 3] = [Self::Poison, Self::Rejected, Self::Exhausted];

    /// The header value: `poison`, `rejected` or `exhausted`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Poison => "poison",
            Self::Rejected => "rejected",
            Self::Exhausted => "exhausted",
        }
    }

    /// The class of a header value written by [`DeathClass::as_str`]; `None`
    /// for anything else.
    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == value)
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// What the handler decided; the runtime settles the delivery accordingly. The
/// `String` of the failures is a reason for people: it is logged and written on
/// the moved message (at most 1024 characters of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done (or already done): acknowledge.
    Ack,
    /// A transient failure: try again later, with a growing delay. The message
    /// goes to the retry queue of the queue's
    /// [`RetryPolicy::delay_after`](crate::RetryPolicy::delay_after) (reason in
    /// `x-last-error`) and comes back when the delay expires; once
    /// [`RetryPolicy::max_attempts`](crate::RetryPolicy::max_attempts) runs
    /// have failed it is dead-lettered as [`DeathClass::Exhausted`]. A handler
    /// that panics or passes its deadline counts as this.
    Retry(String),
    /// A permanent failure (bad payload, unknown type, invariant broken): DLQ
    /// now, as [`DeathClass::Rejected`], the reason in `x-death-reason`.
    Reject(String),
    /// A dependency of the handler is unavailable (not the message's fault): the
    /// consumer pauses until [`Handler::ready`] answers, then runs it again.
    /// No retry is spent on it. A message that keeps answering this right after
    /// the probe said the dependency is back (5 times) is retried instead.
    Unavailable(String),
}

impl Outcome {
    /// The outcome of a database failure: [`Outcome::Unavailable`] when the
    /// database cannot be used at all ([`crate::availability::is_unavailable`]),
    /// else [`Outcome::Retry`].
    pub fn database(error: &sqlx::Error) -> Self {
        let reason = format!("database: {error}");
        if crate::availability::is_unavailable(error) {
            Self::Unavailable(reason)
        } else {
            Self::Retry(reason)
        }
    }
}

/// A delivery whose envelope has been checked: it has a message id and a type,
/// and its body is within [`ConsumerOptions::max_body`](crate::ConsumerOptions::max_body).
#[derive(Clone, Debug)]
pub struct IncomingMessage {
    /// The queue it was consumed from.
    pub queue: String,
    /// The AMQP `message_id`, never empty: the key the inbox deduplicates on
    /// (for an outbox event, the row's UUID). Kept across retries and redrives.
    pub message_id: String,
    /// The AMQP `type`, never empty: what the handler dispatches on.
    pub message_type: String,
    /// The exchange it was first published to, also when it comes back from a
    /// retry queue or a redrive (`x-original-exchange`).
    pub exchange: String,
    /// The routing key it was first published with (`x-original-routing-key`
    /// after a retry or a redrive).
    pub routing_key: String,
    /// The body, as published.
    pub payload: Vec<u8>,
    /// Every AMQP header as delivered: the producer's own, the trace context,
    /// and the runtime's `x-…` headers ([`crate::consumer::headers`]).
    pub headers: FieldTable,
    /// The AMQP `correlation_id`, when the producer set one.
    pub correlation_id: Option<String>,
    /// The AMQP `app_id`: the producing application, when it said.
    pub app_id: Option<String>,
    /// The AMQP `timestamp`, seconds since the Unix epoch: for an outbox event,
    /// when its row was written; `None` when the producer set none.
    pub timestamp: Option<u64>,
    /// 1 on the first handler run; grows with each retry.
    pub attempt: u32,
    /// Times an operator sent the message back from its DLQ.
    pub redrives: u32,
    /// The broker redelivered it (a previous consumer died before settling).
    pub redelivered: bool,
    /// The producer's trace context (empty when absent or malformed).
    pub trace_context: Context,
    /// This delivery's consumer span (`process <queue>`, a child of
    /// `trace_context`). [`Handler::handle`] already runs inside it; a
    /// [`Handler::handle_batch`] runs each message's work in its own.
    pub span: tracing::Span,
}

/// Processes one message. Runs inside the consumer span; must not assume it runs
/// only once per message (use the inbox for effects).
///
/// Most services implement [`InboxHandler`](crate::InboxHandler) instead and
/// consume with [`RuntimeBuilder::consume_inbox`](crate::RuntimeBuilder::consume_inbox),
/// which makes a `Handler` of it; implement this trait for a consumer without a
/// database, or with its own idempotence.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message and says what to do with it. Runs inside the
    /// message's consumer span, within
    /// [`ConsumerOptions::handler_timeout`](crate::ConsumerOptions::handler_timeout);
    /// a panic or a passed deadline counts as [`Outcome::Retry`]. The same
    /// message may come again (a redelivery after a crash, a retry, a redrive).
    fn handle(&self, message: IncomingMessage) -> impl Future<Output = Outcome> + Send;

    /// Processes the deliveries that were ready together (at most
    /// [`ConsumerOptions::batch`](crate::ConsumerOptions::batch)), answering
    /// one [`Outcome`] per message, in order. A handler overrides it to share
    /// work between them, e.g. one database transaction
    /// ([`crate::InboxConsumer`]). The default handles them one after the
    /// other, each in its span.
    fn handle_batch(
        &self,
        messages: Vec<IncomingMessage>,
    ) -> impl Future<Output = Vec<Outcome>> + Send {
        async move {
            let mut outcomes = Vec::with_capacity(messages.len());
            for message in messages {
                let span = message.span.clone();
                outcomes.push(self.handle(message).instrument(span).await);
            }
            outcomes
        }
    }

    /// Whether the handler's dependencies answer again, asked while the consumer
    /// is paused after [`Outcome::Unavailable`]. The default says yes, so the
    /// held messages are simply tried again after the backoff.
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }
}
