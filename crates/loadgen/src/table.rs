//! The report for people: a markdown table from the report's JSON.

use serde_json::Value;

fn f(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| v.to_string(), |x| format!("{x:.1}"))
}

fn f2(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| v.to_string(), |x| format!("{x:.2}"))
}

/// The quantiles asked for of a latency object; "none" for no samples, which
/// would otherwise read as zero milliseconds.
fn quantiles(h: &Value, keys: &[&str]) -> String {
    if h["count"].as_u64() == Some(0) {
        return "none".into();
    }
    keys.iter()
        .map(|k| f(&h[format!("{k}_ms")]))
        .collect::<Vec<_>>()
        .join(" / ")
}

struct Table(String);

impl Table {
    fn row(&mut self, k: &str, v: impl AsRef<str>) {
        self.0.push_str(&format!("| {k} | {} |\n", v.as_ref()));
    }
}

pub fn markdown(r: &Value) -> String {
    let mut t = Table(String::new());
    t.0.push_str(&preface(r));
    t.0.push_str("| measure | value |\n|---|---|\n");
    main_run(&mut t, r);
    cpu(
        &mut t,
        &r["load"]["cpu_steady"],
        &r["load"]["cpu_whole_run"],
    );
    ceilings(&mut t, r);
    if !r["open_loop"].is_null() {
        open_loop(&mut t, &r["open_loop"]);
    }
    if !r["half_rate"].is_null() {
        let h = &r["half_rate"];
        t.row("half-rate run: offered orders/s", f(&h["rate"]));
        t.row(
            "half-rate place → confirmed p50 / p99 / max (ms)",
            quantiles(&h["load"]["place_to_confirmed"], &["p50", "p99", "max"]),
        );
    }
    if !r["overload"].is_null() {
        overload(&mut t, &r["overload"]);
    }
    t.0
}

/// What ran, in which order, so the figures can be read without the script.
fn preface(r: &Value) -> String {
    let mut runs = Vec::new();
    let o = &r["open_loop"];
    if !o.is_null() {
        runs.push(format!(
            "an open-loop run at {} orders/s for {} s, first after the services started \
             (its first {} s are the cold start; it replaces the half-rate run of earlier reports)",
            f(&o["rate"]),
            o["secs"],
            o["cold"]["secs"]
        ));
    }
    let main = match r["main"]["rate"].as_f64() {
        Some(rate) => format!("the main run, open loop at {rate:.1} orders/s"),
        None => format!(
            "the main run, closed loop with {} clients",
            r["concurrency"]
        ),
    };
    runs.push(format!("{main} ({} orders)", r["load"]["sent"]));
    runs.push("the database, broker and relay ceilings".into());
    if !r["half_rate"].is_null() {
        runs.push("the half-rate run".into());
    }
    let v = &r["overload"];
    if !v.is_null() {
        runs.push(format!(
            "an overload run at {} orders/s (2 × the main run's completed/s) for {} s",
            f(&v["rate"]),
            v["secs"]
        ));
    }
    format!(
        "Runs, in order: {}. Every run waits up to {} s after its last answer for its \
         accepted orders to complete; those that do not are \"lost\".\n\n",
        runs.join("; "),
        r["drain_s"]
    )
}

fn main_run(t: &mut Table, r: &Value) {
    let l = &r["load"];
    t.row("concurrency", r["concurrency"].to_string());
    t.row(
        "orders accepted / failed",
        format!("{} / {}", l["accepted"], l["failed"]),
    );
    t.row("API accepted orders/s", f(&l["accepted_per_s"]));
    t.row("completed orders/s (end to end)", f(&l["completed_per_s"]));
    for (name, key) in [
        ("HTTP POST /orders", "http"),
        ("place → confirmed", "place_to_confirmed"),
    ] {
        t.row(
            &format!("{name} p50 / p95 / p99 / max (ms)"),
            quantiles(&l[key], &["p50", "p95", "p99", "max"]),
        );
    }
    t.row("outbox backlog peak", l["outbox_backlog_peak"].to_string());
}

/// Two windows side by side: the steady part (the figure asked for) and the whole
/// run, the one where every order counted was also placed inside it.
fn cpu(t: &mut Table, steady: &Value, whole: &Value) {
    if steady.is_null() && whole.is_null() {
        return;
    }
    let window = |w: &Value| {
        if w.is_null() {
            return "not measured: the run ended before its warm-up did".to_owned();
        }
        format!(
            "{} / {} / {} / {}",
            f(&w["seconds"]),
            w["accepted"],
            w["completed"],
            f(&w["completed_per_s"])
        )
    };
    t.row(
        "CPU windows, steady part / whole main run: s / accepted / completed / completed orders/s",
        format!("{}; {}", window(steady), window(whole)),
    );
    let cell = |w: &Value, key: &str| {
        let ms = &w["cpu_ms_per_completed_order"][key];
        if w.is_null() {
            "–".to_owned()
        } else if ms.is_null() {
            "not measured (no pid given)".to_owned()
        } else {
            format!("{} ({} cores)", f2(ms), f2(&w["cores"][key]))
        }
    };
    let both = |key: &str| format!("{}; {}", cell(steady, key), cell(whole, key));
    let services = if steady.is_null() { whole } else { steady };
    for name in services["services"].as_array().into_iter().flatten() {
        let name = name.as_str().unwrap_or_default();
        t.row(
            &format!("CPU ms per completed order, steady; whole run: {name}-service"),
            both(name),
        );
    }
    for (label, key) in [
        ("services total", "services"),
        (
            "PostgreSQL (postmaster, backends, reaped backends)",
            "postgres",
        ),
        ("RabbitMQ (beam.smp and its children)", "rabbitmq"),
        ("total (services + PostgreSQL + RabbitMQ)", "total"),
        ("loadgen (for information)", "loadgen"),
        (
            "whole machine, busy time of all CPUs (for information)",
            "machine",
        ),
    ] {
        t.row(
            &format!("CPU ms per completed order, steady; whole run: {label}"),
            both(key),
        );
    }
}

