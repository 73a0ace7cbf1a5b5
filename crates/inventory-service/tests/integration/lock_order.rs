//! Reservations and releases lock stock rows in one order whatever the
//! database's collation, so concurrent ones never deadlock.

use std::time::Duration;

use contracts::events::v1::{OrderItem, OrderPlaced};
use inventory_service::{
    MIGRATIONS,
    store::{self, Release, Reservation},
};
use messaging::{Inbox, Processed};
use sqlx::PgPool;
use uuid::Uuid;

/// Mixed case: the ICU order (a-1, B-1, c-1, …) and the byte order
/// (B-1, D-1, F-1, a-1, …) disagree.
const SKUS: [&str; 6] = ["a-1", "B-1", "c-1", "D-1", "e-1", "F-1"];
const ON_HAND: i64 = 1_000_000;
const TASKS: usize = 16;
const ORDERS_PER_TASK: usize = 50;

/// Items over 3 to 6 of the SKUs, starting and running in a different place and
/// direction for each (task, order).
fn items_for(task: usize, order: usize) -> Vec<OrderItem> {
    let count = 3 + (task + order) % (SKUS.len() - 2);
    let start = task * 7 + order;
    let mut items: Vec<OrderItem> = (0..count)
        .map(|k| OrderItem {
            sku: SKUS[(start + k) % SKUS.len()].to_owned(),
            quantity: 1,
        })
        .collect();
    if (task + order) % 2 == 1 {
        items.reverse();
    }
    items
}

async fn reserve(inbox: &Inbox, order_id: Uuid, items: Vec<OrderItem>) -> Result<(), String> {
    let placed = OrderPlaced {
        order_id: order_id.to_string(),
        customer_id: "c-1".into(),
        email: None,
        items,
        placed_at: contracts::decode::now(),
    };
    let processed = inbox
        .process(&format!("placed-{order_id}"), |tx| {
            Box::pin(async move { store::reserve(tx, order_id, &placed).await })
        })
        .await
        .map_err(|e| describe("reserve", &e))?;
    match processed {
        Processed::Done(Reservation::Reserved) => Ok(()),
        other => Err(format!("reserve {order_id}: {other:?}")),
    }
}

async fn release(inbox: &Inbox, order_id: Uuid) -> Result<(), String> {
    let processed = inbox
        .process(&format!("cancelled-{order_id}"), |tx| {
            Box::pin(async move { store::release(tx, order_id).await })
        })
        .await
        .map_err(|e| describe("release", &e))?;
    match processed {
        Processed::Done(Release::Released) => Ok(()),
        other => Err(format!("release {order_id}: {other:?}")),
    }
}

fn describe(step: &str, e: &sqlx::Error) -> String {
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
        .unwrap_or_default();
    format!("{step}: SQLSTATE {code}: {e}")
}

async fn stock(pool: &PgPool) -> Vec<(String, i64, i64)> {
    sqlx::query_as("SELECT sku, available, reserved FROM stock ORDER BY sku COLLATE \"C\"")
        .fetch_all(pool)
        .await
        .expect("stock")
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_reservations_and_releases_of_mixed_case_skus_never_deadlock() {
    let db = testkit::TestDb::create_with_icu_locale("en-US").await;
    // A deadlock costs `deadlock_timeout` (1 s by default) before PostgreSQL
    // breaks it; detecting it sooner makes a regression fail fast with 40P01
    // rather than crawl. Best effort: it needs a superuser, and only speeds up.
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{}\" SET deadlock_timeout = '50ms'",
        db.name
    )))
    .execute(&db.pool)
    .await;
    let pool = service_kit::database::connect_and_migrate(
        &db.url,
        TASKS as u32,
        std::time::Duration::from_secs(15),
        MIGRATIONS,
    )
    .await
    .expect("migrate");
    for sku in SKUS {
        store::set_available(&pool, sku, ON_HAND)
            .await
            .expect("stock a sku");
    }
    let inbox = Inbox::new(pool.clone(), "inventory.order-events");

    // Each task reserves an order, then releases the one before it, each in its
    // own transaction as the consumer does: reservations and releases overlap.
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let inbox = inbox.clone();
            tokio::spawn(async move {
                let mut failures = Vec::new();
                let mut previous: Option<Uuid> = None;
                for order in 0..ORDERS_PER_TASK {
                    let order_id = Uuid::now_v7();
                    // Only a reservation that took place has something to release.
                    let reserved = match reserve(&inbox, order_id, items_for(task, order)).await {
                        Ok(()) => Some(order_id),
                        Err(e) => {
                            failures.push(e);
                            None
                        }
                    };
                    if let Some(earlier) = std::mem::replace(&mut previous, reserved)
                        && let Err(e) = release(&inbox, earlier).await
                    {
                        failures.push(e);
                    }
                }
                if let Some(last) = previous
                    && let Err(e) = release(&inbox, last).await
                {
                    failures.push(e);
                }
                failures
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut failures = Vec::new();
    for task in tasks {
        let outcome = tokio::time::timeout_at(deadline, task)
            .await
            .expect("tasks finish in time")
            .expect("task panicked");
        failures.extend(outcome);
    }

    let deadlocks = failures
        .iter()
        .filter(|f| f.contains("SQLSTATE 40P01"))
        .count();
    assert!(
        failures.is_empty(),
        "{} of {} transactions failed, {deadlocks} of them deadlocked (40P01); first: {:#?}",
        failures.len(),
        TASKS * ORDERS_PER_TASK * 2,
        &failures[..failures.len().min(5)]
    );
    let mut expected: Vec<(String, i64, i64)> = SKUS
        .iter()
        .map(|sku| ((*sku).to_owned(), ON_HAND, 0))
        .collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(stock(&pool).await, expected, "every reservation released");
    pool.close().await;
    db.drop_db().await;
}
