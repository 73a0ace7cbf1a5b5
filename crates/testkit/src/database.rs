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

/// Dropped with its database: by [`TestDb::drop_db`], or, when a failing test
/// unwinds past it, by `Drop`, so red runs leave no scratch databases either.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    admin_url: String,
    dropped: bool,
}

impl TestDb {
    /// Creates a uniquely named database next to `DATABASE_URL` and connects a
    /// pool to it; panics, naming the server, when it cannot.
    pub async fn create() -> Self {
        Self::try_create_on(&database_url(), "shop_test")
            .await
            .unwrap_or_else(|e| panic!("cannot create a test database at {}: {e}", database_url()))
    }

    /// Like [`Self::create`], but the database's default collation comes from
    /// the ICU locale `icu_locale` (e.g. `en-US`, which orders `a-1` before `B-1`
    /// where the server's usual `C` byte order puts `B-1` first), for code whose
    /// correctness must not depend on the collation.
    pub async fn create_with_icu_locale(icu_locale: &str) -> Self {
        let quoted = icu_locale.replace('\'', "''");
        let clause = format!("TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE '{quoted}'");
        Self::try_create(&database_url(), "shop_test", &clause)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot create a test database with ICU locale {icu_locale} at {}: {e}",
                    database_url()
                )
            })
    }

    /// Creates a database named `<prefix>_<random>` on the server of `admin_url`
    /// and connects a pool to it.
    pub async fn try_create_on(admin_url: &str, prefix: &str) -> Result<Self, sqlx::Error> {
        Self::try_create(admin_url, prefix, "").await
    }

    /// `clause` follows `CREATE DATABASE <name>` (trusted text, not user input).
    async fn try_create(admin_url: &str, prefix: &str, clause: &str) -> Result<Self, sqlx::Error> {
        let name = crate::unique(prefix);
        let mut admin = PgConnection::connect(admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{name}\" {clause}"
        )))
        .execute(&mut admin)
        .await?;
        let _ = admin.close().await;
        let url = url_for(admin_url, &name);
        let pool = match PgPoolOptions::new().max_connections(10).connect(&url).await {
            Ok(pool) => pool,
            Err(e) => {
                drop_database(admin_url, &name).await;
                return Err(e);
            }
        };
        Ok(Self {
            name,
            url,
            pool,
            admin_url: admin_url.to_owned(),
            dropped: false,
        })
    }

    /// Closes the pool and drops the database.
    pub async fn drop_db(mut self) {
        self.dropped = true;
        self.pool.close().await;
        drop_database(&self.admin_url, &self.name).await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // No async in Drop, and this may run on a runtime thread: drop the
        // database from a thread of its own with a small runtime.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(drop_database(&admin_url, &name));
            }
        })
        .join();
    }
}

/// `DROP DATABASE ... WITH (FORCE)`: open connections are terminated first.
async fn drop_database(admin_url: &str, name: &str) {
    if let Ok(mut admin) = PgConnection::connect(admin_url).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
        let _ = admin.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exists(name: &str) -> bool {
        let mut admin = PgConnection::connect(&database_url()).await.expect("admin");
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
            .bind(name)
            .fetch_optional(&mut admin)
            .await
            .expect("query");
        found.is_some()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_test_database_is_dropped_even_when_a_panic_unwinds_past_it() {
        let db = TestDb::create().await;
        let name = db.name.clone();
        assert!(exists(&name).await);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _db = db;
            panic!("a failing test");
        }));
        assert!(unwound.is_err());
        assert!(!exists(&name).await, "{name} was left behind");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_database_with_an_icu_locale_orders_by_that_locale() {
        let db = TestDb::create_with_icu_locale("en-US").await;

        let sorted: Vec<String> =
            sqlx::query_scalar("SELECT s FROM unnest(ARRAY['c-1', 'B-1', 'a-1']) AS s ORDER BY s")
                .fetch_all(&db.pool)
                .await
                .expect("query");

        assert_eq!(sorted, ["a-1", "B-1", "c-1"]);
        db.drop_db().await;
    }

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
