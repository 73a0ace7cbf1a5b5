//! W3C Trace Context (`traceparent`, `tracestate`) carried in AMQP message headers,
//! and the producer/consumer spans of the OpenTelemetry messaging conventions.
//!
//! Extraction never fails a message: a missing header continues nothing, and a
//! malformed one starts a new trace with a warning.

use std::collections::HashMap;

use lapin::types::{AMQPValue, FieldTable, LongString};
use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Span attribute carrying a message's correlation id, named by the application
/// (the shop uses `shop.order_id`), so traces can be searched by it.
static CORRELATION_ATTRIBUTE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Names the attribute that carries correlation ids on messaging spans. Call once
/// at startup; later calls are ignored.
pub fn set_correlation_attribute(name: &'static str) {
    let _ = CORRELATION_ATTRIBUTE.set(name);
}

/// Tags `span` with the correlation id under the configured attribute.
pub fn tag_correlation(span: &Span, correlation_id: Option<&str>) {
    if let (Some(name), Some(id)) = (CORRELATION_ATTRIBUTE.get(), correlation_id) {
        span.set_attribute(*name, id.to_owned());
    }
}

/// The W3C header with the trace id, parent span id and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header with vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// Writes the trace context of `cx` into `headers` (nothing if `cx` has no span).
pub fn inject(cx: &Context, headers: &mut FieldTable) {
    TraceContextPropagator::new().inject_context(cx, &mut TableInjector(headers));
}

/// Writes the trace context of `cx` into a plain map (for storing it in a row).
pub fn inject_map(cx: &Context) -> HashMap<String, String> {
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut map);
    map
}

/// Reads a trace context from message headers. A malformed `traceparent` is
/// logged and yields an empty context, so the consumer starts a new trace.
pub fn extract(headers: Option<&FieldTable>) -> Context {
    let Some(headers) = headers else {
        return Context::new();
    };
    let cx = TraceContextPropagator::new().extract(&TableExtractor(headers));
    if !cx.span().span_context().is_valid()
        && let Some(raw) = TableExtractor(headers).get(TRACEPARENT)
    {
        tracing::warn!(
            traceparent = %raw.chars().take(128).collect::<String>(),
            "malformed traceparent header; starting a new trace"
        );
    }
    cx
}

/// Reads a trace context from a plain map (a stored row's headers).
pub fn extract_map(map: &HashMap<String, String>) -> Context {
    TraceContextPropagator::new().extract(map)
}

/// The context to propagate from `span`: its own context when an OpenTelemetry
/// layer is installed, otherwise the context it was given as parent, so that
/// propagation passes through even in a process that exports nothing.
pub fn context_of(span: &Span, parent: &Context) -> Context {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        cx
    } else {
        parent.clone()
    }
}

/// Makes `parent` the parent of a freshly created `span` (ignored when the span
/// is disabled or no OpenTelemetry layer is installed).
pub fn set_parent(span: &Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

struct TableInjector<'a>(&'a mut FieldTable);

impl Injector for TableInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // RabbitMQ does not understand short strings in tables: use long strings.
        self.0
            .insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    }
}

struct TableExtractor<'a>(&'a FieldTable);

impl Extractor for TableExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    fn remote(trace: u128, span: u64) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }

    #[test]
    fn round_trips_through_headers() {
        let cx = remote(0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331);
        let mut headers = FieldTable::default();
        inject(&cx, &mut headers);
        let back = extract(Some(&headers));
        assert_eq!(
            back.span().span_context().trace_id(),
            cx.span().span_context().trace_id()
        );
        assert_eq!(
            back.span().span_context().span_id(),
            cx.span().span_context().span_id()
        );
    }

    #[test]
    fn malformed_or_missing_yields_an_empty_context() {
        let mut headers = FieldTable::default();
        headers.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString("00-zz-not-hex-01".into()),
        );
        assert!(!extract(Some(&headers)).span().span_context().is_valid());
        headers.insert(TRACEPARENT.into(), AMQPValue::Boolean(true));
        assert!(!extract(Some(&headers)).span().span_context().is_valid());
        assert!(!extract(None).span().span_context().is_valid());
    }
}
