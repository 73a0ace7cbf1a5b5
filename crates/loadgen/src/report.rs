//! The report: JSON for machines, a markdown table for people.

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

pub fn outcome(o: &Outcome) -> Value {
    let per_sec = |n: u64, d: std::time::Duration| {
        if d.is_zero() {
            0.0
        } else {
            n as f64 / d.as_secs_f64()
        }
    };
    json!({
        "accepted": o.accepted,
        "failed": o.failed,
        "completed": o.completed,
        "confirmed": o.confirmed,
        "accepted_per_s": per_sec(o.accepted, o.accepting),
        "completed_per_s": per_sec(o.completed, o.completing),
        "http": latency(&o.http),
        "place_to_confirmed": latency(&o.place_to_confirmed),
        "outbox_backlog_peak": o.backlog_peak,
    })
}

pub fn markdown(report: &Value) -> String {
    let f = |v: &Value| {
        v.as_f64()
            .map_or_else(|| v.to_string(), |x| format!("{x:.1}"))
    };
    let r = report;
    let mut out = String::new();
    out.push_str("| measure | value |\n|---|---|\n");
    let mut row = |k: &str, v: String| out.push_str(&format!("| {k} | {v} |\n"));
    row("concurrency", r["concurrency"].to_string());
    row(
        "orders accepted / failed",
        format!("{} / {}", r["load"]["accepted"], r["load"]["failed"]),
    );
    row("API accepted orders/s", f(&r["load"]["accepted_per_s"]));
    row(
        "completed orders/s (end to end)",
        f(&r["load"]["completed_per_s"]),
    );
    for (name, key) in [
        ("HTTP POST /orders", "http"),
        ("place → confirmed", "place_to_confirmed"),
    ] {
        let h = &r["load"][key];
        row(
            &format!("{name} p50 / p95 / p99 / max (ms)"),
            format!(
                "{} / {} / {} / {}",
                f(&h["p50_ms"]),
                f(&h["p95_ms"]),
                f(&h["p99_ms"]),
                f(&h["max_ms"])
            ),
        );
    }
    row(
        "outbox backlog peak",
        r["load"]["outbox_backlog_peak"].to_string(),
    );
    row(
        "database ceiling (order transaction/s)",
        f(&r["ceilings"]["database_tx_per_s"]),
    );
    row(
        "broker ceiling: confirmed publish msg/s",
        f(&r["ceilings"]["publish_per_s"]),
    );
    row(
        "broker ceiling: consume with ack msg/s",
        f(&r["ceilings"]["consume_per_s"]),
    );
    row(
        "relay (pre-filled outbox) msg/s",
        f(&r["ceilings"]["relay_per_s"]),
    );
    row(
        "API / database ceiling",
        f2(&r["ratios"]["api_over_database"]),
    );
    row(
        "relay / broker publish ceiling",
        f2(&r["ratios"]["relay_over_publish"]),
    );
    row(
        "end to end / smaller ceiling",
        f2(&r["ratios"]["completed_over_smaller_ceiling"]),
    );
    if !r["half_rate"].is_null() {
        let h = &r["half_rate"];
        row("half-rate run: offered orders/s", f(&h["rate"]));
        row(
            "half-rate place → confirmed p50 / p99 / max (ms)",
            format!(
                "{} / {} / {}",
                f(&h["load"]["place_to_confirmed"]["p50_ms"]),
                f(&h["load"]["place_to_confirmed"]["p99_ms"]),
                f(&h["load"]["place_to_confirmed"]["max_ms"])
            ),
        );
    }
    out
}

fn f2(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| v.to_string(), |x| format!("{x:.2}"))
}
