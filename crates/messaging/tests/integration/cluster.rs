//! Settings naming several nodes of a cluster: the broker starts on one that
//! answers and, when its node is lost, moves on to the next. Each "node" here
//! is a proxy in front of the one local broker, so a test can take one away.

use std::time::Duration;

use messaging::{OutgoingMessage, Publisher};

use crate::support::{self, Fixture};

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    listener.local_addr().expect("address").port()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_list_with_a_dead_node_connects_to_a_live_one() {
    let mut fixture = Fixture::without_database(support::fast_retry(3)).await;
    let live = testkit::TcpProxy::start("127.0.0.1:5672")
        .await
        .expect("proxy");
    let dead = closed_port().await;
    // Whichever node the random start picks, the broker ends up on the live one.
    for _ in 0..4 {
        let settings = support::settings()
            .with_host_port("127.0.0.1", dead)
            .with_more_nodes(&[("127.0.0.1", live.port())]);
        let broker = fixture.connect_with(settings).await.expect("connect");
        assert_eq!(broker.node(), format!("127.0.0.1:{}", live.port()));
        broker.close().await;
    }
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn when_its_node_is_lost_the_connection_moves_to_the_next_and_publishing_resumes() {
    let mut fixture = Fixture::without_database(support::fast_retry(3)).await;
    let a = testkit::TcpProxy::start("127.0.0.1:5672")
        .await
        .expect("proxy a");
    let b = testkit::TcpProxy::start("127.0.0.1:5672")
        .await
        .expect("proxy b");
    let settings = support::settings()
        .with_host_port("127.0.0.1", a.port())
        .with_more_nodes(&[("127.0.0.1", b.port())]);
    let broker = fixture.connect_with(settings).await.expect("connect");
    let first = broker.node();
    let (lost, other) = if first.ends_with(&format!(":{}", a.port())) {
        (&a, &b)
    } else {
        (&b, &a)
    };

    // The node goes away for good: open connections cut, new ones refused.
    lost.block();
    let moved_to = format!("127.0.0.1:{}", other.port());
    testkit::wait_until(
        "the connection on the other node",
        Duration::from_secs(15),
        || async { broker.is_connected() && broker.node() == moved_to },
    )
    .await;
    assert_eq!(broker.reconnects(), 1, "one rebuild, on the other node");
    let message = OutgoingMessage::new(&fixture.names.exchange, "k", "t", b"x".to_vec());
    Publisher::new(broker.clone(), "test")
        .publish(&message)
        .await
        .expect("publishing resumes on the other node");
    testkit::wait_until("the message queued", Duration::from_secs(5), || async {
        fixture.ready().await == 1
    })
    .await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn queues_get_the_initial_group_size_and_one_made_without_it_is_kept() {
    // A fresh topology: the queue, its DLQ and its retry queues carry the size.
    let mut names = support::Names::new(support::fast_retry(2));
    names.queue = names.queue.with_initial_group_size(Some(1));
    let fixture = Fixture::start(names, false).await;
    for queue in fixture.names.queue.queue_names() {
        let args = support::queue_arguments(&queue).expect("declared");
        assert!(
            args.contains("x-quorum-initial-group-size"),
            "{queue}: {args}"
        );
    }
    fixture.finish().await;

    // A queue made without it (one broker, before the move to a cluster): the
    // declaration keeps it as it is instead of failing the connection.
    let mut names = support::Names::new(support::fast_retry(2));
    let (conn, _ch) = support::raw_channel().await;
    names
        .topology()
        .declare(&conn)
        .await
        .expect("declared without the size");
    names.queue = names.queue.with_initial_group_size(Some(1));
    let kept = Fixture::start(names, false).await;
    for queue in kept.names.queue.queue_names() {
        let args = support::queue_arguments(&queue).expect("declared");
        assert!(
            !args.contains("x-quorum-initial-group-size"),
            "{queue} kept as it was: {args}"
        );
    }
    kept.finish().await;
}
