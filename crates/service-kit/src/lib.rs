//! What every shop service shares at its edges, so each service crate holds only
//! its domain:
//!
//! ```text
//!  auth       bearer tokens (JWT) → the Principal handlers authorize with
//!  config     environment variables → typed values; errors name the variable
//!  database   pool + embedded migrations; errors name host/db/user, never the password
//!  problem    application/problem+json errors and extractors that explain bad input
//!  health     /healthz, /readyz (real checks), /metrics
//!  history    per-order history of events emitted and applied (operator timelines)
//!  metrics    Prometheus text: HTTP, consumers, relay, broker, service gauges
//!  shutdown   SIGTERM/SIGINT → one cancellation token
//! ```

pub mod auth;
pub mod config;
pub mod database;
pub mod health;
pub mod healthcheck;
pub mod history;
pub mod http_span;
pub mod metrics;
pub mod openapi;
pub mod platform;
pub mod problem;
pub mod shutdown;

/// Installs the process-wide rustls crypto provider (ring). Call first in `main`
/// (and in tests that open TLS connections): with more than one provider compiled
/// in, rustls refuses to guess.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
