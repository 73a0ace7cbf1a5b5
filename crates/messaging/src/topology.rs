//! Declarative broker topology: exchanges, exchange-to-exchange bindings and
//! consumer queues with their dead-letter queue and delayed-retry queues.
//!
//! For a consumer queue `Q` bound to the dead-letter exchange `DLX` this declares:
//!
//! ```text
//!   Q              quorum, x-delivery-limit, dead-letters to DLX with key Q
//!   Q.dlq          quorum, bound to DLX with key Q (poison and exhausted messages),
//!                  x-delivery-limit far out of reach (reading it returns messages)
//!   Q.retry.<ms>   quorum, one per retry delay, x-message-ttl = delay, dead-letters
//!                  back into Q through the default exchange when the delay expires
//! ```
//!
//! Every queue uses at-least-once dead-lettering (`x-dead-letter-strategy` with
//! `x-overflow=reject-publish`), so a message moving between them is never dropped.
//! Declaring is idempotent: every replica declares the same arguments at startup and
//! after each reconnect, which RabbitMQ 3.10+ and 4.x accept as no-ops.

use std::time::Duration;

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{
        ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

/// The delivery limit of every DLQ. Reading a DLQ (`dead_letters`) takes its
/// messages and returns them, and a quorum queue counts each return as a
/// delivery: RabbitMQ 3.x always, 4.0-4.2 against a default limit of 20 that
/// would drop a dead letter looked at 20 times. Explicit and far out of reach,
/// so looking never loses one.
pub const DLQ_DELIVERY_LIMIT: i64 = 1_000_000;

/// Everything one process declares.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    pub exchanges: Vec<ExchangeSpec>,
    pub exchange_bindings: Vec<ExchangeBinding>,
    pub queues: Vec<QueueSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExchangeType {
    Topic,
    Fanout,
    Direct,
}

#[derive(Clone, Debug)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: ExchangeType,
}

/// `source` forwards to `destination` the messages matching `routing_key`.
#[derive(Clone, Debug)]
pub struct ExchangeBinding {
    pub source: String,
    pub destination: String,
    pub routing_key: String,
}

/// A consumer queue with its bindings, dead-letter target and retry policy.
#[derive(Clone, Debug)]
pub struct QueueSpec {
    pub name: String,
    /// `(exchange, routing key)` pairs; a fanout exchange ignores the key.
    pub bindings: Vec<(String, String)>,
    /// Exchange receiving this queue's dead letters (routing key = queue name).
    pub dead_letter_exchange: String,
    /// Redeliveries (consumer crashes, requeues) after which the broker itself
    /// dead-letters a message; explicit because 3.x has no default and 4.x has 20.
    pub delivery_limit: u32,
    pub retry: RetryPolicy,
}

/// Transient failures are retried after `delays[attempt - 1]` (the last delay is
/// reused), until `max_attempts` handler runs have failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub delays: Vec<Duration>,
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            delays: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            max_attempts: 5,
        }
    }
}

impl RetryPolicy {
    /// The delay before handler run `attempt + 1`, after run `attempt` (1-based) failed.
    pub fn delay_after(&self, attempt: u32) -> Option<Duration> {
        let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        self.delays.get(index).or(self.delays.last()).copied()
    }
}

