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
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("no queue '{0}' on the broker")]
    UnknownQueue(String),
    #[error("queue '{queue}' has no dead-letter queue '{dlq}'")]
    NoDeadLetterQueue { queue: String, dlq: String },
    #[error("not in {dlq}: {}", ids.join(", "))]
    UnknownIds { dlq: String, ids: Vec<String> },
    #[error("RabbitMQ did not answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "{dlq} holds more than {limit} messages ({not_read} more): its oldest cannot be told from the rest, so nothing was moved; read at least {} at once",
        limit + *not_read as usize
    )]
    TooMany {
        dlq: String,
        limit: usize,
        not_read: u32,
    },
    #[error(
        "no message of {dlq} arrived within {timeout:?}: one the client cannot parse (e.g. a message id or header name that is not UTF-8) may be at its head; remove it with the RabbitMQ UI or `rabbitmqctl purge_queue`"
    )]
    Unreadable { dlq: String, timeout: Duration },
    #[error("RabbitMQ: {0}")]
    Broker(String),
}

impl From<lapin::Error> for DeadLetterError {
    fn from(error: lapin::Error) -> Self {
        Self::Broker(error.to_string())
    }
}

/// One message of a DLQ, as the runtime (or the broker) dead-lettered it.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub message_id: String,
    /// The AMQP `type` (e.g. a protobuf full name).
    pub message_type: String,
    pub correlation_id: Option<String>,
    pub app_id: Option<String>,
    pub content_type: Option<String>,
    /// Event time, seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// Why it was dead-lettered (`x-death-reason`, or the broker's `x-death`).
    pub reason: Option<String>,
    pub class: Option<DeathClass>,
    /// Handler runs before it was dead-lettered.
    pub attempts: Option<u32>,
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// Where it was first published.
    pub original_exchange: Option<String>,
    pub original_routing_key: Option<String>,
    /// Times it was redriven before.
    pub redrives: u32,
    pub payload: Vec<u8>,
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
    All,
    /// These message ids (every copy of each); an id not in the DLQ fails the
    /// operation before anything moves.
    Ids(Vec<String>),
    /// Those whose reason contains this text.
    ReasonContains(String),
}

impl Selection {
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

/// A connection for reading and moving dead letters.
#[derive(Debug)]
pub struct DeadLetters {
    broker: Broker,
    publisher: Publisher,
}

impl DeadLetters {
    /// Connects (no topology is declared: an operator tool changes none).
    pub async fn connect(settings: AmqpSettings, app_id: &str) -> Result<Self, DeadLetterError> {
        let broker = Broker::connect(settings, Topology::default()).await?;
        let publisher = Publisher::new(broker.clone(), app_id);
        Ok(Self { broker, publisher })
    }

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

    /// Reads up to `limit` dead letters of `queue` and leaves them all in place.
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
            crate::faults::crash_point(crate::faults::points::REDRIVE_AFTER_CONFIRM);
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

    /// Deletes the selected dead letters of `queue`.
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

async fn bounded<T>(
    operation: impl Future<Output = lapin::Result<T>>,
) -> Result<T, DeadLetterError> {
    match tokio::time::timeout(OP_TIMEOUT, operation).await {
        Ok(result) => result.map_err(DeadLetterError::from),
        Err(_) => Err(DeadLetterError::Timeout(OP_TIMEOUT)),
    }
}

async fn declare_passive(channel: &Channel, queue: &str) -> Result<u32, DeadLetterError> {
    let options = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match tokio::time::timeout(
        OP_TIMEOUT,
        channel.queue_declare(queue.into(), options, FieldTable::default()),
    )
    .await
    {
        Ok(Ok(queue)) => Ok(queue.message_count()),
        Ok(Err(e)) if lapin_not_found(&e) => Err(DeadLetterError::UnknownQueue(queue.to_owned())),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(DeadLetterError::Timeout(OP_TIMEOUT)),
    }
}

fn lapin_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

fn is_not_found(error: &DeadLetterError) -> bool {
    matches!(error, DeadLetterError::UnknownQueue(_))
}

fn missing_dlq(error: DeadLetterError, queue: &str) -> DeadLetterError {
    if is_not_found(&error) {
        DeadLetterError::NoDeadLetterQueue {
            queue: queue.to_owned(),
            dlq: dlq_name(queue),
        }
    } else {
        error
    }
}

async fn ack(channel: &Channel, delivery_tag: u64) -> Result<(), DeadLetterError> {
    bounded(channel.basic_ack(delivery_tag, BasicAckOptions::default())).await
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

/// Closes a channel, which hands its unacknowledged messages back to their
/// queue; bounded, and a channel already gone has handed them back already.
async fn close(channel: &Channel) {
    if channel.status().connected() {
        let _ = tokio::time::timeout(OP_TIMEOUT, channel.close(200, "done".into())).await;
    }
}

/// The depth of one DLQ, read every `every` on `broker`'s connection; -1 until
/// first read and while it cannot be read (for metrics).
#[derive(Clone, Debug)]
pub struct DepthProbe {
    pub queue: String,
    depth: Arc<AtomicI64>,
}

impl DepthProbe {
    pub fn depth(&self) -> Option<u64> {
        u64::try_from(self.depth.load(Ordering::Relaxed)).ok()
    }
}

/// Watches the depth of the DLQ of `queue` until `shutdown`.
pub fn watch_depth(
    broker: Broker,
    queue: &str,
    every: Duration,
    shutdown: CancellationToken,
) -> (DepthProbe, tokio::task::JoinHandle<()>) {
    let probe = DepthProbe {
        queue: queue.to_owned(),
        depth: Arc::new(AtomicI64::new(-1)),
    };
    let dlq = dlq_name(queue);
    let depth = probe.depth.clone();
    let task = tokio::spawn(async move {
        let mut channel: Option<Channel> = None;
        loop {
            let link = broker.current();
            if channel.as_ref().is_none_or(|c| !c.status().connected())
                && let Some(connection) = link.connection.filter(|c| c.status().connected())
            {
                channel = bounded(connection.create_channel()).await.ok();
            }
            let read = match &channel {
                Some(c) => declare_passive(c, &dlq).await.ok(),
                None => None,
            };
            depth.store(read.map_or(-1, i64::from), Ordering::Relaxed);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
        }
        if let Some(c) = channel {
            close(&c).await;
        }
    });
    (probe, task)
}
