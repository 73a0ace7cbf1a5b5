//! Faults of production length (the database refusing connections for minutes
//! is in `database_outage`): the broker stopped for a minute, a minute-long memory alarm, bad outbox rows, a
//! handler stuck on a row lock, and a connection that dies while the topology is
//! declared on reconnect. Each restores what it broke in a guard, also when the
//! test fails.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use messaging::{
    AmqpSettings, Broker, ConsumerOptions, Handler, IncomingMessage, Outcome, OutgoingMessage,
    Publisher, QueueSpec, RetryPolicy, Topology, spawn_consumer,
};
use serde_json::Value;

use crate::{
    harness::{Chaos, SERIAL, admin, rabbitmqctl},
    scenarios::{BrokerBack, Watermark, pause, start_driving, watermark_now},
};

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_stopped_for_a_minute_order_intake_stays_ready_and_everything_completes_after() {
    let _serial = SERIAL.write().await;
    let chaos = Chaos::start("broker-stop-60s", vec![]).await;
    let _back = BrokerBack;
    rabbitmqctl(&["stop_app"]).await;
    let stopped = Instant::now();
    // Probe order-service's readiness four times a second, from the stop until
    // everything has settled.
    let watching = Arc::new(AtomicBool::new(true));
    let answers = Arc::new(Mutex::new((0usize, Vec::<String>::new())));
    let watcher = {
        let (watching, answers, url) = (
            watching.clone(),
            answers.clone(),
            format!("{}/readyz", chaos.stack.order()),
        );
        tokio::spawn(async move {
            let http = crate::harness::client();
            while watching.load(Ordering::SeqCst) {
                let status = http
                    .get(&url)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                {
                    let mut answers = answers.lock().expect("answers");
                    answers.0 += 1;
                    if status != 200 {
                        answers
                            .1
                            .push(format!("{:.1}s: {status}", stopped.elapsed().as_secs_f64()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let (driver, _done) = start_driving(&chaos);
    let placed = driver.await.expect("driver");
    let intake = stopped.elapsed();
    // The outage lasts a minute: its length, not a wait for a condition.
    tokio::time::sleep_until((stopped + Duration::from_secs(60)).into()).await;
    rabbitmqctl(&["start_app"]).await;
    rabbitmqctl(&["await_startup"]).await;
    chaos.settle_and_check(&placed, 1, 0).await;
    watching.store(false, Ordering::SeqCst);
    watcher.await.expect("watcher");
    let (probes, unready) = answers.lock().expect("answers").clone();
    crate::harness::report(&format!(
        "chaos broker-stop-60s: {} orders accepted in {:.1}s while stopped, readyz probes={probes} not-200={}",
        placed.len(),
        intake.as_secs_f64(),
        unready.len()
    ));
    assert!(
        intake < Duration::from_secs(60),
        "the orders came in while the broker was stopped"
    );
    assert_eq!(
        chaos.urls.refused.load(Ordering::SeqCst),
        0,
        "every POST /orders was answered 202 while the broker was stopped"
    );
    assert!(
        probes > 200,
        "readiness was probed throughout ({probes} probes)"
    );
    assert!(
        unready.is_empty(),
        "order-service /readyz was not 200: {unready:?}"
    );
    chaos.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_minute_long_memory_alarm_holds_no_transaction_open_and_everything_completes_after() {
    let _serial = SERIAL.write().await;
    let chaos = Chaos::start("memory-alarm-60s", vec![]).await;
    let restore = watermark_now().await;
    let names = chaos.database_names();
    let admin = admin().await;
    // The longest-open transaction in the stack's databases, sampled five times
    // a second for the whole scenario.
    let watching = Arc::new(AtomicBool::new(true));
    let longest = Arc::new(Mutex::new(0.0f64));
    let sampler = {
        let (watching, longest, admin, names) = (
            watching.clone(),
            longest.clone(),
            admin.clone(),
            names.clone(),
        );
        tokio::spawn(async move {
            while watching.load(Ordering::SeqCst) {
                let open: Option<f64> = sqlx::query_scalar(
                    "SELECT max(EXTRACT(EPOCH FROM now() - xact_start))::FLOAT8
                     FROM pg_stat_activity
                     WHERE datname = ANY($1) AND xact_start IS NOT NULL
                       AND pid <> pg_backend_pid()",
                )
                .bind(&names)
                .fetch_one(&admin)
                .await
                .unwrap_or(None);
                {
                    let mut longest = longest.lock().expect("longest");
                    *longest = longest.max(open.unwrap_or(0.0));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let (driver, _done) = start_driving(&chaos);
    pause(800).await;
    let guard = Watermark(restore.clone());
    rabbitmqctl(&["set_vm_memory_high_watermark", "0"]).await;
    let alarm_started = Instant::now();
    // While publishing is blocked the API goes on accepting orders into the outbox.
    let orders_db = chaos.stack.databases[0].pool.clone();
    let backlog = testkit::wait_for(
        "the outbox to grow during the alarm",
        Duration::from_secs(20),
        || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                    .fetch_one(&orders_db)
                    .await
                    .unwrap_or(0);
            (n >= 10).then_some(n)
        },
    )
    .await;
    // The broker blocks the relay's connection; consumers have their own, which
    // is not blocked, so they can go on acking (and draining queues).
    let order = chaos.stack.order();
    testkit::wait_until(
        "order-service to see its publish connection blocked",
        Duration::from_secs(10),
        || async {
            chaos
                .stack
                .metric(&order, "broker_blocked{connection=\"publish\"}")
                .await
                == 1.0
        },
    )
    .await;
    let placed = driver.await.expect("driver");
    // The alarm lasts a minute: its length, not a wait for a condition.
    tokio::time::sleep_until((alarm_started + Duration::from_secs(60)).into()).await;
    for url in [
        order.clone(),
        chaos.stack.inventory(),
        chaos.stack.notification(),
    ] {
        assert_eq!(
            chaos
                .stack
                .metric(&url, "broker_blocked{connection=\"consume\"}")
                .await,
            0.0,
            "consume connection of {url} blocked"
        );
    }
    rabbitmqctl(&["set_vm_memory_high_watermark", &restore]).await;
    let alarm_ended = Instant::now();
    drop(guard);
    let during = placed
        .iter()
        .filter(|p| p.accepted_at > alarm_started && p.accepted_at < alarm_ended)
        .count();
    assert!(during > 0, "no order was accepted during the alarm");
    assert!(backlog >= 10);
    chaos.settle_and_check(&placed, 1, 0).await;
    watching.store(false, Ordering::SeqCst);
    sampler.await.expect("sampler");
    admin.close().await;
    let longest = *longest.lock().expect("longest");
    crate::harness::report(&format!(
        "chaos memory-alarm-60s: {during} orders accepted during the alarm, longest open transaction {longest:.1}s"
    ));
    assert!(
        longest < 10.0,
        "a transaction stayed open {longest:.1}s during the alarm"
    );
    chaos.stop().await;
}

/// Puts the broker's maximum message size back if a test fails while it is lowered.
struct MaxMessageSize;

const DEFAULT_MAX_MESSAGE_SIZE: &str = "134217728";

fn set_max_message_size(bytes: &str) -> String {
    e2e::rabbitmqctl(&[
        "eval",
        &format!("application:set_env(rabbit, max_message_size, {bytes})."),
    ])
}

impl Drop for MaxMessageSize {
    fn drop(&mut self) {
        set_max_message_size(DEFAULT_MAX_MESSAGE_SIZE);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_outbox_rows_are_parked_with_their_reason_while_the_rows_behind_them_flow() {
    let _serial = SERIAL.write().await;
    // The relay's channel is opened after this, so it gets the lower limit.
    let _size = MaxMessageSize;
    set_max_message_size("1048576");
    let mut chaos = Chaos::start(
        "outbox-poison",
        vec![("order-service", "OUTBOX_PARK_AFTER".into(), "3".into())],
    )
    .await;
    chaos.expect_parked = 3;
    let orders_db = chaos.stack.databases[0].pool.clone();
    // Three bad rows at the head of order-service's outbox: an exchange that
    // does not exist, a body over the broker's maximum, headers that are not a
    // string map.
    for (exchange, payload, headers) in [
        ("shop.no-such-exchange", vec![0x0a_u8, 0x00], "{}"),
        ("shop.events", vec![0x0a; 2 * 1024 * 1024], "{}"),
        ("shop.events", vec![0x0a, 0x00], r#"{"x-count": 1}"#),
    ] {
        sqlx::query(
            "INSERT INTO outbox (id, exchange, routing_key, type, payload, headers)
             VALUES (gen_random_uuid(), $1, 'order.placed', 'shop.events.v1.OrderPlaced', $2, $3::jsonb)",
        )
        .bind(exchange)
        .bind(payload)
        .bind(headers)
        .execute(&orders_db)
        .await
        .expect("insert a bad row");
    }
    let injected = Instant::now();
    // An order placed right behind them completes within seconds.
    let sku = testkit::unique("BEHIND");
    chaos.stack.set_stock(&sku, 5).await;
    let http = crate::harness::client();
    let id = chaos.stack.place("behind-the-bad-rows", &[(&sku, 1)]).await;
    testkit::wait_until(
        "the order behind the bad rows to be confirmed",
        Duration::from_secs(30),
        || async {
            let order: Value = http
                .get(format!("{}/orders/{id}", chaos.urls.order))
                .send()
                .await
                .expect("GET order")
                .json()
                .await
                .expect("json");
            order["status"] == "confirmed"
        },
    )
    .await;
    let flowed_in = injected.elapsed();
    let (driver, _done) = start_driving(&chaos);
    let placed = driver.await.expect("driver");
    let parked: Vec<(String, String)> = testkit::wait_for(
        "the bad rows to be parked",
        Duration::from_secs(60),
        || async {
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT exchange, coalesce(last_error, '') FROM outbox
                 WHERE parked_at IS NOT NULL ORDER BY seq",
            )
            .fetch_all(&orders_db)
            .await
            .unwrap_or_default();
            (rows.len() == 3).then_some(rows)
        },
    )
    .await;
    let parked_in = injected.elapsed();
    assert!(parked[0].1.contains("404"), "missing exchange: {parked:?}");
    assert!(parked[1].1.contains("406"), "oversized body: {parked:?}");
    assert!(
        parked[2].1.contains("unreadable"),
        "bad headers: {parked:?}"
    );
    assert_eq!(
        chaos.stack.metric(&chaos.urls.order, "outbox_parked").await,
        3.0
    );
    chaos.settle_and_check(&placed, 3, 0).await;
    crate::harness::report(&format!(
        "chaos outbox-poison: order behind the bad rows confirmed in {:.1}s, 3 rows parked in {:.1}s: {parked:?}",
        flowed_in.as_secs_f64(),
        parked_in.as_secs_f64()
    ));
    chaos.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_blocked_by_a_row_lock_for_a_minute_is_retried_while_other_messages_flow() {
    let _serial = SERIAL.write().await;
    let inventory =
        |key: &str, value: &str| ("inventory-service", key.to_owned(), value.to_owned());
    let chaos = Chaos::start(
        "row-lock-60s",
        vec![
            inventory("HANDLER_TIMEOUT", "3s"),
            inventory("DATABASE_STATEMENT_TIMEOUT", "5s"),
            inventory("DATABASE_POOL_SIZE", "10"),
            inventory("RETRY_MAX_ATTEMPTS", "40"),
        ],
    )
    .await;
    let sku = testkit::unique("LOCKED");
    chaos.stack.set_stock(&sku, 5).await;
    let inventory_db = chaos.stack.databases[1].pool.clone();
    let mut holder = inventory_db.begin().await.expect("begin");
    sqlx::query("SELECT sku FROM stock WHERE sku = $1 FOR UPDATE")
        .bind(&sku)
        .execute(&mut *holder)
        .await
        .expect("lock the row");
    let locked_at = Instant::now();
    let stuck = chaos.stack.place("blocked-by-a-lock", &[(&sku, 1)]).await;
    let (driver, _done) = start_driving(&chaos);
    let placed = driver.await.expect("driver");
    // Every other order completes while the lock is still held.
    let orders_db = chaos.stack.databases[0].pool.clone();
    let ids: Vec<String> = placed.iter().map(|p| p.id.clone()).collect();
    testkit::wait_until(
        "every other order to reach a final state while the row is locked",
        Duration::from_secs(45),
        || async {
            let pending: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM orders WHERE id::text = ANY($1) AND status = 'pending'",
            )
            .bind(&ids)
            .fetch_one(&orders_db)
            .await
            .unwrap_or(-1);
            pending == 0
        },
    )
    .await;
    let others_done = locked_at.elapsed();
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id::text = $1")
        .bind(&stuck)
        .fetch_one(&orders_db)
        .await
        .expect("stuck order");
    assert_eq!(status, "pending", "the order behind the lock waits for it");
    let timeouts = "messaging_handler_timeouts_total{queue=\"inventory.order-events\"}";
    let url = chaos.stack.inventory();
    testkit::wait_until(
        "the handler deadline to fire",
        Duration::from_secs(30),
        || async { chaos.stack.metric(&url, timeouts).await >= 1.0 },
    )
    .await;
    // The lock is held for a minute: the fault's length.
    tokio::time::sleep_until((locked_at + Duration::from_secs(60)).into()).await;
    holder.rollback().await.expect("release the lock");
    let released = Instant::now();
    loop {
        let status =
            sqlx::query_scalar::<_, String>("SELECT status FROM orders WHERE id::text = $1")
                .bind(&stuck)
                .fetch_one(&orders_db)
                .await
                .unwrap_or_default();
        if status == "confirmed" {
            break;
        }
        if released.elapsed() > Duration::from_secs(60) {
            // Say what inventory did with the order before failing.
            let index = chaos.indices("inventory-service")[0];
            let log =
                std::fs::read_to_string(&chaos.stack.processes[index].log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(stuck.as_str())).collect();
            let tail = format!(
                "{}\n--- last lines ---\n{}",
                lines[lines.len().saturating_sub(12)..].join("\n"),
                chaos.stack.processes[index].log_tail()
            );
            panic!(
                "the order behind the lock is {status:?} 60 s after the release; inventory's log of it:\n{tail}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fired = chaos.stack.metric(&url, timeouts).await;
    chaos.settle_and_check(&placed, 1, 0).await;
    crate::harness::report(&format!(
        "chaos row-lock-60s: others done {:.1}s into the lock, handler deadline fired {fired} times",
        others_done.as_secs_f64()
    ));
    chaos.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_dies_while_the_topology_is_declared_on_reconnect_is_rebuilt() {
    let _serial = SERIAL.write().await;
    let chaos = Chaos::start("declare-stall", vec![]).await;
    let (driver, _done) = start_driving(&chaos);
    pause(1000).await;
    // order-service's next connection freezes at its first declare, as if the
    // peer vanished without a FIN.
    let proxy = &chaos.proxies[0];
    proxy.stall_next_declare();
    proxy.sever();
    testkit::wait_until(
        "a reconnect to freeze mid-declare",
        Duration::from_secs(30),
        || async { proxy.stalls() >= 1 },
    )
    .await;
    let placed = driver.await.expect("driver");
    chaos.settle_and_check(&placed, 1, 0).await;
    let order = chaos.stack.order();
    for role in ["publish", "consume"] {
        let connected = chaos
            .stack
            .metric(
                &order,
                &format!("broker_connected{{connection=\"{role}\"}}"),
            )
            .await;
        assert_eq!(connected, 1.0, "{role} connection of order-service is back");
    }
    let live = crate::harness::client()
        .get(format!("{order}/healthz"))
        .send()
        .await
        .expect("healthz")
        .status();
    assert_eq!(live.as_u16(), 200);
    chaos.stop().await;
}

/// Acks what it is given, after a short pause; asks once for a retry of the
/// message whose body is `retry-me`.
struct SlowAcker {
    runs: Arc<Mutex<Vec<(String, u32)>>>,
}

impl Handler for SlowAcker {
    async fn handle(&self, message: IncomingMessage) -> Outcome {
        let body = String::from_utf8_lossy(&message.payload).into_owned();
        self.runs
            .lock()
            .expect("runs")
            .push((body.clone(), message.attempt));
        if body == "retry-me" && message.attempt == 1 {
            return Outcome::Retry("asked to retry".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Outcome::Ack
    }
}

/// Messages in `queue` of `vhost` (ready and unacknowledged), as the broker counts them.
async fn depth(vhost: &str, queue: &str) -> Option<u64> {
    let out = rabbitmqctl(&[
        "list_queues",
        "-p",
        vhost,
        "--no-table-headers",
        "-q",
        "name",
        "messages",
    ])
    .await;
    out.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        (parts.next()? == queue).then(|| parts.next()?.parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_goes_on_acking_during_an_alarm_while_its_retry_waits_to_be_published() {
    let _serial = SERIAL.write().await;
    let vhost = e2e::Vhost::create();
    let restore = watermark_now().await;
    let exchange = testkit::unique("alarm.events");
    let queue = QueueSpec::new(testkit::unique("alarm.queue"), testkit::unique("alarm.dlx"))
        .bind(&exchange, "#")
        .with_retry(RetryPolicy {
            delays: vec![Duration::from_millis(200)],
            max_attempts: 3,
        });
    let topology = Topology::single_queue(&exchange, &queue.dead_letter_exchange, queue.clone());
    let settings = |role: &str| {
        let mut settings = AmqpSettings::from_url(&vhost.amqp_url()).expect("url");
        settings.connection_name = format!("alarm test {role}");
        settings
    };
    let consume = Broker::connect(settings("consume"), topology.clone())
        .await
        .expect("consume connection");
    let publish = Broker::connect(settings("publish"), topology.clone())
        .await
        .expect("publish connection");
    let publisher = Publisher::new(publish.clone(), "alarm-test");
    let mut messages = vec![OutgoingMessage::new(
        &exchange,
        "k",
        "t",
        b"retry-me".to_vec(),
    )];
    for i in 0..20 {
        messages.push(OutgoingMessage::new(
            &exchange,
            "k",
            "t",
            format!("ok-{i}").into_bytes(),
        ));
    }
    assert!(
        publisher
            .publish_batch(&messages)
            .await
            .iter()
            .all(Result::is_ok)
    );

    let guard = Watermark(restore.clone());
    rabbitmqctl(&["set_vm_memory_high_watermark", "0"]).await;
    let runs = Arc::new(Mutex::new(Vec::new()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let consumer = spawn_consumer(
        consume.clone(),
        queue.clone(),
        ConsumerOptions {
            prefetch: 32,
            concurrency: 4,
            // Retries go out on the publish connection: the alarm blocks it, and
            // the consume connection goes on acking.
            publisher: Some(publisher.clone()),
            ..ConsumerOptions::default()
        },
        SlowAcker { runs: runs.clone() },
        shutdown.clone(),
    );
    // Every good message is acked during the alarm; only the one whose retry
    // waits for publishing is still held.
    testkit::wait_until(
        "the good messages to be acked during the alarm",
        Duration::from_secs(30),
        || async { depth(&vhost.name, &queue.name).await == Some(1) },
    )
    .await;
    let retried_during_alarm = runs
        .lock()
        .expect("runs")
        .iter()
        .filter(|(body, _)| body == "retry-me")
        .count();
    rabbitmqctl(&["set_vm_memory_high_watermark", &restore]).await;
    drop(guard);
    testkit::wait_until(
        "the retried message to be handled again after the alarm",
        Duration::from_secs(30),
        || async {
            runs.lock()
                .expect("runs")
                .iter()
                .any(|(body, attempt)| body == "retry-me" && *attempt == 2)
        },
    )
    .await;
    testkit::wait_until("the queue to drain", Duration::from_secs(30), || async {
        depth(&vhost.name, &queue.name).await == Some(0)
    })
    .await;
    assert_eq!(
        retried_during_alarm, 1,
        "the retry was not spun during the alarm"
    );
    let dlq = depth(&vhost.name, &queue.dlq_name()).await;
    assert_eq!(dlq, Some(0), "nothing dead-lettered");
    shutdown.cancel();
    consumer.join().await;
    consume.close().await;
    publish.close().await;
    drop(vhost);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_caught_by_an_alarm_in_the_middle_of_its_batches_publishes_everything_after() {
    let _serial = SERIAL.write().await;
    let vhost = e2e::Vhost::create();
    let restore = watermark_now().await;
    let db = testkit::TestDb::create().await;
    messaging::migrations::migrate(&db.pool)
        .await
        .expect("migrate");
    let exchange = testkit::unique("relay.events");
    let queue = QueueSpec::new(testkit::unique("relay.queue"), testkit::unique("relay.dlx"))
        .bind(&exchange, "#");
    let topology = Topology::single_queue(&exchange, &queue.dead_letter_exchange, queue.clone());
    let settings = AmqpSettings::from_url(&vhost.amqp_url()).expect("url");
    let broker = Broker::connect(settings, topology).await.expect("connect");
    // Large rows, so that batches are still being sent when the alarm starts.
    const ROWS: i64 = 8000;
    sqlx::query(
        "INSERT INTO outbox (id, exchange, routing_key, type, payload)
         SELECT gen_random_uuid(), $1, 'k', 't', decode(repeat('ab', 8192), 'hex')
         FROM generate_series(1, $2)",
    )
    .bind(&exchange)
    .bind(ROWS)
    .execute(&db.pool)
    .await
    .expect("backlog");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let relay = messaging::spawn_relay(
        db.pool.clone(),
        Publisher::new(broker.clone(), "alarm-relay"),
        // Smaller batches take longer to drain: the alarm lands in the middle.
        messaging::RelayOptions {
            batch_size: 64,
            lanes: 1,
            ..messaging::RelayOptions::default()
        },
        shutdown.clone(),
    );
    testkit::wait_until(
        "the relay to be publishing",
        Duration::from_secs(30),
        || async { relay.status().published > 0 },
    )
    .await;
    let guard = Watermark(restore.clone());
    rabbitmqctl(&["set_vm_memory_high_watermark", "0"]).await;
    let at_alarm = relay.status().published;
    testkit::wait_until(
        &format!("the publish connection blocked ({at_alarm} rows published at the alarm)"),
        Duration::from_secs(20),
        || async { broker.is_blocked() },
    )
    .await;
    let during = relay.status().published;
    rabbitmqctl(&["set_vm_memory_high_watermark", &restore]).await;
    drop(guard);
    let unpublished = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap_or(-1)
    };
    testkit::wait_until(
        "every row published after the alarm",
        Duration::from_secs(90),
        || async { unpublished().await == 0 },
    )
    .await;
    assert!(relay.probe().heartbeat().is_alive());
    crate::harness::report(&format!(
        "chaos relay-alarm: {during} of {ROWS} rows published when the alarm blocked the relay"
    ));
    assert!(
        during < ROWS as u64,
        "the alarm came in the middle of the backlog"
    );
    shutdown.cancel();
    relay.join().await;
    broker.close().await;
    db.drop_db().await;
    drop(vhost);
}
