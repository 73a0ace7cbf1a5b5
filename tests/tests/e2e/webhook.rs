use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use e2e::{Options, Stack};
use futures_util::StreamExt;

/// A webhook receiver that answers 503 to its first `failures` calls.
#[derive(Clone, Default)]
struct Receiver {
    failures: u32,
    calls: Arc<AtomicU32>,
    keys: Arc<Mutex<Vec<String>>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap) -> StatusCode {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    r.keys.lock().expect("keys").push(key);
    if r.calls.fetch_add(1, Ordering::SeqCst) < r.failures {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn serve(receiver: Receiver) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(receiver);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/hook")
}

fn with_webhook(url: String) -> Options {
    Options {
        env: vec![("notification-service", "NOTIFY_WEBHOOK_URL".into(), url)],
        // Inventory is not needed: the placement alone is notified.
        held_back: vec!["inventory-service"],
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_webhook_is_retried_with_the_same_idempotency_key_until_it_succeeds() {
    let receiver = Receiver {
        failures: 2,
        ..Receiver::default()
    };
    let stack = Stack::start_with(with_webhook(serve(receiver.clone()).await)).await;

    let id = stack.place("hooked", &[("SKU-1", 1)]).await;

    let delivered = testkit::wait_for(
        "the webhook delivery recorded",
        Duration::from_secs(30),
        || async {
            stack
                .notifications(&id)
                .await
                .into_iter()
                .find(|n| n["event"] == "order.placed" && !n["delivered_at"].is_null())
        },
    )
    .await;
    assert_eq!(delivered["channel"], "webhook");
    let keys = receiver.keys.lock().expect("keys").clone();
    assert_eq!(keys.len(), 3, "two failures then success: {keys:?}");
    assert!(
        keys.iter().all(|k| *k == keys[0] && !k.is_empty()),
        "one Idempotency-Key: {keys:?}"
    );
    assert_eq!(
        keys[0],
        delivered["message_id"].as_str().expect("message id")
    );
    assert_eq!(
        stack.notifications(&id).await.len(),
        1,
        "one notification, however many attempts"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_that_keeps_failing_ends_in_the_dlq_with_the_reason() {
    let receiver = Receiver {
        failures: u32::MAX,
        ..Receiver::default()
    };
    let stack = Stack::start_with(with_webhook(serve(receiver.clone()).await)).await;

    let id = stack.place("hooked", &[("SKU-1", 1)]).await;

    let conn = lapin::Connection::connect(&stack.vhost.amqp_url(), Default::default())
        .await
        .expect("amqp");
    let channel = conn.create_channel().await.expect("channel");
    let mut dlq = channel
        .basic_consume(
            "notification.order-events.dlq".into(),
            "e2e-dlq".into(),
            lapin::options::BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .expect("consume the DLQ");
    let dead = tokio::time::timeout(Duration::from_secs(30), dlq.next())
        .await
        .expect("a dead letter within 30 s")
        .expect("stream")
        .expect("delivery");
    let headers = dead.properties.headers().clone().expect("headers");
    let reason = match headers.inner().get("x-death-reason") {
        Some(lapin::types::AMQPValue::LongString(s)) => {
            String::from_utf8_lossy(s.as_bytes()).into_owned()
        }
        other => panic!("no reason: {other:?}"),
    };
    assert!(
        reason.contains("gave up after 4 attempts") && reason.contains("503"),
        "{reason}"
    );
    assert_eq!(
        receiver.calls.load(Ordering::SeqCst),
        4,
        "one call per attempt"
    );
    let notes = stack.notifications(&id).await;
    assert_eq!(notes.len(), 1);
    assert!(notes[0]["delivered_at"].is_null());
    assert!(
        notes[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{notes:?}"
    );
    let _ = conn.close(200, "bye".into()).await;
    stack.stop().await;
}
