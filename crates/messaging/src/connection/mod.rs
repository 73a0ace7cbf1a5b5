//! A supervised broker connection (a service runs two: one publishes, one consumes).
//!
//! [`Broker::connect`] is the startup preflight: it connects once, declares the
//! topology and turns any failure into one clear [`ConnectError`] line. It then
//! spawns a supervisor that watches the connection and, when it dies, rebuilds it
//! from scratch with [`Backoff`](crate::Backoff) (full jitter, capped) and declares
//! the topology again. Publishers and consumers follow the current connection
//! through a `watch` channel: a new *generation* means "open your channels again".
//!
//! We do not use the client's built-in recovery: it cannot recover channels closed
//! by soft errors and may never finish after a broker restart. A fresh connection is
//! simple and always works.
//!
//! One job per file: `broker` (the [`Broker`] handle), `supervisor` (watching
//! the connection and rebuilding it), `open` (one connection and its topology,
//! bounded), `connect_error` (the [`ConnectError`] and how a client error
//! becomes one).

mod broker;
mod connect_error;
mod open;
mod supervisor;

pub use broker::Broker;
pub use connect_error::ConnectError;
