//! Messaging over RabbitMQ, generic and free of any shop knowledge.
//!
//! ```text
//!  settings ─▶ Broker (one supervised connection, topology re-declared on reconnect)
//!                ├─▶ Publisher   confirmed, mandatory, batched publishing
//!                └─▶ consumer    Handler → Outcome; retries, DLQ, re-subscribe
//!  dead_letters: list, redrive (back to the queue, in order) and purge a DLQ
//!  propagation: W3C trace context in AMQP headers, producer/consumer spans
//!
//!  Postgres half:
//!  outbox::enqueue(tx, event) ─▶ outbox row (+ trace context, NOTIFY on commit)
//!  relay    claims rows (SKIP LOCKED), publishes with confirms, marks confirmed rows
//!  parked   the rows the relay gave up on: list, retry, discard (operator)
//!  Inbox::process(id, work)   dedup record + handler work in one transaction
//!  InboxConsumer              a Handler from decode + apply (+ after); batches in one transaction
//!  migrations                 embedded, own history table
//! ```

#![warn(missing_docs)]

pub mod availability;
mod backoff;
#[macro_use]
mod crash;
mod connection;
pub mod consumer;
pub mod dead_letters;
#[cfg(feature = "testing")]
pub mod faults;
mod heartbeat;
mod histogram;
pub mod inbox;
mod inbox_consumer;
pub mod migrations;
pub mod outbox;
pub mod parked;
pub mod propagation;
mod publisher;
mod relay;
mod runtime;
mod settings;
pub mod topology;

pub use backoff::Backoff;
pub use connection::{Broker, ConnectError};
pub use consumer::{
    ConsumerHandle, ConsumerOptions, ConsumerProbe, ConsumerStats, DeathClass, Handler,
    IncomingMessage, Outcome, spawn_consumer,
};
pub use dead_letters::{DeadLetter, DeadLetterError, DeadLetters, Selection};
pub use heartbeat::{Heartbeat, WEDGED_AFTER};
pub use histogram::Histogram;
pub use inbox::{Inbox, Processed};
pub use inbox_consumer::{ApplyError, InboxConsumer, InboxHandler};
pub use outbox::{NewMessage, enqueue};
pub use publisher::{
    CONTENT_TYPE_PROTOBUF, DEFAULT_CONFIRM_TIMEOUT, OutgoingMessage, PublishError, Publisher,
};
pub use relay::{RelayHandle, RelayOptions, RelayProbe, RelayStatus, spawn_relay};
pub use runtime::{Check, Runtime, RuntimeBuilder, RuntimeProbe, StartError};
pub use settings::{AmqpSettings, InvalidUrl};
pub use topology::{ExchangeBinding, ExchangeSpec, ExchangeType, QueueSpec, RetryPolicy, Topology};

/// Re-exported: [`InboxHandler::apply`] returns one.
pub use futures_util::future::BoxFuture;
/// Re-exported so callers can build headers without depending on lapin directly.
pub use lapin::types::{AMQPValue, FieldTable};
