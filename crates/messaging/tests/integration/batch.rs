//! Batch consumption: deliveries that arrive together share one inbox
//! transaction and one multi-ack, and a batch changes nothing of what happens to
//! each message (duplicates, poison, a crash between commit and ack).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lapin::{BasicProperties, options::BasicPublishOptions, types::FieldTable};
use messaging::{
    ApplyError, BoxFuture, Broker, ConsumerOptions, InboxConsumer, InboxHandler, IncomingMessage,
    Outcome, OutgoingMessage, Publisher, consumer::header_str, consumer::headers,
};

use crate::support::{self, Fixture};

/// Applies a message as a row in `effects` stamped with its transaction id.
/// A body `undecodable` fails decoding, a body `refused` fails applying for
/// good. Optionally cuts the consumer's connection right after the first batch
/// of several messages committed, before it is acked.
#[derive(Default)]
struct Effects {
    /// Transaction of each applied message id.
    applied_in: Mutex<HashMap<String, i64>>,
    /// Message ids in the order the handler saw them, duplicates included.
    seen: Mutex<Vec<String>>,
    cut: Option<Cut>,
}

/// What cuts the consumer's connection, once.
struct Cut {
    proxy: testkit::TcpProxy,
    broker: Broker,
    done: AtomicBool,
}

impl InboxHandler for Effects {
    type Event = ();
    type Output = ();

    fn decode(&self, message: &IncomingMessage) -> Result<(), String> {
        self.seen
            .lock()
            .expect("log")
            .push(message.message_id.clone());
        if message.payload == b"undecodable" {
            return Err("undecodable payload".to_owned());
        }
        Ok(())
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut sqlx::PgConnection,
        message: &'a IncomingMessage,
        _event: &'a (),
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(async move {
            if message.payload == b"refused" {
                return Err(ApplyError::Permanent("refused by the handler".to_owned()));
            }
            let in_tx: i64 = sqlx::query_scalar(
                "INSERT INTO effects (message_id) VALUES ($1) RETURNING txid_current()",
            )
            .bind(&message.message_id)
            .fetch_one(&mut *tx)
            .await?;
            self.applied_in
                .lock()
                .expect("log")
                .insert(message.message_id.clone(), in_tx);
            Ok(())
        })
    }

    async fn after(&self, message: &IncomingMessage, _event: &(), applied: Option<()>) -> Outcome {
        let Some(cut) = &self.cut else {
            return Outcome::Ack;
        };
        let shared_tx = applied.is_some() && {
            let applied_in = self.applied_in.lock().expect("log");
            let tx = applied_in[&message.message_id];
            applied_in.values().filter(|t| **t == tx).count() > 1
        };
        if shared_tx && !cut.done.swap(true, Ordering::SeqCst) {
            // The batch committed; its ack must not reach the broker.
            cut.proxy.block();
            testkit::wait_until(
                "the consumer's connection is down",
                Duration::from_secs(10),
                || async { !cut.broker.is_connected() },
            )
            .await;
            cut.proxy.restore();
        }
        Outcome::Ack
    }
}

impl Effects {
    fn transactions(&self) -> usize {
        let applied_in = self.applied_in.lock().expect("log");
        let mut txs: Vec<i64> = applied_in.values().copied().collect();
        txs.sort_unstable();
        txs.dedup();
        txs.len()
    }

    fn seen(&self, id: &str) -> usize {
        self.seen
            .lock()
            .expect("log")
            .iter()
            .filter(|s| *s == id)
            .count()
    }
}

/// A handler with a shared view for the test.
struct Shared(Arc<Effects>);

impl InboxHandler for Shared {
    type Event = ();
    type Output = ();

    fn decode(&self, message: &IncomingMessage) -> Result<(), String> {
        self.0.decode(message)
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut sqlx::PgConnection,
        message: &'a IncomingMessage,
        event: &'a (),
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        self.0.apply(tx, message, event)
    }

    async fn after(&self, message: &IncomingMessage, event: &(), applied: Option<()>) -> Outcome {
        self.0.after(message, event, applied).await
    }
}

/// Consumes the test queue through `broker` with `handler` through an inbox,
/// one batch of up to 32 at a time.
fn consume_in_batches(
    fixture: &mut Fixture,
    broker: Broker,
    handler: &Arc<Effects>,
) -> messaging::ConsumerProbe {
    let options = ConsumerOptions {
        prefetch: 64,
        concurrency: 1,
        batch: 32,
        app_id: "test".into(),
        ..Default::default()
    };
    let inbox = messaging::Inbox::new(fixture.pool().clone(), "batch");
    fixture.consume_on(
        broker,
        InboxConsumer::new(inbox, Shared(handler.clone())),
        options,
    )
}

/// Publishes `body` with message id `id` to the test exchange, confirmed.
async fn publish(publisher: &Publisher, fixture: &Fixture, id: &str, body: &[u8]) {
    let mut message = OutgoingMessage::new(&fixture.names.exchange, "k", "t", body.to_vec());
    message.message_id = id.to_owned();
    publisher.publish(&message).await.expect("publish");
}

