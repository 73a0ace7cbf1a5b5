//! Proof of life for a long-running loop: the loop beats on every turn and while
//! it waits, so a loop stuck on a call that never returns shows as a growing age.
//! Liveness probes read the age; a dependency being down does not stop the beat.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// A loop whose last beat is older than this is considered wedged: every wait
/// inside the runtime's loops beats at least once a second and every call they
/// make is bounded well below it.
pub const WEDGED_AFTER: Duration = Duration::from_secs(60);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Shared between the loop (which beats) and its probes (which read the age).
#[derive(Clone, Debug)]
pub struct Heartbeat {
    last: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            last: Arc::new(AtomicU64::new(now_ms())),
        }
    }
}

impl Heartbeat {
    /// Records that the loop is alive now.
    pub fn beat(&self) {
        self.last.store(now_ms(), Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last.load(Ordering::Relaxed)))
    }

    /// False once the loop has not beaten for [`WEDGED_AFTER`].
    pub fn is_alive(&self) -> bool {
        self.age() < WEDGED_AFTER
    }

    /// Sleeps `duration`, beating every second meanwhile.
    pub async fn sleep(&self, duration: Duration) {
        let until = tokio::time::Instant::now() + duration;
        loop {
            self.beat();
            let now = tokio::time::Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep((until - now).min(Duration::from_secs(1))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_age_grows_until_the_next_beat() {
        let heart = Heartbeat::default();
        heart.sleep(Duration::from_millis(30)).await;
        std::thread::sleep(Duration::from_millis(20));
        assert!(heart.age() >= Duration::from_millis(20));
        heart.beat();
        assert!(heart.age() < Duration::from_millis(20));
        assert!(heart.is_alive());
    }
}
