//! The command line: every flag, its default, and the processes to measure.

use std::{path::PathBuf, time::Duration};

use crate::cpu::{Component, Group};

pub const USAGE: &str = "\
usage: loadgen [flags]
  --order-url URL --inventory-url URL --amqp-url URL --database-url URL
  main run:   --concurrency N (32) --count N (10000) | --duration S, [--rate R: open loop]
              --warm-up-secs S (5): skipped before the CPU window opens
  CPU:        --service-pids NAME=PID,... --postgres-pid PID --rabbitmq-pid PID
  open loop:  --open-rate R (100) --open-secs S (40; 0 skips) --cold-secs S (20)
  overload:   --overload-secs S (60; 0 skips), at 2 x the main run's completed/s
  half rate:  --half-rate-secs S (0 = skipped)
  ceilings:   --ceiling-count N (20000) --window N (256)
  all runs:   --drain-secs S (60) --max-in-flight N (8192) --out DIR (target/bench)";

#[derive(Debug)]
pub struct Args {
    pub order_url: String,
    pub inventory_url: String,
    pub amqp_url: String,
    pub database_url: String,
    pub concurrency: usize,
    pub count: Option<usize>,
    pub duration: Option<Duration>,
    pub rate: Option<f64>,
    pub warm_up: Duration,
    pub window: usize,
    pub ceiling_count: usize,
    pub half_rate_secs: u64,
    pub open_rate: f64,
    pub open_secs: u64,
    pub cold_secs: u64,
    pub overload_secs: u64,
    pub drain: Duration,
    pub max_in_flight: usize,
    /// The processes whose CPU is measured over the main run's steady window.
    pub components: Vec<Component>,
    pub out: PathBuf,
}

fn pid(v: &str, flag: &str) -> Result<u32, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("{flag}: '{v}' is not a process id"))
}

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        order_url: "http://127.0.0.1:8080".into(),
        inventory_url: "http://127.0.0.1:8081".into(),
        amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        database_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
        concurrency: 32,
        count: None,
        duration: None,
        rate: None,
        warm_up: Duration::from_secs(5),
        window: 256,
        ceiling_count: 20_000,
        half_rate_secs: 0,
        open_rate: 100.0,
        open_secs: 40,
        cold_secs: 20,
        overload_secs: 60,
        drain: Duration::from_secs(60),
        max_in_flight: 8192,
        components: Vec::new(),
        out: PathBuf::from("target/bench"),
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String, f: &str| match v.parse::<f64>() {
            Ok(n) if n.is_finite() && n >= 0.0 => Ok(n),
            _ => Err(format!("{f}: '{v}' is not a number ≥ 0")),
        };
        let secs = |v: String, f: &str| number(v, f).map(Duration::from_secs_f64);
        match flag.as_str() {
            "--order-url" => a.order_url = value()?,
            "--inventory-url" => a.inventory_url = value()?,
            "--amqp-url" => a.amqp_url = value()?,
            "--database-url" => a.database_url = value()?,
            "--concurrency" => a.concurrency = number(value()?, &flag)? as usize,
            "--count" => a.count = Some(number(value()?, &flag)? as usize),
            "--duration" => a.duration = Some(secs(value()?, &flag)?),
            "--rate" => a.rate = Some(number(value()?, &flag)?),
            "--warm-up-secs" => a.warm_up = secs(value()?, &flag)?,
            "--window" => a.window = number(value()?, &flag)? as usize,
            "--ceiling-count" => a.ceiling_count = number(value()?, &flag)? as usize,
            "--half-rate-secs" => a.half_rate_secs = number(value()?, &flag)? as u64,
            "--open-rate" => a.open_rate = number(value()?, &flag)?,
            "--open-secs" => a.open_secs = number(value()?, &flag)? as u64,
            "--cold-secs" => a.cold_secs = number(value()?, &flag)? as u64,
            "--overload-secs" => a.overload_secs = number(value()?, &flag)? as u64,
            "--drain-secs" => a.drain = secs(value()?, &flag)?,
            "--max-in-flight" => a.max_in_flight = number(value()?, &flag)? as usize,
            "--service-pids" => {
                for pair in value()?.split(',').filter(|p| !p.is_empty()) {
                    let (name, p) = pair
                        .split_once('=')
                        .ok_or_else(|| format!("{flag}: '{pair}' is not NAME=PID"))?;
                    a.components.push(Component {
                        name: name.trim().to_owned(),
                        group: Group::Service,
                        pid: pid(p, &flag)?,
                    });
                }
            }
            "--postgres-pid" => a.components.push(Component {
                name: "postgres".into(),
                group: Group::Postgres,
                pid: pid(&value()?, &flag)?,
            }),
            "--rabbitmq-pid" => a.components.push(Component {
                name: "rabbitmq".into(),
                group: Group::Rabbitmq,
                pid: pid(&value()?, &flag)?,
            }),
            "--out" => a.out = PathBuf::from(value()?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if a.count.is_none() && a.duration.is_none() {
        a.count = Some(10_000);
    }
    if a.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if a.rate.is_some_and(|r| r <= 0.0) || a.open_rate <= 0.0 {
        return Err("--rate and --open-rate must be above 0".into());
    }
    let mut names: Vec<&str> = a.components.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err("each measured process needs its own name".into());
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Result<Args, String> {
        parse(line.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn service_postgres_and_rabbitmq_pids_become_named_components() {
        let a = args("--service-pids order=11,inventory=12 --postgres-pid 2 --rabbitmq-pid 3")
            .expect("valid flags");
        let got: Vec<(&str, Group, u32)> = a
            .components
            .iter()
            .map(|c| (c.name.as_str(), c.group, c.pid))
            .collect();
        assert_eq!(
            got,
            [
                ("order", Group::Service, 11),
                ("inventory", Group::Service, 12),
                ("postgres", Group::Postgres, 2),
                ("rabbitmq", Group::Rabbitmq, 3),
            ]
        );
    }

    #[test]
    fn a_malformed_pid_list_or_a_repeated_name_is_refused() {
        assert!(args("--service-pids order").is_err());
        assert!(args("--service-pids order=x").is_err());
        assert!(args("--service-pids postgres=1 --postgres-pid 2").is_err());
    }

    #[test]
    fn without_a_count_or_duration_the_main_run_is_ten_thousand_orders() {
        let a = args("--overload-secs 0").expect("valid flags");
        assert_eq!(a.count, Some(10_000));
        assert_eq!(a.overload_secs, 0);
        assert_eq!(a.half_rate_secs, 0);
    }
}
