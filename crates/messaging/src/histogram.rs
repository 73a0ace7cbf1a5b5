//! A lock-free latency histogram with fixed Prometheus-style buckets, shared by
//! the consumer runtime (handler latency) and the services' HTTP metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Latencies in seconds, counted into fixed buckets with upper bounds from 1 ms
/// to 5 s (1, 2.5, 5, 10, 25, 50, 100, 250, 500 ms, 1, 2.5, 5 s), cumulative as
/// Prometheus expects; observations above 5 s count only in the total (`+Inf`).
/// Safe to share between threads without a lock.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Cumulative: slot `i` counts observations `<= BUCKETS[i]`.
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Counts one observation of `seconds`.
    pub fn observe(&self, seconds: f64) {
        for (bound, slot) in BUCKETS.iter().zip(&self.counts) {
            if seconds <= *bound {
                slot.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// (upper bound, cumulative count) per bucket, without `+Inf`.
    pub fn buckets(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        BUCKETS
            .iter()
            .zip(&self.counts)
            .map(|(bound, slot)| (*bound, slot.load(Ordering::Relaxed)))
    }

    /// Observations so far (the `+Inf` bucket and `_count` of a Prometheus
    /// histogram).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The sum of all observations, seconds, to the microsecond (`_sum`).
    pub fn sum_seconds(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(0.003);
        h.observe(0.2);
        h.observe(9.0);
        let buckets: Vec<_> = h.buckets().collect();
        assert_eq!(buckets[1], (0.0025, 0));
        assert_eq!(buckets[2], (0.005, 1));
        assert_eq!(buckets[7], (0.25, 2));
        assert_eq!(buckets[11], (5.0, 2));
        assert_eq!(h.count(), 3);
        assert!((h.sum_seconds() - 9.203).abs() < 1e-6);
    }
}
