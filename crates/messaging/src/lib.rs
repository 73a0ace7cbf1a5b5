//! Reliable messaging between services over RabbitMQ and PostgreSQL, generic
//! and free of any business knowledge.
//!
//! # What it gives you
//!
//! - **A transactional outbox and its relay.** [`enqueue`] writes an event as a
//!   row in *your* transaction, so it exists exactly when the change it
//!   announces commits. The relay publishes committed rows with publisher
//!   confirms and marks them published only once the broker has them.
//! - **Idempotent inbox consumers.** An [`InboxHandler`] applies each message
//!   in a transaction that also records its id, so a message delivered twice
//!   changes your tables once.
//! - **Retries with delay queues, and DLQs.** A handler answers an [`Outcome`]:
//!   transient failures wait in per-delay retry queues and come back; permanent
//!   or exhausted ones go to the queue's dead-letter queue. A [`Topology`]
//!   declares all of them.
//! - **Dead-letter operations.** [`DeadLetters`] lists, redrives (in
//!   dead-lettering order) and purges a DLQ; [`parked`] lists, retries and
//!   discards outbox rows the broker kept refusing (or that cannot be read).
//! - **Trace propagation.** The W3C trace context travels from the writing
//!   transaction through the outbox row and the message into the consumer's
//!   span ([`propagation`]).
//! - **Separate publish and consume connections**, each supervised and rebuilt
//!   after a loss, so a broker alarm that blocks publishing never blocks acks.
//!
//! [`Runtime`] wires it all: one builder call starts it, [`Runtime::join`]
//! stops it in order.
//!
//! # The parts
//!
//! ```text
//!  Runtime::builder(pool, amqp) … .start(shutdown) ─▶ Runtime: probe(), join()
//!    migrations                 the outbox and inbox tables, own history table
//!    AmqpSettings ─▶ Broker ×2  "publish" and "consume": one supervised connection
//!                               each, topology re-declared on every reconnect
//!    "publish" ─▶ Publisher     confirmed, mandatory, batched publishing
//!    "consume" ─▶ consumer      Handler → Outcome; retries, DLQ, pause, re-subscribe
//!                               (its retry and DLQ copies go out on the Publisher)
//!    relay                      claims outbox rows (SKIP LOCKED), publishes them
//!                               with confirms, marks the confirmed rows
//!    inbox cleanup, DLQ depths  retention and metrics
//!
//!  In your code:
//!  enqueue(tx, NewMessage)    outbox row (+ trace context, NOTIFY on commit)
//!  InboxHandler               decode + apply (+ after); InboxConsumer makes it a Handler
//!  Inbox::process(id, work)   dedup record + handler work in one transaction;
//!                             deliveries ready together share one (process_batch)
//!
//!  For operators and tools:
//!  dead_letters   list, redrive (back to the queue, in order) and purge a DLQ
//!  parked         the rows the relay gave up on: list, retry, discard
//!
//!  Throughout:
//!  propagation    W3C trace context in AMQP headers, producer/consumer spans
//! ```
//!
//! # A walk through the example
//!
//! `crates/messaging/examples/greetings/main.rs` is a complete service in
//! about 130 lines; read it next to this.
//!
//! **Write.** `POST /greetings` stores a row and its event in one
//! transaction; both commit or neither does:
//!
//! ```no_run
//! # async fn greet(pool: sqlx::PgPool, name: String) -> Result<(), sqlx::Error> {
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO greetings (name) VALUES ($1)")
//!     .bind(&name)
//!     .execute(&mut *tx)
//!     .await?;
//! let event = messaging::NewMessage::new(
//!     "greetings",         // exchange
//!     "greeting.created",  // routing key
//!     "example.Greeting",  // AMQP type, what consumers dispatch on
//!     name.into_bytes(),
//! );
//! messaging::enqueue(&mut tx, event).await?;
//! tx.commit().await?; // the NOTIFY in it wakes the relay
//! # Ok(())
//! # }
//! ```
//!
//! **Consume.** `Audit` implements [`InboxHandler`]: `decode` turns the body
//! into an event (an `Err` dead-letters the message as rejected), and `apply`
//! writes the `audit` row inside the inbox transaction, so it runs once per
//! message id however often the message is delivered. `after` (not used
//! there) runs after the commit, for work outside the database.
//!
//! **Run.** The runtime migrates the messaging tables, connects twice
//! (declaring the topology: exchange `greetings`, queue `greetings.audit` with
//! its DLQ and retry queues, dead-letter exchange `greetings.dlx`) and starts
//! the relay and the consumer:
//!
//! ```no_run
//! # use messaging::{ApplyError, BoxFuture, InboxHandler, IncomingMessage};
//! # struct Audit;
//! # impl InboxHandler for Audit {
//! #     type Event = String;
//! #     type Output = ();
//! #     fn decode(&self, m: &IncomingMessage) -> Result<String, String> {
//! #         String::from_utf8(m.payload.clone()).map_err(|e| e.to_string())
//! #     }
//! #     fn apply<'a>(
//! #         &'a self,
//! #         _: &'a mut sqlx::PgConnection,
//! #         _: &'a IncomingMessage,
//! #         _: &'a String,
//! #     ) -> BoxFuture<'a, Result<(), ApplyError>> {
//! #         Box::pin(async { Ok(()) })
//! #     }
//! # }
//! use messaging::{AmqpSettings, QueueSpec, Runtime, Topology};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let amqp = AmqpSettings::from_url(&std::env::var("AMQP_URL")?)?;
//! let audit = QueueSpec::new("greetings.audit", "greetings.dlx").bind("greetings", "greeting.#");
//! let shutdown = CancellationToken::new(); // cancel it on Ctrl-C / SIGTERM
//! let runtime = Runtime::builder(pool, amqp)
//!     .topology(Topology::single_queue("greetings", "greetings.dlx", audit))
//!     .consume_inbox("greetings.audit", Audit)
//!     .start(shutdown.clone())
//!     .await?; // a clear one-line StartError if the database or broker is not usable
//! let probe = runtime.probe(); // probe.checks() for readiness, probe.wedged() for liveness
//! // … serve HTTP until `shutdown` fires …
//! runtime.join().await; // consumers settle, relay finishes its batch, connections close
//! # Ok(())
//! # }
//! ```
//!
//! Run it against a local Postgres and RabbitMQ:
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1/postgres \
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//!   cargo run -p messaging --example greetings
//! curl -d ada 127.0.0.1:3000/greetings   # 202: the row and its event committed
//! curl 127.0.0.1:3000/readyz             # 200, or 503 with the failing checks
//! ```
//!
//! The `audit` table then holds the greeting once (`HTTP_ADDR` moves the
//! server). `cargo test` runs the example's own test against the real broker
//! and database.
//!
//! # Outcomes
//!
//! A [`Handler`] answers one [`Outcome`] per message; the runtime settles the
//! delivery by it (`Q` is the queue, see [`topology`] for the names):
//!
//! ```text
//!  Ack               done, or a duplicate: ack
//!  Retry(reason)     transient: to Q.retry.<n>ms, back in Q after the delay; once
//!                    RetryPolicy::max_attempts runs failed, to Q.dlq (exhausted)
//!  Reject(reason)    permanent: to Q.dlq at once (rejected)
//!  Unavailable(why)  a dependency is down: the consumer pauses, probes
//!                    Handler::ready with backoff, then runs the message again;
//!                    no retry is spent
//! ```
//!
//! A panic or a passed handler deadline counts as `Retry`; a message without a
//! `message_id` or `type`, or with a body over the limit, goes to the DLQ unread
//! (poison). For an [`InboxConsumer`]: a `decode` error or
//! [`ApplyError::Permanent`] rejects, a database error retries, or pauses the
//! consumer when the database cannot be reached at all ([`Outcome::database`]).
//!
//! # Guarantees, and their limits
//!
//! - **Effects once.** Delivery is at least once end to end: an outbox row
//!   counts as published only once the broker confirmed it, and a consumer
//!   acks only after its transaction committed (or its retry or DLQ copy was
//!   confirmed). A crash in between sends or delivers again under the same
//!   `message_id`, and the inbox skips it. Limits: the inbox remembers ids
//!   for its retention (7 days by default,
//!   [`RuntimeBuilder::inbox_retention`]); `after` and any work outside the
//!   transaction may run more than once; a plain [`Handler`]
//!   ([`RuntimeBuilder::consume`]) gets no deduplication.
//! - **No ordering guarantee.** Rows usually go out in the order they were
//!   written, but relay lanes and replicas publish concurrently, a refused row
//!   backs off alone, a retried message returns behind later ones, and a
//!   consumer handles several messages at once. Make `apply` tolerate any
//!   order (e.g. check a version).
//! - **Broker down or blocked.** Writes go on: `enqueue` touches only
//!   Postgres, and the outbox holds the rows. The relay starts no round while
//!   the publish connection is down or blocked, backs off after failed rounds,
//!   and catches up once the connection is back. Consumers re-subscribe after
//!   the reconnect; what they had not acked returns to the queue. Under an
//!   alarm they keep acking on their own connection (moves to a retry queue
//!   or the DLQ wait for the alarm to pass). Readiness fails while a
//!   connection is down; an alarm is only noted, and the relay's check fails
//!   once the oldest row has waited [`RelayOptions::stall_after`].
//! - **Database down.** `enqueue` fails with your transaction. The relay's
//!   rounds fail and it backs off. An inbox consumer pauses: it takes no new
//!   deliveries (they stay in the queue, in order), probes the database and
//!   resumes when it answers, so nothing is retried away or dead-lettered
//!   because of an outage.
//!
//! Everything [`Runtime`] starts is public for tools and tests that need less
//! or more: [`Broker::connect`], [`Publisher`], [`spawn_consumer`],
//! [`spawn_relay`], [`migrations::migrate`].

#![warn(missing_docs)]

pub mod availability;
mod backoff;
mod connection;
pub mod consumer;
mod crash;
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

/// Whether this build has the crash points of `faults` (feature `testing`): a
/// process asked for one (`CRASH_POINT`) by a build without them should refuse
/// to start rather than run a fault test that can never fire.
pub const FAULT_INJECTION: bool = cfg!(feature = "testing");

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
