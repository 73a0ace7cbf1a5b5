//! Completion, seen the way any other consumer would see it: a private
//! auto-delete queue bound to `shop.notifications` receives every order event; an
//! `order.confirmed` or `order.rejected` whose correlation id is a placed order
//! completes it. An event may arrive before the 202 does, so early events wait.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use futures_util::StreamExt;
use hdrhistogram::Histogram;

/// What the observer saw, once the run is over.
#[derive(Debug)]
pub struct Completions {
    pub completed: u64,
    pub confirmed: u64,
    pub last: Option<Instant>,
    /// Microseconds, from sending the POST to seeing `order.confirmed`.
    pub place_to_confirmed: Histogram<u64>,
    /// Microseconds, from sending the POST to either terminal event.
    pub place_to_terminal: Histogram<u64>,
    /// The same, for orders sent in the cold part of the run only.
    pub cold_place_to_terminal: Histogram<u64>,
}

#[derive(Default)]
struct Pending {
    /// order id → when its POST was sent, and whether in the cold part.
    placed: HashMap<String, (Instant, bool)>,
    /// order id → (completion time, confirmed?) seen before the 202 arrived.
    early: HashMap<String, (Instant, bool)>,
}

struct Latencies {
    confirmed: Histogram<u64>,
    terminal: Histogram<u64>,
    cold_terminal: Histogram<u64>,
}

struct Shared {
    pending: Mutex<Pending>,
    latencies: Mutex<Latencies>,
    completed: AtomicU64,
    confirmed: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Shared {
    fn complete(&self, (sent, cold): (Instant, bool), at: Instant, confirmed: bool) {
        let micros = u64::try_from(at.saturating_duration_since(sent).as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        {
            let mut l = self.latencies.lock().expect("latencies");
            // A value past the histograms' bound is dropped, not clamped: their
            // bound (two hours) is far beyond any run.
            let _ = l.terminal.record(micros);
            if confirmed {
                let _ = l.confirmed.record(micros);
            }
            if cold {
                let _ = l.cold_terminal.record(micros);
            }
        }
        if confirmed {
            self.confirmed.fetch_add(1, Ordering::Relaxed);
        }
        self.completed.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().expect("last");
        if last.is_none_or(|l| at > l) {
            *last = Some(at);
        }
    }
}

#[derive(Debug)]
pub struct Observer {
    shared: Arc<Shared>,
    conn: lapin::Connection,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("completed", &self.completed)
            .finish_non_exhaustive()
    }
}

fn histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    Histogram::new_with_bounds(1, 7_200_000_000, 3)
}

impl Observer {
    pub async fn start(amqp_url: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            latencies: Mutex::new(Latencies {
                confirmed: histogram()?,
                terminal: histogram()?,
                cold_terminal: histogram()?,
            }),
            completed: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            last: Mutex::new(None),
        });
        let conn =
            lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()).await?;
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
        let task = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Some(Ok(delivery)) = events.next().await {
                    let confirmed = match delivery.routing_key.as_str() {
                        contracts::names::keys::ORDER_CONFIRMED => true,
                        contracts::names::keys::ORDER_REJECTED => false,
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
                    let placed = {
                        let mut pending = shared.pending.lock().expect("pending");
                        match pending.placed.remove(&id) {
                            Some(placed) => Some(placed),
                            None => {
                                pending.early.insert(id, (now, confirmed));
                                None
                            }
                        }
                    };
                    if let Some(placed) = placed {
                        shared.complete(placed, now, confirmed);
                    }
                }
            })
        };
        Ok(Self { shared, conn, task })
    }

    /// An order was accepted: it was sent at `sent`, in the cold part or not.
    pub fn placed(&self, id: String, sent: Instant, cold: bool) {
        let early = {
            let mut pending = self.shared.pending.lock().expect("pending");
            match pending.early.remove(&id) {
                Some(done) => Some(done),
                None => {
                    pending.placed.insert(id, (sent, cold));
                    None
                }
            }
        };
        if let Some((at, confirmed)) = early {
            self.shared.complete((sent, cold), at, confirmed);
        }
    }

    pub fn completed(&self) -> u64 {
        self.shared.completed.load(Ordering::Relaxed)
    }

    pub async fn finish(self) -> Completions {
        self.task.abort();
        let _ = self.conn.close(200, "done".into()).await;
        let l = self.shared.latencies.lock().expect("latencies");
        Completions {
            completed: self.completed(),
            confirmed: self.shared.confirmed.load(Ordering::Relaxed),
            last: *self.shared.last.lock().expect("last"),
            place_to_confirmed: l.confirmed.clone(),
            place_to_terminal: l.terminal.clone(),
            cold_place_to_terminal: l.cold_terminal.clone(),
        }
    }
}
