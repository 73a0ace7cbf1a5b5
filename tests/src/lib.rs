//! The end-to-end harness: starts the three real service binaries as separate
//! processes against fresh databases and a private RabbitMQ vhost, waits until
//! each answers `/readyz`, and drives them over HTTP and AMQP only.
//!
//! The binaries are the ones `cargo build --workspace --bins --features
//! messaging/testing` leaves in the target directory (`scripts/test` builds them
//! before running the tests; the feature gives them the chaos suite's crash
//! points, and a binary without it refuses a `CRASH_POINT`).

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use testkit::TestDb;

pub mod otlp;

pub const SERVICES: [&str; 3] = ["order-service", "inventory-service", "notification-service"];

/// Where cargo put the service binaries.
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the services first (`cargo build --workspace --bins --features messaging/testing`; scripts/test does it)",
        path.display()
    );
    path
}

/// Runs `rabbitmqctl` with `args`, panicking with its output on failure.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("rabbitmqctl {args:?}: {e} (is RabbitMQ installed here?)"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

/// A private vhost, so stacks running in parallel never see each other's messages.
#[derive(Debug)]
pub struct Vhost {
    pub name: String,
}

impl Vhost {
    pub fn create() -> Self {
        let name = testkit::unique("shop-e2e");
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Self { name }
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// One running service process.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    pub url: String,
    pub log: PathBuf,
    child: Child,
}

impl Process {
    /// Starts `binary` with `env` on a free port.
    pub fn spawn(name: &str, env: &[(String, String)]) -> Self {
        Self::spawn_on(name, env, free_port())
    }

    /// Starts `binary` with `env` on `port`.
    pub fn spawn_on(name: &str, env: &[(String, String)], port: u16) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", testkit::unique(name)));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(binary(name))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self {
            name: name.to_owned(),
            url: format!("http://127.0.0.1:{port}"),
            log,
            child,
        }
    }

    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    /// The last lines the process wrote (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then waits for a graceful exit (SIGKILL after 20 s).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        self.child.wait().ok();
        None
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A port free right now and never handed out before in this test process: the
/// kernel may give the same ephemeral port to two tests asking one after the
/// other, and the second service would then fail to bind while its readiness
/// probe reached the first test's service.
fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// How to start a stack.
#[derive(Clone, Debug)]
pub struct Options {
    /// Processes per service.
    pub replicas: usize,
    /// Services to leave stopped at first (start them with [`Stack::start_service`]).
    pub held_back: Vec<&'static str>,
    /// Extra variables per service name.
    pub env: Vec<(&'static str, String, String)>,
    /// Services that reach RabbitMQ through another port (a fault proxy).
    pub amqp_port: Vec<(&'static str, u16)>,
    /// Bearer tokens from this issuer on every API (`AUTH_MODE=jwt`); `None`
    /// runs the services with `AUTH_MODE=off`. With an issuer, the stack's
    /// own client and `shopctl` carry an operator's token (`ops stock:write`).
    pub auth: Option<std::sync::Arc<testkit::Issuer>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            replicas: 1,
            held_back: Vec::new(),
            env: Vec::new(),
            amqp_port: Vec::new(),
            auth: None,
        }
    }
}

/// What one `shopctl` run printed and how it ended.
#[derive(Debug)]
pub struct Shopctl {
    /// `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Shopctl {
    /// Its `--json` output, asserting it succeeded.
    pub fn json(&self) -> Value {
        assert_eq!(self.code, Some(0), "shopctl failed: {self:?}");
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("shopctl printed no JSON ({e}): {self:?}"))
    }

    /// Asserts it failed with one line on stderr containing `text`.
    pub fn assert_fails_with(&self, text: &str) {
        assert_eq!(self.code, Some(1), "shopctl should fail: {self:?}");
        assert_eq!(self.stderr.lines().count(), 1, "one line: {self:?}");
        assert!(self.stderr.contains(text), "{text:?} in {self:?}");
    }
}

