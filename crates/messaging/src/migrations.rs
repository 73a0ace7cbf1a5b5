//! The messaging tables (`outbox`, `inbox`), migrated at service startup.
//!
//! Their history lives in `_messaging_migrations`, apart from the service's own
//! `_sqlx_migrations`, so each service runs its migrations and these side by side
//! without either seeing the other's versions as unknown.

use std::borrow::Cow;

use sqlx::{
    SqlSafeStr,
    migrate::{MigrateError, Migration, MigrationType, Migrator},
};

/// Name of the table recording which messaging migrations ran.
pub const HISTORY_TABLE: &str = "_messaging_migrations";

fn migrator() -> Migrator {
    let mut migrator = Migrator::with_migrations(vec![
        Migration::new(
            1,
            Cow::Borrowed("outbox and inbox"),
            MigrationType::Simple,
            include_str!("../migrations/0001_outbox_inbox.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            Cow::Borrowed("outbox parking"),
            MigrationType::Simple,
            include_str!("../migrations/0002_outbox_parking.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            3,
            Cow::Borrowed("outbox discard"),
            MigrationType::Simple,
            include_str!("../migrations/0003_outbox_discard.sql").into_sql_str(),
            false,
        ),
    ]);
    migrator.dangerous_set_table_name(HISTORY_TABLE);
    migrator
}

/// Creates or upgrades the messaging tables. Safe to run from many replicas at
/// once (migrations take an advisory lock).
pub async fn migrate<'a, A>(connection: A) -> Result<(), MigrateError>
where
    A: sqlx::Acquire<'a, Database = sqlx::Postgres>,
    <A::Connection as std::ops::Deref>::Target: sqlx::migrate::Migrate,
{
    migrator().run(connection).await
}