fn ceilings(t: &mut Table, r: &Value) {
    let c = &r["ceilings"];
    t.row(
        "database ceiling (order transaction/s)",
        f(&c["database_tx_per_s"]),
    );
    t.row(
        "broker ceiling: confirmed publish msg/s",
        f(&c["publish_per_s"]),
    );
    t.row(
        "broker ceiling: consume with ack msg/s",
        f(&c["consume_per_s"]),
    );
    t.row("relay (pre-filled outbox) msg/s", f(&c["relay_per_s"]));
    let q = &r["ratios"];
    t.row("API / database ceiling", f2(&q["api_over_database"]));
    t.row(
        "relay / broker publish ceiling",
        f2(&q["relay_over_publish"]),
    );
    t.row(
        "end to end / smaller ceiling",
        f2(&q["completed_over_smaller_ceiling"]),
    );
}

fn open_loop(t: &mut Table, o: &Value) {
    let (l, cold) = (&o["load"], &o["cold"]);
    let name = format!("open loop {} orders/s", f(&o["rate"]));
    t.row(
        &format!("{name}: sent / accepted / failed / lost"),
        format!(
            "{} / {} / {} / {}",
            l["sent"], l["accepted"], l["failed"], l["lost"]
        ),
    );
    let first = format!("{name}, first {} s (cold start)", cold["secs"]);
    let whole = format!("{name}, whole {} s", o["secs"]);
    for (part, http, terminal) in [
        (&first, &cold["http"], &cold["place_to_terminal"]),
        (&whole, &l["http"], &l["place_to_terminal"]),
    ] {
        t.row(
            &format!("{part}: HTTP POST /orders p50 / p99 / max (ms)"),
            quantiles(http, &["p50", "p99", "max"]),
        );
        t.row(
            &format!("{part}: place → terminal p50 / p99 / max (ms)"),
            quantiles(terminal, &["p50", "p99", "max"]),
        );
    }
}

fn overload(t: &mut Table, v: &Value) {
    let l = &v["load"];
    t.row(
        "overload: offered orders/s",
        format!(
            "{} (target {}, for {} s)",
            f(&l["offered_per_s"]),
            f(&v["rate"]),
            v["secs"]
        ),
    );
    t.row(
        "overload: accepted (202) count, /s",
        format!("{}, {}", l["accepted"], f(&l["accepted_per_offered_s"])),
    );
    t.row(
        "overload: answered 429 count, /s",
        format!("{}, {}", l["throttled"], f(&l["throttled_per_offered_s"])),
    );
    t.row(
        "overload: 429 answers without Retry-After",
        l["throttled_without_retry_after"].to_string(),
    );
    t.row(
        "overload: other failures count, /s",
        format!("{}, {}", l["failed"], f(&l["failed_per_offered_s"])),
    );
    if l["skipped_at_in_flight_cap"].as_u64().unwrap_or(0) > 0 {
        t.row(
            "overload: not sent, loadgen's in-flight cap reached",
            l["skipped_at_in_flight_cap"].to_string(),
        );
    }
    t.row(
        "overload: accepted orders' place → terminal p50 / p99 / max (ms)",
        quantiles(&l["place_to_terminal"], &["p50", "p99", "max"]),
    );
    t.row(
        "overload: 429 answers' latency p50 / p99 / max (ms)",
        quantiles(&l["throttled_latency"], &["p50", "p99", "max"]),
    );
    t.row(
        "overload: HTTP POST /orders answers other than 429 p50 / p99 / max (ms)",
        quantiles(&l["http"], &["p50", "p99", "max"]),
    );
    t.row(
        &format!(
            "overload: lost (accepted, not terminal {} s after the last answer)",
            v["drain_s"]
        ),
        l["lost"].to_string(),
    );
    t.row(
        "overload: outbox backlog peak",
        l["outbox_backlog_peak"].to_string(),
    );
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_latency_without_samples_reads_none_not_zero() {
        let empty = json!({"count": 0, "p50_ms": 0.0, "p99_ms": 0.0});
        let some = json!({"count": 2, "p50_ms": 1.25, "p99_ms": 3.0});
        assert_eq!(quantiles(&empty, &["p50", "p99"]), "none");
        assert_eq!(quantiles(&some, &["p50", "p99"]), "1.2 / 3.0");
    }
}
