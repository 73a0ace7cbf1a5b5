//! One order request: what it sends, and how its answer is classified and
//! counted. A 429 is neither a failure nor retried: it is the service shedding
//! load, which is what the overload run looks for.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use hdrhistogram::{CreationError, Histogram};
use indicatif::ProgressBar;
use reqwest::{StatusCode, header::RETRY_AFTER};

use crate::{cpu::Probe, observe::Observer, window::Mark};

/// What the clients count, shared by every request.
pub struct Tally {
    pub sent: AtomicU64,
    pub accepted: AtomicU64,
    pub throttled: AtomicU64,
    pub throttled_bare: AtomicU64,
    pub failed: AtomicU64,
    pub skipped: AtomicU64,
    pub last_sent: Mutex<Option<Instant>>,
    pub last_accept: Mutex<Option<Instant>>,
    pub http: Mutex<Histogram<u64>>,
    pub cold_http: Mutex<Histogram<u64>>,
    pub throttled_latency: Mutex<Histogram<u64>>,
}

/// Where orders go and what they hold.
pub struct Orders {
    pub http: reqwest::Client,
    /// `POST` target: order-service's `/orders`.
    pub url: String,
    /// One is picked at random per order.
    pub skus: Vec<String>,
}

/// Everything one request needs.
pub struct Client {
    orders: Orders,
    pub observer: Observer,
    pub tally: Tally,
    cold_until: Option<Instant>,
    progress: ProgressBar,
    count_mode: bool,
    pub started: Instant,
}

#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// 202, with the new order's id.
    Accepted(String),
    /// 429: the service shedding load; `Retry-After` in seconds, if given.
    Throttled { retry_after: Option<u64> },
    /// Any other answer, a 202 without an id, or none at all.
    Failed,
}

impl Answer {
    async fn of(response: reqwest::Result<reqwest::Response>) -> Self {
        match response {
            Ok(r) if r.status() == StatusCode::ACCEPTED => r
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned))
                .map_or(Self::Failed, Self::Accepted),
            Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => {
                let retry_after = r
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok());
                // Read to the end so the connection is reused, not reopened.
                let _ = r.bytes().await;
                Self::Throttled { retry_after }
            }
            Ok(r) => {
                let _ = r.bytes().await;
                Self::Failed
            }
            Err(_) => Self::Failed,
        }
    }
}

impl Client {
    pub fn new(
        orders: Orders,
        started: Instant,
        observer: Observer,
        cold_until: Option<Instant>,
        progress: ProgressBar,
        count_mode: bool,
    ) -> Result<Self, CreationError> {
        Ok(Self {
            orders,
            observer,
            tally: Tally {
                sent: AtomicU64::new(0),
                accepted: AtomicU64::new(0),
                throttled: AtomicU64::new(0),
                throttled_bare: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                skipped: AtomicU64::new(0),
                last_sent: Mutex::new(None),
                last_accept: Mutex::new(None),
                http: Mutex::new(histogram()?),
                cold_http: Mutex::new(histogram()?),
                throttled_latency: Mutex::new(histogram()?),
            },
            cold_until,
            progress,
            count_mode,
            started,
        })
    }

    /// Sends order `i` and counts its answer; a 429 returns how long the
    /// service asked to wait (1 s when it did not say).
    pub async fn place(&self, i: usize) -> Option<std::time::Duration> {
        let sku = &self.orders.skus[rand::random_range(0..self.orders.skus.len())];
        let body = serde_json::json!({"customer_id": format!("load-{i}"), "items": [{"sku": sku, "quantity": 1}]});
        let sent = Instant::now();
        self.tally.sent.fetch_add(1, Ordering::Relaxed);
        set_latest(&self.tally.last_sent, sent);
        let cold = self.cold_until.is_some_and(|c| sent < c);
        let response = self
            .orders
            .http
            .post(&self.orders.url)
            .json(&body)
            .send()
            .await;
        let micros = u64::try_from(sent.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let answer = Answer::of(response).await;
        let t = &self.tally;
        let mut wait = None;
        match answer {
            Answer::Accepted(id) => {
                self.record_http(micros, cold);
                t.accepted.fetch_add(1, Ordering::Relaxed);
                set_latest(&t.last_accept, Instant::now());
                self.observer.placed(id, sent, cold);
            }
            Answer::Throttled { retry_after } => {
                let _ = t
                    .throttled_latency
                    .lock()
                    .expect("histogram")
                    .record(micros);
                t.throttled.fetch_add(1, Ordering::Relaxed);
                if retry_after.is_none() {
                    t.throttled_bare.fetch_add(1, Ordering::Relaxed);
                }
                wait = Some(std::time::Duration::from_secs(retry_after.unwrap_or(1)));
            }
            Answer::Failed => {
                self.record_http(micros, cold);
                t.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.count_mode {
            self.progress.inc(1);
        } else {
            self.progress.set_position(self.started.elapsed().as_secs());
        }
        wait
    }

    /// HTTP latency of every answer but a 429, which has its own.
    fn record_http(&self, micros: u64, cold: bool) {
        let _ = self.tally.http.lock().expect("histogram").record(micros);
        if cold {
            let _ = self
                .tally
                .cold_http
                .lock()
                .expect("histogram")
                .record(micros);
        }
    }

    /// The counters and the CPU now: one end of a window.
    pub async fn mark(&self, probe: Probe) -> Option<Mark> {
        let cpu = tokio::task::spawn_blocking(move || probe.sample())
            .await
            .ok()?;
        Some(Mark {
            accepted: self.tally.accepted.load(Ordering::Relaxed),
            completed: self.observer.completed(),
            cpu,
        })
    }
}

fn set_latest(slot: &Mutex<Option<Instant>>, at: Instant) {
    let mut slot = slot.lock().expect("instant");
    if slot.is_none_or(|l| at > l) {
        *slot = Some(at);
    }
}

/// Microseconds, up to ten minutes: past the client timeout.
fn histogram() -> Result<Histogram<u64>, CreationError> {
    Histogram::new_with_bounds(1, 600_000_000, 3)
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// The answer to one POST from a server that replies with `response`.
    async fn answer_to(response: String) -> Answer {
        service_kit::install_crypto_provider();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            socket.write_all(response.as_bytes()).await.expect("write");
        });
        let sent = reqwest::Client::new()
            .post(format!("http://{addr}/orders"))
            .body("{}")
            .send()
            .await;
        Answer::of(sent).await
    }

    fn reply(status: &str, headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn a_202_with_an_id_is_an_accepted_order() {
        let body = r#"{"id":"o-1","status":"pending"}"#;
        let response = reply("202 Accepted", "content-type: application/json\r\n", body);
        assert_eq!(answer_to(response).await, Answer::Accepted("o-1".into()));
    }

    #[tokio::test]
    async fn a_429_is_throttled_not_failed_and_its_retry_after_is_noted() {
        let with = reply("429 Too Many Requests", "retry-after: 2\r\n", "");
        let without = reply("429 Too Many Requests", "", "");
        assert_eq!(
            answer_to(with).await,
            Answer::Throttled {
                retry_after: Some(2)
            }
        );
        assert_eq!(
            answer_to(without).await,
            Answer::Throttled { retry_after: None }
        );
    }

    #[tokio::test]
    async fn any_other_status_is_a_failure() {
        let response = reply("503 Service Unavailable", "", "");
        assert_eq!(answer_to(response).await, Answer::Failed);
    }
}
