//! `shopctl dlq list|show|redrive|purge`: the shop's queues and what their
//! dead letters mean (order id, event decoded); the moving is
//! `messaging::dead_letters`.

use contracts::{decode::Event, names};
use indicatif::{ProgressBar, ProgressStyle};
use messaging::{
    AMQPValue, AmqpSettings, DeadLetter, DeadLetters, FieldTable, Selection,
    dead_letters::{self, Moved},
};
use serde_json::{Value, json};

use crate::{
    Cli, Error,
    cli::Dlq,
    output::{Table, print_json},
};

/// The shop's consumer queues, each with its DLQ.
const QUEUES: [&str; 3] = [
    names::INVENTORY_QUEUE,
    names::ORDER_QUEUE,
    names::NOTIFICATION_QUEUE,
];

pub async fn run(cli: &Cli, command: &Dlq) -> Result<(), Error> {
    let raw = crate::cli::value_or_file(cli.amqp_url.as_deref(), "AMQP_URL", "--amqp-url")
        .map_err(Error::Config)?;
    // A cluster's nodes are tried from a random one on until one answers.
    let mut settings = AmqpSettings::from_url(&raw)
        .map_err(|e| Error::Config(format!("AMQP_URL is invalid: {e}")))?;
    settings.connection_name = "shopctl".to_owned();
    let broker = DeadLetters::connect(settings, "shopctl").await?;
    let result = match command {
        Dlq::List { queue: None, .. } => counts(cli, &broker).await,
        Dlq::List {
            queue: Some(queue),
            limit,
        } => list(cli, &broker, queue, limit.get()).await,
        Dlq::Show {
            message_id,
            queue,
            limit,
        } => show(cli, &broker, queue, message_id, limit.get()).await,
        Dlq::Redrive {
            queue,
            which,
            dry_run,
            limit,
        } => {
            let selection = if which.all {
                Selection::All
            } else if let Some(text) = &which.reason_contains {
                Selection::ReasonContains(text.clone())
            } else {
                Selection::Ids(which.ids.clone())
            };
            redrive(cli, &broker, queue, &selection, *dry_run, limit.get()).await
        }
        Dlq::Purge {
            queue,
            which,
            limit,
            ..
        } => {
            let selection = if which.all {
                Selection::All
            } else {
                Selection::Ids(which.ids.clone())
            };
            let report = broker.purge(queue, &selection, limit.get()).await?;
            finish(cli, "purged", queue, &report)
        }
    };
    broker.close().await;
    result
}

async fn counts(cli: &Cli, broker: &DeadLetters) -> Result<(), Error> {
    let mut items = Vec::new();
    for queue in QUEUES {
        let depth = broker.depth(queue).await?;
        items.push(json!({
            "queue": queue, "dlq": dead_letters::dlq_name(queue), "messages": depth,
        }));
    }
    if cli.json {
        print_json(&json!({ "items": items }));
        return Ok(());
    }
    let mut table = Table::new(&["QUEUE", "DLQ", "MESSAGES"]);
    for item in &items {
        table.row(vec![
            crate::output::cell(&item["queue"]),
            crate::output::cell(&item["dlq"]),
            crate::output::cell(&item["messages"]),
        ]);
    }
    print!("{}", table.render());
    Ok(())
}

async fn list(cli: &Cli, broker: &DeadLetters, queue: &str, limit: usize) -> Result<(), Error> {
    let listing = broker.list(queue, limit).await?;
    if cli.json {
        let items: Vec<Value> = listing.letters.iter().map(summary).collect();
        print_json(&json!({
            "queue": queue,
            "dlq": dead_letters::dlq_name(queue),
            "items": items,
            "not_read": listing.not_read,
        }));
        return Ok(());
    }
    let mut table = Table::new(&[
        "MESSAGE ID",
        "TYPE",
        "ORDER ID",
        "REASON",
        "ATTEMPTS",
        "DEAD-LETTERED AT",
        "SIZE",
    ]);
    for letter in &listing.letters {
        let s = summary(letter);
        table.row(
            [
                "message_id",
                "type",
                "order_id",
                "reason",
                "attempts",
                "dead_lettered_at",
                "size",
            ]
            .iter()
            .map(|k| crate::output::cell(&s[*k]))
            .collect(),
        );
    }
    print!("{}", table.render());
    println!(
        "{} dead letter(s) in {}",
        listing.letters.len(),
        dead_letters::dlq_name(queue)
    );
    if listing.not_read > 0 {
        println!(
            "{} more not read (raise --limit to see them)",
            listing.not_read
        );
    }
    Ok(())
}

