//! Declarative broker topology: exchanges, exchange-to-exchange bindings and
//! consumer queues with their dead-letter queue and delayed-retry queues.
//!
//! For a consumer queue `Q` bound to the dead-letter exchange `DLX` this declares:
//!
//! ```text
//!   Q              quorum, x-delivery-limit, dead-letters to DLX with key Q
//!   Q.dlq          quorum, bound to DLX with key Q (every dead letter: poison,
//!                  rejected and exhausted, and the broker's at the delivery limit),
//!                  x-delivery-limit far out of reach (reading it returns messages)
//!   Q.retry.<n>ms  quorum, one per retry delay of n milliseconds, x-message-ttl = n,
//!                  dead-letters back into Q through the default exchange when the
//!                  delay expires
//! ```
//!
//! Every queue uses at-least-once dead-lettering (`x-dead-letter-strategy` with
//! `x-overflow=reject-publish`), so a message moving between them is never dropped.
//! Declaring is idempotent: every replica declares the same arguments at startup and
//! after each reconnect, which RabbitMQ 3.10+ and 4.x accept as no-ops.
//!
//! One job per file: `spec` (what a topology is made of, and the names of its
//! queues), `declare` (declaring it on the broker), `delete` (tearing a scratch
//! topology down).

mod declare;
mod delete;
mod spec;

pub use declare::DLQ_DELIVERY_LIMIT;
pub use spec::{ExchangeBinding, ExchangeSpec, ExchangeType, QueueSpec, RetryPolicy, Topology};
