//! Admission control for `POST /orders`: when orders arrive faster than the saga
//! completes them, the excess is answered `429` with `Retry-After` at once,
//! instead of being accepted into a backlog whose wait grows without bound.
//!
//! The signal is measured, not guessed: a sampler reads, every
//! [`SAMPLE_EVERY`], how many orders created in the last [`RECENT`] are still
//! pending and how long the median one has waited. Orders are shed while
//!
//! ```text
//!   pending ≥ ADMISSION_MIN_PENDING  and  median wait ≥ ADMISSION_TARGET  and  the saga is moving
//! ```
//!
//! - The median of a queue served in order is half its head's wait, so the
//!   accepted orders wait about twice the target at most.
//! - The floor keeps a few stuck orders (a parked event, a locked row) from ever
//!   closing intake; orders older than [`RECENT`] are left to the alerts on
//!   `orders_oldest_pending_seconds`.
//! - "Moving" means this replica applied an inventory result within
//!   [`MOVING_WITHIN`]. While the broker or inventory is away nothing completes,
//!   and the outbox is there to hold orders until it comes back: an outage is not
//!   an overload, and intake stays open.
//!
//! Deciding reads one atomic: a shed order costs no database work.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How often the pending orders are read.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Orders pending longer are stuck, not queued: the signal leaves them out.
pub const RECENT: Duration = Duration::from_secs(30);
/// The saga counts as moving while results were applied this recently.
pub const MOVING_WITHIN: Duration = Duration::from_secs(2);

/// `ADMISSION_TARGET` and `ADMISSION_MIN_PENDING`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Median wait of the recent pending orders above which orders are shed;
    /// `None` never sheds.
    pub target: Option<Duration>,
    /// Fewer recent pending orders than this never shed.
    pub min_pending: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            target: Some(Duration::from_millis(500)),
            min_pending: 64,
        }
    }
}

/// Shared by the sampler, the consumer (progress) and the HTTP handler.
#[derive(Clone, Debug)]
pub struct Admission {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limits: Limits,
    started: Instant,
    /// Milliseconds since `started` of the last applied inventory result.
    progressed_at: AtomicU64,
    /// Median wait of the recent pending orders, ms, when shedding.
    shedding_wait_ms: AtomicU64,
    shedding: AtomicBool,
    shed: AtomicU64,
}

/// Why an order is refused now.
#[derive(Clone, Copy, Debug)]
pub struct Shed {
    /// Whole seconds for `Retry-After` (at least 1).
    pub retry_after: u64,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits,
                started: Instant::now(),
                progressed_at: AtomicU64::new(u64::MAX),
                shedding_wait_ms: AtomicU64::new(0),
                shedding: AtomicBool::new(false),
                shed: AtomicU64::new(0),
            }),
        }
    }

    /// An order's saga moved on (an inventory result was applied).
    pub fn progressed(&self) {
        self.inner
            .progressed_at
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// `Err` when an order arriving now is to be refused.
    pub fn admit(&self) -> Result<(), Shed> {
        if !self.inner.shedding.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.inner.shed.fetch_add(1, Ordering::Relaxed);
        let wait_ms = self.inner.shedding_wait_ms.load(Ordering::Relaxed);
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

    /// Applies one sample of the recent pending orders.
    pub fn observe(&self, pending: i64, median_wait: Duration) {
        let limits = self.inner.limits;
        let moving = match self.inner.progressed_at.load(Ordering::Relaxed) {
            u64::MAX => false,
            at => self.now_ms().saturating_sub(at) <= duration_ms(MOVING_WITHIN),
        };
        let shed = limits.target.is_some_and(|target| {
            moving && pending >= i64::from(limits.min_pending) && median_wait >= target
        });
        self.inner
            .shedding_wait_ms
            .store(duration_ms(median_wait), Ordering::Relaxed);
        let was = self.inner.shedding.swap(shed, Ordering::Relaxed);
        if shed != was {
            if shed {
                tracing::warn!(
                    pending,
                    ?median_wait,
                    "orders arrive faster than they complete; answering new ones 429 until the wait comes down"
                );
            } else {
                tracing::info!(pending, ?median_wait, "order intake open again");
            }
        }
    }

    fn now_ms(&self) -> u64 {
        duration_ms(self.inner.started.elapsed())
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Samples the pending orders every [`SAMPLE_EVERY`] until `shutdown`. While
/// the database does not answer, the last decision stands until a sample
/// succeeds (order intake needs the database anyway).
pub async fn sample(admission: Admission, pool: PgPool, shutdown: CancellationToken) {
    if admission.inner.limits.target.is_none() {
        return;
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
        let sample = tokio::select! {
            () = shutdown.cancelled() => return,
            sample = crate::store::recent_pending(&pool, RECENT) => sample,
        };
        match sample {
            Ok((pending, median_wait)) => admission.observe(pending, median_wait),
            Err(error) => tracing::debug!(%error, "admission sample failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Duration = Duration::from_millis(500);

    #[test]
    fn sheds_only_a_long_queue_that_is_moving() {
        let admission = Admission::new(Limits::default());
        // Not moving (nothing completed yet): an outage, intake stays open.
        admission.observe(5_000, Duration::from_secs(20));
        assert!(admission.admit().is_ok());

        admission.progressed();
        admission.observe(5_000, Duration::from_millis(1_500));
        let shed = admission.admit().expect_err("a long, moving queue sheds");
        assert_eq!(shed.retry_after, 2);
        assert_eq!(admission.shed_total(), 1);

        // A few stuck orders: under the floor.
        admission.observe(63, Duration::from_secs(20));
        assert!(admission.admit().is_ok());
        // A short wait: under the target.
        admission.observe(5_000, TARGET - Duration::from_millis(1));
        assert!(admission.admit().is_ok());
        admission.observe(64, TARGET);
        assert_eq!(
            admission.admit().expect_err("at both limits").retry_after,
            1
        );
    }

    #[test]
    fn no_target_never_sheds() {
        let admission = Admission::new(Limits {
            target: None,
            min_pending: 0,
        });
        admission.progressed();
        admission.observe(1_000_000, Duration::from_secs(3600));
        assert!(admission.admit().is_ok());
    }
}
