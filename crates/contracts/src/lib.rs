//! The shop's contracts: event types generated from `proto/shop/events/v1`, and
//! the one place that names exchanges, queues and routing keys.
//!
//! ```text
//!  events::v1::*   prost types (build.rs compiles proto/ with protox, no protoc)
//!  decode, json    an incoming event by its AMQP type; an event as JSON
//!  names           exchanges, queues, routing keys
//!  topology        what each service declares on the broker
//! ```

pub mod decode;
pub mod domain;
mod json;
pub mod names;
pub mod topology;

/// Event messages, package `shop.events.v1`.
pub mod events {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/shop.events.v1.rs"));
    }
}

pub use prost::{Message, Name};

/// The AMQP `type` property of an event: its full protobuf name.
pub fn type_name<M: Name>() -> String {
    M::full_name()
}
