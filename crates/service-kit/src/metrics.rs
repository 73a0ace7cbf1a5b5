//! Prometheus text exposition, written by hand: a handful of counters and two
//! histogram families do not need a metrics framework.
//!
//! HTTP requests are recorded by [`track_http`] (route template, method, status);
//! messaging figures are read at scrape time from the consumer and relay probes
//! and the broker handle. A service adds figures of its own as [`Gauge`]s
//! (registered with [`Metrics::gauge`]) that it sets from a periodic task: a
//! scrape only reads the last values, so a slow database never holds up
//! `/metrics`.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};
use messaging::Histogram;

/// Writes one histogram's samples (`_bucket`, `_sum`, `_count`).
pub fn render_histogram(out: &mut String, name: &str, labels: &str, histogram: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (bound, count) in histogram.buckets() {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
    }
    let count = histogram.count();
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", histogram.sum_seconds());
    let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
}

/// One value a service sets and `/metrics` reports as it was last set.
#[derive(Clone, Debug, Default)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

#[derive(Debug)]
struct Registered {
    help: &'static str,
    gauge: Gauge,
}

/// Metrics a service records as it runs.
#[derive(Debug, Default)]
pub struct Metrics {
    /// (method, route, status) → latency histogram.
    http: Mutex<BTreeMap<(String, String, u16), Arc<Histogram>>>,
    /// The service's own gauges by name (names are the service's constants, so
    /// the set is small and fixed).
    gauges: Mutex<BTreeMap<&'static str, Registered>>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The gauge `name` (0 until set), registered on first use; asking again
    /// for the same name returns the same gauge.
    pub fn gauge(&self, name: &'static str, help: &'static str) -> Gauge {
        self.gauges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name)
            .or_insert_with(|| Registered {
                help,
                gauge: Gauge::default(),
            })
            .gauge
            .clone()
    }

    /// The service's gauges, each with its HELP and TYPE lines.
    pub fn render_gauges(&self, out: &mut String) {
        let gauges = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        for (name, registered) in gauges.iter() {
            sample(
                out,
                name,
                "gauge",
                registered.help,
                "",
                registered.gauge.get(),
            );
        }
    }

    pub fn observe_http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let key = (method.to_owned(), route.to_owned(), status);
        let histogram = self
            .http
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone();
        histogram.observe(seconds);
    }

    /// The HTTP part of the exposition.
    pub fn render_http(&self, out: &mut String) {
        let http = self.http.lock().unwrap_or_else(|e| e.into_inner()).clone();
        out.push_str(
            "# HELP http_server_requests_total HTTP requests by method, route and status.\n",
        );
        out.push_str("# TYPE http_server_requests_total counter\n");
        for ((method, route, status), h) in &http {
            let _ = writeln!(
                out,
                "http_server_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {}",
                escape(route),
                h.count()
            );
        }
        out.push_str("# HELP http_server_request_duration_seconds HTTP request latency.\n");
        out.push_str("# TYPE http_server_request_duration_seconds histogram\n");
        for ((method, route, status), h) in &http {
            let labels = format!(
                "method=\"{method}\",route=\"{}\",status=\"{status}\"",
                escape(route)
            );
            render_histogram(out, "http_server_request_duration_seconds", &labels, h);
        }
    }
}

/// Middleware recording every request under its route template (never the raw
/// path, so ids do not explode the label set).
pub async fn track_http(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.observe_http(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Writes one sample with its HELP and TYPE lines.
pub fn sample(out: &mut String, name: &str, kind: &str, help: &str, labels: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

pub fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let metrics = Metrics::default();
        metrics.observe_http("GET", "/orders/{id}", 200, 0.003);
        metrics.observe_http("GET", "/orders/{id}", 200, 0.2);
        let mut out = String::new();
        metrics.render_http(&mut out);
        assert!(out.contains(
            "http_server_requests_total{method=\"GET\",route=\"/orders/{id}\",status=\"200\"} 2"
        ));
        assert!(out.contains("le=\"0.005\"} 1"));
        assert!(out.contains("le=\"0.25\"} 2"));
        assert!(out.contains("le=\"+Inf\"} 2"));
    }

    #[test]
    fn gauges_render_their_last_value_and_register_once() {
        let metrics = Metrics::default();
        let gauge = metrics.gauge("things_waiting", "Things waiting.");
        let mut out = String::new();
        metrics.render_gauges(&mut out);
        assert!(out.contains("\nthings_waiting 0\n"), "{out}");
        gauge.set(2.5);
        metrics.gauge("things_waiting", "Things waiting.").set(3.0);
        let mut out = String::new();
        metrics.render_gauges(&mut out);
        assert_eq!(
            out,
            "# HELP things_waiting Things waiting.\n# TYPE things_waiting gauge\nthings_waiting 3\n"
        );
    }
}
