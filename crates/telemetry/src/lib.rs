//! Telemetry for one service process.
//!
//! ```text
//!  tracing spans/events ─┬─▶ log layer (text or JSON, with trace_id/span_id),
//!                        │   filtered by RUST_LOG
//!                        └─▶ OpenTelemetry layer (INFO and above) ─▶ tracer
//!                            provider ─▶ batch exporter (OTLP gRPC or
//!                            HTTP/protobuf) when OTEL_EXPORTER_OTLP_ENDPOINT
//!                            is set
//! ```
//!
//! The log filter applies to log output only: spans (and events) at INFO and
//! above reach OpenTelemetry whatever `RUST_LOG` says, so a quiet log level never
//! breaks a trace. Without an endpoint nothing is exported, but spans still get
//! ids and the W3C context propagates.

mod format;

use opentelemetry::{global, trace::TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{
    EnvFilter, Layer, filter::LevelFilter, layer::SubscriberExt, util::SubscriberInitExt,
};

/// Used when `RUST_LOG` is unset.
pub const DEFAULT_FILTER: &str = "info,lapin=off,sqlx::postgres::notice=warn";

/// The spans and events OpenTelemetry receives, whatever `RUST_LOG` says. Below
/// INFO are the libraries' own: sqlx's DEBUG summary of every statement, turned
/// into a span event with its SQL text, was 4 % of the services' CPU under load
/// (issue #13's profile), and lapin's and h2's TRACE events are built at all
/// only when some layer wants them.
const OTEL_LEVEL: LevelFilter = LevelFilter::INFO;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("RUST_LOG is invalid: {0}")]
    Filter(String),
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL is invalid: '{0}' (expected grpc or http/protobuf)")]
    Protocol(String),
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT is invalid: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// How spans leave the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Export {
    None,
    Grpc(String),
    HttpProtobuf(String),
}

impl Export {
    /// From the standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `_PROTOCOL` variables.
    pub fn from_env() -> Result<Self, TelemetryError> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let Some(endpoint) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
        else {
            return Ok(Self::None);
        };
        match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            None | Some("grpc") => Ok(Self::Grpc(endpoint)),
            Some("http/protobuf") => Ok(Self::HttpProtobuf(http_traces_url(&endpoint))),
            Some(other) => Err(TelemetryError::Protocol(other.to_owned())),
        }
    }
}

/// The generic endpoint is a base URL: traces go to `<base>/v1/traces`.
fn http_traces_url(endpoint: &str) -> String {
    if endpoint.ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    }
}

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes it.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// Installs logging and tracing for `service_name` (overridden by
/// `OTEL_SERVICE_NAME`). Must run inside a Tokio runtime when exporting over gRPC.
pub fn init(service_name: &str, format: LogFormat) -> Result<Telemetry, TelemetryError> {
    let service_name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| service_name.to_owned());
    let filter = match std::env::var("RUST_LOG") {
        Ok(raw) if !raw.trim().is_empty() => {
            EnvFilter::try_new(&raw).map_err(|e| TelemetryError::Filter(format!("'{raw}': {e}")))?
        }
        _ => EnvFilter::new(DEFAULT_FILTER),
    };
    let resource = Resource::builder()
        .with_service_name(service_name.clone())
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let provider = match Export::from_env()? {
        Export::None => builder.build(),
        Export::Grpc(endpoint) => {
            let mut exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone());
            if endpoint.starts_with("https://") {
                exporter = exporter.with_tls_config(
                    opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                        .with_native_roots(),
                );
            }
            let exporter = exporter
                .build()
                .map_err(|e| TelemetryError::Exporter(format!("{endpoint}: {e}")))?;
            builder.with_batch_exporter(exporter).build()
        }
        Export::HttpProtobuf(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| TelemetryError::Exporter(format!("{endpoint}: {e}")))?;
            builder.with_batch_exporter(exporter).build()
        }
    };
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer(service_name);
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .event_format(format::Text(tracing_subscriber::fmt::format()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(format::Json)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                // Both run on every poll of an instrumented future: the busy/idle
                // timings read the clock, the activation attaches an OpenTelemetry
                // context nothing here reads (the context is taken from the span).
                .with_tracked_inactivity(false)
                .with_context_activation(false)
                .with_filter(OTEL_LEVEL),
        )
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Flushes the last spans and stops the tracer provider. Blocking: call from
    /// `main` after the runtime's work is done.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("telemetry shutdown: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::http_traces_url;

    #[test]
    fn the_http_endpoint_is_a_base_url() {
        assert_eq!(
            http_traces_url("http://jaeger:4318"),
            "http://jaeger:4318/v1/traces"
        );
        assert_eq!(
            http_traces_url("http://jaeger:4318/"),
            "http://jaeger:4318/v1/traces"
        );
        assert_eq!(
            http_traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
