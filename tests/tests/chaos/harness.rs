use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use e2e::{Options, SERVICES, Stack};
use serde_json::Value;
use testkit::TcpProxy;

/// Broker- and database-wide faults must not overlap: a scenario takes the
/// exclusive side (`write`). The two that touch only what is their own (one
/// database; a cluster of their own) and mostly wait take the shared side
/// (`read`) and may run together.
pub static SERIAL: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

pub const ORDERS: usize = 240;
const SKUS: usize = 5;
pub const UNITS: i64 = 60;

/// An accepted order as the client knows it.
#[derive(Clone, Debug)]
pub struct Placed {
    pub id: String,
    pub sku: String,
    pub quantity: i64,
    pub accepted_at: Instant,
}

pub struct Chaos {
    pub name: &'static str,
    pub stack: Stack,
    /// One proxy per service between it and RabbitMQ, in SERVICES order (none
    /// on a cluster of the scenario's own).
    pub proxies: Vec<TcpProxy>,
    /// Where the checks read the DLQs: the stack's vhost, or each node of a
    /// cluster (the first that answers).
    pub broker_urls: Vec<String>,
    /// Orders the driver must have placed at least.
    pub min_orders: usize,
    pub skus: Vec<String>,
    pub marker: PathBuf,
    pub urls: Urls,
    /// Outbox rows the scenario expects parked (all services together).
    pub expect_parked: usize,
}

#[derive(Clone, Debug)]
pub struct Urls {
    pub order: String,
    pub inventory: String,
    pub notification: String,
    /// `POST /orders` attempts not answered 202 (errors and other statuses).
    pub refused: Arc<AtomicUsize>,
}

/// A client that retries: what a real caller of the API does through faults.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

