//! Runs the example against the real broker and database: a private vhost and a
//! scratch database, both removed afterwards, also when the test fails.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A private RabbitMQ vhost (the example's names are fixed), deleted on drop.
struct Vhost(String);

impl Vhost {
    fn create() -> Self {
        let vhost = Self(testkit::unique("greetings"));
        rabbitmqctl(&["add_vhost", &vhost.0]);
        rabbitmqctl(&["set_permissions", "-p", &vhost.0, "guest", ".*", ".*", ".*"]);
        vhost
    }

    /// Messages in `queue`, ready or delivered and not yet acked.
    fn messages(&self, queue: &str) -> Option<u64> {
        let output = std::process::Command::new("rabbitmqctl")
            .args(["list_queues", "-q", "-p", &self.0, "name", "messages"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| {
                let (name, count) = line.split_once('\t')?;
                (name == queue).then(|| count.trim().parse().ok())?
            })
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_vhost", &self.0]);
    }
}

fn rabbitmqctl(args: &[&str]) {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output();
    let ok = output.as_ref().is_ok_and(|o| o.status.success());
    assert!(
        ok || std::thread::panicking(),
        "rabbitmqctl {args:?}: {output:?}"
    );
}

/// One HTTP/1.1 request; the response's status code and body.
async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: example\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(format!("{head}{body}").as_bytes())
        .await
        .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn greetings_are_stored_published_and_audited_exactly_once() {
    let db = testkit::TestDb::create().await;
    let vhost = Vhost::create();
    let url = testkit::amqp_url();
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    let amqp = AmqpSettings::from_url(&format!("{base}/{}", vhost.0)).expect("AMQP_URL");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(serve(
        db.pool.clone(),
        amqp.clone(),
        listener,
        shutdown.clone(),
    ));

    testkit::wait_until("the service ready", Duration::from_secs(20), || async {
        assert!(!service.is_finished(), "the service stopped while starting");
        tokio::net::TcpStream::connect(addr).await.is_ok()
            && request(addr, "GET", "/readyz", "").await.0 == 200
    })
    .await;
    for name in ["ada", "grace", "barbara"] {
        assert_eq!(request(addr, "POST", "/greetings", name).await.0, 202);
    }
    let audited = || async {
        sqlx::query_scalar::<_, String>("SELECT name FROM audit ORDER BY name")
            .fetch_all(&db.pool)
            .await
            .expect("audit")
    };
    testkit::wait_until(
        "three greetings audited",
        Duration::from_secs(20),
        || async { audited().await.len() == 3 },
    )
    .await;
    assert_eq!(audited().await, ["ada", "barbara", "grace"]);
    testkit::wait_until(
        "every event marked published",
        Duration::from_secs(10),
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
            )
            .fetch_one(&db.pool)
            .await
            .expect("outbox")
                == 3
        },
    )
    .await;

    // The broker may deliver a message twice: a copy of ada's event, under its
    // message id, changes nothing (audit takes duplicates; the inbox refuses them).
    let first: String = sqlx::query_scalar("SELECT message_id FROM audit WHERE name = 'ada'")
        .fetch_one(&db.pool)
        .await
        .expect("ada's message id");
    let broker = messaging::Broker::connect(amqp, Topology::default())
        .await
        .expect("connect");
    let mut copy = messaging::OutgoingMessage::new(
        "greetings",
        "greeting.created",
        "example.Greeting",
        b"ada".to_vec(),
    );
    copy.message_id = first;
    messaging::Publisher::new(broker.clone(), "test")
        .publish(&copy)
        .await
        .expect("publish the copy");
    broker.close().await;
    testkit::wait_until("the copy acked", Duration::from_secs(20), || async {
        vhost.messages("greetings.audit") == Some(0)
    })
    .await;
    assert_eq!(audited().await, ["ada", "barbara", "grace"], "applied once");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), service)
        .await
        .expect("stops in time")
        .expect("task")
        .expect("serve");
    db.drop_db().await;
}
