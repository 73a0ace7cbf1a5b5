//! Admission control for `POST /orders`: when orders arrive faster than the saga
//! completes them, the excess is answered `429` with `Retry-After` at once,
//! instead of being accepted into a backlog whose wait grows without bound.
//!
//! The signal is measured where the saga ends: each time this replica moves an
//! order out of `pending`, the database says how long ago it was placed. Orders
//! are shed while, over the last [`WINDOW`],
//!
//! ```text
//!   at least MIN_COMPLETED orders completed  and  their median wait ≥ ADMISSION_TARGET
//! ```
//!
//! - A queue served in order shows its wait in the orders leaving it. The
//!   completions lag the queue by that wait, so under twice the sustainable
//!   rate the queue reaches about twice the target before shedding starts,
//!   and accepted orders wait about that much at most.
//! - While nothing completes (the broker or inventory away) there is no signal
//!   and intake stays open: the outbox holds orders until the outage ends. An
//!   outage is not an overload.
//! - The backlog an outage leaves behind does show: while it drains, new orders
//!   are refused rather than queued behind it.
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
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

/// How often the decision is taken again.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The completions a decision looks at.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Fewer completions in the window say nothing about a queue.
pub const MIN_COMPLETED: usize = 8;

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
    shedding: AtomicBool,
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
                shedding: AtomicBool::new(false),
                shed: AtomicU64::new(0),
            }),
        }
    }

    /// An order left `pending` after waiting `waited` since it was placed.
    pub fn completed(&self, waited: Duration) {
        if self.inner.target.is_none() {
            return;
        }
        let now = Instant::now();
        let mut completed = self.window();
        completed.push_back((now, waited));
        forget_before(&mut completed, now);
    }

    /// `Err` when an order arriving now is to be refused.
    pub fn admit(&self) -> Result<(), Shed> {
        if !self.inner.shedding.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.inner.shed.fetch_add(1, Ordering::Relaxed);
        let wait_ms = self.inner.wait_ms.load(Ordering::Relaxed);
        Err(Shed {
            retry_after: wait_ms.div_ceil(1000).max(1),
        })
    }

    /// Orders refused since startup.
    pub fn shed_total(&self) -> u64 {
        self.inner.shed.load(Ordering::Relaxed)
    }

    pub fn is_shedding(&self) -> bool {
        self.inner.shedding.load(Ordering::Relaxed)
    }

    /// Takes the decision from the completions of the last [`WINDOW`].
    pub fn decide(&self) {
        let Some(target) = self.inner.target else {
            return;
        };
        let (count, median) = {
            let mut completed = self.window();
            forget_before(&mut completed, Instant::now());
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
        let shed = count >= MIN_COMPLETED && median >= target;
        self.inner.wait_ms.store(
            u64::try_from(median.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if shed != self.inner.shedding.swap(shed, Ordering::Relaxed) {
            if shed {
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

    fn complete(admission: &Admission, count: usize, waited: Duration) {
        for _ in 0..count {
            admission.completed(waited);
        }
    }

    #[test]
    fn sheds_while_the_orders_completing_now_waited_longer_than_the_target() {
        let admission = Admission::new(Some(TARGET));
        complete(&admission, 20, Duration::from_millis(1_500));
        admission.decide();
        let shed = admission.admit().expect_err("a long wait sheds");
        assert_eq!(shed.retry_after, 2);
        assert_eq!(admission.shed_total(), 1);

        // Most orders now complete quickly: the median is under the target.
        complete(&admission, 21, Duration::from_millis(20));
        admission.decide();
        assert!(admission.admit().is_ok());
    }

    #[test]
    fn too_few_completions_or_none_never_shed() {
        let admission = Admission::new(Some(TARGET));
        admission.decide();
        assert!(admission.admit().is_ok(), "nothing completes: an outage");
        complete(&admission, MIN_COMPLETED - 1, Duration::from_secs(60));
        admission.decide();
        assert!(
            admission.admit().is_ok(),
            "a few stuck orders completing late"
        );
        complete(&admission, 1, Duration::from_secs(60));
        admission.decide();
        assert!(admission.admit().is_err());
    }

    #[test]
    fn no_target_never_sheds() {
        let admission = Admission::new(None);
        complete(&admission, 1_000, Duration::from_secs(3600));
        admission.decide();
        assert!(admission.admit().is_ok());
    }
}
