//! Drives `POST /orders`, closed or open loop, and waits for the orders to
//! complete (see `observe`).
//!
//! Closed loop: `concurrency` clients, each sending its next order when the last
//! one is answered. Open loop (`rate`): one order every `1 / rate` seconds,
//! whether or not earlier ones were answered, so a slow service meets the same
//! offered load instead of a politely waiting client. A 429 is counted apart
//! from failures and never retried.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::{
    cpu::Probe,
    observe::{Completions, Observer},
    request::{Client, Orders},
    window::Window,
};

/// How to drive: a count or a duration, at full concurrency or a fixed rate.
#[derive(Clone, Debug)]
pub struct Plan {
    pub concurrency: usize,
    pub count: Option<usize>,
    pub duration: Option<Duration>,
    /// Orders per second, open loop; `None` = closed loop of `concurrency` clients.
    pub rate: Option<f64>,
    /// Orders sent this long after the start are also reported on their own.
    pub cold: Option<Duration>,
    /// CPU of these processes, over the steady window after this warm-up and
    /// over the whole run.
    pub steady: Option<(Duration, Probe)>,
    /// How long accepted orders may take to complete once the last is answered.
    pub drain: Duration,
    /// Open loop: requests in flight beyond which a due order is not sent.
    pub max_in_flight: usize,
}

#[derive(Debug)]
pub struct Outcome {
    pub sent: u64,
    pub accepted: u64,
    /// Answered 429.
    pub throttled: u64,
    pub throttled_without_retry_after: u64,
    /// Any other answer, or none.
    pub failed: u64,
    /// Open loop: due orders not sent because `max_in_flight` were in flight.
    pub skipped: u64,
    /// Open loop: the scheduled span (sent + skipped orders at the rate); closed
    /// loop: from the first request to the last one sent.
    pub offering: Duration,
    /// From the first request to the last 202.
    pub accepting: Duration,
    /// From the first request to the last completion.
    pub completing: Duration,
    /// Microseconds, every answer but 429s.
    pub http: Histogram<u64>,
    /// Microseconds, the same for orders sent in the cold part.
    pub cold_http: Histogram<u64>,
    /// Microseconds, 429 answers.
    pub throttled_latency: Histogram<u64>,
    pub completions: Completions,
    pub backlog_peak: i64,
    /// From the warm-up's end to the first client running out of orders.
    pub steady: Option<Window>,
    /// From before the first request to after the last completion: every order
    /// counted was both placed and completed inside it.
    pub whole: Option<Window>,
}

impl Outcome {
    /// Accepted orders that did not complete within the drain deadline.
    pub fn lost(&self) -> u64 {
        self.accepted.saturating_sub(self.completions.completed)
    }
}

