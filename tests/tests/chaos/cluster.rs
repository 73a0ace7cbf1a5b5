//! The saga on a three-node RabbitMQ cluster of the scenario's own (the
//! services get the list of its nodes in `AMQP_URL`), under a steady stream of
//! orders, in two phases on one cluster and one stack:
//!
//! 1. **kills**: for each service in turn, SIGKILL the node its consumer is
//!    connected to; then SIGKILL the node leading `inventory.order-events`.
//!    Each killed node is restarted once the saga has recovered, before the
//!    next kill, so two of three nodes (a quorum) always run.
//! 2. **rolling restart**: each node stopped gracefully and started again, one
//!    after the other.
//!
//! After each kill or stop, *recovered* is the time until both connections of
//! every service are up again on a live node, every consumer is subscribed,
//! and an order placed after the fault has reached its final state with both
//! its notifications. After each phase: every order terminal,
//! nothing lost or duplicated (the suite's invariants), and every service
//! queue has its consumer.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use e2e::SERVICES;
use serde_json::Value;
use testkit::RabbitCluster;

use crate::harness::{self, Chaos, Placed, SERIAL, client, report};

/// Clients placing orders at once (each about 4 orders/s).
const CONCURRENCY: usize = 2;
/// Orders each phase places at least (it goes on until its faults are done).
const MIN_ORDERS: usize = 300;
/// Longest wait for the saga to recover from one fault before the test fails
/// (a deadline, not the figure: that is printed).
const RECOVERY_DEADLINE: Duration = Duration::from_secs(90);

