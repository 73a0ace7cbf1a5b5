//! Drives `POST /orders` and observes completion on the fanout exchange.
//!
//! Completion is seen the way any other consumer would see it: a private
//! auto-delete queue bound to `shop.notifications` receives every order event; an
//! `order.confirmed` or `order.rejected` whose correlation id is a placed order
//! completes it. An event may arrive before the 202 does, so early events wait.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};

/// How to drive: a count or a duration, at full concurrency or a fixed rate.
#[derive(Clone, Debug)]
pub struct Plan {
    pub concurrency: usize,
    pub count: Option<usize>,
    pub duration: Option<Duration>,
    /// Orders per second across all clients; `None` = as fast as they answer.
    pub rate: Option<f64>,
}

#[derive(Debug)]
pub struct Outcome {
    pub accepted: u64,
    pub failed: u64,
    pub completed: u64,
    pub confirmed: u64,
    /// From the first request to the last 202.
    pub accepting: Duration,
    /// From the first request to the last completion.
    pub completing: Duration,
    /// Microseconds.
    pub http: Histogram<u64>,
    /// Microseconds, from sending the POST to seeing `order.confirmed`.
    pub place_to_confirmed: Histogram<u64>,
    pub backlog_peak: i64,
}

#[derive(Default)]
struct Pending {
    /// order id → when its POST was sent.
    placed: HashMap<String, Instant>,
    /// order id → (completion time, confirmed?) seen before the 202 arrived.
    early: HashMap<String, (Instant, bool)>,
}

struct Shared {
    pending: Mutex<Pending>,
    latency: Mutex<Histogram<u64>>,
    completed: AtomicU64,
    confirmed: AtomicU64,
    last_completion: Mutex<Option<Instant>>,
}

impl Shared {
    fn complete(&self, sent: Instant, at: Instant, confirmed: bool) {
        if confirmed {
            let micros =
                u64::try_from(at.saturating_duration_since(sent).as_micros()).unwrap_or(u64::MAX);
            let _ = self
                .latency
                .lock()
                .expect("histogram")
                .record(micros.max(1));
            self.confirmed.fetch_add(1, Ordering::Relaxed);
        }
        self.completed.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_completion.lock().expect("last");
        if last.is_none_or(|l| at > l) {
            *last = Some(at);
        }
    }
}

