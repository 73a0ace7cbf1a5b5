//! `/healthz` (the process answers), `/readyz` (every dependency really works)
//! and `/metrics`, shared by all services.

use std::{fmt::Write, sync::Arc};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use messaging::{Broker, ConsumerProbe, RelayProbe};
use serde::Serialize;
use sqlx::PgPool;

use crate::metrics::{Metrics, escape, render_histogram, sample};

/// What readiness checks and metrics read.
#[derive(Clone, Debug)]
pub struct Health {
    pub pool: PgPool,
    /// The service's broker connections by role (`publish`, `consume`).
    pub brokers: Vec<(&'static str, Broker)>,
    pub consumers: Vec<ConsumerProbe>,
    pub relay: Option<RelayProbe>,
    pub metrics: Arc<Metrics>,
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    checks: Vec<Check>,
}

#[derive(Serialize)]
struct Check {
    name: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl Health {
    pub fn router<S>(self) -> Router<S> {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(Arc::new(self))
    }

    /// One check for all connections: it fails when any of them is down and
    /// says which.
    fn broker_check(&self) -> Check {
        let mut notes = Vec::new();
        for (role, broker) in &self.brokers {
            if !broker.is_connected() {
                notes.push(format!("{role} connection down"));
            } else if broker.is_blocked() {
                notes.push(format!("{role} connection blocked by a broker alarm"));
            }
        }
        Check {
            name: "broker".into(),
            ok: self.brokers.iter().all(|(_, b)| b.is_connected()),
            detail: (!notes.is_empty()).then(|| notes.join(", ")),
        }
    }

    async fn checks(&self) -> Vec<Check> {
        let mut checks = vec![
            Check {
                name: "database".into(),
                ok: crate::database::ping(&self.pool).await,
                detail: None,
            },
            self.broker_check(),
        ];
        for consumer in &self.consumers {
            checks.push(Check {
                name: format!("consumer {}", consumer.queue),
                ok: consumer.is_subscribed(),
                detail: None,
            });
        }
        if let Some(relay) = &self.relay {
            let status = relay.status();
            checks.push(Check {
                name: "outbox relay".into(),
                ok: relay.is_healthy(),
                detail: status.oldest_unpublished.map(|age| {
                    format!(
                        "backlog {}, oldest unpublished {:.1}s",
                        status.backlog,
                        age.as_secs_f64()
                    )
                }),
            });
        }
        checks
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let checks = health.checks().await;
    let ready = checks.iter().all(|c| c.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { ready, checks }))
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let mut out = String::new();
    health.metrics.render_http(&mut out);
    out.push_str("# HELP messaging_consumed_total Deliveries settled, by queue and outcome.\n");
    out.push_str("# TYPE messaging_consumed_total counter\n");
    for c in &health.consumers {
        let q = escape(&c.queue);
        let s = &c.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        for (outcome, value) in [
            ("ack", load(&s.acked)),
            ("retry", load(&s.retried)),
            ("dead_lettered", load(&s.dead_lettered)),
            ("requeued", load(&s.requeued)),
        ] {
            let _ = writeln!(
                out,
                "messaging_consumed_total{{queue=\"{q}\",outcome=\"{outcome}\"}} {value}"
            );
        }
    }
    out.push_str("# HELP messaging_handler_duration_seconds Handler run time, by queue.\n");
    out.push_str("# TYPE messaging_handler_duration_seconds histogram\n");
    for c in &health.consumers {
        let labels = format!("queue=\"{}\"", escape(&c.queue));
        render_histogram(
            &mut out,
            "messaging_handler_duration_seconds",
            &labels,
            &c.stats.handler_duration,
        );
    }
    if let Some(relay) = &health.relay {
        let status = relay.status();
        sample(
            &mut out,
            "outbox_published_total",
            "counter",
            "Outbox rows published and marked.",
            "",
            status.published as f64,
        );
        sample(
            &mut out,
            "outbox_backlog",
            "gauge",
            "Unpublished outbox rows.",
            "",
            status.backlog as f64,
        );
        sample(
            &mut out,
            "outbox_oldest_unpublished_seconds",
            "gauge",
            "Age of the oldest unpublished outbox row.",
            "",
            status.oldest_unpublished.map_or(0.0, |d| d.as_secs_f64()),
        );
    }
    type Family = (&'static str, &'static str, &'static str, fn(&Broker) -> f64);
    let families: [Family; 3] = [
        (
            "broker_connected",
            "gauge",
            "1 while the RabbitMQ connection is open, by connection role.",
            |b| f64::from(u8::from(b.is_connected())),
        ),
        (
            "broker_reconnects_total",
            "counter",
            "RabbitMQ connections rebuilt since start, by connection role.",
            |b| b.reconnects() as f64,
        ),
        (
            "broker_blocked",
            "gauge",
            "1 while the broker blocks publishing on the connection (resource alarm).",
            |b| f64::from(u8::from(b.is_blocked())),
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (role, broker) in &health.brokers {
            let _ = writeln!(out, "{name}{{connection=\"{role}\"}} {}", value(broker));
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
}