/// Runs a blocking cluster operation off the async threads.
async fn on_cluster<T: Send + 'static>(
    cluster: &Arc<RabbitCluster>,
    op: impl FnOnce(&RabbitCluster) -> Result<T, String> + Send + 'static,
) -> T {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || op(&cluster))
        .await
        .expect("cluster operation")
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `/readyz` of `url`, if it answers.
async fn readiness(http: &reqwest::Client, url: &str) -> Option<Value> {
    http.get(format!("{url}/readyz"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// The nodes (indices) `url`'s connections are on, by role, from the broker
/// check's detail (`publish on 127.0.0.1:P, consume on 127.0.0.1:Q`).
async fn connected_nodes(
    http: &reqwest::Client,
    url: &str,
    cluster: &RabbitCluster,
) -> Vec<(String, usize)> {
    let Some(ready) = readiness(http, url).await else {
        return Vec::new();
    };
    let detail = ready["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "broker")
        .and_then(|c| c["detail"].as_str())
        .unwrap_or_default()
        .to_owned();
    detail
        .split(", ")
        .filter_map(|part| {
            let (role, node) = part.split_once(" on ")?;
            let port = node.rsplit(':').next()?.parse().ok()?;
            Some((role.to_owned(), cluster.node_on_port(port)?))
        })
        .collect()
}

/// Every service's connections up, none on `gone`, and its consumers
/// subscribed (a readiness body without a broker or a consumer check is not).
async fn all_connected(
    http: &reqwest::Client,
    urls: &harness::Urls,
    cluster: &RabbitCluster,
    gone: usize,
) -> bool {
    for url in [&urls.order, &urls.inventory, &urls.notification] {
        let Some(ready) = readiness(http, url).await else {
            return false;
        };
        let checks: Vec<&Value> = ready["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| {
                c["name"] == "broker"
                    || c["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("consumer "))
            })
            .collect();
        let has_broker = checks.iter().any(|c| c["name"] == "broker");
        if !has_broker || checks.len() < 2 || checks.iter().any(|c| c["ok"] != true) {
            return false;
        }
        // Both connections (publish and consume) back, on live nodes.
        let nodes = connected_nodes(http, url, cluster).await;
        if nodes.len() < 2 || nodes.iter().any(|(_, node)| *node == gone) {
            return false;
        }
    }
    true
}

/// Places one order and waits until it is confirmed, rejected or cancelled and
/// both its notifications are written: every service took part.
async fn probe_order(http: &reqwest::Client, chaos: &Chaos, tag: &str) -> Placed {
    let customer = format!("{}-probe-{tag}", chaos.name);
    let sku = chaos.skus[chaos.skus.len() - 1].clone();
    let body = serde_json::json!({"customer_id": customer, "items": [{"sku": sku, "quantity": 1}]});
    let id: String = harness::retry("probe order accepted", || {
        let request = http
            .post(format!("{}/orders", chaos.urls.order))
            .header("Idempotency-Key", &customer)
            .json(&body);
        async move {
            let response = request.send().await.ok()?;
            if response.status().as_u16() != 202 {
                return None;
            }
            response.json::<Value>().await.ok()?["id"]
                .as_str()
                .map(str::to_owned)
        }
    })
    .await;
    let status = testkit::wait_for("the probe order settled", RECOVERY_DEADLINE, || async {
        let response = http
            .get(format!("{}/orders/{id}", chaos.urls.order))
            .send()
            .await
            .ok()?;
        let order: Value = response.json().await.ok()?;
        order["status"]
            .as_str()
            .filter(|s| matches!(*s, "confirmed" | "rejected" | "cancelled"))
            .map(str::to_owned)
    })
    .await;
    chaos
        .stack
        .wait_notified(&id, &["order.placed", &format!("order.{status}")])
        .await;
    Placed {
        id,
        sku,
        quantity: 1,
        accepted_at: Instant::now(),
    }
}

/// After node `gone` failed at `since`: waits until the saga works again and
/// returns how long that took, with the probe order it placed.
async fn recover(
    chaos: &Chaos,
    cluster: &RabbitCluster,
    gone: usize,
    since: Instant,
    tag: &str,
) -> (Duration, Placed) {
    let http = client();
    testkit::wait_until(
        "every connection and consumer up, off the failed node",
        RECOVERY_DEADLINE,
        || all_connected(&http, &chaos.urls, cluster, gone),
    )
    .await;
    let probe = probe_order(&http, chaos, tag).await;
    (since.elapsed(), probe)
}

/// Starts a stream of at least [`MIN_ORDERS`] orders on `skus`, going on
/// until the returned flag is set.
fn start_stream(
    chaos: &Chaos,
    skus: Vec<String>,
) -> (tokio::task::JoinHandle<Vec<Placed>>, Arc<AtomicBool>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (name, urls, flag) = (chaos.name, chaos.urls.clone(), stop.clone());
    let driver = tokio::spawn(async move {
        harness::drive_until(name, &urls, &skus, CONCURRENCY, MIN_ORDERS, flag).await
    });
    (driver, stop)
}

/// Every service queue has a consumer again.
async fn assert_consumed(cluster: &Arc<RabbitCluster>) {
    let queues = on_cluster(cluster, |c| c.consumers(0)).await;
    for queue in [
        contracts::names::ORDER_QUEUE,
        contracts::names::INVENTORY_QUEUE,
        contracts::names::NOTIFICATION_QUEUE,
    ] {
        let consumers = queues
            .iter()
            .find(|(name, _)| name == queue)
            .map_or(0, |(_, n)| *n);
        assert!(consumers >= 1, "{queue} has no consumer: {queues:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_nodes_killed_and_restarted_under_load_lose_and_duplicate_nothing() {
    // Its broker is its own: it may run beside `database_outage`.
    let _quiet = SERIAL.read().await;
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| RabbitCluster::start(3))
            .await
            .expect("cluster start")
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let env = SERVICES
        .iter()
        .map(|s| {
            (
                *s,
                "AMQP_QUORUM_INITIAL_GROUP_SIZE".to_owned(),
                "3".to_owned(),
            )
        })
        .collect();
    let mut chaos = Chaos::on_cluster("cluster-kills", env, &cluster).await;
    // Each queue has a replica on every node: the kills below never take
    // away a majority.
    let queue = contracts::names::INVENTORY_QUEUE;
    let members = on_cluster(&cluster, move |c| c.queue_info(queue, "members")).await;
    assert_eq!(
        members.matches('@').count(),
        3,
        "replicas of {queue}: {members}"
    );
    let arguments = on_cluster(&cluster, move |c| c.queue_info(queue, "arguments")).await;
    assert!(
        arguments.contains("x-quorum-initial-group-size"),
        "{queue}: {arguments}"
    );
    chaos.min_orders = MIN_ORDERS;
    let http = client();
    let mut recoveries = Vec::new();

    // Phase 1: SIGKILL the node under each service, then the queue leader.
    let (driver, stop) = start_stream(&chaos, chaos.skus.clone());
    let mut probes = Vec::new();
    let mut faults = 0;
    for (service, url) in SERVICES.iter().zip([
        chaos.urls.order.clone(),
        chaos.urls.inventory.clone(),
        chaos.urls.notification.clone(),
    ]) {
        let node = testkit::wait_for("the service's node", RECOVERY_DEADLINE, || async {
            connected_nodes(&http, &url, &cluster)
                .await
                .into_iter()
                .find(|(role, _)| role == "consume")
                .map(|(_, node)| node)
        })
        .await;
        // Looked up after the previous fault: the service may have moved.
        let what = format!("{service}'s node");
        let since = Instant::now();
        on_cluster(&cluster, move |c| c.kill(node)).await;
        faults += 1;
        let (took, probe) = recover(&chaos, &cluster, node, since, &format!("kill-{faults}")).await;
        report(&format!(
            "chaos cluster-kills: SIGKILL node {node} ({what}): recovered_in={:.1}s",
            took.as_secs_f64()
        ));
        recoveries.push(took);
        probes.push(probe);
        on_cluster(&cluster, move |c| c.restart(node)).await;
    }
    let leader = on_cluster(&cluster, |c| c.leader(contracts::names::INVENTORY_QUEUE)).await;
    let since = Instant::now();
    on_cluster(&cluster, move |c| c.kill(leader)).await;
    faults += 1;
    let (took, probe) = recover(&chaos, &cluster, leader, since, "kill-leader").await;
    let new_leader = on_cluster(&cluster, |c| c.leader(contracts::names::INVENTORY_QUEUE)).await;
    assert_ne!(new_leader, leader, "another node leads after the kill");
    report(&format!(
        "chaos cluster-kills: SIGKILL node {leader} (leader of {}): recovered_in={:.1}s",
        contracts::names::INVENTORY_QUEUE,
        took.as_secs_f64()
    ));
    recoveries.push(took);
    probes.push(probe);
    on_cluster(&cluster, move |c| c.restart(leader)).await;
    stop.store(true, Ordering::SeqCst);
    let mut placed = driver.await.expect("driver");
    placed.append(&mut probes);
    chaos.settle_and_check(&placed, faults, 0).await;
    assert_consumed(&cluster).await;

    // Phase 2: a rolling restart, on SKUs of its own (phase 1 sold out).
    chaos.name = "cluster-rolling-restart";
    let skus: Vec<String> = (0..3).map(|i| testkit::unique(&format!("R{i}"))).collect();
    for sku in &skus {
        chaos.stack.set_stock(sku, harness::UNITS).await;
    }
    chaos.skus.extend(skus.iter().cloned());
    let (driver, stop) = start_stream(&chaos, skus);
    for node in 0..cluster.len() {
        let since = Instant::now();
        on_cluster(&cluster, move |c| c.stop(node)).await;
        let (took, probe) =
            recover(&chaos, &cluster, node, since, &format!("restart-{node}")).await;
        report(&format!(
            "chaos cluster-rolling-restart: node {node} stopped: recovered_in={:.1}s",
            took.as_secs_f64()
        ));
        recoveries.push(took);
        probes.push(probe);
        on_cluster(&cluster, move |c| c.restart(node)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let phase_two = driver.await.expect("driver");
    assert!(phase_two.len() >= MIN_ORDERS);
    placed.extend(phase_two);
    placed.extend(probes);
    chaos.min_orders = 2 * MIN_ORDERS;
    chaos.settle_and_check(&placed, cluster.len(), 0).await;
    assert_consumed(&cluster).await;
    let worst = recoveries.iter().max().copied().unwrap_or_default();
    report(&format!(
        "chaos cluster: {} faults, slowest recovery {:.1}s",
        recoveries.len(),
        worst.as_secs_f64()
    ));
    chaos.stop().await;

    // The kit leaves nothing behind.
    let cluster = Arc::into_inner(cluster).expect("the only handle");
    let dir = cluster.dir().to_owned();
    drop(cluster);
    assert!(!dir.exists(), "{} outlived the cluster", dir.display());
}
