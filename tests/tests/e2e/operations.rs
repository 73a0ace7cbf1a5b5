//! The operator's tool against the real stack: dead letters brought back,
//! stuck orders found, an order's story told.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use e2e::{Options, Stack};
use serde_json::Value;

const QUEUE: &str = "notification.order-events";

/// A webhook receiver that answers 503 while `down`; records the keys it took.
#[derive(Clone, Default)]
struct Receiver {
    down: Arc<AtomicBool>,
    delivered: Arc<Mutex<Vec<String>>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap) -> StatusCode {
    if r.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    r.delivered.lock().expect("keys").push(key);
    StatusCode::OK
}

impl Receiver {
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/hook")
    }

    fn delivered(&self) -> Vec<String> {
        self.delivered.lock().expect("keys").clone()
    }
}

/// A stack whose webhook is down, with `orders` orders placed and each
/// placement's notification dead-lettered after its retries. Notifications are
/// handled one at a time, so the order they are delivered in is observable.
async fn dead_lettered_notifications(orders: usize) -> (Stack, Receiver, Vec<String>) {
    let receiver = Receiver::default();
    receiver.down.store(true, Ordering::SeqCst);
    let url = receiver.serve().await;
    let stack = Stack::start_with(Options {
        env: vec![
            ("notification-service", "NOTIFY_WEBHOOK_URL".into(), url),
            (
                "notification-service",
                "CONSUMER_CONCURRENCY".into(),
                "1".into(),
            ),
            ("notification-service", "AMQP_PREFETCH".into(), "1".into()),
        ],
        // The placement alone is notified.
        held_back: vec!["inventory-service"],
        ..Options::default()
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..orders {
        ids.push(stack.place(&format!("ops-{i}"), &[("SKU-1", 1)]).await);
    }
    testkit::wait_until(
        "every notification dead-lettered",
        Duration::from_secs(60),
        || async {
            let counts = stack.shopctl(&["dlq", "list", "--json"], &[]).await.json();
            counts["items"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|q| q["queue"] == QUEUE && q["messages"] == orders)
        },
    )
    .await;
    (stack, receiver, ids)
}

async fn listed(stack: &Stack) -> Vec<Value> {
    stack
        .shopctl(&["dlq", "list", "--queue", QUEUE, "--json"], &[])
        .await
        .json()["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn ids_of(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["message_id"].as_str().expect("message_id").to_owned())
        .collect()
}

/// `shopctl dlq redrive --all`, which must move `expected` messages.
async fn redrive_all(stack: &Stack, expected: usize) {
    let done = stack
        .shopctl(
            &["dlq", "redrive", "--queue", QUEUE, "--all", "--json"],
            &[],
        )
        .await
        .json();
    assert_eq!(done["count"], expected, "{done}");
}

/// Every notification delivered once, in dead-lettering order, the DLQ empty.
async fn each_notified_once_in_order(
    stack: &Stack,
    receiver: &Receiver,
    order: &[String],
    orders: &[String],
) {
    assert_eq!(
        receiver.delivered(),
        order,
        "each once, none lost, in dead-lettering order"
    );
    assert!(listed(stack).await.is_empty(), "the DLQ is empty");
    for id in orders {
        assert_eq!(stack.notifications(id).await.len(), 1);
    }
}

async fn wait_metric(stack: &Stack, sample: &str, value: f64) {
    let url = stack.notification();
    testkit::wait_until(
        &format!("{sample} = {value}"),
        Duration::from_secs(30),
        || async { stack.metric(&url, sample).await == value },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_lettered_notifications_are_listed_then_redriven_in_order_once_the_webhook_is_back() {
    let (stack, receiver, orders) = dead_lettered_notifications(4).await;

    let items = listed(&stack).await;
    assert_eq!(items.len(), 4, "{items:?}");
    for item in &items {
        let order = item["order_id"].as_str().expect("order id");
        assert!(orders.iter().any(|o| o == order), "{item}");
        let reason = item["reason"].as_str().expect("reason");
        assert!(
            reason.contains("gave up after 4 attempts") && reason.contains("503"),
            "{reason}"
        );
        assert_eq!(item["type"], "shop.events.v1.OrderPlaced");
        assert_eq!(item["attempts"], 4);
        assert_eq!(item["class"], "exhausted");
        assert!(item["dead_lettered_at"].is_string(), "{item}");
        assert!(item["size"].as_u64().is_some_and(|s| s > 0), "{item}");
    }
    let order = ids_of(&items);
    assert!(
        items
            .windows(2)
            .all(|w| w[0]["dead_lettered_at"].as_str() <= w[1]["dead_lettered_at"].as_str()),
        "oldest dead-lettered first: {items:?}"
    );
    assert_eq!(
        ids_of(&listed(&stack).await),
        order,
        "listing leaves them, in order"
    );
    let table = stack.shopctl(&["dlq", "list", "--queue", QUEUE], &[]).await;
    assert_eq!(table.code, Some(0), "{table:?}");
    assert!(table.stdout.starts_with("MESSAGE ID"), "{}", table.stdout);
    assert!(order.iter().all(|id| table.stdout.contains(id.as_str())));
    println!("$ shopctl dlq list --queue {QUEUE}\n{}", table.stdout);
    wait_metric(
        &stack,
        &format!("messaging_dead_lettered_total{{queue=\"{QUEUE}\",class=\"exhausted\"}}"),
        4.0,
    )
    .await;
    wait_metric(
        &stack,
        &format!("messaging_dlq_depth{{queue=\"{QUEUE}\"}}"),
        4.0,
    )
    .await;

    // One of them in full: envelope, headers and the payload decoded.
    let shown = stack
        .shopctl(&["dlq", "show", &order[0], "--queue", QUEUE, "--json"], &[])
        .await
        .json();
    assert_eq!(shown["routing_key"], "order.placed");
    assert_eq!(shown["payload"]["order_id"], items[0]["order_id"]);
    assert!(shown["headers"]["traceparent"].is_string(), "{shown}");

    // Mistakes change nothing and say what is wrong.
    stack
        .shopctl(&["dlq", "list", "--queue", "no.such-queue"], &[])
        .await
        .assert_fails_with("no queue 'no.such-queue'");
    stack
        .shopctl(
            &[
                "dlq",
                "redrive",
                "--queue",
                QUEUE,
                "--id",
                &order[0],
                "--id",
                "not-there",
            ],
            &[],
        )
        .await
        .assert_fails_with("not in notification.order-events.dlq: not-there");
    stack
        .shopctl(&["dlq", "show", "not-there", "--queue", QUEUE], &[])
        .await
        .assert_fails_with("no dead letter not-there");
    assert_eq!(ids_of(&listed(&stack).await), order, "nothing moved");
    assert!(receiver.delivered().is_empty());

    receiver.down.store(false, Ordering::SeqCst);
    let redrive = stack
        .shopctl(&["dlq", "redrive", "--queue", QUEUE, "--all"], &[])
        .await;
    assert_eq!(redrive.code, Some(0), "{redrive:?}");
    assert!(
        redrive.stdout.contains("redriven 4 message(s)"),
        "{redrive:?}"
    );
    testkit::wait_until(
        "every notification delivered",
        Duration::from_secs(30),
        || async { receiver.delivered().len() >= 4 },
    )
    .await;
    assert_eq!(
        receiver.delivered(),
        order,
        "each once (one Idempotency-Key each), in dead-lettering order"
    );
    assert!(listed(&stack).await.is_empty(), "the DLQ is empty");
    for id in &orders {
        let notes = stack.notifications(id).await;
        assert_eq!(notes.len(), 1);
        assert!(notes[0]["delivered_at"].is_string(), "{notes:?}");
    }
    wait_metric(
        &stack,
        &format!("messaging_redriven_total{{queue=\"{QUEUE}\"}}"),
        4.0,
    )
    .await;
    wait_metric(
        &stack,
        &format!("messaging_dlq_depth{{queue=\"{QUEUE}\"}}"),
        0.0,
    )
    .await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_cut_off_half_way_loses_nothing_and_notifies_each_order_once() {
    let (stack, receiver, orders) = dead_lettered_notifications(3).await;
    let order = ids_of(&listed(&stack).await);
    let acks = format!("messaging_consumed_total{{queue=\"{QUEUE}\",outcome=\"ack\"}}");
    // Each delivery was acknowledged as it moved on: three times to a retry
    // queue, once to the DLQ.
    wait_metric(&stack, &acks, 12.0).await;
    let acked_before = 12.0;
    receiver.down.store(false, Ordering::SeqCst);

    // shopctl dies once the broker confirmed the second copy and before it
    // removed that one's original: its connection drops with the second and
    // third originals (and perhaps the first, whose removal was just sent)
    // still held.
    let marker = std::env::temp_dir().join(format!("{}.crash", testkit::unique("redrive")));
    let marker_path = marker.to_string_lossy().into_owned();
    let cut = stack
        .shopctl(
            &["dlq", "redrive", "--queue", QUEUE, "--all"],
            &[
                ("CRASH_POINT", "redrive.after-confirm@2"),
                ("CRASH_MARKER", &marker_path),
            ],
        )
        .await;
    assert_ne!(cut.code, Some(0), "{cut:?}");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap_or_default().trim(),
        "redrive.after-confirm",
        "the crash point fired"
    );
    let _ = std::fs::remove_file(&marker);
    testkit::wait_until(
        "the two copies delivered",
        Duration::from_secs(30),
        || async { receiver.delivered().len() >= 2 },
    )
    .await;
    let left = testkit::wait_for(
        "the held originals back in the DLQ",
        Duration::from_secs(30),
        || async {
            let left = ids_of(&listed(&stack).await);
            (left.contains(&order[1]) && left.contains(&order[2])).then_some(left)
        },
    )
    .await;
    assert!(left.iter().all(|id| order.contains(id)), "{left:?}");

    // The second run sends what is left again; the inbox knows the second one
    // and only the third is delivered.
    redrive_all(&stack, left.len()).await;
    let runs = 2.0 + left.len() as f64;
    wait_metric(
        &stack,
        &format!("messaging_redriven_total{{queue=\"{QUEUE}\"}}"),
        runs,
    )
    .await;
    wait_metric(&stack, &acks, acked_before + runs).await;
    each_notified_once_in_order(&stack, &receiver, &order, &orders).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shopctl_tells_a_confirmed_orders_story_and_finds_an_order_stuck_behind_a_parked_event() {
    let proxy = testkit::TcpProxy::start("127.0.0.1:5672")
        .await
        .expect("proxy");
    let stack = Stack::start_with(Options {
        amqp_port: vec![("order-service", proxy.port())],
        env: vec![("order-service", "OUTBOX_PARK_AFTER".into(), "1".into())],
        ..Options::default()
    })
    .await;
    stack.set_stock("SKU-1", 10).await;
    let confirmed = stack.place("story", &[("SKU-1", 1)]).await;
    assert_eq!(stack.settled(&confirmed).await["status"], "confirmed");
    stack
        .wait_notified(&confirmed, &["order.placed", "order.confirmed"])
        .await;

    // The timeline of the confirmed order, across the three services.
    let story = stack
        .shopctl(&["order", &confirmed, "--json"], &[])
        .await
        .json();
    assert_eq!(story["status"], "confirmed");
    let trace = story["trace_id"].as_str().expect("trace id").to_owned();
    assert_eq!(trace.len(), 32, "{story}");
    assert_eq!(
        story["jaeger_url"],
        format!("http://jaeger.test:16686/trace/{trace}")
    );
    let events = story["events"].as_array().expect("events");
    let has = |service: &str, action: &str, event: &str| {
        events
            .iter()
            .any(|e| e["service"] == service && e["action"] == action && e["event"] == event)
    };
    assert!(has("order-service", "emitted", "order.placed"), "{story}");
    assert!(
        has("inventory-service", "emitted", "inventory.reserved"),
        "{story}"
    );
    assert!(
        has("order-service", "applied", "inventory.reserved"),
        "{story}"
    );
    assert!(
        has("order-service", "emitted", "order.confirmed"),
        "{story}"
    );
    assert!(
        has("notification-service", "notified", "order.confirmed"),
        "{story}"
    );
    for e in events {
        if let Some(t) = e["trace_id"].as_str() {
            assert_eq!(t, trace, "one trace: {e}");
        }
        assert!(e["message_id"].is_string(), "{e}");
    }
    assert!(
        events
            .iter()
            .skip(1)
            .all(|e| e["since_previous_ms"].as_i64().is_some_and(|ms| ms >= 0)),
        "in time order: {story}"
    );
    let table = stack.shopctl(&["order", &confirmed], &[]).await;
    assert_eq!(table.code, Some(0), "{table:?}");
    println!("$ shopctl order {confirmed}\n{}", table.stdout);
    assert!(
        table.stdout.contains("order.confirmed") && table.stdout.contains(&trace),
        "{}",
        table.stdout
    );

    // An order whose OrderPlaced the broker refuses: its outbox row names an
    // exchange that does not exist, and one refusal parks it.
    proxy.block();
    let stuck = stack.place("story", &[("SKU-1", 1)]).await;
    let orders_db = &stack.databases[0].pool;
    let row: uuid::Uuid = sqlx::query_scalar(
        "UPDATE outbox SET exchange = 'shop.nowhere'
         WHERE routing_key = 'order.placed' AND published_at IS NULL AND correlation_id = $1
         RETURNING id",
    )
    .bind(&stuck)
    .fetch_one(orders_db)
    .await
    .expect("the unpublished OrderPlaced");
    proxy.restore();
    let database_url = stack.databases[0].url.clone();
    let parked = testkit::wait_for("the row parked", Duration::from_secs(60), || async {
        let listed = stack
            .shopctl(
                &["outbox", "list", "--database-url", &database_url, "--json"],
                &[],
            )
            .await
            .json();
        listed["items"]
            .as_array()
            .and_then(|items| items.first().cloned())
    })
    .await;
    assert_eq!(parked["id"], row.to_string());
    assert_eq!(parked["order_id"], stuck.as_str());
    assert!(
        parked["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("shop.nowhere")),
        "{parked}"
    );

    let found = stack
        .shopctl(&["orders", "stuck", "--older-than", "1ms", "--json"], &[])
        .await
        .json();
    let table = stack
        .shopctl(&["orders", "stuck", "--older-than", "1ms"], &[])
        .await;
    println!("$ shopctl orders stuck --older-than 1ms\n{}", table.stdout);
    let outbox = stack
        .shopctl(&["outbox", "list", "--database-url", &database_url], &[])
        .await;
    println!("$ shopctl outbox list\n{}", outbox.stdout);
    let items = found["items"].as_array().expect("items");
    assert!(
        items.iter().all(|o| o["id"] != confirmed.as_str()),
        "a confirmed order is not stuck: {found}"
    );
    let entry = items
        .iter()
        .find(|o| o["id"] == stuck.as_str())
        .unwrap_or_else(|| panic!("the parked order is stuck: {found}"));
    assert_eq!(entry["last_event"]["event"], "order.placed");
    assert_eq!(entry["last_event"]["outbox"]["state"], "parked");
    assert!(entry["created_at"].is_string());

    // Fixed, retried: the order goes through.
    stack
        .shopctl(
            &[
                "outbox",
                "retry",
                "--database-url",
                &database_url,
                "--id",
                &uuid::Uuid::now_v7().to_string(),
            ],
            &[],
        )
        .await
        .assert_fails_with("not a parked outbox row");
    sqlx::query("UPDATE outbox SET exchange = 'shop.events' WHERE id = $1")
        .bind(row)
        .execute(orders_db)
        .await
        .expect("fix the row");
    let retried = stack
        .shopctl(
            &[
                "outbox",
                "retry",
                "--database-url",
                &database_url,
                "--id",
                &row.to_string(),
                "--json",
            ],
            &[],
        )
        .await
        .json();
    assert_eq!(retried["count"], 1);
    assert_eq!(stack.settled(&stuck).await["status"], "confirmed");
    let found = stack
        .shopctl(&["orders", "stuck", "--older-than", "1ms", "--json"], &[])
        .await
        .json();
    assert_eq!(found["items"], serde_json::json!([]), "{found}");
    stack
        .shopctl(&["order", &uuid::Uuid::now_v7().to_string()], &[])
        .await
        .assert_fails_with("unknown order");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_whose_broker_connection_is_cut_half_way_loses_nothing_and_notifies_each_once() {
    let (stack, receiver, orders) = dead_lettered_notifications(8).await;
    let order = ids_of(&listed(&stack).await);
    receiver.down.store(false, Ordering::SeqCst);
    // A slow link: every chunk shopctl sends waits 100 ms, so the redrive takes
    // seconds and the cut lands between two of its messages.
    let proxy = testkit::TcpProxy::start("127.0.0.1:5672")
        .await
        .expect("proxy");
    proxy.delay_client(Duration::from_millis(100));
    let url = stack
        .vhost
        .amqp_url()
        .replace(":5672/", &format!(":{}/", proxy.port()));
    let env = [("AMQP_URL", url.as_str())];
    let redrive = stack.shopctl(&["dlq", "redrive", "--queue", QUEUE, "--all"], &env);
    let cut_it = async {
        testkit::wait_until(
            "a first redriven delivery",
            Duration::from_secs(60),
            || async { !receiver.delivered().is_empty() },
        )
        .await;
        proxy.sever();
        receiver.delivered().len()
    };
    let (cut, delivered_at_cut) = tokio::join!(redrive, cut_it);
    assert_eq!(cut.code, Some(1), "{cut:?}");
    assert!(cut.stderr.contains("stopped after"), "{cut:?}");
    println!("{}", cut.stderr.trim());
    assert!(
        delivered_at_cut < orders.len(),
        "cut half-way: {delivered_at_cut}"
    );

    let left = testkit::wait_for(
        "the held originals back in the DLQ",
        Duration::from_secs(30),
        || async {
            let left = ids_of(&listed(&stack).await);
            (left.len() + receiver.delivered().len() >= order.len()).then_some(left)
        },
    )
    .await;
    assert!(
        !left.is_empty() && left.iter().all(|id| order.contains(id)),
        "{left:?}"
    );
    redrive_all(&stack, left.len()).await;
    testkit::wait_until(
        "every notification delivered",
        Duration::from_secs(30),
        || async { receiver.delivered().len() >= order.len() },
    )
    .await;
    // Every copy handled, duplicates included, before counting deliveries.
    let vhost = stack.vhost.name.clone();
    testkit::wait_until("the queue drained", Duration::from_secs(30), || {
        let vhost = vhost.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                e2e::rabbitmqctl(&["-q", "list_queues", "-p", &vhost, "name", "messages"])
            })
            .await
            .expect("join")
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [QUEUE, "0"])
        }
    })
    .await;
    each_notified_once_in_order(&stack, &receiver, &order, &orders).await;
    stack.stop().await;
}
