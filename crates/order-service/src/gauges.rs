//! What order-service adds to `/metrics`: how many orders are still `pending`
//! and how long the oldest has waited. An order stays pending while its saga is
//! stalled somewhere (inventory down, a message parked or dead-lettered), so
//! the age is the figure to alert on. A periodic task refreshes both: a slow
//! database delays the figures, never a scrape.

use std::time::Duration;

use service_kit::{metrics::Gauge, platform::Platform};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{admission::Admission, store};

pub const PENDING: &str = "orders_pending";
pub const OLDEST_PENDING_SECONDS: &str = "orders_oldest_pending_seconds";
pub const SHEDDING: &str = "orders_admission_shedding";
pub const SHED: &str = "orders_shed";

/// How often the gauges are read from the database.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// Registers the gauges (so the first scrape has them) and starts refreshing them.
pub fn start(platform: &mut Platform, admission: &Admission) {
    let pending = platform.metrics.gauge(PENDING, "Orders still pending.");
    let oldest = platform.metrics.gauge(
        OLDEST_PENDING_SECONDS,
        "Age of the oldest order still pending (0 when none).",
    );
    let shedding = platform.metrics.gauge(
        SHEDDING,
        "1 while new orders are answered 429 (the saga cannot keep up), else 0.",
    );
    let shed = platform
        .metrics
        .gauge(SHED, "Orders answered 429 since startup.");
    let pool = platform.pool.clone();
    let shutdown = platform.shutdown.clone();
    platform.spawn(refresh(pool, pending, oldest, shutdown.clone()));
    let admission = admission.clone();
    platform.spawn(async move {
        loop {
            shedding.set(f64::from(u8::from(admission.is_shedding())));
            shed.set(admission.shed_total() as f64);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(crate::admission::SAMPLE_EVERY) => {}
            }
        }
    });
}

async fn refresh(pool: PgPool, pending: Gauge, oldest: Gauge, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        let summary = tokio::select! {
            () = shutdown.cancelled() => return,
            summary = store::pending_summary(&pool) => summary,
        };
        match summary {
            Ok((count, age)) => {
                pending.set(count as f64);
                oldest.set(age);
                failing = false;
            }
            Err(error) => {
                // Once per outage: the database's own checks say the rest.
                if !failing {
                    tracing::warn!(%error, "pending order gauges not refreshed; they keep their last values");
                }
                failing = true;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(REFRESH_EVERY) => {}
        }
    }
}
