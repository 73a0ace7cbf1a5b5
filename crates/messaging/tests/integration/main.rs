//! Integration tests of the messaging crate against the real RabbitMQ and
//! PostgreSQL (`DATABASE_URL`, default postgres on 127.0.0.1:5432)
//! and RabbitMQ (`AMQP_URL`, default guest on 127.0.0.1:5672). Every test declares its own
//! uniquely named exchanges, queues and database and deletes them at the end, through
//! `support::Fixture`, which deletes them also when the test panics.

mod batch;
mod cluster;
mod consume;
mod dead_letters;
mod fixture;
mod inbox;
mod outbox;
mod parked;
mod pause;
mod preflight;
mod publish;
mod recovery;
mod relay_faults;
mod support;
