//! Admission control for `POST /orders`: when orders arrive faster than the saga
//! completes them, the excess is answered `429` with `Retry-After` at once,
//! instead of being accepted into a backlog whose wait grows without bound.
//!
//! The signal is measured where the saga ends: each time this replica moves an
//! order out of `pending`, the database says how long ago it was placed. Over
//! the last [`WINDOW`], with at least [`MIN_COMPLETED`] completions, the median
//! wait `m` decides which share of new orders is refused:
//!
//! ```text
//!   m ≤ target: none      m = 1.5 × target: half      m ≥ 2 × target: all
//! ```
//!
//! Refusing in proportion (spread evenly over the requests) keeps the queue
//! near the target with the saga busy; refusing all at once would let it run
//! dry and idle until the window forgets the long waits.
//!
//! - A queue served in order shows its wait in the orders leaving it. The
//!   completions lag the queue by that wait, so under twice the sustainable
//!   rate the queue reaches about twice the target before shedding starts,
//!   and accepted orders wait about that much at most.
//! - While nothing completes (the broker or inventory away) there is no signal
//!   and intake stays open: the outbox holds orders until the outage ends. An
//!   outage is not an overload.
//! - The backlog an outage leaves behind does show while it drains, new orders
//!   refused rather than queued behind it; orders held up longer than [`STALE`]
//!   (a long outage, a DLQ redrive) are left out, they say nothing about the
//!   queue new orders join. `Retry-After` is the median wait, at most
//!   [`RETRY_AFTER_MAX`] seconds.
//! - Stuck orders (a parked event, a locked row) do not complete, so they never
//!   close intake; `orders_oldest_pending_seconds` alerts on them.
//! - Replicas share the completions (competing consumers), so each sees the same
//!   wait and decides alike.
//!
//! Deciding reads one atomic: a refused order costs no database work.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

/// How often the decision is taken again.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The completions a decision looks at.
pub const WINDOW: Duration = Duration::from_millis(500);
/// Fewer completions in the window say nothing about a queue.
pub const MIN_COMPLETED: usize = 8;
/// An order that waited longer was held up (an outage, a DLQ redrive), not
/// queued: its completion says nothing about the queue new orders join.
pub const STALE: Duration = Duration::from_secs(60);
/// The longest `Retry-After`: intake reopens within a window of the queue draining.
pub const RETRY_AFTER_MAX: u64 = 10;

/// Shared by the decision task, the consumer (completions) and the HTTP handler.
#[derive(Clone, Debug)]
pub struct Admission {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `ADMISSION_TARGET`: `None` never sheds.
    target: Option<Duration>,
    /// When each recent completion happened and how long its order waited.
    completed: Mutex<VecDeque<(Instant, Duration)>>,
    /// The median wait of the window, ms, while shedding.
    wait_ms: AtomicU64,
    /// Share of new orders refused, per mille (0 = none).
    refuse_permille: AtomicU64,
    /// Requests asked so far: request `n` is refused when the refusals owed up
    /// to it, `⌊(n + 1) × share / 1000⌋`, grow past those up to the one before.
    /// Exact under any concurrency, and nothing to underflow.
    requests: AtomicU64,
    shed: AtomicU64,
}

/// An order refused now.
#[derive(Clone, Copy, Debug)]
pub struct Shed {
    /// Whole seconds for `Retry-After` (at least 1).
    pub retry_after: u64,
}

impl Admission {
    pub fn new(target: Option<Duration>) -> Self {
        Self {
            inner: Arc::new(Inner {
                target,
                completed: Mutex::new(VecDeque::new()),
                wait_ms: AtomicU64::new(0),
                refuse_permille: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                shed: AtomicU64::new(0),
            }),
        }
    }

    /// An order left `pending` after waiting `waited` since it was placed.
    pub fn completed(&self, waited: Duration) {
        self.completed_at(Instant::now(), waited);
    }

    fn completed_at(&self, now: Instant, waited: Duration) {
        if self.inner.target.is_none() || waited > STALE {
            return;
        }
        let mut completed = self.window();
        completed.push_back((now, waited));
        forget_before(&mut completed, now);
    }

    /// `Err` when an order arriving now is to be refused.
    pub fn admit(&self) -> Result<(), Shed> {
        let share = self.inner.refuse_permille.load(Ordering::Relaxed);
        if share == 0 {
            return Ok(());
        }
        let n = u128::from(self.inner.requests.fetch_add(1, Ordering::Relaxed));
        let share = u128::from(share);
        if (n + 1) * share / 1000 == n * share / 1000 {
            return Ok(());
        }
        self.inner.shed.fetch_add(1, Ordering::Relaxed);
        let wait_ms = self.inner.wait_ms.load(Ordering::Relaxed);
        Err(Shed {
            retry_after: wait_ms.div_ceil(1000).clamp(1, RETRY_AFTER_MAX),
        })
    }

    /// Orders refused since startup.
    pub fn shed_total(&self) -> u64 {
        self.inner.shed.load(Ordering::Relaxed)
    }

    pub fn is_shedding(&self) -> bool {
        self.inner.refuse_permille.load(Ordering::Relaxed) > 0
    }

    /// Takes the decision from the completions of the last [`WINDOW`].
    pub fn decide(&self) {
        self.decide_at(Instant::now());
    }