async fn show(
    cli: &Cli,
    broker: &DeadLetters,
    queue: &str,
    message_id: &str,
    limit: usize,
) -> Result<(), Error> {
    let listing = broker.list(queue, limit).await?;
    let copies: Vec<&DeadLetter> = listing
        .letters
        .iter()
        .filter(|l| l.message_id == message_id)
        .collect();
    let Some(letter) = copies.first() else {
        return Err(Error::UnknownMessage {
            id: message_id.to_owned(),
            dlq: dead_letters::dlq_name(queue),
        });
    };
    let mut detail = summary(letter);
    detail["copies"] = json!(copies.len());
    detail["exchange"] = json!(letter.original_exchange);
    detail["routing_key"] = json!(letter.original_routing_key);
    detail["correlation_id"] = json!(letter.correlation_id);
    detail["app_id"] = json!(letter.app_id);
    detail["content_type"] = json!(letter.content_type);
    detail["timestamp"] = json!(
        letter
            .timestamp
            .and_then(|t| chrono::DateTime::from_timestamp(i64::try_from(t).ok()?, 0))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
    );
    detail["headers"] = table_json(&letter.headers);
    detail["payload"] = match Event::decode(&letter.message_type, &letter.payload) {
        Ok(event) => event.to_json(),
        Err(reason) => json!({ "undecodable": reason, "hex": hex::encode(&letter.payload) }),
    };
    if cli.json {
        print_json(&detail);
        return Ok(());
    }
    if let Value::Object(fields) = &detail {
        for (key, value) in fields {
            if key != "headers" && key != "payload" {
                println!("{key:<18} {}", crate::output::cell(value));
            }
        }
    }
    println!("headers");
    print_json(&detail["headers"]);
    println!("payload");
    print_json(&detail["payload"]);
    Ok(())
}

async fn redrive(
    cli: &Cli,
    broker: &DeadLetters,
    queue: &str,
    selection: &Selection,
    dry_run: bool,
    limit: usize,
) -> Result<(), Error> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("redriving {bar:30} {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let report = broker
        .redrive(queue, selection, limit, dry_run, &mut progress)
        .await;
    bar.finish_and_clear();
    let report = report?;
    finish(
        cli,
        if dry_run { "would redrive" } else { "redriven" },
        queue,
        &report,
    )
}

/// Prints what moved; an interrupted operation is an error after the report.
fn finish(cli: &Cli, verb: &str, queue: &str, report: &Moved) -> Result<(), Error> {
    let dlq = dead_letters::dlq_name(queue);
    if cli.json {
        print_json(&json!({
            "queue": queue,
            "dlq": dlq,
            "action": verb,
            "message_ids": report.moved,
            "count": report.moved.len(),
            "left_in_dlq": report.left + report.not_selected + report.not_read as usize,
            "interrupted": report.interrupted,
        }));
    } else {
        for id in &report.moved {
            println!("{verb} {id}");
        }
        println!(
            "{verb} {} message(s) of {dlq}; {} left in it",
            report.moved.len(),
            report.left + report.not_selected + report.not_read as usize
        );
    }
    match &report.interrupted {
        None => Ok(()),
        Some(why) => Err(Error::Interrupted(format!(
            "stopped after {} of {}: {why}; every other message is still in {dlq}, run it again",
            report.moved.len(),
            report.moved.len() + report.left
        ))),
    }
}

/// The list entry of a dead letter.
fn summary(letter: &DeadLetter) -> Value {
    let order_id = letter.correlation_id.clone().or_else(|| {
        Event::decode(&letter.message_type, &letter.payload)
            .ok()
            .map(|e| e.order_id().to_owned())
    });
    json!({
        "message_id": letter.message_id,
        "type": letter.message_type,
        "order_id": order_id,
        "routing_key": letter.original_routing_key,
        "reason": letter.reason,
        "class": letter.class.map(|c| c.as_str()),
        "attempts": letter.attempts,
        "dead_lettered_at": letter.dead_lettered_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        "redrives": letter.redrives,
        "size": letter.size(),
    })
}

fn table_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.to_string(), value_json(v)))
            .collect(),
    )
}

fn value_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(v) => json!(v),
        AMQPValue::ShortShortUInt(v) => json!(v),
        AMQPValue::ShortInt(v) => json!(v),
        AMQPValue::ShortUInt(v) => json!(v),
        AMQPValue::LongInt(v) => json!(v),
        AMQPValue::LongUInt(v) => json!(v),
        AMQPValue::LongLongInt(v) => json!(v),
        AMQPValue::Float(v) => json!(v),
        AMQPValue::Double(v) => json!(v),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::Timestamp(t) => json!(
            chrono::DateTime::from_timestamp(i64::try_from(*t).unwrap_or(0), 0)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        ),
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(value_json).collect())
        }
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::ByteArray(b) => json!(hex::encode(b.as_slice())),
        AMQPValue::DecimalValue(d) => json!(format!("{d:?}")),
        AMQPValue::Void => Value::Null,
    }
}
