//! `loadgen`: drives the running shop with orders and reports its throughput,
//! latency and CPU per order beside the ceilings of its own database and broker,
//! measured in the same run with the same code paths.
//!
//! ```sh
//! loadgen --order-url http://127.0.0.1:8080 --inventory-url http://127.0.0.1:8081 \
//!         --amqp-url amqp://guest:guest@127.0.0.1:5672/shop-bench \
//!         --database-url postgres://postgres@127.0.0.1:5432/postgres \
//!         --concurrency 32 --count 10000 [--rate 500] [--duration 30] [--out target/bench] \
//!         [--service-pids order=PID,inventory=PID,notification=PID] \
//!         [--postgres-pid PID] [--rabbitmq-pid PID] [--open-secs 40] [--overload-secs 60]
//! ```
//! `--database-url` is a server the ceilings may create scratch databases on;
//! `loadgen --help` lists every flag. The runs, in order:
//!
//! 1. open loop at `--open-rate` (100/s) for `--open-secs`, first, so that its
//!    first `--cold-secs` are the services' cold start (it replaces the
//!    half-rate run of earlier reports, still there with `--half-rate-secs`);
//! 2. the main run, closed loop (or open at `--rate`), with the CPU of each
//!    measured process over its steady part and over the whole run (`window`,
//!    `cpu`);
//! 3. the ceilings (`ceilings`), then the half-rate run if asked for;
//! 4. overload: open loop at twice the main run's completed/s.
//!
//! Layout: `args` (flags), `drive` (closed and open loop), `request` (one order
//! and its answer), `observe` (seeing orders complete), `cpu` and `window` (CPU
//! per order), `ceilings`, `report` (JSON) and `table` (markdown).

mod args;
mod ceilings;
mod cpu;
mod drive;
mod observe;
mod report;
mod request;
mod table;
mod window;

use std::{process::ExitCode, time::Duration};

use serde_json::json;

use crate::args::Args;

/// A progress line with the time since loadgen started, to see where a run's
/// minutes go.
macro_rules! say {
    ($t0:expr, $($arg:tt)*) => {
        eprintln!("loadgen [{:5.0} s]: {}", $t0.elapsed().as_secs_f64(), format_args!($($arg)*))
    };
}

/// The overload run offers this many times the main run's completed/s.
const OVERLOAD_FACTOR: f64 = 2.0;