    fn decide_at(&self, now: Instant) {
        let Some(target) = self.inner.target else {
            return;
        };
        let (count, median) = {
            let mut completed = self.window();
            forget_before(&mut completed, now);
            let mut waits: Vec<Duration> = completed.iter().map(|(_, w)| *w).collect();
            let count = waits.len();
            let middle = count / 2;
            let median = if count == 0 {
                Duration::ZERO
            } else {
                *waits.select_nth_unstable(middle).1
            };
            (count, median)
        };
        let shed = if count >= MIN_COMPLETED && median > target {
            let over = (median - target).as_secs_f64() / target.as_secs_f64();
            (over * 1000.0).clamp(1.0, 1000.0) as u64
        } else {
            0
        };
        self.inner.wait_ms.store(
            u64::try_from(median.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let before = self.inner.refuse_permille.swap(shed, Ordering::Relaxed);
        if (shed > 0) != (before > 0) {
            if shed > 0 {
                tracing::warn!(completed = count, median_wait = ?median, "orders wait longer than ADMISSION_TARGET; answering new ones 429 until the wait comes down");
            } else {
                tracing::info!(completed = count, median_wait = ?median, "order intake open again");
            }
        }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Duration)>> {
        self.inner
            .completed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn forget_before(completed: &mut VecDeque<(Instant, Duration)>, now: Instant) {
    while completed
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) > WINDOW)
    {
        completed.pop_front();
    }
}

/// Takes the decision every [`SAMPLE_EVERY`] until `shutdown`.
pub async fn run(admission: Admission, shutdown: CancellationToken) {
    if admission.inner.target.is_none() {
        return;
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
        admission.decide();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Duration = Duration::from_millis(500);

    /// One instant for a whole test: the window never moves under it.
    struct Clock {
        admission: Admission,
        now: Instant,
    }

    impl Clock {
        fn new(target: Option<Duration>) -> Self {
            Self {
                admission: Admission::new(target),
                now: Instant::now(),
            }
        }

        fn complete(&self, count: usize, waited: Duration) {
            for _ in 0..count {
                self.admission.completed_at(self.now, waited);
            }
        }

        fn decide(&self) {
            self.admission.decide_at(self.now);
        }

        fn refused_of(&self, requests: usize) -> usize {
            (0..requests)
                .filter(|_| self.admission.admit().is_err())
                .count()
        }
    }

    #[test]
    fn refuses_a_share_growing_with_the_wait_over_the_target() {
        let clock = Clock::new(Some(TARGET));
        clock.complete(20, Duration::from_millis(750));
        clock.decide();
        assert_eq!(clock.refused_of(100), 50, "1.5 × target: half");

        clock.complete(21, Duration::from_millis(1_500));
        clock.decide();
        assert_eq!(clock.refused_of(100), 100, "3 × target: all");
        let shed = clock.admission.admit().expect_err("refused");
        assert_eq!(shed.retry_after, 2, "the median wait, rounded up");
        assert_eq!(clock.admission.shed_total(), 151);

        // Most orders now complete quickly: the median is under the target.
        clock.complete(50, Duration::from_millis(20));
        clock.decide();
        assert_eq!(clock.refused_of(100), 0);
    }

    #[test]
    fn the_window_forgets_completions_older_than_it() {
        let clock = Clock::new(Some(TARGET));
        clock.complete(20, Duration::from_secs(2));
        clock
            .admission
            .decide_at(clock.now + WINDOW + Duration::from_millis(1));
        assert_eq!(clock.refused_of(100), 0);
    }

    #[test]
    fn too_few_completions_none_or_stale_ones_never_refuse() {
        let clock = Clock::new(Some(TARGET));
        clock.decide();
        assert!(
            clock.admission.admit().is_ok(),
            "nothing completes: an outage"
        );
        clock.complete(20, STALE + Duration::from_secs(1));
        clock.decide();
        assert_eq!(
            clock.refused_of(100),
            0,
            "orders held up an hour: a redrive"
        );
        clock.complete(MIN_COMPLETED - 1, Duration::from_secs(30));
        clock.decide();
        assert_eq!(clock.refused_of(100), 0, "a few orders completing late");
        clock.complete(1, Duration::from_secs(30));
        clock.decide();
        let shed = clock.admission.admit().expect_err("refused");
        assert_eq!(shed.retry_after, RETRY_AFTER_MAX, "Retry-After is bounded");
    }

    #[test]
    fn refusals_stay_exact_when_requests_race() {
        let clock = Clock::new(Some(TARGET));
        clock.complete(20, Duration::from_millis(600));
        clock.decide();
        // A fifth refused, from 8 threads at once: the count is exact, and
        // never runs away to refusing everything.
        let refused: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| clock.refused_of(1_000)))
                .collect();
            workers.into_iter().map(|w| w.join().expect("worker")).sum()
        });
        assert_eq!(refused, 1_600);
        assert_eq!(clock.refused_of(1_000), 200);
    }

    #[test]
    fn no_target_never_refuses() {
        let clock = Clock::new(None);
        clock.complete(1_000, Duration::from_secs(30));
        clock.decide();
        assert!(clock.admission.admit().is_ok());
    }
}
