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

/// The argument fixing how many nodes hold a quorum queue's replicas when it is
/// created.
const GROUP_SIZE_ARG: &str = "x-quorum-initial-group-size";
const DELIVERY_LIMIT_ARG: &str = "x-delivery-limit";

impl QueueSpec {
    /// Declares the queue, its DLQ, its retry queues and bindings, on a channel
    /// of its own. The exchanges it binds to must exist.
    ///
    /// A queue that exists with arguments fixed at creation that differ from
    /// these (a DLQ made before DLQs had a delivery limit, a queue made with
    /// another initial group size or none) is kept as it is, with a warning,
    /// so that an upgrade or a move to a cluster never stops a service.
    pub async fn declare(&self, connection: &Connection) -> lapin::Result<()> {
        let mut channel = connection.create_channel().await?;
        let result = self.declare_on(connection, &mut channel).await;
        if channel.status().connected() {
            let _ = channel.close(200, "queue declared".into()).await;
        }
        result
    }

    async fn declare_on(
        &self,
        connection: &Connection,
        channel: &mut Channel,
    ) -> lapin::Result<()> {
        let dlq = self.dlq_name();
        let mut dlq_args = self.quorum_args();
        dlq_args.insert(
            DELIVERY_LIMIT_ARG.into(),
            AMQPValue::LongLongInt(DLQ_DELIVERY_LIMIT),
        );
        declare_quorum(
            connection,
            channel,
            &dlq,
            dlq_args,
            &[DELIVERY_LIMIT_ARG, GROUP_SIZE_ARG],
        )
        .await?;
        channel
            .queue_bind(
                dlq.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                self.name.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let mut args = self.quorum_args();
        insert_str(
            &mut args,
            "x-dead-letter-exchange",
            &self.dead_letter_exchange,
        );
        insert_str(&mut args, "x-dead-letter-routing-key", &self.name);
        args.insert(
            DELIVERY_LIMIT_ARG.into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        declare_quorum(connection, channel, &self.name, args, &[GROUP_SIZE_ARG]).await?;

        let mut delays = self.retry.delays.clone();
        delays.sort();
        delays.dedup();
        for delay in delays {
            let mut args = self.quorum_args();
            // The default exchange routes by queue name: expiry sends it home.
            insert_str(&mut args, "x-dead-letter-exchange", "");
            insert_str(&mut args, "x-dead-letter-routing-key", &self.name);
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            let name = self.retry_queue_name(delay);
            declare_quorum(connection, channel, &name, args, &[GROUP_SIZE_ARG]).await?;
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

    /// The arguments every queue of this spec is declared with.
    fn quorum_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        insert_str(&mut args, "x-queue-type", "quorum");
        insert_str(&mut args, "x-dead-letter-strategy", "at-least-once");
        insert_str(&mut args, "x-overflow", "reject-publish");
        if let Some(size) = self.initial_group_size {
            args.insert(
                GROUP_SIZE_ARG.into(),
                AMQPValue::LongLongInt(i64::from(size.get())),
            );
        }
        args
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

/// The argument of `tolerated` a 406 `inequivalent arg '<arg>'` names, if any.
fn inequivalent<'a>(error: &lapin::Error, tolerated: &[&'a str]) -> Option<&'a str> {
    let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else {
        return None;
    };
    if amqp.get_id() != 406 {
        return None;
    }
    let message = amqp.get_message().as_str();
    tolerated
        .iter()
        .find(|arg| message.contains(&format!("inequivalent arg '{arg}'")))
        .copied()
}

fn insert_str(args: &mut FieldTable, key: &str, value: &str) {
    args.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value)),
    );
}

/// Declares quorum queue `name` with `args` on `channel`.
///
/// A queue that exists with another value (or none) of one of the `tolerated`
/// arguments is kept as it is, with a warning: the 406 closed `channel`, so it
/// is replaced by a new one, and the queue is declared again without that
/// argument, so the other arguments are still checked (RabbitMQ reports only
/// the first difference). When the queue has a value of an argument no longer
/// sent, its existence is checked passively instead.
async fn declare_quorum(
    connection: &Connection,
    channel: &mut Channel,
    name: &str,
    mut args: FieldTable,
    tolerated: &[&str],
) -> lapin::Result<()> {
    let mut dropped: Vec<&str> = Vec::new();
    loop {
        let declared = channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args.clone(),
            )
            .await;
        let error = match declared {
            Ok(_) => return Ok(()),
            Err(error) => error,
        };
        let Some(arg) = inequivalent(&error, tolerated) else {
            return Err(error);
        };
        warn_kept(name, arg);
        *channel = connection.create_channel().await?;
        if dropped.contains(&arg) {
            // It has a value we no longer send: keep it (the arguments RabbitMQ
            // compares after this one go unchecked).
            return channel
                .queue_declare(
                    name.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|_| ());
        }
        dropped.push(arg);
        let mut map = args.inner().clone();
        map.remove(arg);
        args = FieldTable::from(map);
    }
}

fn warn_kept(queue: &str, arg: &str) {
    if arg == DELIVERY_LIMIT_ARG {
        tracing::warn!(
            %queue,
            "the DLQ was declared without x-delivery-limit: on RabbitMQ 4.0-4.2 a dead letter read 20 times is dropped; give it a delivery-limit policy or recreate it"
        );
    } else {
        tracing::warn!(
            %queue,
            "the queue exists with another initial group size (fixed when it was created); it is kept as it is: change its replicas with `rabbitmq-queues grow` or `shrink`"
        );
    }
}
