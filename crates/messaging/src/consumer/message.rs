//! What a handler sees and answers: the message, the outcome, the handler trait.

use std::future::Future;

use lapin::types::FieldTable;
use opentelemetry::Context;
use tracing::Instrument;

/// Why a message was dead-lettered, in the few classes an operator acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeathClass {
    /// The envelope itself is unusable (no message id or type, body too large).
    Poison,
    /// The handler refused it as permanently wrong (bad payload, unknown type,
    /// broken invariant).
    Rejected,
    /// Transient failures used up every retry.
    Exhausted,
}

impl DeathClass {
    pub const ALL: [Self; 3] = [Self::Poison, Self::Rejected, Self::Exhausted];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Poison => "poison",
            Self::Rejected => "rejected",
            Self::Exhausted => "exhausted",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == value)
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// What the handler decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done (or already done): acknowledge.
    Ack,
    /// A transient failure: try again later, with a growing delay.
    Retry(String),
    /// A permanent failure (bad payload, unknown type, invariant broken): DLQ now.
    Reject(String),
    /// A dependency of the handler is unavailable (not the message's fault): the
    /// consumer pauses until [`Handler::ready`] answers, then runs it again.
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

/// A delivery whose envelope has been checked.
#[derive(Clone, Debug)]
pub struct IncomingMessage {
    pub queue: String,
    pub message_id: String,
    pub message_type: String,
    pub exchange: String,
    pub routing_key: String,
    pub payload: Vec<u8>,
    pub headers: FieldTable,
    pub correlation_id: Option<String>,
    pub app_id: Option<String>,
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
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, message: IncomingMessage) -> impl Future<Output = Outcome> + Send;

    /// Processes the deliveries that were ready together (at most
    /// [`ConsumerOptions::batch`]), answering one [`Outcome`] per message, in
    /// order. A handler overrides it to share work between them, e.g. one
    /// database transaction ([`crate::InboxConsumer`]). The default handles them
    /// one after the other, each in its span.
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
