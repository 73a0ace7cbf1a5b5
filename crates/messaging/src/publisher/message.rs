//! What a caller hands the publisher: an [`OutgoingMessage`] and its envelope,
//! with the defaults a new message gets.

use lapin::types::FieldTable;
use opentelemetry::Context;

pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf";

/// A message to publish, with its envelope.
#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    /// The deduplication key end to end (the outbox row id).
    pub message_id: String,
    pub exchange: String,
    pub routing_key: String,
    /// Full protobuf name, e.g. `shop.events.v1.OrderPlaced`.
    pub message_type: String,
    pub payload: Vec<u8>,
    pub content_type: String,
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
