//! The producer span each published message gets (OpenTelemetry messaging
//! semantic conventions); the send path parents it and records its errors.

use tracing::field::Empty;

use super::OutgoingMessage;

pub(super) fn producer_span(message: &OutgoingMessage) -> tracing::Span {
    tracing::info_span!(
        "publish",
        otel.name = %format!("publish {}", message.exchange),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %message.exchange,
        messaging.rabbitmq.destination.routing_key = %message.routing_key,
        messaging.message.id = %message.message_id,
        messaging.message.conversation_id = message.correlation_id.as_deref(),
        messaging.message.body.size = message.payload.len(),
        message.type = %message.message_type,
        error.type = Empty,
    )
}