impl Chaos {
    /// The stack on the machine's broker, each service through a fault proxy.
    pub async fn start(name: &'static str, env: Vec<(&'static str, String, String)>) -> Self {
        Self::launch(name, env, None).await
    }

    /// The stack on `cluster` (the default vhost), every service given the
    /// list of its nodes; no proxies.
    pub async fn on_cluster(
        name: &'static str,
        env: Vec<(&'static str, String, String)>,
        cluster: &testkit::RabbitCluster,
    ) -> Self {
        Self::launch(name, env, Some(cluster)).await
    }

    async fn launch(
        name: &'static str,
        env: Vec<(&'static str, String, String)>,
        cluster: Option<&testkit::RabbitCluster>,
    ) -> Self {
        let mut proxies = Vec::new();
        if cluster.is_none() {
            for _ in SERVICES {
                proxies.push(TcpProxy::start("127.0.0.1:5672").await.expect("proxy"));
            }
        }
        let marker = std::env::temp_dir().join(testkit::unique("crash-marker"));
        let scenario = env;
        let mut env = Vec::new();
        for service in SERVICES {
            // Generous retries: faults come in bursts.
            env.push((service, "RETRY_DELAYS".into(), "100ms,300ms,1s,2s".into()));
            env.push((service, "RETRY_MAX_ATTEMPTS".into(), "12".into()));
            env.push((service, "CRASH_MARKER".into(), marker.display().to_string()));
            if let Some(cluster) = cluster {
                env.push((service, "AMQP_URL".into(), cluster.amqp_urls()));
            }
        }
        // The scenario's own settings win over the defaults above.
        env.extend(scenario);
        let amqp_port = SERVICES
            .iter()
            .zip(&proxies)
            .map(|(s, p)| (*s, p.port()))
            .collect();
        let stack = Stack::start_with(Options {
            env,
            amqp_port,
            ..Options::default()
        })
        .await;
        let urls = Urls {
            order: stack.order(),
            inventory: stack.inventory(),
            notification: stack.notification(),
            refused: Arc::new(AtomicUsize::new(0)),
        };
        let broker_urls = match cluster {
            Some(cluster) => (0..cluster.len()).map(|i| cluster.amqp_url(i)).collect(),
            None => vec![stack.vhost.amqp_url()],
        };
        let skus = (0..SKUS)
            .map(|i| testkit::unique(&format!("C{i}")))
            .collect();
        let chaos = Self {
            name,
            stack,
            proxies,
            broker_urls,
            min_orders: ORDERS,
            skus,
            marker,
            urls,
            expect_parked: 0,
        };
        for sku in &chaos.skus {
            chaos.stack.set_stock(sku, UNITS).await;
        }
        chaos
    }

    /// Waits until every order is terminal, notified, reflected in stock and every
    /// outbox drained; then counts what was lost or duplicated and prints the summary.
    pub async fn settle_and_check(&self, placed: &[Placed], faults: usize, expected_dlq: usize) {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(180);
        let http = client();
        let mut report;
        loop {
            report = self.inspect(&http, placed, expected_dlq).await;
            if report.clean() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let recovered = started.elapsed();
        let line = format!(
            "chaos {}: faults={faults} orders={} lost={} duplicated={} recovered_in={:.1}s",
            self.name,
            placed.len(),
            report.lost,
            report.duplicated,
            recovered.as_secs_f64()
        );
        self::report(&line);
        assert!(report.clean(), "{line}\n{:#?}", report.details);
        assert!(
            placed.len() >= self.min_orders,
            "every order was accepted in the end: {} of {}",
            placed.len(),
            self.min_orders
        );
    }

    async fn inspect(
        &self,
        http: &reqwest::Client,
        placed: &[Placed],
        expected_dlq: usize,
    ) -> Report {
        let mut report = Report::default();
        let [orders_db, inventory_db, notifications_db] =
            [0, 1, 2].map(|i| &self.stack.databases[i].pool);
        // Orders: terminal, and one per customer (no duplicate from client retries).
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT id::text, status FROM orders")
            .fetch_all(orders_db)
            .await
            .unwrap_or_default();
        let status: HashMap<String, String> = rows.into_iter().collect();
        let duplicates: i64 =
            sqlx::query_scalar("SELECT count(*) - count(DISTINCT customer_id) FROM orders")
                .fetch_one(orders_db)
                .await
                .unwrap_or(0);
        report.duplicate(
            duplicates as usize,
            "orders created twice for one client request",
        );
        let mut confirmed: BTreeMap<&str, i64> = BTreeMap::new();
        for order in placed {
            match status.get(&order.id).map(String::as_str) {
                Some("confirmed") => *confirmed.entry(&order.sku).or_default() += order.quantity,
                Some("rejected" | "cancelled") => {}
                other => report.lose(1, format!("order {} is {other:?}", order.id)),
            }
        }
        // Stock: reserved = confirmed quantities, available = the rest.
        let stock: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT sku, available, reserved FROM stock")
                .fetch_all(inventory_db)
                .await
                .unwrap_or_default();
        for (sku, available, reserved) in stock.iter().filter(|s| self.skus.contains(&s.0)) {
            let expected = confirmed.get(sku.as_str()).copied().unwrap_or(0);
            if *reserved > expected {
                report.duplicate(
                    (*reserved - expected) as usize,
                    format!("{sku}: reserved {reserved}, confirmed {expected}"),
                );
            } else if *reserved < expected {
                report.lose(
                    (expected - *reserved) as usize,
                    format!("{sku}: reserved {reserved}, confirmed {expected}"),
                );
            }
            if available + reserved != UNITS {
                report.lose(
                    1,
                    format!("{sku}: available {available} + reserved {reserved} != {UNITS}"),
                );
            }
        }
        // Notifications: placed and the final event of every order.
        let notes: Vec<(String, String)> =
            sqlx::query_as("SELECT order_id::text, event FROM notifications")
                .fetch_all(notifications_db)
                .await
                .unwrap_or_default();
        let mut seen: HashMap<(String, String), usize> = HashMap::new();
        for note in notes {
            *seen.entry(note).or_default() += 1;
        }
        for order in placed {
            let Some(final_status) = status.get(&order.id) else {
                continue;
            };
            for event in ["order.placed".to_owned(), format!("order.{final_status}")] {
                match seen.get(&(order.id.clone(), event.clone())) {
                    None => report.lose(1, format!("no {event} notification for {}", order.id)),
                    Some(n) if *n > 1 => {
                        report.duplicate(n - 1, format!("{event} notified {n} times"))
                    }
                    Some(_) => {}
                }
            }
        }
        // Outboxes drained; parked rows only where the scenario parks on purpose.
        let mut parked = 0;
        for (service, pool) in SERVICES
            .iter()
            .zip([orders_db, inventory_db, notifications_db])
        {
            let (waiting, parked_here): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE parked_at IS NULL),
                        count(*) FILTER (WHERE parked_at IS NOT NULL)
                 FROM outbox WHERE published_at IS NULL",
            )
            .fetch_one(pool)
            .await
            .unwrap_or((-1, 0));
            parked += parked_here.unsigned_abs() as usize;
            if waiting != 0 {
                report.lose(
                    waiting.unsigned_abs() as usize,
                    format!("{service}: {waiting} outbox rows unpublished"),
                );
            }
        }
        if parked != self.expect_parked {
            report.lose(
                parked.abs_diff(self.expect_parked),
                format!(
                    "{parked} outbox rows parked, expected {}",
                    self.expect_parked
                ),
            );
        }
        // DLQs: exactly what was injected.
        let mut conn = None;
        for url in &self.broker_urls {
            if let Ok(c) = lapin::Connection::connect(url, Default::default()).await {
                conn = Some(c);
                break;
            }
        }
        if conn.is_none() {
            report
                .details
                .push("no broker node answered for the DLQ check".into());
            report.unready = true;
        }
        if let Some(conn) = conn {
            let channel = conn.create_channel().await;
            if channel.is_err() {
                report.details.push("no channel for the DLQ check".into());
                report.unready = true;
            }
            if let Ok(channel) = channel {
                for queue in [
                    contracts::names::ORDER_QUEUE,
                    contracts::names::INVENTORY_QUEUE,
                    contracts::names::NOTIFICATION_QUEUE,
                ] {
                    let dlq = format!("{queue}.dlq");
                    let count = channel
                        .queue_declare(
                            dlq.as_str().into(),
                            lapin::options::QueueDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            Default::default(),
                        )
                        .await
                        .map(|q| q.message_count() as usize)
                        .unwrap_or(usize::MAX);
                    if count != expected_dlq {
                        report.lose(
                            count.abs_diff(expected_dlq),
                            format!("{dlq} holds {count}, expected {expected_dlq}"),
                        );
                    }
                }
            }
            let _ = conn.close(200, "bye".into()).await;
        }
        // Everyone ready.
        for url in [
            &self.urls.order,
            &self.urls.inventory,
            &self.urls.notification,
        ] {
            let ready = http
                .get(format!("{url}/readyz"))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if !ready {
                report.details.push(format!("{url} is not ready"));
                report.unready = true;
            }
        }
        report
    }

    /// The names of the stack's three databases.
    pub fn database_names(&self) -> Vec<String> {
        self.stack
            .databases
            .iter()
            .map(|d| d.name.clone())
            .collect()
    }

    /// The processes of `service`, by index in the stack.
    pub fn indices(&self, service: &str) -> Vec<usize> {
        self.stack
            .processes
            .iter()
            .enumerate()
            .filter(|(_, p)| p.name == service)
            .map(|(i, _)| i)
            .collect()
    }

    /// What the crash marker file says fired.
    pub fn crash_marks(&self) -> String {
        std::fs::read_to_string(&self.marker).unwrap_or_default()
    }

    pub async fn stop(self) {
        let _ = std::fs::remove_file(&self.marker);
        self.stack.stop().await;
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub lost: usize,
    pub duplicated: usize,
    pub unready: bool,
    pub details: Vec<String>,
}

impl Report {
    fn lose(&mut self, n: usize, why: impl Into<String>) {
        self.lost += n;
        self.details.push(why.into());
    }

    fn duplicate(&mut self, n: usize, why: impl Into<String>) {
        if n > 0 {
            self.duplicated += n;
            self.details.push(why.into());
        }
    }

    fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && !self.unready
    }
}

