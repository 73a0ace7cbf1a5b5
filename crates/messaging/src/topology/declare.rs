//! Declaring a topology on the broker: exchanges and their bindings first, then
//! each queue with its DLQ and retry queues (quorum, at-least-once
//! dead-lettering), idempotently.

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use super::{ExchangeType, QueueSpec, Topology};

/// The delivery limit of every DLQ. Reading a DLQ (`dead_letters`) takes its
/// messages and returns them, and a quorum queue counts each return as a
/// delivery: RabbitMQ 3.x always, 4.0-4.2 against a default limit of 20 that
/// would drop a dead letter looked at 20 times. Explicit and far out of reach,
/// so looking never loses one.
pub const DLQ_DELIVERY_LIMIT: i64 = 1_000_000;

impl QueueSpec {
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
