//! What every delivery must carry, the consumer span, and header access.

use lapin::{
    message::Delivery,
    types::{AMQPValue, FieldTable, LongString},
};
use tracing::field::Empty;

use super::{Handler, IncomingMessage, Runtime, headers};
use crate::propagation;

/// Why a delivery is poison: it lacks what every message must carry, so no
/// handler is asked and it is dead-lettered at once.
#[derive(Debug, thiserror::Error)]
pub(super) enum EnvelopeError {
    #[error("missing message_id")]
    MissingMessageId,
    #[error("missing type")]
    MissingType,
    #[error("body of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

impl<H: Handler> Runtime<H> {
    /// Checks what every message must carry; a failure is permanent.
    pub(super) fn envelope(&self, delivery: &Delivery) -> Result<IncomingMessage, EnvelopeError> {
        let properties = &delivery.properties;
        let message_id = properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .filter(|s| !s.is_empty())
            .ok_or(EnvelopeError::MissingMessageId)?;
        let message_type = properties
            .kind()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .filter(|s| !s.is_empty())
            .ok_or(EnvelopeError::MissingType)?;
        if delivery.data.len() > self.options.max_body {
            return Err(EnvelopeError::TooLarge {
                size: delivery.data.len(),
                limit: self.options.max_body,
            });
        }
        let headers = properties.headers().clone().unwrap_or_default();
        let retried = header_u32(&headers, headers::RETRY_COUNT).unwrap_or(0);
        let redrives = header_u32(&headers, headers::REDRIVE_COUNT).unwrap_or(0);
        let exchange = header_str(&headers, headers::ORIGINAL_EXCHANGE)
            .unwrap_or_else(|| delivery.exchange.as_str().to_owned());
        let routing_key = header_str(&headers, headers::ORIGINAL_ROUTING_KEY)
            .unwrap_or_else(|| delivery.routing_key.as_str().to_owned());
        let mut message = IncomingMessage {
            queue: self.queue.name.clone(),
            trace_context: propagation::extract(Some(&headers)),
            message_id,
            message_type,
            exchange,
            routing_key,
            payload: delivery.data.clone(),
            headers,
            correlation_id: properties
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str().to_owned()),
            app_id: properties.app_id().as_ref().map(|s| s.as_str().to_owned()),
            timestamp: *properties.timestamp(),
            attempt: retried.saturating_add(1),
            redrives,
            redelivered: delivery.redelivered,
            span: tracing::Span::none(),
        };
        message.span = consumer_span(&message);
        propagation::set_parent(&message.span, message.trace_context.clone());
        propagation::tag_correlation(&message.span, message.correlation_id.as_deref());
        Ok(message)
    }
}

pub(super) fn consumer_span(message: &IncomingMessage) -> tracing::Span {
    tracing::info_span!(
        "process",
        otel.name = %format!("process {}", message.queue),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %message.exchange,
        messaging.destination.subscription.name = %message.queue,
        messaging.rabbitmq.destination.routing_key = %message.routing_key,
        messaging.message.id = %message.message_id,
        messaging.message.conversation_id = message.correlation_id.as_deref(),
        messaging.message.body.size = message.payload.len(),
        message.type = %message.message_type,
        message.attempt = message.attempt,
        message.outcome = Empty,
    )
}

pub(super) fn set_header(headers: &mut FieldTable, key: &str, value: AMQPValue) {
    headers.insert(key.into(), value);
}

pub(super) fn set_str(headers: &mut FieldTable, key: &str, value: &str) {
    // Bound what a reason can add to a message.
    let value: String = value.chars().take(1024).collect();
    headers.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
}

/// A string header, however the producer encoded it.
pub fn header_str(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A non-negative integer header, however the producer encoded it.
pub fn header_u32(headers: &FieldTable, key: &str) -> Option<u32> {
    let value: i64 = match headers.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        _ => return None,
    };
    u32::try_from(value).ok()
}