/// Prints a figure of the suite past the test harness's capture (also when the
/// test passes) and appends it to target/chaos-summary.txt.
pub fn report(line: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{line}");
    let summary = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/chaos-summary.txt");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(summary)
    {
        let _ = writeln!(file, "{line}");
    }
}

/// A pool on the server's maintenance database, for faults and observations
/// that span the stack's databases.
pub async fn admin() -> sqlx::PgPool {
    sqlx::PgPool::connect(&testkit::database_url())
        .await
        .expect("admin pool")
}

/// Retries `attempt` until it yields a value, for at most two minutes.
pub async fn retry<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no answer for two minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `rabbitmqctl` off the async threads.
pub async fn rabbitmqctl(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        e2e::rabbitmqctl(&refs)
    })
    .await
    .expect("rabbitmqctl")
}

/// Places `ORDERS` orders from `concurrency` clients, cancelling every
/// seventh; every request is retried (same Idempotency-Key) until answered,
/// after `Retry-After` when refused with 429.
pub async fn drive(
    name: &'static str,
    urls: &Urls,
    skus: &[String],
    concurrency: usize,
) -> Vec<Placed> {
    drive_until(
        name,
        urls,
        skus,
        concurrency,
        ORDERS,
        Arc::new(AtomicBool::new(true)),
    )
    .await
}

