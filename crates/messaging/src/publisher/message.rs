//! What a caller hands the publisher: an [`OutgoingMessage`] and its envelope,
//! with the defaults a new message gets.

use lapin::types::FieldTable;
use opentelemetry::Context;

/// `application/x-protobuf`: the content type [`OutgoingMessage::new`] sets,
/// and so the one every outbox event goes out with.
pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf";

/// A message to publish, with its envelope.
#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    /// The deduplication key end to end (the outbox row id).
    pub message_id: String,
    /// The exchange to publish to; `""` is the default exchange, which routes
    /// to the queue named by the routing key.
    pub exchange: String,
    /// The routing key; a queue must be bound for it, or the publish fails
    /// with [`PublishError::Unroutable`](crate::PublishError::Unroutable).
    pub routing_key: String,
    /// The AMQP `type` consumers dispatch on (e.g. a protobuf full name).
    pub message_type: String,
    /// The body.
    pub payload: Vec<u8>,
    /// The AMQP `content_type` (default [`CONTENT_TYPE_PROTOBUF`]).
    pub content_type: String,
    /// The AMQP `correlation_id`, if any.
    pub correlation_id: Option<String>,
    /// The producing application; `None` names the publisher's own.
    pub app_id: Option<String>,
    /// Event time, seconds since the Unix epoch (AMQP timestamps are seconds).
    pub timestamp: Option<u64>,
    /// Extra headers; trace headers are added by the publisher.
    pub headers: FieldTable,
    /// The trace context the producer span continues; `None` continues the current
    /// span (the outbox relay passes the context stored with the row).
    pub parent: Option<Context>,
}

impl OutgoingMessage {
    /// A message with a fresh UUIDv7 `message_id`, content type
    /// [`CONTENT_TYPE_PROTOBUF`] and the current time as timestamp; no
    /// correlation id, `app_id`, extra headers or explicit trace parent.
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        message_type: impl Into<String>,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            message_id: uuid::Uuid::now_v7().to_string(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            message_type: message_type.into(),
            payload,
            content_type: CONTENT_TYPE_PROTOBUF.to_owned(),
            correlation_id: None,
            app_id: None,
            timestamp: Some(unix_now()),
            headers: FieldTable::default(),
            parent: None,
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
