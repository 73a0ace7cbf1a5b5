//! A fresh PostgreSQL database per test, dropped at the end.

use sqlx::{Connection, PgConnection, PgPool, postgres::PgPoolOptions};

/// The server tests use; override with `DATABASE_URL` (any database on it: tests
/// create their own next to it).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `base` with its database name replaced by `name`.
pub fn url_for(base: &str, name: &str) -> String {
    let (without_query, query) = match base.split_once('?') {
        Some((u, q)) => (u, format!("?{q}")),
        None => (base, String::new()),
    };
    let authority_end = without_query
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| without_query[start..].find('/').map(|j| start + j))
        .unwrap_or(without_query.len());
    format!("{}/{name}{query}", &without_query[..authority_end])
}

#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    /// Creates a uniquely named database and connects a pool to it.
    pub async fn create() -> Self {
        let name = crate::unique("shop_test");
        let mut admin = PgConnection::connect(&database_url())
            .await
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {}: {e}", database_url()));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let _ = admin.close().await;
        let url = url_for(&database_url(), &name);
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect(&url)
            .await
            .expect("connect to test database");
        Self { name, url, pool }
    }

    /// Closes the pool and drops the database.
    pub async fn drop_db(self) {
        self.pool.close().await;
        if let Ok(mut admin) = PgConnection::connect(&database_url()).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
            let _ = admin.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::url_for;

    #[test]
    fn replaces_only_the_database_name() {
        assert_eq!(
            url_for("postgres://u:p@h:5432/postgres", "x"),
            "postgres://u:p@h:5432/x"
        );
        assert_eq!(
            url_for("postgres://h/db?sslmode=disable", "x"),
            "postgres://h/x?sslmode=disable"
        );
        assert_eq!(url_for("postgres://h:5432", "x"), "postgres://h:5432/x");
    }
}
