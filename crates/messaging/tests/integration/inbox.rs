use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use messaging::{Handler, Inbox, IncomingMessage, NewMessage, Outcome, Processed, enqueue};

use crate::support::{self, Fixture};

fn apply(
    id: String,
    hold: Duration,
) -> impl for<'c> FnOnce(
    &'c mut sqlx::PgConnection,
) -> futures_util::future::BoxFuture<'c, Result<(), sqlx::Error>> {
    move |tx| {
        Box::pin(async move {
            sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tokio::time::sleep(hold).await;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_message_processed_concurrently_by_two_instances_has_one_effect() {
    let db = support::database().await;
    let a = Inbox::new(db.pool.clone(), "inventory");
    let b = Inbox::new(db.pool.clone(), "inventory");

    // The first holds its transaction open while the second arrives.
    let (first, second) = tokio::join!(
        a.process("m-1", apply("m-1".into(), Duration::from_millis(300))),
        async {
            tokio::task::yield_now().await;
            b.process("m-1", apply("m-1".into(), Duration::ZERO)).await
        }
    );

    let mut outcomes = vec![first.expect("first"), second.expect("second")];
    outcomes.sort_by_key(|o| matches!(o, Processed::Duplicate));
    assert_eq!(outcomes, vec![Processed::Done(()), Processed::Duplicate]);
    assert_eq!(
        support::count(&db.pool, "SELECT count(*) FROM effects").await,
        1
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_consumer_processes_a_message_once_on_its_own() {
    let db = support::database().await;
    let inventory = Inbox::new(db.pool.clone(), "inventory");
    let notification = Inbox::new(db.pool.clone(), "notification");

    assert_eq!(
        inventory
            .process("m-1", apply("m-1".into(), Duration::ZERO))
            .await
            .expect("a"),
        Processed::Done(())
    );
    assert_eq!(
        notification
            .process("m-1", apply("m-1".into(), Duration::ZERO))
            .await
            .expect("b"),
        Processed::Done(())
    );
    assert_eq!(
        inventory
            .process("m-1", apply("m-1".into(), Duration::ZERO))
            .await
            .expect("c"),
        Processed::Duplicate
    );
    assert_eq!(
        support::count(&db.pool, "SELECT count(*) FROM effects").await,
        2
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_error_inside_the_inbox_transaction_persists_nothing_and_the_message_is_retried()
{
    let mut fixture = Fixture::new(support::fast_retry(5)).await;
    let attempts = Arc::new(Mutex::new(Vec::new()));

    /// Writes its effect and an outbox event, then fails on the first attempt.
    struct FailsOnce {
        inbox: Inbox,
        exchange: String,
        attempts: Arc<Mutex<Vec<u32>>>,
    }
    impl Handler for FailsOnce {
        async fn handle(&self, message: IncomingMessage) -> Outcome {
            self.attempts.lock().expect("log").push(message.attempt);
            let attempt = message.attempt;
            let id = message.message_id.clone();
            let exchange = self.exchange.clone();
            let result = self
                .inbox
                .process(&message.message_id, |tx| {
                    Box::pin(async move {
                        sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
                            .bind(&id)
                            .execute(&mut *tx)
                            .await?;
                        enqueue(
                            &mut *tx,
                            NewMessage::new(&exchange, "next.event", "t", vec![]),
                        )
                        .await?;
                        if attempt == 1 {
                            return Err(sqlx::Error::Protocol(
                                "simulated failure after writing".into(),
                            ));
                        }
                        Ok(())
                    })
                })
                .await;
            match result {
                Ok(_) => Outcome::Ack,
                Err(e) => Outcome::Retry(e.to_string()),
            }
        }
    }
    fixture.consume(
        FailsOnce {
            inbox: Inbox::new(fixture.pool().clone(), "c"),
            exchange: fixture.names.exchange.clone(),
            attempts: attempts.clone(),
        },
        support::consumer_options(),
    );

    fixture.publish("k", b"x").await;
    testkit::wait_until(
        "the first, failing attempt",
        Duration::from_secs(10),
        || async { !attempts.lock().expect("log").is_empty() },
    )
    .await;
    // Before the retry lands (200 ms later) nothing of attempt 1 is visible.
    assert_eq!(fixture.count("SELECT count(*) FROM effects").await, 0);
    assert_eq!(fixture.count("SELECT count(*) FROM outbox").await, 0);
    assert_eq!(fixture.count("SELECT count(*) FROM inbox").await, 0);

    testkit::wait_until("the retry succeeded", Duration::from_secs(10), || async {
        fixture.count("SELECT count(*) FROM inbox").await == 1
    })
    .await;
    assert_eq!(*attempts.lock().expect("log"), vec![1, 2]);
    assert_eq!(fixture.count("SELECT count(*) FROM effects").await, 1);
    assert_eq!(
        fixture.count("SELECT count(*) FROM outbox").await,
        1,
        "one next event"
    );
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inbox_records_past_retention_are_deleted() {
    let db = support::database().await;
    let inbox = Inbox::new(db.pool.clone(), "c");
    inbox
        .process("old", apply("old".into(), Duration::ZERO))
        .await
        .expect("old");
    sqlx::query("UPDATE inbox SET processed_at = now() - interval '8 days'")
        .execute(&db.pool)
        .await
        .expect("age it");
    inbox
        .process("new", apply("new".into(), Duration::ZERO))
        .await
        .expect("new");

    let deleted = messaging::inbox::cleanup(&db.pool, Duration::from_secs(7 * 24 * 3600))
        .await
        .expect("cleanup");

    assert_eq!(deleted, 1);
    let left: Vec<String> = sqlx::query_scalar("SELECT message_id FROM inbox")
        .fetch_all(&db.pool)
        .await
        .expect("rows");
    assert_eq!(left, vec!["new".to_owned()]);
    db.drop_db().await;
}
