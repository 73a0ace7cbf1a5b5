//! The service's own PostgreSQL database: pool, embedded migrations, and startup
//! errors that name host, database and user but never the password.

use std::{borrow::Cow, time::Duration};

use sqlx::{
    Connection, PgConnection, PgPool, SqlSafeStr,
    migrate::{Migration, MigrationType, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
};

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("DATABASE_URL is invalid: {0}")]
    InvalidUrl(String),
    #[error(
        "cannot connect to PostgreSQL database '{database}' at {host}:{port} as '{user}': {reason}"
    )]
    Connect {
        host: String,
        port: u16,
        database: String,
        user: String,
        reason: String,
    },
    #[error("migrating database '{database}' failed: {reason}")]
    Migrate { database: String, reason: String },
}

/// Connects a pool (failing fast with one clear line) and runs the messaging and
/// service migrations.
///
/// Every pooled connection carries `statement_timeout` and
/// `idle_in_transaction_session_timeout` (twice that, at least 30 s): a statement stuck
/// on a lock, or a transaction whose holder stopped talking, is ended by the
/// server instead of holding locks and a connection indefinitely. Migrations run
/// on a connection of their own without those bounds (building an index may take
/// longer).
pub async fn connect_and_migrate(
    url: &str,
    max_connections: u32,
    statement_timeout: Duration,
    migrations: &[(i64, &'static str, &'static str)],
) -> Result<PgPool, DatabaseError> {
    let target = Target::parse(url)?;
    let mut direct = target.connect_once().await?;
    let fail = |e: sqlx::migrate::MigrateError| DatabaseError::Migrate {
        database: target.database.clone(),
        reason: e.to_string(),
    };
    messaging::migrations::migrate(&mut direct)
        .await
        .map_err(fail)?;
    migrator(migrations).run(&mut direct).await.map_err(fail)?;
    let _ = direct.close().await;
    let statement = format!("{}ms", statement_timeout.as_millis());
    // A transaction may sit idle between statements while its holder awaits a
    // bounded step (the relay awaits its batch's confirms, up to two publish
    // deadlines plus a wait for the other lane): twice the statement bound, at
    // least 30 s.
    let idle = format!(
        "{}ms",
        (statement_timeout * 2)
            .max(Duration::from_secs(30))
            .as_millis()
    );
    let pooled = target.options.clone().options([
        ("statement_timeout", statement.as_str()),
        ("idle_in_transaction_session_timeout", idle.as_str()),
    ]);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(pooled)
        .await
        .map_err(|e| target.error(e))?;
    Ok(pool)
}

/// A pool for a tool that only reads and repairs (no migrations), failing fast
/// with one clear line.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DatabaseError> {
    let target = Target::parse(url)?;
    let direct = target.connect_once().await?;
    let _ = direct.close().await;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(target.options.clone())
        .await
        .map_err(|e| target.error(e))
}

/// A parsed `DATABASE_URL`, and errors that name it without the password.
struct Target<'a> {
    url: &'a str,
    options: PgConnectOptions,
    database: String,
}

impl<'a> Target<'a> {
    fn parse(url: &'a str) -> Result<Self, DatabaseError> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| DatabaseError::InvalidUrl(redact(&e.to_string(), url)))?;
        let database = options.get_database().unwrap_or("postgres").to_owned();
        Ok(Self {
            url,
            options,
            database,
        })
    }

    fn error(&self, e: sqlx::Error) -> DatabaseError {
        DatabaseError::Connect {
            host: self.options.get_host().to_owned(),
            port: self.options.get_port(),
            database: self.database.clone(),
            user: self.options.get_username().to_owned(),
            reason: redact(&e.to_string(), self.url),
        }
    }

    /// One direct connection: a pool would only say "timed out", hiding
    /// "connection refused" or "password authentication failed".
    async fn connect_once(&self) -> Result<PgConnection, DatabaseError> {
        tokio::time::timeout(
            Duration::from_secs(10),
            PgConnection::connect_with(&self.options),
        )
        .await
        .map_err(|_| self.error(sqlx::Error::PoolTimedOut))?
        .map_err(|e| self.error(e))
    }
}

fn migrator(migrations: &[(i64, &'static str, &'static str)]) -> Migrator {
    Migrator::with_migrations(
        migrations
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// Whether the database answers, within a second (for readiness).
pub async fn ping(pool: &PgPool) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            sqlx::query("SELECT 1").execute(pool)
        )
        .await,
        Ok(Ok(_))
    )
}

fn redact(message: &str, url: &str) -> String {
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty());
    match password {
        Some(p) => message.replace(p, "***"),
        None => message.to_owned(),
    }
}
