//! The probes and `/metrics`, shared by all services.
//!
//! - `/readyz` (readiness: may this replica get traffic?) is 200 exactly when the
//!   service's database answers and, with bearer tokens, it has the issuer's
//!   keys: then it can take and serve requests. The broker,
//!   the consumers (subscribed, paused) and the relay (backlog, oldest age, parked
//!   rows) are reported in the body but never make a replica unready: while the
//!   broker is away the outbox keeps taking orders, and taking every replica out
//!   of service then would turn intake away for nothing.
//! - `/healthz` (liveness: should this process be restarted?) fails only when a
//!   loop of the runtime is wedged: a connection supervisor, a consumer or the
//!   relay has not beaten its heartbeat for [`messaging::WEDGED_AFTER`]. A
//!   dependency being down is not a reason to restart.

use std::{fmt::Write, sync::Arc};

use axum::{Json, extract::State, http::StatusCode, response::IntoResponse};
use messaging::{Broker, ConsumerProbe, DeathClass, RuntimeProbe};
use serde::Serialize;
use sqlx::PgPool;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::metrics::{Metrics, escape, render_histogram, sample};

/// What readiness checks and metrics read.
#[derive(Clone, Debug)]
pub struct Health {
    pub pool: PgPool,
    /// The messaging runtime: connections, consumers, DLQ depths, relay.
    pub messaging: RuntimeProbe,
    pub metrics: Arc<Metrics>,
    /// Reported: whether tokens are checked, and with which keys.
    pub auth: Arc<crate::auth::Auth>,
}

/// Whether this replica may get traffic, and the state of each dependency.
#[derive(Serialize, utoipa::ToSchema)]
struct Readiness {
    ready: bool,
    checks: Vec<Check>,
}

/// One dependency or loop and whether it works.
#[derive(Serialize, utoipa::ToSchema)]
struct Check {
    name: String,
    ok: bool,
    /// Only critical checks decide readiness; the others are information.
    critical: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    detail: Option<String>,
}

/// Whether the process should be left running.
#[derive(Serialize, utoipa::ToSchema)]
struct Liveness {
    alive: bool,
    /// The loops that stopped beating, with the age of their last beat.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    wedged: Vec<String>,
}

impl Health {
    /// `/healthz`, `/readyz` and `/metrics`, documented.
    pub fn router<S: Clone + Send + Sync + 'static>(self) -> OpenApiRouter<S> {
        OpenApiRouter::new()
            .routes(routes!(healthz))
            .routes(routes!(readyz))
            .routes(routes!(metrics))
            .with_state(Arc::new(self))
    }

    /// The database (critical: without it the service can take no request),
    /// then each part of the messaging runtime (reported, never critical).
    async fn checks(&self) -> Vec<Check> {
        let mut checks = vec![Check {
            name: "database".into(),
            ok: crate::database::ping(&self.pool).await,
            critical: true,
            detail: None,
        }];
        checks.extend(self.messaging.checks().into_iter().map(|c| Check {
            name: c.name,
            ok: c.ok,
            critical: false,
            detail: c.detail,
        }));
        // Without any key (the issuer has not answered since startup) every
        // API request is refused: not ready. Otherwise reported only.
        let (ok, detail) = self.auth.check();
        checks.push(Check {
            name: "auth".into(),
            ok,
            critical: !ok,
            detail: Some(detail),
        });
        checks
    }
}

/// Readiness: 200 exactly when the database answers; the other checks are
/// reported, never failing it.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "probes",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready: the database does not answer, or no token signing key is loaded yet", body = Readiness),
    )
)]
async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let checks = health.checks().await;
    let ready = checks.iter().filter(|c| c.critical).all(|c| c.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { ready, checks }))
}

