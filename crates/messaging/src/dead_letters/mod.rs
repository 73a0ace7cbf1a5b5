//! The dead letters of a consumer queue `Q`, kept in `Q.dlq`: read them, send
//! them back to `Q` (redrive) or delete them (purge). Generic: it reads the
//! runtime's headers, never what a message means.
//!
//! ```text
//!  take     basic.get every message of Q.dlq, unacknowledged (held, not removed)
//!  sort     by dead-lettering time (x-dead-lettered-at, else the broker's x-death)
//!  list     hand them all back (close the channel)
//!  redrive  publish copies to Q (default exchange, confirms) in that order, one
//!           at a time; ack a DLQ original only once its copy is confirmed;
//!           hand back the rest
//!  purge    ack the selected ones; hand back the rest
//! ```
//!
//! A quorum queue does not keep the position of messages handed back (on
//! RabbitMQ 3.10 they return in no useful order), so the order of a DLQ is the
//! order of dead-lettering recorded on each message, never its queue position.
//!
//! Acks are known to be applied before the channel closes (`settle_and_close`).
//!
//! Interrupted anywhere (a cut connection, a crash of the caller), a message is
//! in the DLQ, in `Q`, or, when the cut falls between a confirm and its ack, in
//! both under one `message_id`, which the consumers' inboxes deduplicate (as
//! long as they keep its record: the inbox retention). Nothing is lost and no
//! effect happens twice. One copy is in flight at a time, so a refused or
//! unconfirmed copy is never overtaken by a later one.
//!
//! Files: this one (what a dead letter is, the errors), `operations` (depth,
//! list, redrive, purge), `channel` (bounded broker operations), `depth` (a
//! DLQ's depth for metrics).

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use lapin::{
    Channel, Connection,
    message::Delivery,
    options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, LongString},
};
use tokio_util::sync::CancellationToken;

use crate::{
    AmqpSettings, Broker, ConnectError, OutgoingMessage, Publisher, Topology,
    consumer::{DeathClass, header_str, header_u32, headers},
    propagation,
};

/// Bound of each broker operation; an operator tool must never hang.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers of a dead letter that describe its death or its earlier tries: a
/// redriven message starts its retries afresh.
const DEATH_HEADERS: &[&str] = &[
    headers::RETRY_COUNT,
    headers::LAST_ERROR,
    headers::DEATH_REASON,
    headers::DEATH_CLASS,
    headers::ATTEMPTS,
    headers::FAILED_QUEUE,
    headers::DEAD_LETTERED_AT,
    "x-death",
    "x-delivery-count",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// The DLQ of consumer queue `queue`, by the topology's naming.
pub fn dlq_name(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// Why an operation on dead letters did not happen (or stopped); each displays
/// as one line.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// [`DeadLetters::connect`] could not connect.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The consumer queue named does not exist on the broker (a typo, or
    /// another vhost).
    #[error("no queue '{0}' on the broker")]
    UnknownQueue(String),
    /// The consumer queue exists but its DLQ does not (it was not declared by
    /// this crate's [`Topology`]).
    #[error("queue '{queue}' has no dead-letter queue '{dlq}'")]
    NoDeadLetterQueue {
        /// The consumer queue.
        queue: String,
        /// The DLQ name that was looked for ([`dlq_name`]).
        dlq: String,
    },
    /// [`Selection::Ids`] named ids that are not among the dead letters read;
    /// nothing was moved.
    #[error("not in {dlq}: {}", ids.join(", "))]
    UnknownIds {
        /// The DLQ searched.
        dlq: String,
        /// The ids not found.
        ids: Vec<String>,
    },
    /// No connection, or no answer to one broker operation, within the bound
    /// (10 s).
    #[error("RabbitMQ did not answer within {0:?}")]
    Timeout(Duration),
    /// A redrive found more dead letters than `limit`; nothing was moved.
    /// Call again with a `limit` of at least `limit + not_read`.
    #[error(
        "{dlq} holds more than {limit} messages ({not_read} more): its oldest cannot be told from the rest, so nothing was moved; read at least {} at once",
        limit + *not_read as usize
    )]
    TooMany {
        /// The DLQ read.
        dlq: String,
        /// The `limit` of the call.
        limit: usize,
        /// Messages the DLQ still held beyond those read.
        not_read: u32,
    },
    /// The broker did not hand out the DLQ's next message in time, most
    /// likely because the client cannot parse it; nothing was moved.
    #[error(
        "no message of {dlq} arrived within {timeout:?}: one the client cannot parse (e.g. a message id or header name that is not UTF-8) may be at its head; remove it with the RabbitMQ UI or `rabbitmqctl purge_queue`"
    )]
    Unreadable {
        /// The DLQ read.
        dlq: String,
        /// How long the read waited.
        timeout: Duration,
    },
    /// Any other broker or client error, as its text.
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
}

