//! `shopctl orders stuck` and `shopctl order <id>`: what the services know of
//! an order, read from their APIs (order history, inventory reservation,
//! notifications) and put in time order.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::{
    Cli, Error,
    api::Api,
    output::{Table, cell, human_duration, print_json},
};

const ORDER: &str = "order-service";
const INVENTORY: &str = "inventory-service";
const NOTIFICATION: &str = "notification-service";

pub async fn stuck(cli: &Cli, older_than: Duration, limit: usize) -> Result<(), Error> {
    let api = Api::new(cli)?;
    let before = chrono::Duration::from_std(older_than)
        .ok()
        .and_then(|d| Utc::now().checked_sub_signed(d))
        .ok_or_else(|| Error::Config("--older-than is too large".into()))?;
    let url = format!(
        "{}/orders?status=pending&created_before={}&limit={}",
        base(&cli.order_url),
        before.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        limit.clamp(1, 100)
    );
    let orders = api.list(ORDER, &url, limit).await?;
    let mut items = Vec::new();
    for order in &orders {
        let id = order["id"].as_str().unwrap_or_default();
        let history = api
            .get(
                ORDER,
                &format!("{}/orders/{id}/events", base(&cli.order_url)),
            )
            .await?
            .unwrap_or(Value::Null);
        let last = history["items"]
            .as_array()
            .and_then(|items| items.last())
            .cloned()
            .unwrap_or(Value::Null);
        let age = order["created_at"]
            .as_str()
            .and_then(parse_time)
            .map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0);
        items.push(json!({
            "id": id,
            "customer_id": order["customer_id"],
            "created_at": order["created_at"],
            "age_seconds": age,
            "last_event": last,
        }));
    }
    if cli.json {
        print_json(&json!({ "older_than_seconds": older_than.as_secs_f64(), "items": items }));
        return Ok(());
    }
    let mut table = Table::new(&["ORDER ID", "CREATED AT", "AGE", "LAST EVENT", "STATE"]);
    for item in &items {
        let last = &item["last_event"];
        table.row(vec![
            cell(&item["id"]),
            cell(&item["created_at"]),
            item["age_seconds"]
                .as_f64()
                .map_or("-".into(), |s| human_duration(Duration::from_secs_f64(s))),
            format!("{} {}", cell(&last["direction"]), cell(&last["event"])),
            outbox_state(last),
        ]);
    }
    print!("{}", table.render());
    println!(
        "{} order(s) pending for more than {}",
        items.len(),
        human_duration(older_than)
    );
    Ok(())
}

