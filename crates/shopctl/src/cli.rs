//! The command line: flags mirror the environment (`AMQP_URL`, `ORDER_URL`, ...).

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "shopctl",
    version,
    about = "The shop's operator tool: dead letters, stuck orders, an order's timeline, parked outbox rows."
)]
pub struct Cli {
    /// RabbitMQ URL incl. vhost (dlq commands); or a file holding it in
    /// AMQP_URL_FILE.
    #[arg(long, env = "AMQP_URL", global = true, hide_env_values = true)]
    pub amqp_url: Option<String>,
    /// order-service base URL.
    #[arg(
        long,
        env = "ORDER_URL",
        global = true,
        default_value = "http://127.0.0.1:8080"
    )]
    pub order_url: String,
    /// inventory-service base URL.
    #[arg(
        long,
        env = "INVENTORY_URL",
        global = true,
        default_value = "http://127.0.0.1:8081"
    )]
    pub inventory_url: String,
    /// notification-service base URL.
    #[arg(
        long,
        env = "NOTIFICATION_URL",
        global = true,
        default_value = "http://127.0.0.1:8082"
    )]
    pub notification_url: String,
    /// Jaeger UI base URL (for trace links).
    #[arg(
        long,
        env = "JAEGER_URL",
        global = true,
        default_value = "http://127.0.0.1:16686"
    )]
    pub jaeger_url: String,
    /// Bearer token for the services' APIs: an operator's (scope `ops`;
    /// `stock:write` for `stock set`). Or a file holding it in SHOP_TOKEN_FILE.
    #[arg(long, env = "SHOP_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Dead letters: list, show, send back (redrive) or delete (purge).
    #[command(subcommand)]
    Dlq(Dlq),
    /// Orders in the saga.
    #[command(subcommand)]
    Orders(Orders),
    /// One order's timeline across the three services.
    Order {
        /// The order id.
        id: String,
    },
    /// Outbox rows the relay parked after repeated refusals by the broker.
    #[command(subcommand)]
    Outbox(Outbox),
    /// Stock levels.
    #[command(subcommand)]
    Stock(Stock),
    /// Mints a development token with a signing key (by default the DEMO key
    /// of deploy/auth, which the compose stack and deploy/k8s trust).
    Token(TokenArgs),
}

#[derive(Debug, Subcommand)]
pub enum Stock {
    /// Sets the available units of SKUs (creating them): SKU=N ...
    Set {
        #[arg(required = true, value_name = "SKU=N", value_parser = stock_level)]
        levels: Vec<(String, i64)>,
    },
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The subject: a customer id (who may then see its own orders only), or
    /// an operator's name.
    #[arg(long)]
    pub sub: String,
    /// A scope to grant, repeatable: `stock:write` (set stock), `ops`
    /// (every order, the histories, notifications, shopctl).
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// The PEM private key (RSA → RS256, P-256 → ES256).
    #[arg(long, env = "AUTH_SIGNING_KEY_FILE", default_value = crate::token::DEMO_KEY)]
    pub key: String,
    /// The `kid` the services' JWKS knows the key by.
    #[arg(long, env = "AUTH_KID", default_value = crate::token::DEMO_KID)]
    pub kid: String,
    #[arg(long, env = "AUTH_ISSUER", default_value = crate::token::DEMO_ISSUER)]
    pub issuer: String,
    #[arg(long, env = "AUTH_AUDIENCE", default_value = crate::token::DEMO_AUDIENCE)]
    pub audience: String,
    /// How long the token is valid, e.g. 15m, 1h.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub ttl: Duration,
}

#[derive(Debug, Subcommand)]
pub enum Dlq {
    /// Without --queue, the number of dead letters per DLQ; with it, each one.
    List {
        /// The source queue (e.g. notification.order-events); its DLQ is <queue>.dlq.
        #[arg(long)]
        queue: Option<String>,
        #[command(flatten)]
        limit: Limit,
    },
    /// One dead letter: its envelope and its payload decoded.
    Show {
        message_id: String,
        #[arg(long)]
        queue: String,
        #[command(flatten)]
        limit: Limit,
    },
    /// Sends dead letters back to their queue, oldest dead-lettered first.
    Redrive {
        #[arg(long)]
        queue: String,
        #[command(flatten)]
        which: Which,
        /// Say what would be sent, and send nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        limit: Limit,
    },
    /// Deletes dead letters.
    Purge {
        #[arg(long)]
        queue: String,
        #[command(flatten)]
        which: PurgeWhich,
        /// Confirm the deletion.
        #[arg(long, required = true)]
        yes: bool,
        #[command(flatten)]
        limit: Limit,
    },
}

