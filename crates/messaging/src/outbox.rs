//! Writing to the transactional outbox: the event is a row in the caller's own
//! transaction, so it exists exactly when the state change it announces commits.
//! The row carries the trace context current at write time; the relay continues
//! that trace when it publishes. A `NOTIFY` in the same transaction wakes the
//! relay on commit (Postgres delivers notifications only for committed work).

use std::collections::HashMap;

use sqlx::PgConnection;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::propagation;

/// The `LISTEN`/`NOTIFY` channel the relay wakes on.
pub const NOTIFY_CHANNEL: &str = "messaging_outbox";

/// An event to publish once the surrounding transaction commits.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub exchange: String,
    pub routing_key: String,
    /// Full protobuf name, e.g. `shop.events.v1.OrderPlaced`.
    pub message_type: String,
    pub payload: Vec<u8>,
    pub correlation_id: Option<String>,
    /// Extra string headers, published as AMQP headers.
    pub headers: HashMap<String, String>,
}

impl NewMessage {
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        message_type: impl Into<String>,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            message_type: message_type.into(),
            payload,
            correlation_id: None,
            headers: HashMap::new(),
        }
    }

    #[must_use]
    pub fn correlated(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
}

/// Stores `message` in the caller's transaction and returns its message id.
/// Nothing is published if the transaction rolls back.
#[tracing::instrument(skip_all, fields(messaging.destination.name = %message.exchange, messaging.rabbitmq.destination.routing_key = %message.routing_key))]
pub async fn enqueue(tx: &mut PgConnection, message: NewMessage) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    propagation::tag_correlation(&tracing::Span::current(), message.correlation_id.as_deref());
    let mut headers = message.headers;
    headers.extend(propagation::inject_map(&tracing::Span::current().context()));
    // One round trip: insert, and queue the wake-up that fires on commit.
    sqlx::query(
        "WITH row AS (
             INSERT INTO outbox (id, exchange, routing_key, type, payload, headers, correlation_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             RETURNING id
         )
         SELECT pg_notify('messaging_outbox', '') FROM row",
    )
    .bind(id)
    .bind(&message.exchange)
    .bind(&message.routing_key)
    .bind(&message.message_type)
    .bind(&message.payload)
    .bind(sqlx::types::Json(&headers))
    .bind(&message.correlation_id)
    .execute(tx)
    .await?;
    Ok(id)
}