impl QueueSpec {
    pub fn new(name: impl Into<String>, dead_letter_exchange: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            bindings: Vec::new(),
            dead_letter_exchange: dead_letter_exchange.into(),
            delivery_limit: 10,
            retry: RetryPolicy::default(),
        }
    }

    #[must_use]
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.bindings.push((exchange.into(), routing_key.into()));
        self
    }

    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    #[must_use]
    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = limit;
        self
    }

    pub fn dlq_name(&self) -> String {
        crate::dead_letters::dlq_name(&self.name)
    }

    /// The retry queue that holds a message for `delay`.
    pub fn retry_queue_name(&self, delay: Duration) -> String {
        format!("{}.retry.{}ms", self.name, delay.as_millis())
    }

    /// Every queue [`declare`](Self::declare) creates: the queue, its DLQ and its
    /// retry queues.
    pub fn queue_names(&self) -> Vec<String> {
        let mut delays = self.retry.delays.clone();
        delays.sort();
        delays.dedup();
        [self.name.clone(), self.dlq_name()]
            .into_iter()
            .chain(delays.into_iter().map(|d| self.retry_queue_name(d)))
            .collect()
    }

    /// Declares the queue, its DLQ, its retry queues and bindings, on a channel
    /// of its own. The exchanges it binds to must exist.
    pub async fn declare(&self, connection: &Connection) -> lapin::Result<()> {
        let channel = self.declare_dlq(connection).await?;
        let result = self.declare_rest(&channel).await;
        if channel.status().connected() {
            let _ = channel.close(200, "queue declared".into()).await;
        }
        result
    }

    /// Declares the DLQ and returns the open channel. A DLQ made before DLQs had
    /// a delivery limit refuses the new arguments (406 inequivalent arg); it is
    /// kept as it is, with a warning, so that an upgrade never stops a service.
    async fn declare_dlq(&self, connection: &Connection) -> lapin::Result<Channel> {
        let dlq = self.dlq_name();
        let mut dlq_args = quorum_args();
        dlq_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DLQ_DELIVERY_LIMIT),
        );
        let channel = connection.create_channel().await?;
        match declare_quorum(&channel, &dlq, dlq_args).await {
            Ok(()) => Ok(channel),
            Err(error) if without_delivery_limit(&error) => {
                tracing::warn!(
                    queue = %dlq,
                    "the DLQ was declared without x-delivery-limit: on RabbitMQ 4.0-4.2 a dead letter read 20 times is dropped; give it a delivery-limit policy or recreate it"
                );
                let channel = connection.create_channel().await?;
                channel
                    .queue_declare(
                        dlq.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                Ok(channel)
            }
            Err(error) => Err(error),
        }
    }

    async fn declare_rest(&self, channel: &Channel) -> lapin::Result<()> {
        let dlq = self.dlq_name();
        channel
            .queue_bind(
                dlq.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                self.name.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let mut args = quorum_args();
        insert_str(
            &mut args,
            "x-dead-letter-exchange",
            &self.dead_letter_exchange,
        );
        insert_str(&mut args, "x-dead-letter-routing-key", &self.name);
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        declare_quorum(channel, &self.name, args).await?;

        let mut delays = self.retry.delays.clone();
        delays.sort();
        delays.dedup();
        for delay in delays {
            let mut args = quorum_args();
            // The default exchange routes by queue name: expiry sends it home.
            insert_str(&mut args, "x-dead-letter-exchange", "");
            insert_str(&mut args, "x-dead-letter-routing-key", &self.name);
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            declare_quorum(channel, &self.retry_queue_name(delay), args).await?;
        }

        for (exchange, key) in &self.bindings {
            channel
                .queue_bind(
                    self.name.as_str().into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}

impl Topology {
    /// One topic exchange, its dead-letter exchange and one queue: the smallest
    /// topology the consumer runtime works on (tests and benchmarks).
    pub fn single_queue(exchange: &str, dead_letter_exchange: &str, queue: QueueSpec) -> Self {
        Self {
            exchanges: vec![
                ExchangeSpec {
                    name: exchange.to_owned(),
                    kind: ExchangeType::Topic,
                },
                ExchangeSpec {
                    name: dead_letter_exchange.to_owned(),
                    kind: ExchangeType::Direct,
                },
            ],
            exchange_bindings: vec![],
            queues: vec![queue],
        }
    }

    /// Deletes every queue and exchange [`declare`](Self::declare) creates, with
    /// their messages: the teardown of a scratch topology.
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        for queue in &self.queues {
            for name in queue.queue_names() {
                channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await?;
            }
        }
        for exchange in &self.exchanges {
            channel
                .exchange_delete(
                    exchange.name.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// Declares everything, exchanges first. Safe to run concurrently from replicas.
    pub async fn declare(&self, connection: &Connection) -> lapin::Result<()> {
        let channel = connection.create_channel().await?;
        let declared = self.declare_exchanges(&channel).await;
        let _ = channel.close(200, "exchanges declared".into()).await;
        declared?;
        for queue in &self.queues {
            queue.declare(connection).await?;
        }
        Ok(())
    }

    async fn declare_exchanges(&self, channel: &Channel) -> lapin::Result<()> {
        for exchange in &self.exchanges {
            let kind = match exchange.kind {
                ExchangeType::Topic => ExchangeKind::Topic,
                ExchangeType::Fanout => ExchangeKind::Fanout,
                ExchangeType::Direct => ExchangeKind::Direct,
            };
            channel
                .exchange_declare(
                    exchange.name.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
        }
        for binding in &self.exchange_bindings {
            channel
                .exchange_bind(
                    binding.destination.as_str().into(),
                    binding.source.as_str().into(),
                    binding.routing_key.as_str().into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}

/// The channel error of declaring a DLQ that exists without the delivery limit.
fn without_delivery_limit(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if amqp.get_id() == 406 && amqp.get_message().as_str().contains("'x-delivery-limit'"))
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    insert_str(&mut args, "x-queue-type", "quorum");
    insert_str(&mut args, "x-dead-letter-strategy", "at-least-once");
    insert_str(&mut args, "x-overflow", "reject-publish");
    args
}

fn insert_str(args: &mut FieldTable, key: &str, value: &str) {
    args.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value)),
    );
}

async fn declare_quorum(channel: &Channel, name: &str, args: FieldTable) -> lapin::Result<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_then_repeats_the_last() {
        let policy = RetryPolicy {
            delays: vec![Duration::from_millis(10), Duration::from_millis(50)],
            max_attempts: 5,
        };
        assert_eq!(policy.delay_after(1), Some(Duration::from_millis(10)));
        assert_eq!(policy.delay_after(2), Some(Duration::from_millis(50)));
        assert_eq!(policy.delay_after(4), Some(Duration::from_millis(50)));
    }

    #[test]
    fn names_derive_from_the_queue() {
        let q = QueueSpec::new("inventory.order-events", "shop.dlx");
        assert_eq!(q.dlq_name(), "inventory.order-events.dlq");
        assert_eq!(
            q.retry_queue_name(Duration::from_secs(5)),
            "inventory.order-events.retry.5000ms"
        );
    }
}
