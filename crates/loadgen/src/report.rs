//! The report's JSON: one object per run, from its outcome.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::drive::Outcome;

pub fn millis(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

pub fn latency(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_ms": millis(h, 0.50),
        "p95_ms": millis(h, 0.95),
        "p99_ms": millis(h, 0.99),
        "max_ms": if h.is_empty() { 0.0 } else { h.max() as f64 / 1000.0 },
    })
}

fn per_sec(n: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

pub fn outcome(o: &Outcome) -> Value {
    let c = &o.completions;
    json!({
        "sent": o.sent,
        "accepted": o.accepted,
        "throttled": o.throttled,
        "throttled_without_retry_after": o.throttled_without_retry_after,
        "failed": o.failed,
        "skipped_at_in_flight_cap": o.skipped,
        "completed": c.completed,
        "confirmed": c.confirmed,
        "rejected": c.completed.saturating_sub(c.confirmed),
        "lost": o.lost(),
        "offering_s": o.offering.as_secs_f64(),
        // Each count over the same span, the one the orders were offered in.
        "offered_per_s": per_sec(o.sent, o.offering),
        "accepted_per_offered_s": per_sec(o.accepted, o.offering),
        "throttled_per_offered_s": per_sec(o.throttled, o.offering),
        "failed_per_offered_s": per_sec(o.failed, o.offering),
        "accepted_per_s": per_sec(o.accepted, o.accepting),
        "completed_per_s": per_sec(c.completed, o.completing),
        "http": latency(&o.http),
        "throttled_latency": latency(&o.throttled_latency),
        "place_to_confirmed": latency(&c.place_to_confirmed),
        "place_to_terminal": latency(&c.place_to_terminal),
        "outbox_backlog_peak": o.backlog_peak,
    })
}

/// The orders sent in the first `secs` of the run, on their own.
pub fn cold(o: &Outcome, secs: u64) -> Value {
    json!({
        "secs": secs,
        "http": latency(&o.cold_http),
        "place_to_terminal": latency(&o.completions.cold_place_to_terminal),
    })
}
