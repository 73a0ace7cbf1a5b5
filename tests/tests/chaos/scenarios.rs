use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lapin::{
    BasicProperties,
    options::BasicPublishOptions,
    types::{AMQPValue, FieldTable},
};

use crate::harness::{Chaos, Placed, SERIAL, rabbitmqctl};

const CONCURRENCY: usize = 8;

/// Starts the order stream in the background; `done` flips when it ends.
pub(crate) fn start_driving(
    chaos: &Chaos,
) -> (tokio::task::JoinHandle<Vec<Placed>>, Arc<AtomicBool>) {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    // The driver only needs URLs and SKUs; it gets its own copy of the handle.
    let view = DriverView {
        urls: chaos.urls.clone(),
        skus: chaos.skus.clone(),
        name: chaos.name,
    };
    let handle = tokio::spawn(async move {
        let placed = view.drive().await;
        flag.store(true, Ordering::SeqCst);
        placed
    });
    (handle, done)
}

struct DriverView {
    urls: crate::harness::Urls,
    skus: Vec<String>,
    name: &'static str,
}

impl DriverView {
    async fn drive(self) -> Vec<Placed> {
        crate::harness::drive(self.name, &self.urls, &self.skus, CONCURRENCY).await
    }
}

pub(crate) async fn pause(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_connections_severed_repeatedly_mid_stream() {
    let _serial = SERIAL.write().await;
    let chaos = Chaos::start("amqp-cuts", vec![]).await;
    let (driver, done) = start_driving(&chaos);
    let mut faults = 0;
    while !done.load(Ordering::SeqCst) {
        pause(300).await;
        let which = rand::random_range(0..chaos.proxies.len());
        chaos.proxies[which].sever();
        faults += 1;
        if faults % 8 == 0 {
            rabbitmqctl(&[
                "close_all_connections",
                "-p",
                &chaos.stack.vhost.name,
                "chaos test",
            ])
            .await;
            faults += 1;
        }
    }
    let placed = driver.await.expect("driver");
    chaos.settle_and_check(&placed, faults, 0).await;
    chaos.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn services_killed_at_random_and_restarted() {
    let _serial = SERIAL.write().await;
    let mut chaos = Chaos::start("sigkill", vec![]).await;
    let (driver, done) = start_driving(&chaos);
    let mut faults = 0;
    while !done.load(Ordering::SeqCst) {
        pause(rand::random_range(300..900)).await;
        // Every service in turn, at random moments.
        let index = faults % chaos.stack.processes.len();
        chaos.stack.processes[index].kill();
        faults += 1;
        pause(rand::random_range(50..400)).await;
        chaos.stack.restart(index, None).await;
    }
    let placed = driver.await.expect("driver");
    assert!(
        faults >= 3,
        "every service was killed at least once ({faults} kills)"
    );
    chaos.settle_and_check(&placed, faults, 0).await;
    chaos.stop().await;
}

/// Starts the broker application again if a test fails while it is stopped.
pub(crate) struct BrokerBack;

impl Drop for BrokerBack {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_application_stopped_and_started() {
    let _serial = SERIAL.write().await;
    let chaos = Chaos::start("broker-restart", vec![]).await;
    let _back = BrokerBack;
    let (driver, done) = start_driving(&chaos);
    let mut faults = 0;
    while !done.load(Ordering::SeqCst) && faults < 2 {
        pause(1500).await;
        rabbitmqctl(&["stop_app"]).await;
        pause(2000).await;
        rabbitmqctl(&["start_app"]).await;
        rabbitmqctl(&["await_startup"]).await;
        faults += 1;
    }
    let placed = driver.await.expect("driver");
    chaos.settle_and_check(&placed, faults, 0).await;
    chaos.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn database_connections_terminated_repeatedly() {
    let _serial = SERIAL.write().await;
    let chaos = Chaos::start("postgres-terminate", vec![]).await;
    let names = chaos.database_names();
    let admin = crate::harness::admin().await;
    let (driver, done) = start_driving(&chaos);
    let mut faults = 0;
    while !done.load(Ordering::SeqCst) {
        pause(rand::random_range(400..900)).await;
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ANY($1) AND pid <> pg_backend_pid()",
        )
        .bind(&names)
        .fetch_all(&admin)
        .await
        .unwrap_or_default();
        faults += killed.iter().filter(|k| **k).count();
    }
    let placed = driver.await.expect("driver");
    admin.close().await;
    chaos.settle_and_check(&placed, faults, 0).await;
    chaos.stop().await;
}

/// Restores the memory watermark if a test fails during an alarm.
pub(crate) struct Watermark(pub(crate) String);

impl Drop for Watermark {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", &self.0])
            .output();
    }
}

/// The broker's memory watermark now, to restore after an alarm.
pub(crate) async fn watermark_now() -> String {
    let current = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]).await;
    let current = current
        .trim()
        .trim_start_matches("{relative,")
        .trim_end_matches('}')
        .trim()
        .to_owned();
    if current.parse::<f64>().is_ok() {
        current
    } else {
        "0.4".to_owned()
    }
}

