//! `loadgen`: drives the running shop with orders and reports its throughput and
//! latency beside the ceilings of its own database and broker, measured in the
//! same run with the same code paths.
//!
//! ```sh
//! loadgen --order-url http://127.0.0.1:8080 --inventory-url http://127.0.0.1:8081 \
//!         --amqp-url amqp://guest:guest@127.0.0.1:5672/shop-bench \
//!         --database-url postgres://postgres@127.0.0.1:5432/postgres \
//!         --concurrency 32 --count 20000 [--rate 500] [--duration 30] [--out target/bench]
//! ```
//! `--database-url` is a server the ceilings may create scratch databases on.

mod ceilings;
mod drive;
mod report;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use serde_json::json;

#[derive(Debug)]
struct Args {
    order_url: String,
    inventory_url: String,
    amqp_url: String,
    database_url: String,
    concurrency: usize,
    count: Option<usize>,
    duration: Option<Duration>,
    rate: Option<f64>,
    window: usize,
    ceiling_count: usize,
    half_rate_secs: u64,
    out: PathBuf,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        order_url: "http://127.0.0.1:8080".into(),
        inventory_url: "http://127.0.0.1:8081".into(),
        amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        database_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
        concurrency: 32,
        count: None,
        duration: None,
        rate: None,
        window: 256,
        ceiling_count: 20_000,
        half_rate_secs: 15,
        out: PathBuf::from("target/bench"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String, f: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("{f}: '{v}' is not a number"))
        };
        match flag.as_str() {
            "--order-url" => a.order_url = value()?,
            "--inventory-url" => a.inventory_url = value()?,
            "--amqp-url" => a.amqp_url = value()?,
            "--database-url" => a.database_url = value()?,
            "--concurrency" => a.concurrency = number(value()?, &flag)? as usize,
            "--count" => a.count = Some(number(value()?, &flag)? as usize),
            "--duration" => a.duration = Some(Duration::from_secs_f64(number(value()?, &flag)?)),
            "--rate" => a.rate = Some(number(value()?, &flag)?),
            "--window" => a.window = number(value()?, &flag)? as usize,
            "--ceiling-count" => a.ceiling_count = number(value()?, &flag)? as usize,
            "--half-rate-secs" => a.half_rate_secs = number(value()?, &flag)? as u64,
            "--out" => a.out = PathBuf::from(value()?),
            "-h" | "--help" => {
                return Err("usage: see the header of crates/loadgen/src/main.rs".into());
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.count.is_none() && a.duration.is_none() {
        a.count = Some(10_000);
    }
    if a.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    service_kit::install_crypto_provider();
    let args = match parse() {
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
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(args.concurrency)
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
    eprintln!("loadgen: driving {} clients", args.concurrency);
    let plan = drive::Plan {
        concurrency: args.concurrency,
        count: args.count,
        duration: args.duration,
        rate: args.rate,
    };
    let load = drive::run(&http, &args.order_url, &args.amqp_url, &skus, &plan).await?;
    if load.accepted == 0 {
        return Err(format!(
            "no order was accepted ({} failed): is order-service answering at {}?",
            load.failed, args.order_url
        )
        .into());
    }
    let load_json = report::outcome(&load);

    eprintln!("loadgen: measuring the database ceiling");
    let database =
        ceilings::database(&args.database_url, args.concurrency, args.ceiling_count).await?;
    // Broker and relay alternate over three rounds and report medians: on a small
    // machine one run of either varies by a third.
    let (mut publishes, mut consumes, mut relays) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=3 {
        eprintln!("loadgen: measuring the broker ceiling and the relay ({round}/3)");
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
        "load": load_json,
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
        eprintln!(
            "loadgen: half-rate run at {rate:.0} orders/s for {} s",
            args.half_rate_secs
        );
        let plan = drive::Plan {
            concurrency: args.concurrency,
            count: None,
            duration: Some(Duration::from_secs(args.half_rate_secs)),
            rate: Some(rate),
        };
        let half = drive::run(&http, &args.order_url, &args.amqp_url, &skus, &plan).await?;
        report["half_rate"] = json!({ "rate": rate, "load": report::outcome(&half) });
    }

    std::fs::create_dir_all(&args.out)?;
    let table = report::markdown(&report);
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
