//! A RabbitMQ cluster of its own for a test: nodes of the installed RabbitMQ
//! started side by side on free loopback ports, joined into one cluster, owned
//! by the [`RabbitCluster`] value and killed with their files when it drops
//! (also when the test panics). Each node runs as a child process in a
//! process group of its own, which a kill ends whole. The nodes of a test
//! process that died without dropping its cluster (SIGKILL, a CI timeout) are
//! swept by the next [`RabbitCluster::start`]: each cluster directory names the
//! process that owns it.
//!
//! Each node gets its own directory (home with the shared Erlang cookie,
//! database, logs, an empty plugin list, a config that listens on its port
//! only) and a unique node name `<prefix>-<i>@localhost`, so a cluster never
//! meets the machine's own broker or another test's cluster. Needs to run as a
//! user that may start `rabbitmq-server` (root here).
//!
//! The methods block (they run `rabbitmqctl`): call them from
//! `tokio::task::spawn_blocking` in async tests.

mod host;

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use host::{free_ports, kill_group, output_within, set_mode, sweep_orphans};

const SBIN: &str = "/usr/lib/rabbitmq/bin";
/// What every cluster directory's name starts with.
const PREFIX: &str = "shoptest-";
/// `rabbitmqctl list_queues` printing only the values, one queue a line.
const LIST_QUEUES: &str = "list_queues";
const QUIET: &str = "--quiet";
const NO_HEADERS: &str = "--no-table-headers";
/// The longest a `rabbitmqctl` call may take before it is killed.
const CTL_LIMIT: Duration = Duration::from_secs(60);

/// A running cluster of RabbitMQ nodes; dropped, it kills them and removes
/// their files.
#[derive(Debug)]
pub struct RabbitCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

#[derive(Debug)]
struct Node {
    name: String,
    amqp_port: u16,
    dist_port: u16,
    dir: PathBuf,
    /// The running `rabbitmq-server`, leader of the node's process group.
    process: Mutex<Option<Child>>,
}

impl RabbitCluster {
    /// Starts `size` nodes, joins the others to the first and waits until
    /// every one runs. Errors say which step failed, with the tool's output.
    pub fn start(size: usize) -> Result<Self, String> {
        assert!(size >= 1, "a cluster has at least one node");
        sweep_orphans();
        let prefix = crate::unique("shoptest").replace('_', "-");
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("owner"), std::process::id().to_string())
            .map_err(|e| e.to_string())?;
        // From here on, dropping `cluster` kills what was started.
        let mut cluster = Self {
            dir,
            nodes: Vec::new(),
        };
        let cookie = crate::unique("cookie");
        let mut ports = free_ports(2 * size)?.into_iter();
        for i in 0..size {
            let dir = cluster.dir.join(format!("n{i}"));
            std::fs::create_dir_all(dir.join("home")).map_err(|e| e.to_string())?;
            let cookie_file = dir.join("home/.erlang.cookie");
            std::fs::write(&cookie_file, &cookie).map_err(|e| e.to_string())?;
            set_mode(&cookie_file, 0o400)?;
            let node = Node {
                name: format!("{prefix}-{i}@localhost"),
                amqp_port: ports.next().ok_or("no port")?,
                dist_port: ports.next().ok_or("no port")?,
                dir,
                process: Mutex::new(None),
            };
            std::fs::write(
                node.dir.join("rabbitmq.conf"),
                format!(
                    "listeners.tcp.1 = 127.0.0.1:{}\nloopback_users = none\n",
                    node.amqp_port
                ),
            )
            .map_err(|e| e.to_string())?;
            std::fs::write(node.dir.join("plugins"), "[].\n").map_err(|e| e.to_string())?;
            std::fs::write(node.dir.join("env.conf"), "").map_err(|e| e.to_string())?;
            cluster.nodes.push(node);
        }
        for i in 0..size {
            cluster.launch(i)?;
        }
        for i in 0..size {
            cluster.await_running(i)?;
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..size {
            cluster.ctl(i, &["stop_app"])?;
            cluster.ctl(i, &["join_cluster", &first])?;
            cluster.ctl(i, &["start_app"])?;
        }
        Ok(cluster)
    }

