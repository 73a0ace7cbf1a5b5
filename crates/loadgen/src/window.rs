//! A measured window: the order counters and the CPU counters read together at
//! both ends, so CPU per completed order divides two figures of the same
//! interval. `drive` takes two: the steady part (after a warm-up, until the
//! first client has no more orders to send, while every other is still busy)
//! and the whole run (from before the first request to after the last
//! completion).

use serde_json::{Map, Value, json};

use crate::cpu::{Group, Probe, Sample};

/// Counters at one end of the window.
#[derive(Clone, Debug)]
pub struct Mark {
    pub accepted: u64,
    pub completed: u64,
    pub cpu: Sample,
}

#[derive(Clone, Debug)]
pub struct Window {
    pub start: Mark,
    pub end: Mark,
}

/// CPU seconds between two tick counters; `None` when either end is missing.
fn seconds(start: Option<u64>, end: Option<u64>, ticks_per_s: f64) -> Option<f64> {
    Some(end?.saturating_sub(start?) as f64 / ticks_per_s)
}

impl Window {
    /// Per component: CPU ms per completed order and cores used, with the
    /// services, PostgreSQL and RabbitMQ subtotals and their total.
    pub fn json(&self, probe: &Probe) -> Value {
        let (s, e) = (&self.start, &self.end);
        let elapsed = e.cpu.at.saturating_duration_since(s.cpu.at).as_secs_f64();
        let completed = e.completed.saturating_sub(s.completed);
        let accepted = e.accepted.saturating_sub(s.accepted);
        let tick = probe.ticks_per_s;
        let mut cpu: Vec<(String, Option<f64>)> = Vec::new();
        let mut group_sum = |group: Group| -> Option<f64> {
            let mut sum = None;
            for c in probe.components.iter().filter(|c| c.group == group) {
                let at = |m: &Mark| m.cpu.components.get(&c.name).copied().flatten();
                let v = seconds(at(s), at(e), tick);
                if group == Group::Service {
                    cpu.push((c.name.clone(), v));
                }
                sum = Some(sum.unwrap_or(0.0) + v?);
            }
            sum
        };
        let services = group_sum(Group::Service);
        let postgres = group_sum(Group::Postgres);
        let rabbitmq = group_sum(Group::Rabbitmq);
        let total = match (services, postgres, rabbitmq) {
            (Some(a), Some(b), Some(c)) => Some(a + b + c),
            _ => None,
        };
        let loadgen = seconds(s.cpu.own, e.cpu.own, tick);
        let machine = seconds(s.cpu.machine, e.cpu.machine, tick);
        // What the machine spent beyond the measured processes and loadgen:
        // softirq for the loopback traffic, the kernel, and any other work.
        let other = match (machine, total, loadgen) {
            (Some(m), Some(t), Some(l)) => Some(m - t - l),
            _ => None,
        };
        cpu.extend([
            ("services".to_owned(), services),
            ("postgres".to_owned(), postgres),
            ("rabbitmq".to_owned(), rabbitmq),
            ("total".to_owned(), total),
            ("loadgen".to_owned(), loadgen),
            ("machine".to_owned(), machine),
            ("other".to_owned(), other),
        ]);
        let mut per_order = Map::new();
        let mut per_accepted = Map::new();
        let mut cores = Map::new();
        let ms_per =
            |secs: Option<f64>, n: u64| secs.filter(|_| n > 0).map(|v| v * 1000.0 / n as f64);
        for (name, secs) in cpu {
            per_order.insert(name.clone(), json!(ms_per(secs, completed)));
            // While intake outruns completion (a closed loop past saturation), the
            // window's CPU also went into orders it did not see complete.
            per_accepted.insert(name.clone(), json!(ms_per(secs, accepted)));
            cores.insert(
                name,
                json!(secs.filter(|_| elapsed > 0.0).map(|v| v / elapsed)),
            );
        }
        json!({
            "seconds": elapsed,
            "accepted": accepted,
            "completed": completed,
            "completed_per_s": if elapsed > 0.0 { completed as f64 / elapsed } else { 0.0 },
            "accepted_per_s": if elapsed > 0.0 { accepted as f64 / elapsed } else { 0.0 },
            "clock_ticks_per_s": tick,
            "services": probe.components.iter().filter(|c| c.group == Group::Service).map(|c| c.name.clone()).collect::<Vec<_>>(),
            "pids": probe.components.iter().map(|c| (c.name.clone(), json!(c.pid))).collect::<Map<_, _>>(),
            "cpu_ms_per_completed_order": per_order,
            "cpu_ms_per_accepted_order": per_accepted,
            "cores": cores,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        time::{Duration, Instant},
    };

    use super::*;
    use crate::cpu::Component;

    fn mark(at: Instant, completed: u64, ticks: [u64; 4], own: u64, machine: u64) -> Mark {
        let names = ["order", "inventory", "postgres", "rabbitmq"];
        Mark {
            accepted: completed,
            completed,
            cpu: Sample {
                at,
                components: names
                    .iter()
                    .zip(ticks)
                    .map(|(n, t)| ((*n).to_owned(), Some(t)))
                    .collect::<BTreeMap<_, _>>(),
                own: Some(own),
                machine: Some(machine),
            },
        }
    }

    #[test]
    fn cpu_per_completed_order_divides_the_ticks_and_the_orders_of_the_same_window() {
        let component = |name: &str, group, pid| Component {
            name: name.to_owned(),
            group,
            pid,
        };
        let probe = Probe {
            components: vec![
                component("order", Group::Service, 1),
                component("inventory", Group::Service, 2),
                component("postgres", Group::Postgres, 3),
                component("rabbitmq", Group::Rabbitmq, 4),
            ],
            ticks_per_s: 100.0,
        };
        let t0 = Instant::now();
        let window = Window {
            start: mark(t0, 1_000, [100, 200, 300, 400], 10, 5_000),
            end: mark(
                t0 + Duration::from_secs(10),
                2_000,
                [200, 250, 700, 600],
                20,
                5_900,
            ),
        };
        let v = window.json(&probe);
        let ms = &v["cpu_ms_per_completed_order"];
        // 1 000 orders: 100 ticks = 1 s = 1 ms per order.
        assert_eq!(ms["order"], json!(1.0));
        assert_eq!(ms["inventory"], json!(0.5));
        assert_eq!(ms["services"], json!(1.5));
        assert_eq!(ms["postgres"], json!(4.0));
        assert_eq!(ms["rabbitmq"], json!(2.0));
        assert_eq!(ms["total"], json!(7.5));
        assert_eq!(ms["loadgen"], json!(0.1));
        assert_eq!(ms["machine"], json!(9.0));
        assert_eq!(v["completed"], json!(1_000));
        assert_eq!(v["cores"]["postgres"], json!(0.4));
    }
}