/// Runs the stream with `service` armed to abort at `point` on its 20th pass,
/// restarts it (disarmed) when it dies, and proves the point fired.
async fn crash_point(name: &'static str, service: &'static str, point: &'static str) {
    let _serial = SERIAL.write().await;
    let mut chaos = Chaos::start(
        name,
        vec![(service, "CRASH_POINT".into(), format!("{point}@20"))],
    )
    .await;
    let (driver, done) = start_driving(&chaos);
    let mut faults = 0;
    let index = chaos.indices(service)[0];
    loop {
        let finished = done.load(Ordering::SeqCst);
        if chaos.stack.processes[index].exited().is_some() {
            faults += 1;
            let disarmed: Vec<(String, String)> = chaos
                .stack
                .env_for(service)
                .into_iter()
                .filter(|(k, _)| k != "CRASH_POINT")
                .collect();
            chaos.stack.restart(index, Some(disarmed)).await;
        }
        if finished {
            break;
        }
        pause(100).await;
    }
    let placed = driver.await.expect("driver");
    chaos.settle_and_check(&placed, faults, 0).await;
    assert_eq!(
        chaos.crash_marks().trim(),
        point,
        "the crash point fired exactly once"
    );
    assert_eq!(faults, 1);
    chaos.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_order_commit_before_publishing() {
    crash_point(
        "crash-order-commit",
        "order-service",
        order_service::CRASH_AFTER_ORDER_COMMIT,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_broker_confirm_before_marking_the_outbox() {
    crash_point(
        "crash-relay-confirm",
        "inventory-service",
        messaging::faults::points::RELAY_AFTER_CONFIRM,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_a_consumer_commit_before_its_ack() {
    crash_point(
        "crash-consumer-ack",
        "order-service",
        messaging::faults::points::CONSUMER_BEFORE_ACK,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_on_the_wire_lands_in_each_dlq_and_good_orders_flow() {
    let _serial = SERIAL.write().await;
    let chaos = Chaos::start("poison", vec![]).await;
    let (driver, _done) = start_driving(&chaos);
    let conn = lapin::Connection::connect(&chaos.stack.vhost.amqp_url(), Default::default())
        .await
        .expect("amqp");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirms");
    let mut injected = 0;
    for queue in [
        contracts::names::ORDER_QUEUE,
        contracts::names::INVENTORY_QUEUE,
        contracts::names::NOTIFICATION_QUEUE,
    ] {
        let id = || uuid::Uuid::new_v4().to_string();
        let mut bad_trace = FieldTable::default();
        bad_trace.insert(
            "traceparent".into(),
            AMQPValue::LongString("00-not-a-trace-!!".into()),
        );
        let poison: Vec<(&str, Vec<u8>, BasicProperties)> = vec![
            (
                "undecodable body",
                b"\xff\xff\xff\xff".to_vec(),
                BasicProperties::default()
                    .with_message_id(id().into())
                    .with_type("shop.events.v1.OrderPlaced".into()),
            ),
            (
                "unknown type",
                b"{}".to_vec(),
                BasicProperties::default()
                    .with_message_id(id().into())
                    .with_type("shop.events.v1.Unheard".into()),
            ),
            (
                "huge body",
                vec![0x0a; 4 * 1024 * 1024],
                BasicProperties::default()
                    .with_message_id(id().into())
                    .with_type("shop.events.v1.OrderPlaced".into()),
            ),
            (
                "malformed traceparent",
                b"\x0a\xff".to_vec(),
                BasicProperties::default()
                    .with_message_id(id().into())
                    .with_type("shop.events.v1.OrderCancelled".into())
                    .with_headers(bad_trace),
            ),
            (
                "missing message_id",
                b"".to_vec(),
                BasicProperties::default().with_type("shop.events.v1.OrderPlaced".into()),
            ),
        ];
        for (what, body, properties) in poison {
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &body,
                    properties,
                )
                .await
                .expect("publish poison")
                .await
                .unwrap_or_else(|e| panic!("{what} to {queue}: {e}"));
            injected += 1;
        }
    }
    let placed = driver.await.expect("driver");
    chaos.settle_and_check(&placed, injected, 5).await;
    // Each dead letter says why.
    for queue in [
        contracts::names::ORDER_QUEUE,
        contracts::names::INVENTORY_QUEUE,
        contracts::names::NOTIFICATION_QUEUE,
    ] {
        let mut reasons = Vec::new();
        while let Some(got) = channel
            .basic_get(
                format!("{queue}.dlq").as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("get")
        {
            let headers = got
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            reasons.push(
                messaging::consumer::header_str(&headers, "x-death-reason").unwrap_or_default(),
            );
        }
        assert_eq!(reasons.len(), 5, "{queue}: {reasons:?}");
        assert!(
            reasons.iter().all(|r| !r.is_empty()),
            "{queue}: {reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("exceeds the limit")),
            "{queue}: {reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("unknown message type")),
            "{queue}: {reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("missing message_id")),
            "{queue}: {reasons:?}"
        );
    }
    let _ = conn.close(200, "bye".into()).await;
    chaos.stop().await;
}