    /// The directory holding every node's files (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many nodes the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has at least one node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The AMQP port of node `i`.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].amqp_port
    }

    /// The node (index) listening on `port`, if any.
    pub fn node_on_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.amqp_port == port)
    }

    /// The Erlang name of node `i` (`<prefix>-<i>@localhost`).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node (index) with Erlang name `name`.
    pub fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Node `i`'s URL for the default vhost, as guest.
    pub fn amqp_url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port(i))
    }

    /// Every node's URL, comma-separated (what `AMQP_URL` takes for a cluster).
    pub fn amqp_urls(&self) -> String {
        (0..self.len())
            .map(|i| self.amqp_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills node `i` with SIGKILL, as a crash would (its whole process
    /// group), and reaps it.
    pub fn kill(&self, i: usize) -> Result<(), String> {
        let mut process = self.process(i);
        let Some(mut child) = process.take() else {
            return Err(format!("node {i} is not running"));
        };
        kill_group(child.id());
        child
            .wait()
            .map(|_| ())
            .map_err(|e| format!("node {i}: {e}"))
    }

    /// Stops node `i` gracefully (`rabbitmqctl stop`), as a rolling restart
    /// does, and waits (at most a minute) until its process has exited.
    pub fn stop(&self, i: usize) -> Result<(), String> {
        self.ctl(i, &["stop"])?;
        let mut process = self.process(i);
        let Some(mut child) = process.take() else {
            return Err(format!("node {i} is not running"));
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    kill_group(child.id());
                    let _ = child.wait();
                    return Err(format!("node {i} did not exit within a minute of `stop`"));
                }
            }
        }
    }

    /// Starts node `i` again (after [`Self::kill`] or [`Self::stop`]) and waits
    /// until it runs; it rejoins the cluster it was in.
    pub fn restart(&self, i: usize) -> Result<(), String> {
        self.launch(i)?;
        self.await_running(i)
    }

    /// The node (index) leading quorum queue `queue` of the default vhost, asked
    /// of any node that answers.
    pub fn leader(&self, queue: &str) -> Result<usize, String> {
        let mut last = String::new();
        for i in 0..self.len() {
            match self.ctl(i, &[LIST_QUEUES, QUIET, NO_HEADERS, "name", "leader"]) {
                Ok(out) => {
                    for line in out.lines() {
                        let mut fields = line.split_whitespace();
                        if fields.next() == Some(queue) {
                            let leader = fields.next().unwrap_or_default();
                            return self.node_named(leader).ok_or_else(|| {
                                format!("{queue} is led by {leader:?}, not a node of this cluster")
                            });
                        }
                    }
                    return Err(format!("no queue {queue}: {out}"));
                }
                Err(e) => last = e,
            }
        }
        Err(format!("no node answered: {last}"))
    }

    /// What node 0 reports of `queue` (default vhost) for one `list_queues`
    /// info item (`members`, `arguments`, `leader`, …).
    pub fn queue_info(&self, queue: &str, item: &str) -> Result<String, String> {
        let out = self.ctl(0, &[LIST_QUEUES, QUIET, NO_HEADERS, "name", item])?;
        out.lines()
            .find_map(|line| {
                let (name, value) = line.split_once('\t')?;
                (name == queue).then(|| value.to_owned())
            })
            .ok_or_else(|| format!("no queue {queue}: {out}"))
    }

    /// `(queue, consumers)` of every queue in the default vhost, asked of node `i`.
    pub fn consumers(&self, i: usize) -> Result<Vec<(String, u64)>, String> {
        let out = self.ctl(i, &[LIST_QUEUES, QUIET, NO_HEADERS, "name", "consumers"])?;
        Ok(out
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let name = fields.next()?.to_owned();
                let consumers = fields.next()?.parse().ok()?;
                Some((name, consumers))
            })
            .collect())
    }

    /// Runs `rabbitmqctl` against node `i` (killed after a minute); its
    /// output, or an error with it.
    pub fn ctl(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let node = &self.nodes[i];
        let mut command = Command::new(Path::new(SBIN).join("rabbitmqctl"));
        command
            .arg("-n")
            .arg(&node.name)
            .args(args)
            .env("HOME", node.dir.join("home"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1");
        let output = output_within(command, CTL_LIMIT)
            .map_err(|e| format!("rabbitmqctl -n {} {args:?}: {e}", node.name))?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "rabbitmqctl -n {} {args:?} failed: {text}{}",
                node.name,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    fn process(&self, i: usize) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.nodes[i]
            .process
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Starts node `i`'s `rabbitmq-server` in the foreground, as the leader of
    /// a new process group, its console output to `console.log`.
    fn launch(&self, i: usize) -> Result<(), String> {
        let node = &self.nodes[i];
        let dir = &node.dir;
        let console = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("console.log"))
            .map_err(|e| e.to_string())?;
        let console_err = console.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(Path::new(SBIN).join("rabbitmq-server"))
            .env("HOME", dir.join("home"))
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("env.conf"))
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("plugins"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            // Distribution on loopback only; schedulers that do not spin
            // (four nodes share two cores with the test).
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none",
            )
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .spawn()
            .map_err(|e| format!("rabbitmq-server: {e} (is RabbitMQ installed?)"))?;
        // For the sweep of an orphaned cluster.
        let _ = std::fs::write(dir.join("pgid"), child.id().to_string());
        *self.process(i) = Some(child);
        Ok(())
    }

    /// Waits (at most 90 s) until node `i` has started its RabbitMQ application.
    fn await_running(&self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            // The node registers after a moment: until then every command
            // fails at once, so ask again.
            match self.ctl(i, &["await_startup", "--timeout", "10"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "{} did not start: {e}\n{}",
                        self.nodes[i].name,
                        self.log_tail(i)
                    ));
                }
                Err(_) => {
                    if let Some(Ok(Some(status))) = self.process(i).as_mut().map(Child::try_wait) {
                        return Err(format!(
                            "{} exited ({status}) while starting\n{}",
                            self.nodes[i].name,
                            self.log_tail(i)
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    /// The last lines of node `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize) -> String {
        let log = self.nodes[i]
            .dir
            .join("log")
            .join(format!("{}.log", self.nodes[i].name));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(mut child) = self.process(i).take() {
                kill_group(child.id());
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