fn main() -> ExitCode {
    service_kit::install_crypto_provider();
    let args = match args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let t0 = std::time::Instant::now();
    let probe = cpu::Probe::new(args.components.clone())?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        // Open-loop runs hold more requests in flight than the closed loop's
        // clients; keeping their connections leaves TCP setup out of the figures.
        .pool_max_idle_per_host(args.concurrency.max(256))
        .build()?;
    // Stock that never runs out: the run measures the confirming path.
    let skus: Vec<String> = (0..64).map(|i| format!("LOAD-{i:03}")).collect();
    for sku in &skus {
        let r = http
            .put(format!("{}/stock/{sku}", args.inventory_url))
            .json(&json!({"available": 1_000_000_000i64}))
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(format!("seeding {sku}: {}", r.status()).into());
        }
    }
    let plan = |rate: Option<f64>, count: Option<usize>, secs: Option<Duration>| drive::Plan {
        concurrency: args.concurrency,
        count,
        duration: secs,
        rate,
        cold: None,
        steady: None,
        drain: args.drain,
        max_in_flight: args.max_in_flight,
    };
    let drive = |plan: drive::Plan| {
        let (http, skus) = (&http, &skus);
        async move {
            let outcome = drive::run(http, &args.order_url, &args.amqp_url, skus, &plan).await?;
            if outcome.accepted == 0 {
                return Err(format!(
                    "no order was accepted ({} failed, {} answered 429): is order-service answering at {}?",
                    outcome.failed, outcome.throttled, args.order_url
                )
                .into());
            }
            Ok::<_, Box<dyn std::error::Error>>(outcome)
        }
    };

    // First, while the services are fresh: the cold start is part of its figures.
    let open_loop = if args.open_secs > 0 {
        say!(
            t0,
            "open loop at {} orders/s for {} s, from a cold start",
            args.open_rate,
            args.open_secs
        );
        let secs = Duration::from_secs(args.open_secs);
        let outcome = drive(drive::Plan {
            cold: Some(Duration::from_secs(args.cold_secs)),
            ..plan(Some(args.open_rate), None, Some(secs))
        })
        .await?;
        json!({
            "rate": args.open_rate,
            "secs": args.open_secs,
            "load": report::outcome(&outcome),
            "cold": report::cold(&outcome, args.cold_secs),
        })
    } else {
        serde_json::Value::Null
    };

    match args.rate {
        Some(rate) => say!(t0, "main run, open loop at {rate} orders/s"),
        None => say!(t0, "main run, {} clients", args.concurrency),
    }
    let load = drive(drive::Plan {
        steady: Some((args.warm_up, probe.clone())),
        ..plan(args.rate, args.count, args.duration)
    })
    .await?;
    let mut load_json = report::outcome(&load);
    load_json["cpu_steady"] = json!(load.steady.as_ref().map(|w| w.json(&probe)));
    load_json["cpu_whole_run"] = json!(load.whole.as_ref().map(|w| w.json(&probe)));

    say!(t0, "measuring the database ceiling");
    let database =
        ceilings::database(&args.database_url, args.concurrency, args.ceiling_count).await?;
    // Broker and relay alternate over three rounds and report medians: on a small
    // machine one run of either varies by a third.
    let (mut publishes, mut consumes, mut relays) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=3 {
        say!(t0, "measuring the broker ceiling and the relay ({round}/3)");
        let (publish, consume) =
            ceilings::broker(&args.amqp_url, args.window, args.ceiling_count).await?;
        publishes.push(publish);
        consumes.push(consume);
        relays.push(
            ceilings::relay(
                &args.database_url,
                &args.amqp_url,
                args.window,
                args.ceiling_count,
            )
            .await?,
        );
    }
    let (publish, consume, relay) = (
        median(&mut publishes),
        median(&mut consumes),
        median(&mut relays),
    );

    let accepted = load_json["accepted_per_s"].as_f64().unwrap_or(0.0);
    let completed = load_json["completed_per_s"].as_f64().unwrap_or(0.0);
    let smaller = database.min(publish).min(consume);
    let mut report = json!({
        "concurrency": args.concurrency,
        "drain_s": args.drain.as_secs_f64(),
        "main": {
            "rate": args.rate,
            "count": args.count,
            "duration_s": args.duration.map(|d| d.as_secs_f64()),
            "warm_up_s": args.warm_up.as_secs_f64(),
        },
        "load": load_json,
        "open_loop": open_loop,
        "ceilings": {
            "database_tx_per_s": database,
            "publish_per_s": publish,
            "consume_per_s": consume,
            "relay_per_s": relay,
            "window": args.window,
            "messages": args.ceiling_count,
            "publish_runs": publishes,
            "consume_runs": consumes,
            "relay_runs": relays,
        },
        "ratios": {
            "api_over_database": accepted / database,
            "relay_over_publish": relay / publish,
            "completed_over_smaller_ceiling": completed / smaller,
        },
    });

    if args.half_rate_secs > 0 && completed > 0.0 {
        let rate = completed / 2.0;
        say!(
            t0,
            "half-rate run at {rate:.0} orders/s for {} s",
            args.half_rate_secs
        );
        let secs = Duration::from_secs(args.half_rate_secs);
        let half = drive(plan(Some(rate), None, Some(secs))).await?;
        report["half_rate"] = json!({ "rate": rate, "load": report::outcome(&half) });
    }

    if args.overload_secs > 0 && args.rate.is_some() {
        // A fixed-rate main run measures latency, not what the stack sustains.
        say!(t0, "no overload run: the main run was at a fixed rate");
    } else if args.overload_secs > 0 && completed > 0.0 {
        let rate = OVERLOAD_FACTOR * completed;
        say!(
            t0,
            "overload at {rate:.0} orders/s for {} s",
            args.overload_secs
        );
        let secs = Duration::from_secs(args.overload_secs);
        // Counted apart from failures; a client that waited before retrying
        // would lower the offered load, which is what this run must not do.
        let overload = drive::run(
            &http,
            &args.order_url,
            &args.amqp_url,
            &skus,
            &plan(Some(rate), None, Some(secs)),
        )
        .await?;
        report["overload"] = json!({
            "rate": rate,
            "secs": args.overload_secs,
            "factor": OVERLOAD_FACTOR,
            "drain_s": args.drain.as_secs_f64(),
            "load": report::outcome(&overload),
        });
    }

    say!(t0, "done");
    std::fs::create_dir_all(&args.out)?;
    let table = table::markdown(&report);
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("report.md"), &table)?;
    println!("{table}");
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
