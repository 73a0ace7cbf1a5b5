//! End-to-end tests: real service processes, real RabbitMQ, real PostgreSQL.
//! Each test starts its own stack (private vhost, fresh databases) and stops it.

mod admission;
mod api;
mod auth;
mod contract;
mod deploy;
mod history;
mod operations;
mod saga;
mod startup;
mod telemetry;
mod webhook;
