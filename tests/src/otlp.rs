//! An OTLP trace receiver inside the test process (gRPC or HTTP/protobuf), so
//! the suite can check the spans the real services export.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Router, body::Bytes, extract::State, http::header, routing::post};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value as AnyValue,
};
use prost::Message;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    pub fn env_value(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// One exported span, flattened for assertions.
#[derive(Clone, Debug)]
pub struct Span {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    /// OTLP span kind: 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub attributes: HashMap<String, String>,
}

pub const KIND_SERVER: i32 = 2;
pub const KIND_PRODUCER: i32 = 4;
pub const KIND_CONSUMER: i32 = 5;

#[derive(Clone, Debug, Default)]
pub struct Spans(Arc<Mutex<Vec<Span>>>);

impl Spans {
    pub fn all(&self) -> Vec<Span> {
        self.0.lock().expect("spans").clone()
    }

    pub fn in_trace(&self, trace_id: &str) -> Vec<Span> {
        self.all()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    fn add(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().expect("spans");
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(text)
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        service: service.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name,
                        kind: span.kind,
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| {
                                (
                                    kv.key.clone(),
                                    kv.value.as_ref().map(text).unwrap_or_default(),
                                )
                            })
                            .collect(),
                    });
                }
            }
        }
    }
}

fn text(value: &opentelemetry_proto::tonic::common::v1::AnyValue) -> String {
    match &value.value {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running receiver; spans arrive in [`Receiver::spans`].
#[derive(Debug)]
pub struct Receiver {
    pub endpoint: String,
    pub protocol: Protocol,
    pub spans: Spans,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Grpc(Spans);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn http_export(
    State(spans): State<Spans>,
    body: Bytes,
) -> ([(header::HeaderName, &'static str); 1], Vec<u8>) {
    if let Ok(request) = ExportTraceServiceRequest::decode(body) {
        spans.add(request);
    }
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

impl Receiver {
    pub async fn start(protocol: Protocol) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let spans = Spans::default();
        let task = match protocol {
            Protocol::Grpc => {
                let service = TraceServiceServer::new(Grpc(spans.clone()));
                let incoming = tokio_stream_from(listener);
                tokio::spawn(async move {
                    let _ = tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming(incoming)
                        .await;
                })
            }
            Protocol::HttpProtobuf => {
                let app = Router::new()
                    .route("/v1/traces", post(http_export))
                    .with_state(spans.clone());
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).await;
                })
            }
        };
        Self {
            endpoint: format!("http://{addr}"),
            protocol,
            spans,
            task,
        }
    }
}

/// The listener as a stream of connections for tonic.
fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}
