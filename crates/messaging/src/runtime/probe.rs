//! What a running [`super::Runtime`] is doing, read without locks: the checks a
//! readiness endpoint reports and the loops a liveness endpoint watches.

use crate::{Broker, ConsumerProbe, RelayProbe, dead_letters::DepthProbe};

/// What is running, cloneable and cheap to read.
#[derive(Clone, Debug)]
pub struct RuntimeProbe {
    /// The connections by role (`publish`, `consume`).
    pub brokers: Vec<(&'static str, Broker)>,
    /// Each consumer, in the order they were added.
    pub consumers: Vec<ConsumerProbe>,
    /// The depth of each consumed queue's DLQ.
    pub dlq_depths: Vec<DepthProbe>,
    /// The outbox relay; `None` when built
    /// [`without_relay`](crate::RuntimeBuilder::without_relay).
    pub relay: Option<RelayProbe>,
}

/// One part of the runtime and whether it works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked: `broker`, `consumer <queue>` or `outbox relay`.
    pub name: String,
    /// Whether it works; a readiness endpoint answers "not ready" when any
    /// check is not ok.
    pub ok: bool,
    /// What is wrong, or worth knowing (a backlog, parked rows).
    pub detail: Option<String>,
}

impl RuntimeProbe {
    /// The state of each part: the connections (one check: down fails it, an
    /// alarm is noted), each consumer (subscribed and not paused), the relay
    /// (healthy, no parked rows; backlog and last error noted).
    pub fn checks(&self) -> Vec<Check> {
        let mut checks = vec![self.broker_check()];
        for consumer in &self.consumers {
            let paused = consumer.paused();
            checks.push(Check {
                name: format!("consumer {}", consumer.queue),
                ok: consumer.is_subscribed() && paused.is_none(),
                detail: match (consumer.is_subscribed(), paused) {
                    (_, Some(reason)) => Some(format!("paused: {reason}")),
                    (false, None) => Some("not subscribed".into()),
                    (true, None) => None,
                },
            });
        }
        if let Some(relay) = &self.relay {
            let status = relay.status();
            let mut notes = Vec::new();
            if let Some(age) = status.oldest_unpublished {
                notes.push(format!(
                    "backlog {}, oldest unpublished {:.1}s",
                    status.backlog,
                    age.as_secs_f64()
                ));
            }
            if status.parked > 0 {
                notes.push(format!("{} parked row(s)", status.parked));
            }
            if let Some(error) = &status.last_error {
                notes.push(error.clone());
            }
            checks.push(Check {
                name: "outbox relay".into(),
                ok: relay.is_healthy() && status.parked == 0,
                detail: (!notes.is_empty()).then(|| notes.join("; ")),
            });
        }
        checks
    }

    /// One check for all connections: it fails when any of them is down and
    /// says which; a connection blocked by a broker alarm is noted, not failed
    /// (consuming goes on, the outbox holds what waits to be published). Each
    /// connection also says which node it is on (or was, while down).
    fn broker_check(&self) -> Check {
        let mut notes = Vec::new();
        for (role, broker) in &self.brokers {
            let node = broker.node();
            if !broker.is_connected() {
                notes.push(format!("{role} connection down (last on {node})"));
            } else if broker.is_blocked() {
                notes.push(format!(
                    "{role} connection on {node} blocked by a broker alarm"
                ));
            } else {
                notes.push(format!("{role} on {node}"));
            }
        }
        Check {
            name: "broker".into(),
            ok: self.brokers.iter().all(|(_, b)| b.is_connected()),
            detail: (!notes.is_empty()).then(|| notes.join(", ")),
        }
    }

    /// The runtime's loops whose heartbeat stopped (a connection supervisor,
    /// a consumer, the relay), one line each: a reason to restart the process,
    /// unlike a dependency being down.
    pub fn wedged(&self) -> Vec<String> {
        let mut beats: Vec<(String, &crate::Heartbeat)> = Vec::new();
        for (role, broker) in &self.brokers {
            beats.push((format!("{role} connection supervisor"), broker.heartbeat()));
        }
        for consumer in &self.consumers {
            beats.push((format!("consumer {}", consumer.queue), consumer.heartbeat()));
        }
        if let Some(relay) = &self.relay {
            beats.push(("outbox relay".into(), relay.heartbeat()));
        }
        beats
            .into_iter()
            .filter(|(_, beat)| !beat.is_alive())
            .map(|(name, beat)| {
                format!("{name}: no heartbeat for {:.0}s", beat.age().as_secs_f64())
            })
            .collect()
    }
}
