//! `shopctl outbox list|retry|discard --database-url URL`: the parked rows of
//! one service's outbox (`messaging::parked`).

use messaging::parked::{self, Rows};
use serde_json::json;

use crate::{
    Cli, Error,
    cli::{Outbox, RowWhich},
    output::{Table, print_json},
};

pub async fn run(cli: &Cli, command: &Outbox) -> Result<(), Error> {
    let database = match command {
        Outbox::List { database, .. }
        | Outbox::Retry { database, .. }
        | Outbox::Discard { database, .. } => database,
    };
    let url = crate::cli::value_or_file(
        database.database_url.as_deref(),
        "DATABASE_URL",
        "--database-url",
    )
    .map_err(Error::Config)?;
    let pool = service_kit::database::connect(&url, 1).await?;
    let result = match command {
        Outbox::List { limit, .. } => list(cli, &pool, *limit).await,
        Outbox::Retry { which, .. } => {
            let ids = parked::retry(&pool, &rows(which)).await?;
            report(cli, "retried", &ids);
            Ok(())
        }
        Outbox::Discard { which, .. } => {
            let ids = parked::discard(&pool, &rows(which)).await?;
            report(cli, "discarded", &ids);
            Ok(())
        }
    };
    pool.close().await;
    result
}

fn rows(which: &RowWhich) -> Rows {
    if which.all {
        Rows::All
    } else {
        Rows::Ids(which.ids.clone())
    }
}

async fn list(cli: &Cli, pool: &sqlx::PgPool, limit: i64) -> Result<(), Error> {
    let rows = parked::list(pool, limit)
        .await
        .map_err(parked::ParkedError::from)?;
    if cli.json {
        let items: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "id": r.id, "exchange": r.exchange, "routing_key": r.routing_key,
                    "type": r.message_type, "order_id": r.correlation_id,
                    "created_at": r.created_at, "parked_at": r.parked_at,
                    "failures": r.failures, "last_error": r.last_error, "size": r.size,
                })
            })
            .collect();
        print_json(&json!({ "items": items }));
        return Ok(());
    }
    let mut table = Table::new(&[
        "ID",
        "ROUTING KEY",
        "ORDER ID",
        "PARKED AT",
        "FAILURES",
        "LAST ERROR",
    ]);
    for r in &rows {
        table.row(vec![
            r.id.to_string(),
            r.routing_key.clone(),
            r.correlation_id.clone().unwrap_or_else(|| "-".into()),
            r.parked_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            r.failures.to_string(),
            r.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    print!("{}", table.render());
    println!("{} parked row(s)", rows.len());
    Ok(())
}

fn report(cli: &Cli, verb: &str, ids: &[uuid::Uuid]) {
    if cli.json {
        print_json(&json!({ "action": verb, "ids": ids, "count": ids.len() }));
        return;
    }
    for id in ids {
        println!("{verb} {id}");
    }
    println!("{verb} {} parked row(s)", ids.len());
}