pub async fn timeline(cli: &Cli, raw_id: &str) -> Result<(), Error> {
    let id = uuid::Uuid::parse_str(raw_id)
        .map_err(|_| Error::Config(format!("'{raw_id}' is not an order id (a UUID)")))?;
    let api = Api::new(cli)?;
    let order_url = base(&cli.order_url);
    let order = api
        .get(ORDER, &format!("{order_url}/orders/{id}"))
        .await?
        .ok_or_else(|| Error::UnknownOrder(id.to_string()))?;
    let history = api
        .get(ORDER, &format!("{order_url}/orders/{id}/events"))
        .await?
        .unwrap_or(Value::Null);
    let reservation = api
        .get(
            INVENTORY,
            &format!("{}/reservations/{id}", base(&cli.inventory_url)),
        )
        .await?;
    let notifications = api
        .list(
            NOTIFICATION,
            &format!(
                "{}/notifications?order_id={id}&limit=100",
                base(&cli.notification_url)
            ),
            1000,
        )
        .await?;

    let mut events: Vec<Value> = Vec::new();
    for (service, list) in [
        (ORDER, history["items"].as_array()),
        (
            INVENTORY,
            reservation.as_ref().and_then(|r| r["events"].as_array()),
        ),
    ] {
        for e in list.into_iter().flatten() {
            events.push(json!({
                "service": service,
                "action": e["direction"],
                "event": e["event"],
                "at": e["at"],
                "message_id": e["message_id"],
                "trace_id": e["trace_id"],
                "outbox": e.get("outbox").cloned().unwrap_or(Value::Null),
            }));
        }
    }
    for n in &notifications {
        events.push(json!({
            "service": NOTIFICATION,
            "action": "notified",
            "event": n["event"],
            "at": n["created_at"],
            "message_id": n["message_id"],
            "channel": n["channel"],
            "delivered_at": n["delivered_at"],
        }));
    }
    // Stable: events of one instant keep the order their service recorded.
    events.sort_by_key(|e| e["at"].as_str().and_then(parse_time));
    let mut previous: Option<DateTime<Utc>> = None;
    for e in &mut events {
        let at = e["at"].as_str().and_then(parse_time);
        e["since_previous_ms"] = match (previous, at) {
            (Some(p), Some(a)) => json!((a - p).num_milliseconds()),
            _ => Value::Null,
        };
        previous = at.or(previous);
    }
    let trace_id = history["trace_id"].as_str().map(str::to_owned).or_else(|| {
        events
            .iter()
            .find_map(|e| e["trace_id"].as_str().map(str::to_owned))
    });
    let jaeger = trace_id
        .as_ref()
        .map(|t| format!("{}/trace/{t}", base(&cli.jaeger_url)));
    if cli.json {
        print_json(&json!({
            "order_id": id,
            "status": order["status"],
            "customer_id": order["customer_id"],
            "created_at": order["created_at"],
            "reason": order.get("reason").cloned().unwrap_or(Value::Null),
            "trace_id": trace_id,
            "jaeger_url": jaeger,
            "reservation": reservation.as_ref().map(|r| json!({"state": r["state"], "items": r["items"]})),
            "events": events,
        }));
        return Ok(());
    }
    println!(
        "order {id}  {}  customer {}  created {}",
        cell(&order["status"]),
        cell(&order["customer_id"]),
        cell(&order["created_at"])
    );
    if let Some(reason) = order.get("reason").and_then(Value::as_str) {
        println!("reason {reason}");
    }
    match (&trace_id, &jaeger) {
        (Some(t), Some(link)) => println!("trace {t}  {link}"),
        _ => println!("trace unknown (no event carried a trace context)"),
    }
    println!();
    let mut table = Table::new(&[
        "AT",
        "+PREV",
        "SERVICE",
        "ACTION",
        "EVENT",
        "MESSAGE ID",
        "NOTE",
    ]);
    for e in &events {
        table.row(vec![
            cell(&e["at"]),
            e["since_previous_ms"].as_i64().map_or("-".into(), |ms| {
                format!(
                    "+{}",
                    human_duration(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
                )
            }),
            cell(&e["service"]),
            cell(&e["action"]),
            cell(&e["event"]),
            cell(&e["message_id"]),
            note(e),
        ]);
    }
    print!("{}", table.render());
    if reservation.is_none() {
        println!("inventory-service has no reservation for this order");
    }
    Ok(())
}

/// What the table says beside an event: the outbox state of an emitted one,
/// the channel and delivery of a notification.
fn note(event: &Value) -> String {
    if event["action"] == "notified" {
        return match event["delivered_at"].as_str() {
            Some(_) => format!("{} delivered", cell(&event["channel"])),
            None => format!("{} not delivered yet", cell(&event["channel"])),
        };
    }
    outbox_state(event)
}

fn outbox_state(event: &Value) -> String {
    let outbox = &event["outbox"];
    match outbox["state"].as_str() {
        None => String::new(),
        Some("published") => "published".into(),
        Some(state) => match outbox["last_error"].as_str() {
            Some(error) => format!("{state}: {error}"),
            None => state.to_owned(),
        },
    }
}

fn parse_time(raw: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn base(url: &str) -> &str {
    url.trim_end_matches('/')
}