/// Like [`drive`], for at least `at_least` orders and on until `stop` is set.
pub async fn drive_until(
    name: &'static str,
    urls: &Urls,
    skus: &[String],
    concurrency: usize,
    at_least: usize,
    stop: Arc<AtomicBool>,
) -> Vec<Placed> {
    let next = Arc::new(AtomicUsize::new(0));
    let placed = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, placed, urls, skus, name, stop) = (
                next.clone(),
                placed.clone(),
                urls.clone(),
                skus.to_vec(),
                name,
                stop.clone(),
            );
            tokio::spawn(async move {
                let http = client();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= at_least && stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let sku = skus[i % skus.len()].clone();
                    let quantity = 1 + (i % 3) as i64;
                    let customer = format!("{name}-{i}");
                    let body = serde_json::json!({"customer_id": customer, "items": [{"sku": sku, "quantity": quantity}]});
                    let key = format!("{name}-key-{i}");
                    let id = retry(&format!("POST /orders #{i}"), || {
                        let request = http.post(format!("{}/orders", urls.order)).header("Idempotency-Key", &key).json(&body);
                        let refused = urls.refused.clone();
                        async move {
                            let response = request.send().await.inspect_err(|_| {
                                refused.fetch_add(1, Ordering::SeqCst);
                            }).ok()?;
                            if response.status().as_u16() != 202 {
                                refused.fetch_add(1, Ordering::SeqCst);
                            }
                            match response.status().as_u16() {
                                202 => response.json::<Value>().await.ok()?["id"].as_str().map(str::to_owned),
                                // Refused while a backlog drains (admission control): wait
                                // as asked, then send the same request again.
                                429 => {
                                    let wait = response
                                        .headers()
                                        .get("retry-after")
                                        .and_then(|v| v.to_str().ok())
                                        .and_then(|v| v.parse::<u64>().ok())
                                        .expect("a 429 carries Retry-After in seconds");
                                    tokio::time::sleep(Duration::from_secs(wait.min(5))).await;
                                    None
                                }
                                s if s >= 500 || s == 409 => None,
                                s => panic!("POST /orders answered {s}: {}", response.text().await.unwrap_or_default()),
                            }
                        }
                    })
                    .await;
                    if i % 7 == 3 {
                        retry(&format!("cancel #{i}"), || {
                            let request = http.post(format!("{}/orders/{id}/cancel", urls.order));
                            async move {
                                let status = request.send().await.ok()?.status().as_u16();
                                // 409: it was rejected first, which is fine.
                                (status == 200 || status == 409).then_some(())
                            }
                        })
                        .await;
                    }
                    // A steady stream (about 40 orders/s from 8 clients), so faults land
                    // throughout it rather than after it.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    placed.lock().expect("placed").push(Placed { id, sku, quantity, accepted_at: Instant::now() });
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("driver");
    }
    placed.lock().expect("placed").clone()
}