async fn effects(fixture: &Fixture) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT message_id) FROM effects")
        .fetch_one(fixture.pool())
        .await
        .expect("effects")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_records_each_message_id_once_and_says_which_are_new() {
    let db = support::database().await;
    let inbox = messaging::Inbox::new(db.pool.clone(), "batch");

    let fresh = inbox
        .process_batch(&["b", "a", "b", "c"], |_, fresh| {
            Box::pin(async move { Ok::<_, sqlx::Error>(fresh) })
        })
        .await
        .expect("first batch");
    assert_eq!(fresh, vec![true, true, false, true], "b twice: new once");

    let failed = inbox
        .process_batch(&["d"], |_, _| {
            Box::pin(async { Err::<(), _>(sqlx::Error::Protocol("the work failed".into())) })
        })
        .await;
    assert!(failed.is_err());

    let fresh = inbox
        .process_batch(&["c", "d"], |_, fresh| {
            Box::pin(async move { Ok::<_, sqlx::Error>(fresh) })
        })
        .await
        .expect("second batch");
    assert_eq!(
        fresh,
        vec![false, true],
        "c seen before; d's failed batch left no record"
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_arriving_together_share_transactions_and_a_duplicate_in_a_batch_applies_once() {
    let mut fixture = Fixture::new(support::fast_retry(3)).await;
    let publisher = fixture.publisher();
    // 60 distinct messages, every third one published twice in a row: the
    // copies arrive together, mostly in one batch.
    let mut published = 0;
    for n in 0..60 {
        let id = format!("m-{n:02}");
        publish(&publisher, &fixture, &id, b"ok").await;
        published += 1;
        if n % 3 == 0 {
            publish(&publisher, &fixture, &id, b"ok").await;
            published += 1;
        }
    }
    let handler = Arc::new(Effects::default());
    let broker = fixture.broker.clone();
    let stats = consume_in_batches(&mut fixture, broker, &handler).stats;
    testkit::wait_until("every delivery acked", Duration::from_secs(20), || async {
        stats.acked.load(Ordering::SeqCst) == published
    })
    .await;

    assert_eq!(
        effects(&fixture).await,
        (60, 60),
        "each message applied once"
    );
    let transactions = handler.transactions();
    assert!(
        transactions < 60,
        "messages that were ready together shared transactions ({transactions} for 60)"
    );
    fixture.stop().await;
    assert_eq!(fixture.ready().await, 0);
    assert_eq!(fixture.dlq_ready().await, 0);
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_messages_in_a_batch_are_dead_lettered_alone_and_the_rest_is_applied_once() {
    let mut fixture = Fixture::new(support::fast_retry(3)).await;
    let publisher = fixture.publisher();
    for n in 0..30 {
        publish(&publisher, &fixture, &format!("good-{n:02}"), b"ok").await;
        match n {
            10 => publish(&publisher, &fixture, "undecodable", b"undecodable").await,
            15 => publish(&publisher, &fixture, "refused", b"refused").await,
            // No message id: the runtime dead-letters it before any handler.
            20 => {
                fixture
                    .channel()
                    .basic_publish(
                        fixture.names.exchange.as_str().into(),
                        "k".into(),
                        BasicPublishOptions::default(),
                        b"no id",
                        BasicProperties::default()
                            .with_type("t".into())
                            .with_headers(FieldTable::default()),
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm");
            }
            _ => {}
        }
    }
    let handler = Arc::new(Effects::default());
    let broker = fixture.broker.clone();
    consume_in_batches(&mut fixture, broker, &handler);
    testkit::wait_until(
        "three dead letters and thirty effects",
        Duration::from_secs(20),
        || async { fixture.dlq_ready().await == 3 && effects(&fixture).await.1 == 30 },
    )
    .await;

    assert_eq!(
        effects(&fixture).await,
        (30, 30),
        "each good message applied once"
    );
    let mut reasons = Vec::new();
    while let Some(letter) = fixture.get_dead().await {
        let letter_headers = letter
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        reasons.push((
            header_str(&letter_headers, headers::DEATH_CLASS).unwrap_or_default(),
            header_str(&letter_headers, headers::DEATH_REASON).unwrap_or_default(),
        ));
    }
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            ("poison".to_owned(), "missing message_id".to_owned()),
            ("rejected".to_owned(), "refused by the handler".to_owned()),
            ("rejected".to_owned(), "undecodable payload".to_owned()),
        ]
    );
    fixture.stop().await;
    assert_eq!(fixture.ready().await, 0);
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_lost_between_a_batch_commit_and_its_ack_redelivers_it_and_applies_nothing_twice()
 {
    let mut fixture = Fixture::new(support::fast_retry(3)).await;
    let publisher = fixture.publisher();
    for n in 0..80 {
        publish(&publisher, &fixture, &format!("m-{n:02}"), b"ok").await;
    }
    let (proxy, broker) = fixture.proxied_broker(|_| {}).await;
    let handler = Arc::new(Effects {
        cut: Some(Cut {
            proxy,
            broker: broker.clone(),
            done: AtomicBool::new(false),
        }),
        ..Effects::default()
    });
    consume_in_batches(&mut fixture, broker, &handler);
    testkit::wait_until(
        "every message applied after the cut",
        Duration::from_secs(30),
        || async { effects(&fixture).await.1 == 80 },
    )
    .await;
    fixture.stop().await;

    let cut = handler.cut.as_ref().expect("cut");
    assert!(
        cut.done.load(Ordering::SeqCst),
        "the connection was cut after a batch committed"
    );
    let redelivered = (0..80)
        .filter(|n| handler.seen(&format!("m-{n:02}")) > 1)
        .count();
    assert!(
        redelivered > 1,
        "the cut batch came back ({redelivered} messages seen twice)"
    );
    assert_eq!(effects(&fixture).await, (80, 80), "nothing applied twice");
    assert_eq!(fixture.ready().await, 0, "every message acked in the end");
    assert_eq!(fixture.dlq_ready().await, 0);
    fixture.finish().await;
}