/// Liveness: 503 only when a loop of the runtime is wedged.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "probes",
    responses(
        (status = 200, description = "Alive", body = Liveness),
        (status = 503, description = "A loop stopped beating: restart the process", body = Liveness),
    )
)]
async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let wedged = health.messaging.wedged();
    let status = if wedged.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Liveness {
            alive: wedged.is_empty(),
            wedged,
        }),
    )
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "probes",
    responses((status = 200, description = "The metrics", body = String, content_type = "text/plain; version=0.0.4"))
)]
async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let mut out = String::new();
    health.metrics.render_http(&mut out);
    health.metrics.render_gauges(&mut out);
    out.push_str("# HELP messaging_consumed_total Deliveries settled, by queue and outcome.\n");
    out.push_str("# TYPE messaging_consumed_total counter\n");
    for c in &health.messaging.consumers {
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
    out.push_str("# HELP messaging_dead_lettered_total Messages dead-lettered, by queue and class (poison: unusable envelope, rejected: refused by the handler, exhausted: retries used up).\n");
    out.push_str("# TYPE messaging_dead_lettered_total counter\n");
    for c in &health.messaging.consumers {
        for class in DeathClass::ALL {
            let _ = writeln!(
                out,
                "messaging_dead_lettered_total{{queue=\"{}\",class=\"{}\"}} {}",
                escape(&c.queue),
                class.as_str(),
                c.stats.dead_lettered_as(class)
            );
        }
    }
    out.push_str("# HELP messaging_dlq_depth Messages waiting in the DLQ of a consumed queue (absent until read).\n");
    out.push_str("# TYPE messaging_dlq_depth gauge\n");
    for probe in &health.messaging.dlq_depths {
        if let Some(depth) = probe.depth() {
            let _ = writeln!(
                out,
                "messaging_dlq_depth{{queue=\"{}\"}} {depth}",
                escape(&probe.queue)
            );
        }
    }
    type ConsumerFamily = (
        &'static str,
        &'static str,
        &'static str,
        fn(&ConsumerProbe) -> f64,
    );
    let consumer_families: [ConsumerFamily; 5] = [
        (
            "messaging_redriven_total",
            "counter",
            "Messages sent back from the DLQ by an operator and run again, by queue.",
            |c| c.stats.redriven.load(std::sync::atomic::Ordering::Relaxed) as f64,
        ),
        (
            "messaging_handler_timeouts_total",
            "counter",
            "Handler runs abandoned at the handler deadline (then retried), by queue.",
            |c| c.stats.timed_out.load(std::sync::atomic::Ordering::Relaxed) as f64,
        ),
        (
            "messaging_consumer_pauses_total",
            "counter",
            "Times the consumer paused because a dependency was unavailable, by queue.",
            |c| c.stats.pauses.load(std::sync::atomic::Ordering::Relaxed) as f64,
        ),
        (
            "messaging_consumer_paused",
            "gauge",
            "1 while the consumer is paused for an unavailable dependency, by queue.",
            |c| f64::from(u8::from(c.paused().is_some())),
        ),
        (
            "messaging_consumer_subscribed",
            "gauge",
            "1 while the consumer is subscribed to its queue, by queue.",
            |c| f64::from(u8::from(c.is_subscribed())),
        ),
    ];
    for (name, kind, help, value) in consumer_families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for c in &health.messaging.consumers {
            let _ = writeln!(out, "{name}{{queue=\"{}\"}} {}", escape(&c.queue), value(c));
        }
    }
    out.push_str("# HELP messaging_handler_duration_seconds Handler run time, by queue.\n");
    out.push_str("# TYPE messaging_handler_duration_seconds histogram\n");
    for c in &health.messaging.consumers {
        let labels = format!("queue=\"{}\"", escape(&c.queue));
        render_histogram(
            &mut out,
            "messaging_handler_duration_seconds",
            &labels,
            &c.stats.handler_duration,
        );
    }
    if let Some(relay) = &health.messaging.relay {
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
            "outbox_parked",
            "gauge",
            "Outbox rows parked after repeated refusals by the broker (need an operator).",
            "",
            status.parked as f64,
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
        for (role, broker) in &health.messaging.brokers {
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