/// One message of a DLQ, as the runtime (or the broker) dead-lettered it.
/// Fields are `None` when neither the runtime's headers nor the broker's
/// `x-death` say.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The AMQP `message_id` (empty when it has none): the id to name in
    /// [`Selection::Ids`], and the key the consumers' inboxes deduplicate on.
    pub message_id: String,
    /// The AMQP `type` (e.g. a protobuf full name); empty when it has none.
    pub message_type: String,
    /// The AMQP `correlation_id`.
    pub correlation_id: Option<String>,
    /// The AMQP `app_id`: the application that first published it.
    pub app_id: Option<String>,
    /// The AMQP `content_type`.
    pub content_type: Option<String>,
    /// Event time, seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// Why it was dead-lettered (`x-death-reason`, or the broker's `x-death`
    /// reason prefixed with `broker: `, e.g. `broker: delivery_limit`).
    pub reason: Option<String>,
    /// The class the runtime recorded (`x-death-class`);
    /// [`DeathClass::Exhausted`] for a message the broker dead-lettered at its
    /// delivery limit.
    pub class: Option<DeathClass>,
    /// Handler runs before it was dead-lettered (`None` when the broker
    /// dead-lettered it).
    pub attempts: Option<u32>,
    /// When it was dead-lettered (`x-dead-lettered-at`, else the time of the
    /// broker's `x-death`, to the second): the order redrive follows.
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// The exchange it was first published to.
    pub original_exchange: Option<String>,
    /// The routing key it was first published with.
    pub original_routing_key: Option<String>,
    /// Times it was redriven before.
    pub redrives: u32,
    /// The body, as published.
    pub payload: Vec<u8>,
    /// Every header it carries, the runtime's and the broker's included.
    pub headers: FieldTable,
    delivery_tag: u64,
}

impl DeadLetter {
    fn from_delivery(delivery: &Delivery) -> Self {
        let properties = &delivery.properties;
        let text =
            |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
        let headers = properties.headers().clone().unwrap_or_default();
        let death = BrokerDeath::of(&headers);
        Self {
            message_id: text(properties.message_id()).unwrap_or_default(),
            message_type: text(properties.kind()).unwrap_or_default(),
            correlation_id: text(properties.correlation_id()),
            app_id: text(properties.app_id()),
            content_type: text(properties.content_type()),
            timestamp: *properties.timestamp(),
            reason: header_str(&headers, headers::DEATH_REASON)
                .or_else(|| death.reason.as_ref().map(|r| format!("broker: {r}"))),
            class: header_str(&headers, headers::DEATH_CLASS)
                .and_then(|c| DeathClass::parse(&c))
                .or_else(|| {
                    (death.reason.as_deref() == Some("delivery_limit"))
                        .then_some(DeathClass::Exhausted)
                }),
            // Not the DLQ's own x-delivery-count: reading the DLQ raises it.
            attempts: header_u32(&headers, headers::ATTEMPTS),
            dead_lettered_at: header_str(&headers, headers::DEAD_LETTERED_AT)
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc))
                .or(death.time),
            original_exchange: header_str(&headers, headers::ORIGINAL_EXCHANGE).or(death.exchange),
            original_routing_key: header_str(&headers, headers::ORIGINAL_ROUTING_KEY)
                .or(death.routing_key),
            redrives: header_u32(&headers, headers::REDRIVE_COUNT).unwrap_or(0),
            payload: delivery.data.clone(),
            headers,
            delivery_tag: delivery.delivery_tag,
        }
    }

    /// The body size in bytes.
    pub fn size(&self) -> usize {
        self.payload.len()
    }

    /// The copy that goes back to `queue`: the same envelope and trace context,
    /// the death and retry headers removed, the redrive counted.
    fn redrive_copy(&self, queue: &str) -> OutgoingMessage {
        let mut headers = FieldTable::default();
        for (key, value) in self.headers.inner() {
            if !DEATH_HEADERS.contains(&key.as_str()) {
                headers.insert(key.clone(), value.clone());
            }
        }
        for (key, value) in [
            (headers::ORIGINAL_EXCHANGE, &self.original_exchange),
            (headers::ORIGINAL_ROUTING_KEY, &self.original_routing_key),
        ] {
            if let Some(value) = value {
                headers.insert(
                    key.into(),
                    AMQPValue::LongString(LongString::from(value.as_str())),
                );
            }
        }
        headers.insert(
            headers::REDRIVE_COUNT.into(),
            AMQPValue::LongLongInt(i64::from(self.redrives) + 1),
        );
        let mut copy =
            OutgoingMessage::new("", queue, self.message_type.as_str(), self.payload.clone());
        copy.message_id.clone_from(&self.message_id);
        copy.content_type = self.content_type.clone().unwrap_or_default();
        copy.correlation_id.clone_from(&self.correlation_id);
        copy.app_id.clone_from(&self.app_id);
        copy.timestamp = self.timestamp;
        copy.parent = Some(propagation::extract(Some(&self.headers)));
        copy.headers = headers;
        copy
    }
}