#[derive(Debug, Args)]
pub struct Limit {
    /// Read at most this many dead letters at once (a redrive needs them all).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
}

impl Limit {
    pub fn get(&self) -> usize {
        usize::try_from(self.limit).unwrap_or(usize::MAX)
    }
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Which {
    /// Every dead letter of the queue.
    #[arg(long)]
    pub all: bool,
    /// These message ids.
    #[arg(long = "id", num_args = 1..)]
    pub ids: Vec<String>,
    /// Those whose reason contains TEXT.
    #[arg(long, value_name = "TEXT")]
    pub reason_contains: Option<String>,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PurgeWhich {
    #[arg(long)]
    pub all: bool,
    #[arg(long = "id", num_args = 1..)]
    pub ids: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum Orders {
    /// Orders still pending after --older-than, with the last event known.
    Stuck {
        /// e.g. 30s, 5m, 1h.
        #[arg(long, default_value = "5m", value_parser = duration)]
        older_than: Duration,
        /// At most this many orders.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum Outbox {
    /// The parked rows, oldest first.
    List {
        #[command(flatten)]
        database: Database,
        /// At most this many rows.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
    /// Puts parked rows back in the relay's stream.
    Retry {
        #[command(flatten)]
        database: Database,
        #[command(flatten)]
        which: RowWhich,
    },
    /// Deletes parked rows: their events are never published.
    Discard {
        #[command(flatten)]
        database: Database,
        #[command(flatten)]
        which: RowWhich,
        /// Confirm the deletion.
        #[arg(long, required = true)]
        yes: bool,
    },
}

#[derive(Debug, Args)]
pub struct Database {
    /// The service database holding the outbox; or a file holding it in
    /// DATABASE_URL_FILE.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

/// The variables shopctl reads (flags mirror them).
pub const VARIABLES: &[&str] = &[
    "AMQP_URL",
    "AMQP_URL_FILE",
    "DATABASE_URL",
    "DATABASE_URL_FILE",
    "ORDER_URL",
    "INVENTORY_URL",
    "NOTIFICATION_URL",
    "JAEGER_URL",
    "SHOP_TOKEN",
    "SHOP_TOKEN_FILE",
    "AUTH_SIGNING_KEY_FILE",
    "AUTH_KID",
    "AUTH_ISSUER",
    "AUTH_AUDIENCE",
];

/// `value`, else the content of the file named by `{name}_FILE` (how the
/// services take secrets), else an error naming both.
pub fn value_or_file(value: Option<&str>, name: &str, flag: &str) -> Result<String, String> {
    if let Some(value) = value.filter(|v| !v.trim().is_empty()) {
        return Ok(value.trim().to_owned());
    }
    let file_var = format!("{name}_FILE");
    match std::env::var_os(&file_var) {
        Some(path) => std::fs::read_to_string(&path)
            .map(|v| v.trim().to_owned())
            .map_err(|e| format!("cannot read {file_var} ({}): {e}", path.to_string_lossy())),
        None => Err(format!(
            "{name} is not set (pass {flag}, or set {name} or {file_var})"
        )),
    }
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RowWhich {
    #[arg(long)]
    pub all: bool,
    #[arg(long = "id", num_args = 1..)]
    pub ids: Vec<uuid::Uuid>,
}

/// `SKU=N`: a SKU and a number of units.
fn stock_level(raw: &str) -> Result<(String, i64), String> {
    let (sku, units) = raw
        .split_once('=')
        .ok_or_else(|| format!("'{raw}' is not SKU=N"))?;
    let units = units
        .trim()
        .parse::<i64>()
        .map_err(|_| format!("'{units}' in '{raw}' is not a number of units"))?;
    contracts::domain::Sku::parse(sku.trim())?;
    Ok((sku.trim().to_owned(), units))
}

fn duration(raw: &str) -> Result<Duration, String> {
    service_kit::config::parse_duration(raw)
}
