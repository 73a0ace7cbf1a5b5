//! The server span of each HTTP request: named `METHOD /route`, continuing an
//! incoming W3C `traceparent`, with OpenTelemetry HTTP attributes.

use axum::{extract::MatchedPath, http::Request};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::{Span, field::Empty};

pub fn make_span<B>(request: &Request<B>) -> Span {
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || request.uri().path().to_owned(),
        |p| p.as_str().to_owned(),
    );
    let span = tracing::info_span!(
        "request",
        otel.name = %format!("{} {}", request.method(), route),
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = %route,
        url.path = %request.uri().path(),
        http.response.status_code = Empty,
        shop.order_id = Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
    messaging::propagation::set_parent(&span, parent);
    span
}

struct HeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Records the status on the request span and logs one line per request.
pub fn on_response<B>(
    response: &axum::http::Response<B>,
    latency: std::time::Duration,
    span: &Span,
) {
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    tracing::debug!(
        status,
        latency_ms = latency.as_secs_f64() * 1e3,
        "request finished"
    );
}