pub async fn run(
    http: &reqwest::Client,
    order_url: &str,
    amqp_url: &str,
    skus: &[String],
    plan: &Plan,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        latency: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3)?),
        completed: AtomicU64::new(0),
        confirmed: AtomicU64::new(0),
        last_completion: Mutex::new(None),
    });

    // The observer: a private queue on the fanout exchange.
    let conn = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let queue = format!("loadgen-{}", uuid::Uuid::new_v4().simple());
    channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            contracts::names::NOTIFICATIONS_EXCHANGE.into(),
            "".into(),
            Default::default(),
            Default::default(),
        )
        .await?;
    let mut events = channel
        .basic_consume(
            queue.as_str().into(),
            "loadgen".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    let observer = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = events.next().await {
                let confirmed = match delivery.routing_key.as_str() {
                    "order.confirmed" => true,
                    "order.rejected" => false,
                    _ => continue,
                };
                let Some(id) = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.to_string())
                else {
                    continue;
                };
                let now = Instant::now();
                let sent = {
                    let mut pending = shared.pending.lock().expect("pending");
                    match pending.placed.remove(&id) {
                        Some(sent) => Some(sent),
                        None => {
                            pending.early.insert(id, (now, confirmed));
                            None
                        }
                    }
                };
                if let Some(sent) = sent {
                    shared.complete(sent, now, confirmed);
                }
            }
        })
    };

    // The backlog sampler.
    let backlog_peak = Arc::new(AtomicU64::new(0));
    let stop_sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (http, url, peak, stop) = (
            http.clone(),
            format!("{order_url}/metrics"),
            backlog_peak.clone(),
            stop_sampling.clone(),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(response) = http.get(&url).send().await
                    && let Ok(text) = response.text().await
                    && let Some(value) =
                        text.lines().find_map(|l| l.strip_prefix("outbox_backlog "))
                    && let Ok(v) = value.trim().parse::<f64>()
                {
                    peak.fetch_max(v as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let total = plan.count.unwrap_or(usize::MAX);
    let progress = match (plan.count, plan.duration) {
        (Some(n), _) => ProgressBar::new(n as u64),
        (None, Some(d)) => ProgressBar::new(d.as_secs()),
        (None, None) => ProgressBar::hidden(),
    };
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let last_accept = Arc::new(Mutex::new(started));
    let http_latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let interval = plan
        .rate
        .map(|r| Duration::from_secs_f64(plan.concurrency as f64 / r.max(0.001)));
    let workers: Vec<_> = (0..plan.concurrency)
        .map(|w| {
            let (http, url, skus, shared) = (http.clone(), format!("{order_url}/orders"), skus.to_vec(), shared.clone());
            let (next, accepted, failed, last_accept, http_latency, progress) =
                (next.clone(), accepted.clone(), failed.clone(), last_accept.clone(), http_latency.clone(), progress.clone());
            let deadline = plan.duration.map(|d| started + d);
            let concurrency = plan.concurrency;
            let count_mode = plan.count.is_some();
            tokio::spawn(async move {
                // Spread the clients evenly over one interval, so a fixed rate is a
                // smooth stream rather than bursts of simultaneous requests.
                let clients = concurrency as f64;
                let mut ticker = interval.map(|i| {
                    let offset = i.mul_f64(w as f64 / clients);
                    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, i);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    ticker
                });
                loop {
                    if let Some(t) = ticker.as_mut() {
                        t.tick().await;
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    let sku = &skus[rand::random_range(0..skus.len())];
                    let body = serde_json::json!({"customer_id": format!("load-{i}"), "items": [{"sku": sku, "quantity": 1}]});
                    let sent = Instant::now();
                    let response = http.post(&url).json(&body).send().await;
                    let elapsed = sent.elapsed();
                    let id = match response {
                        Ok(r) if r.status().as_u16() == 202 => r.json::<serde_json::Value>().await.ok().and_then(|v| v["id"].as_str().map(str::to_owned)),
                        _ => None,
                    };
                    let _ = http_latency
                        .lock()
                        .expect("histogram")
                        .record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX).max(1));
                    match id {
                        Some(id) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            *last_accept.lock().expect("last") = Instant::now();
                            let early = {
                                let mut pending = shared.pending.lock().expect("pending");
                                match pending.early.remove(&id) {
                                    Some(done) => Some(done),
                                    None => {
                                        pending.placed.insert(id, sent);
                                        None
                                    }
                                }
                            };
                            if let Some((at, confirmed)) = early {
                                shared.complete(sent, at, confirmed);
                            }
                        }
                        None => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if count_mode {
                        progress.inc(1);
                    } else {
                        progress.set_position(started.elapsed().as_secs());
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let accepted = accepted.load(Ordering::Relaxed);
    progress.set_message("waiting for completions");
    let wait_until = Instant::now() + Duration::from_secs(120);
    while shared.completed.load(Ordering::Relaxed) < accepted && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    progress.finish_and_clear();
    stop_sampling.cancel();
    let _ = sampler.await;
    observer.abort();
    let _ = conn.close(200, "done".into()).await;

    let last_completion = shared
        .last_completion
        .lock()
        .expect("last")
        .unwrap_or(started);
    let accepting = last_accept
        .lock()
        .expect("last")
        .saturating_duration_since(started);
    let http = http_latency.lock().expect("histogram").clone();
    let place_to_confirmed = shared.latency.lock().expect("histogram").clone();
    Ok(Outcome {
        accepted,
        failed: failed.load(Ordering::Relaxed),
        completed: shared.completed.load(Ordering::Relaxed),
        confirmed: shared.confirmed.load(Ordering::Relaxed),
        accepting,
        completing: last_completion.saturating_duration_since(started),
        http,
        place_to_confirmed,
        backlog_peak: i64::try_from(backlog_peak.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
    })
}
