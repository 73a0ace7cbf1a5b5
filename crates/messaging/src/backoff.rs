//! Exponential backoff with full jitter: attempt `n` sleeps a uniformly random time
//! in `[0, min(max, initial * 2^n)]`, so many replicas reconnecting after the same
//! outage do not hammer the broker in lockstep.

use std::time::Duration;

/// A backoff policy: how long to wait before retry attempt `n` (see the module
/// text). The default is 100 ms doubling up to 10 s. Used for reconnecting
/// ([`AmqpSettings::backoff`](crate::AmqpSettings::backoff)), re-subscribing and
/// probing a paused consumer ([`ConsumerOptions::backoff`](crate::ConsumerOptions::backoff)),
/// and the relay's pauses after failed rounds and its per-row back-off
/// ([`RelayOptions`](crate::RelayOptions)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first delay (attempt 0); it doubles with each attempt.
    pub initial: Duration,
    /// The largest ceiling: delays never exceed it, however many attempts failed.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The upper bound of the delay before attempt `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// A random delay in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempt).as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::random_range(0..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(4), Duration::from_secs(1));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn delay_stays_within_ceiling() {
        let b = Backoff::default();
        for attempt in 0..40 {
            assert!(b.delay(attempt) <= b.ceiling(attempt));
        }
    }
}