/// Three services, three databases, one vhost.
#[derive(Debug)]
pub struct Stack {
    pub vhost: Vhost,
    pub databases: Vec<TestDb>,
    pub processes: Vec<Process>,
    pub http: reqwest::Client,
    options: Options,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        // One rustls provider (ring) for the whole workspace; install it before
        // the first client is built.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let vhost = tokio::task::spawn_blocking(Vhost::create)
            .await
            .expect("vhost");
        let mut databases = Vec::new();
        for _ in SERVICES {
            databases.push(TestDb::create().await);
        }
        let mut stack = Self {
            vhost,
            databases,
            processes: Vec::new(),
            http: client(options.auth.as_deref()),
            options,
        };
        for name in SERVICES {
            if !stack.options.held_back.contains(&name) {
                stack.start_service(name).await;
            }
        }
        stack
    }

    /// An operator's token (`ops stock:write`) when the stack checks tokens.
    pub fn operator_token(&self) -> Option<String> {
        self.options.auth.as_deref().map(operator_token)
    }

    /// The environment `name` runs with.
    pub fn env_for(&self, name: &str) -> Vec<(String, String)> {
        let index = SERVICES
            .iter()
            .position(|s| *s == name)
            .expect("known service");
        let amqp = match self.options.amqp_port.iter().find(|(s, _)| *s == name) {
            Some((_, port)) => self
                .vhost
                .amqp_url()
                .replace(":5672/", &format!(":{port}/")),
            None => self.vhost.amqp_url(),
        };
        let mut env = vec![
            ("DATABASE_URL".to_owned(), self.databases[index].url.clone()),
            ("AMQP_URL".to_owned(), amqp),
            // Two stacks run at once, one may have six processes: stay well under
            // PostgreSQL's default of 100 connections.
            ("DATABASE_POOL_SIZE".to_owned(), "5".to_owned()),
            // Export spans quickly in tests (the default batches for 5 s).
            ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
            ("RETRY_DELAYS".to_owned(), "100ms,200ms,400ms".to_owned()),
            ("RETRY_MAX_ATTEMPTS".to_owned(), "4".to_owned()),
        ];
        match &self.options.auth {
            None => env.push(("AUTH_MODE".to_owned(), "off".to_owned())),
            Some(issuer) => env.extend(issuer.env()),
        }
        for (service, key, value) in &self.options.env {
            if *service == name {
                env.retain(|(k, _)| k != key);
                env.push((key.clone(), value.clone()));
            }
        }
        env
    }

    /// Starts every replica of `name` and waits until each is ready.
    pub async fn start_service(&mut self, name: &str) {
        for _ in 0..self.options.replicas {
            let process = Process::spawn(name, &self.env_for(name));
            self.processes.push(process);
            let index = self.processes.len() - 1;
            self.wait_ready(index).await;
        }
    }

    async fn wait_ready(&mut self, index: usize) {
        let url = format!("{}/readyz", self.processes[index].url);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.processes[index].exited() {
                panic!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.processes[index].name,
                    self.processes[index].log_tail()
                );
            }
            if let Ok(r) = self.http.get(&url).send().await
                && r.status().is_success()
                && self.processes[index].exited().is_none()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} not ready within 30 s:\n{}",
                self.processes[index].name,
                self.processes[index].log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Replaces process `index` by a fresh one of the same service on the same port
    /// (the old one must have exited), with `env` instead of the stack's if given,
    /// and waits until it is ready.
    pub async fn restart(&mut self, index: usize, env: Option<Vec<(String, String)>>) {
        let name = self.processes[index].name.clone();
        let port = self.processes[index].port();
        let env = env.unwrap_or_else(|| self.env_for(&name));
        let old = std::mem::replace(
            &mut self.processes[index],
            Process::spawn_on(&name, &env, port),
        );
        // Keep the old log next to the new one for failure messages.
        let old_log = std::fs::read_to_string(&old.log).unwrap_or_default();
        drop(old);
        if !old_log.is_empty() {
            let _ = std::fs::write(
                self.processes[index].log.with_extension("previous.log"),
                old_log,
            );
        }
        self.wait_ready(index).await;
    }

    /// The base URL of the first running replica of `name`.
    pub fn url(&self, name: &str) -> String {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.url.clone())
            .unwrap_or_else(|| panic!("{name} is not running"))
    }

    /// Every replica's base URL of `name`.
    pub fn urls(&self, name: &str) -> Vec<String> {
        self.processes
            .iter()
            .filter(|p| p.name == name)
            .map(|p| p.url.clone())
            .collect()
    }

    pub fn order(&self) -> String {
        self.url("order-service")
    }

    pub fn inventory(&self) -> String {
        self.url("inventory-service")
    }

    pub fn notification(&self) -> String {
        self.url("notification-service")
    }

    /// Stops every process gracefully and removes databases and vhost.
    pub async fn stop(mut self) {
        let mut processes = std::mem::take(&mut self.processes);
        tokio::task::spawn_blocking(move || {
            for p in &mut processes {
                let status = p.terminate();
                assert!(
                    status.is_some_and(|s| s.success()),
                    "{} did not stop cleanly ({status:?}):\n{}",
                    p.name,
                    p.log_tail()
                );
            }
        })
        .await
        .expect("stop");
        for db in std::mem::take(&mut self.databases) {
            db.drop_db().await;
        }
    }

    /// Runs the real `shopctl` against this stack (its broker vhost and the
    /// services that run; a stopped one gets an address nothing listens on).
    pub async fn shopctl(&self, args: &[&str], env: &[(&str, &str)]) -> Shopctl {
        let url = |name: &str| {
            self.processes
                .iter()
                .find(|p| p.name == name)
                .map_or_else(|| "http://127.0.0.1:9".to_owned(), |p| p.url.clone())
        };
        let mut command = Command::new(binary("shopctl"));
        command
            .args(args)
            .env_clear()
            .env("AMQP_URL", self.vhost.amqp_url())
            .env("ORDER_URL", url("order-service"))
            .env("INVENTORY_URL", url("inventory-service"))
            .env("NOTIFICATION_URL", url("notification-service"))
            .env("JAEGER_URL", "http://jaeger.test:16686");
        if let Some(token) = self.operator_token() {
            command.env("SHOP_TOKEN", token);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        // A shopctl that hangs fails the test instead of hanging it.
        let output = tokio::task::spawn_blocking(move || {
            let child = command
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run shopctl");
            let pid = child.id();
            let (done, waited) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                if waited.recv_timeout(Duration::from_secs(60)).is_err() {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            });
            let output = child.wait_with_output().expect("wait for shopctl");
            let _ = done.send(());
            output
        })
        .await
        .expect("join");
        assert_ne!(
            std::os::unix::process::ExitStatusExt::signal(&output.status),
            Some(9),
            "shopctl was killed after 60 s: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Shopctl {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    // --- HTTP helpers -----------------------------------------------------

    pub async fn set_stock(&self, sku: &str, available: i64) {
        let r = self
            .http
            .put(format!("{}/stock/{sku}", self.inventory()))
            .json(&serde_json::json!({ "available": available }))
            .send()
            .await
            .expect("PUT /stock");
        assert_eq!(
            r.status(),
            200,
            "PUT /stock/{sku}: {}",
            r.text().await.unwrap_or_default()
        );
    }

    pub async fn stock(&self, sku: &str) -> (i64, i64) {
        let v: Value = self
            .http
            .get(format!("{}/stock/{sku}", self.inventory()))
            .send()
            .await
            .expect("GET /stock")
            .json()
            .await
            .expect("stock json");
        (
            v["available"].as_i64().expect("available"),
            v["reserved"].as_i64().expect("reserved"),
        )
    }

    /// Places an order and returns its id.
    pub async fn place(&self, customer: &str, items: &[(&str, i64)]) -> String {
        let body = serde_json::json!({
            "customer_id": customer,
            "items": items.iter().map(|(sku, q)| serde_json::json!({"sku": sku, "quantity": q})).collect::<Vec<_>>(),
        });
        let r = self
            .http
            .post(format!("{}/orders", self.order()))
            .json(&body)
            .send()
            .await
            .expect("POST /orders");
        assert_eq!(
            r.status(),
            202,
            "POST /orders: {}",
            r.text().await.unwrap_or_default()
        );
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["status"], "pending");
        v["id"].as_str().expect("id").to_owned()
    }

    /// `GET /orders?<query>` (the query string without `?`; empty for all).
    pub async fn list_orders(&self, query: &str) -> Value {
        self.http
            .get(format!("{}/orders?{query}", self.order()))
            .send()
            .await
            .expect("GET /orders")
            .json()
            .await
            .expect("json")
    }

    pub async fn order_json(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/orders/{id}", self.order()))
            .send()
            .await
            .expect("GET /orders/{id}")
            .json()
            .await
            .expect("json")
    }

    /// Waits until the order leaves `pending` and returns it.
    pub async fn settled(&self, id: &str) -> Value {
        testkit::wait_for(
            &format!("order {id} settled"),
            Duration::from_secs(30),
            || async {
                let order = self.order_json(id).await;
                (order["status"] != "pending").then_some(order)
            },
        )
        .await
    }

    pub async fn notifications(&self, order_id: &str) -> Vec<Value> {
        let v: Value = self
            .http
            .get(format!(
                "{}/notifications?order_id={order_id}",
                self.notification()
            ))
            .send()
            .await
            .expect("GET /notifications")
            .json()
            .await
            .expect("json");
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until the notifications of `order_id` cover `events`; returns the
    /// event names recorded.
    pub async fn wait_notified(&self, order_id: &str, events: &[&str]) -> Vec<String> {
        testkit::wait_for(
            &format!("notifications {events:?} for {order_id}"),
            Duration::from_secs(30),
            || async {
                let names: Vec<String> = self
                    .notifications(order_id)
                    .await
                    .iter()
                    .filter_map(|n| n["event"].as_str().map(str::to_owned))
                    .collect();
                events
                    .iter()
                    .all(|e| names.iter().any(|n| n == e))
                    .then_some(names)
            },
        )
        .await
    }

    /// The value of a Prometheus sample line starting with `prefix` on `url`
    /// (0 when there is none).
    pub async fn metric(&self, url: &str, prefix: &str) -> f64 {
        self.sample(url, prefix).await.unwrap_or(0.0)
    }

    /// The value of the first Prometheus sample line starting with `prefix` on
    /// `url`, if there is one.
    pub async fn sample(&self, url: &str, prefix: &str) -> Option<f64> {
        let text = self
            .http
            .get(format!("{url}/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

/// An operator's token of `issuer`: every order, the histories, stock.
fn operator_token(issuer: &testkit::Issuer) -> String {
    issuer.token("e2e-operator", &["ops", "stock:write"])
}

/// The stack's HTTP client; with an issuer, it sends an operator's token.
fn client(issuer: Option<&testkit::Issuer>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(issuer) = issuer {
        let value = format!("Bearer {}", operator_token(issuer));
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&value).expect("a header value"),
        );
    }
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .default_headers(headers)
        .build()
        .expect("http client")
}
