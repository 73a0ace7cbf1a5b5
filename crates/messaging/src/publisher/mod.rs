//! Confirmed publishing: every message goes out `mandatory`, persistent, on a
//! channel in confirm mode, and a publish succeeds only when the broker confirmed
//! it. An unroutable message (returned) and a nack are errors; so is a batch that
//! is not confirmed within `confirm_timeout`, and a publish while disconnected or
//! blocked by a broker alarm fails at once instead of waiting. A batch puts all its
//! messages on the wire before awaiting any confirm, so throughput is not bound by
//! one round trip per message.
//!
//! One deadline bounds the whole batch (sends and confirms), and the batch is
//! abandoned as soon as the broker blocks the connection, so a caller holding a
//! database transaction around it never holds it longer than `confirm_timeout`.
//! Sending stops at the first failed send. After a timeout, an abandoned batch or
//! a channel error the channel is discarded: a late confirm or return on it could
//! otherwise settle a later message (see `publish_batch`).
//!
//! One job per file: `message` (the [`OutgoingMessage`] and its defaults),
//! `publish_error` (the [`PublishError`] and which failures are the message's
//! own), `handle` (the [`Publisher`] and publishing one message), `batch` (the
//! confirm/batch send path), `channel` (the confirm-mode channel, opened and
//! discarded), `span` (the producer span).

mod batch;
mod channel;
mod handle;
mod message;
mod publish_error;
mod span;

pub use handle::{DEFAULT_CONFIRM_TIMEOUT, Publisher};
pub use message::{CONTENT_TYPE_PROTOBUF, OutgoingMessage};
pub use publish_error::PublishError;
