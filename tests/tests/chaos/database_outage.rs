//! A database refusing connections for two minutes, the longest fault of the
//! suite. It touches only its own database and mostly waits, so it runs beside
//! the cluster scenario (which has a broker of its own): both take the shared
//! side of [`SERIAL`]. Named to sort right after `cluster`, so the test runner
//! starts the two together.

use std::time::{Duration, Instant};

use sqlx::AssertSqlSafe;

use crate::{
    harness::{Chaos, SERIAL, admin},
    scenarios::{pause, start_driving},
};

/// Lets connections into `database` again if a test fails while they are refused.
struct Admit(String);

impl Drop for Admit {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .arg(testkit::database_url())
            .arg("-c")
            .arg(format!(
                "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
                self.0
            ))
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn inventory_database_refusing_connections_for_two_minutes_dead_letters_nothing() {
    let _quiet = SERIAL.read().await;
    let chaos = Chaos::start("db-outage-120s", vec![]).await;
    let name = chaos.stack.databases[1].name.clone();
    let admin = admin().await;
    let (driver, _done) = start_driving(&chaos);
    pause(1000).await;
    let guard = Admit(name.clone());
    sqlx::query(AssertSqlSafe(format!(
        "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"
    )))
    .execute(&admin)
    .await
    .expect("refuse connections");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&admin)
        .await
        .expect("terminate backends");
    let outage = Instant::now();
    // Orders keep arriving during the outage; inventory pauses instead of
    // spending their retries.
    let placed = driver.await.expect("driver");
    let inventory = chaos.stack.inventory();
    let paused = "messaging_consumer_paused{queue=\"inventory.order-events\"}";
    testkit::wait_until(
        "inventory to pause its consumer",
        Duration::from_secs(60),
        || async { chaos.stack.metric(&inventory, paused).await == 1.0 },
    )
    .await;
    // The fault lasts two minutes: this is its length, not a wait for a condition.
    tokio::time::sleep_until((outage + Duration::from_secs(120)).into()).await;
    assert_eq!(
        chaos.stack.metric(&inventory, paused).await,
        1.0,
        "still paused at the end of the outage"
    );
    sqlx::query(AssertSqlSafe(format!(
        "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"
    )))
    .execute(&admin)
    .await
    .expect("admit connections");
    drop(guard);
    admin.close().await;
    chaos.settle_and_check(&placed, 1, 0).await;
    let pauses = chaos
        .stack
        .metric(
            &inventory,
            "messaging_consumer_pauses_total{queue=\"inventory.order-events\"}",
        )
        .await;
    let dead = chaos
        .stack
        .metric(
            &inventory,
            "messaging_consumed_total{queue=\"inventory.order-events\",outcome=\"dead_lettered\"}",
        )
        .await;
    crate::harness::report(&format!(
        "chaos db-outage-120s: consumer pauses={pauses} dead_lettered={dead}"
    ));
    assert_eq!(dead, 0.0);
    chaos.stop().await;
}
