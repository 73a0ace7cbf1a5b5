//! Test support shared by the integration and end-to-end suites (never linked
//! into a service): a TCP proxy that can sever, refuse, delay and stall
//! connections, a TLS proxy in front of a plain server, scratch databases
//! ([`TestDb`], dropped also when a test fails), a RabbitMQ cluster of a test's
//! own ([`RabbitCluster`]), a token issuer of a test's own ([`Issuer`]), unique names so tests run in parallel, and waiting
//! for a condition with a deadline.

mod cluster;
mod database;
pub mod issuer;
mod proxy;

use std::{future::Future, time::Duration};

pub use cluster::RabbitCluster;
pub use database::{TestDb, database_url, url_for};
pub use issuer::Issuer;
pub use proxy::{TcpProxy, TlsProxy};

/// The broker tests use; override with `AMQP_URL`.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// `prefix` plus a random suffix, safe for queue, exchange and database names.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

/// Polls `check` until it returns `Some`, or panics after `deadline` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Waits until `check` is true, or panics after `deadline` naming `what`.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, deadline, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await;
}