pub async fn run(
    http: &reqwest::Client,
    order_url: &str,
    amqp_url: &str,
    skus: &[String],
    plan: &Plan,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let observer = Observer::start(amqp_url).await?;

    // The backlog sampler.
    let backlog_peak = Arc::new(AtomicU64::new(0));
    let stop_sampling = CancellationToken::new();
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
    let orders = Orders {
        http: http.clone(),
        url: format!("{order_url}/orders"),
        skus: skus.to_vec(),
    };
    let client = Arc::new(Client::new(
        orders,
        started,
        observer,
        plan.cold.map(|c| started + c),
        progress.clone(),
        plan.count.is_some(),
    )?);
    let whole_start = match &plan.steady {
        Some((_, probe)) => client.mark(probe.clone()).await,
        None => None,
    };
    // Tripped when the first client runs out of orders: the steady part ends.
    let sending_done = CancellationToken::new();
    let steady = plan.steady.clone().map(|(warm_up, probe)| {
        let (client, done) = (client.clone(), sending_done.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(warm_up) => {}
                () = done.cancelled() => return None,
            }
            let start = client.mark(probe.clone()).await?;
            done.cancelled().await;
            let end = client.mark(probe).await?;
            Some(Window { start, end })
        })
    });

    let offering = match plan.rate {
        Some(rate) => open_loop(&client, plan, rate, &sending_done).await,
        None => {
            closed_loop(&client, plan, &sending_done).await?;
            let last = *client.tally.last_sent.lock().expect("instant");
            last.unwrap_or(started).saturating_duration_since(started)
        }
    };
    let steady = match steady {
        Some(task) => task.await?,
        None => None,
    };

    let accepted = client.tally.accepted.load(Ordering::Relaxed);
    progress.set_message("waiting for completions");
    let wait_until = Instant::now() + plan.drain;
    while client.observer.completed() < accepted && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let whole = match (&plan.steady, whole_start) {
        (Some((_, probe)), Some(start)) => {
            // The notification-service handles `order.confirmed` as loadgen sees
            // it; let that last hop finish inside the window.
            tokio::time::sleep(Duration::from_secs(1)).await;
            client
                .mark(probe.clone())
                .await
                .map(|end| Window { start, end })
        }
        _ => None,
    };
    progress.finish_and_clear();
    stop_sampling.cancel();
    let _ = sampler.await;

    let client = Arc::into_inner(client).ok_or("a request outlived its run")?;
    let t = client.tally;
    let since_start =
        |at: Option<Instant>| at.unwrap_or(started).saturating_duration_since(started);
    let completions = client.observer.finish().await;
    Ok(Outcome {
        sent: t.sent.into_inner(),
        accepted,
        throttled: t.throttled.into_inner(),
        throttled_without_retry_after: t.throttled_bare.into_inner(),
        failed: t.failed.into_inner(),
        skipped: t.skipped.into_inner(),
        offering,
        accepting: since_start(t.last_accept.into_inner().expect("instant")),
        completing: since_start(completions.last),
        http: t.http.into_inner().expect("histogram"),
        cold_http: t.cold_http.into_inner().expect("histogram"),
        throttled_latency: t.throttled_latency.into_inner().expect("histogram"),
        completions,
        backlog_peak: i64::try_from(backlog_peak.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
        steady,
        whole,
    })
}

/// `concurrency` clients, each sending its next order once the last is
/// accepted; a 429 makes the client wait its `Retry-After` and send the same
/// order again, as a well-behaved client does.
async fn closed_loop(
    client: &Arc<Client>,
    plan: &Plan,
    sending_done: &CancellationToken,
) -> Result<(), tokio::task::JoinError> {
    let total = plan.count.unwrap_or(usize::MAX);
    let deadline = plan.duration.map(|d| client.started + d);
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..plan.concurrency)
        .map(|_| {
            let (client, next, done) = (client.clone(), next.clone(), sending_done.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total || deadline.is_some_and(|d| Instant::now() >= d) {
                        done.cancel();
                        return;
                    }
                    while let Some(wait) = client.place(i).await {
                        tokio::select! {
                            () = done.cancelled() => return,
                            () = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    Ok(())
}

/// One order every `1 / rate` seconds on a fixed schedule, each in its own task.
/// A schedule that fell behind (a starved CPU) catches up rather than dropping
/// orders, so the offered count is the planned one. Returns the scheduled span.
async fn open_loop(
    client: &Arc<Client>,
    plan: &Plan,
    rate: f64,
    sending_done: &CancellationToken,
) -> Duration {
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let total = plan.count.unwrap_or(usize::MAX);
    let origin = tokio::time::Instant::from_std(client.started);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut requests = tokio::task::JoinSet::new();
    let mut slots = 0;
    while slots < total {
        let due = interval.mul_f64(slots as f64);
        if plan.duration.is_some_and(|d| due >= d) {
            break;
        }
        tokio::time::sleep_until(origin + due).await;
        slots += 1;
        while requests.try_join_next().is_some() {}
        if in_flight.load(Ordering::Relaxed) >= plan.max_in_flight {
            client.tally.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (client, in_flight) = (client.clone(), in_flight.clone());
        requests.spawn(async move {
            client.place(slots - 1).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    sending_done.cancel();
    while requests.join_next().await.is_some() {}
    interval.mul_f64(slots as f64)
}