/// The first entry of the broker's own `x-death` header (dead-lettered by
/// RabbitMQ, e.g. at the source queue's delivery limit).
#[derive(Default)]
struct BrokerDeath {
    reason: Option<String>,
    time: Option<DateTime<Utc>>,
    exchange: Option<String>,
    routing_key: Option<String>,
}

impl BrokerDeath {
    fn of(headers: &FieldTable) -> Self {
        let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
            return Self::default();
        };
        let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() else {
            return Self::default();
        };
        Self {
            reason: header_str(first, "reason"),
            time: match first.inner().get("time") {
                Some(AMQPValue::Timestamp(secs)) => {
                    DateTime::from_timestamp(i64::try_from(*secs).unwrap_or(0), 0)
                }
                _ => None,
            },
            exchange: header_str(first, "exchange"),
            routing_key: match first.inner().get("routing-keys") {
                Some(AMQPValue::FieldArray(keys)) => match keys.as_slice().first() {
                    Some(AMQPValue::LongString(k)) => {
                        Some(String::from_utf8_lossy(k.as_bytes()).into_owned())
                    }
                    _ => None,
                },
                _ => None,
            },
        }
    }
}

/// Which dead letters an operation applies to.
#[derive(Clone, Debug)]
pub enum Selection {
    /// Every dead letter read.
    All,
    /// These message ids (every copy of each); an id not in the DLQ fails the
    /// operation before anything moves.
    Ids(Vec<String>),
    /// Those whose reason contains this text.
    ReasonContains(String),
}

impl Selection {
    /// Whether `letter` is selected (a letter without a reason matches no
    /// [`Selection::ReasonContains`]).
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        match self {
            Self::All => true,
            Self::Ids(ids) => ids.contains(&letter.message_id),
            Self::ReasonContains(text) => letter
                .reason
                .as_deref()
                .is_some_and(|r| r.contains(text.as_str())),
        }
    }
}

/// What a list found.
#[derive(Debug)]
pub struct Listing {
    /// In dead-lettering order.
    pub letters: Vec<DeadLetter>,
    /// Messages left in the DLQ beyond the limit of one read.
    pub not_read: u32,
}

/// What a redrive (or a purge) did.
#[derive(Debug, Default)]
pub struct Moved {
    /// The message ids moved, in the order they moved.
    pub moved: Vec<String>,
    /// Selected messages left in the DLQ because the operation stopped.
    pub left: usize,
    /// Messages read and not selected (left in the DLQ).
    pub not_selected: usize,
    /// Messages left in the DLQ beyond the limit of one read.
    pub not_read: u32,
    /// Why the operation stopped before moving every selected message.
    pub interrupted: Option<String>,
}

/// Progress of a long operation: (done, total).
pub type Progress<'a> = &'a mut (dyn FnMut(usize, usize) + Send);

/// A connection for reading and moving dead letters: the library behind an
/// operator's tool. Every operation names the consumer queue `Q` and works on
/// `Q.dlq`; every broker call is bounded (10 s), so a tool never hangs.
#[derive(Debug)]
pub struct DeadLetters {
    broker: Broker,
    publisher: Publisher,
}

mod channel;
mod depth;
mod operations;

pub use depth::{DepthProbe, watch_depth};
