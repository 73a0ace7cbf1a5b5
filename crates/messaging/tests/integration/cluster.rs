//! Settings naming several nodes of a cluster: the broker starts on one that
//! answers and, when its node is lost, moves to another. Each "node" here
//! is a proxy in front of the one local broker, so a test can take one away.

use std::time::Duration;

use messaging::{OutgoingMessage, Publisher};

use crate::support::{self, Fixture};

/// A port bound but not listening, held as long as the socket lives: a
/// connection to it is refused, and no other test can take the port meanwhile.
fn dead_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let port = socket.local_addr().expect("address").port();
    (socket, port)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_list_with_dead_nodes_connects_to_the_live_one() {
    let mut fixture = Fixture::without_database(support::fast_retry(3)).await;
    let live = testkit::TcpProxy::start("127.0.0.1:5672")
        .await
        .expect("proxy");
    let dead: Vec<_> = (0..3).map(|_| dead_port()).collect();
    // Whichever node the random start picks (the live one first only one time
    // in four), the broker ends up on the live one.
    for _ in 0..4 {
        let settings = support::settings()
            .with_host_port("127.0.0.1", dead[0].1)
            .with_more_nodes(&[
                ("127.0.0.1", dead[1].1),
                ("127.0.0.1", live.port()),
                ("127.0.0.1", dead[2].1),
            ]);
        let broker = fixture.connect_with(settings).await.expect("connect");
        assert_eq!(broker.node(), format!("127.0.0.1:{}", live.port()));
        broker.close().await;
    }
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn when_its_node_is_lost_the_connection_moves_to_another_and_publishing_resumes() {
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

/// Each queue the spec declares (queue, DLQ, retry queues) with its arguments.
fn arguments_of(spec: &messaging::QueueSpec) -> Vec<(String, String)> {
    spec.queue_names()
        .into_iter()
        .map(|queue| {
            let args = support::queue_arguments(&queue).expect("declared");
            (queue, args)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn queues_get_the_initial_group_size_and_one_made_without_it_is_kept() {
    // A fresh topology: the queue, its DLQ and its retry queues carry the size.
    let mut names = support::Names::new(support::fast_retry(2));
    names.queue = names
        .queue
        .with_initial_group_size(std::num::NonZeroU32::new(1));
    let fixture = Fixture::start(names, false).await;
    for (queue, args) in arguments_of(&fixture.names.queue) {
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
    names.queue = names
        .queue
        .with_initial_group_size(std::num::NonZeroU32::new(1));
    let kept = Fixture::start(names, false).await;
    for (queue, args) in arguments_of(&kept.names.queue) {
        assert!(
            !args.contains("x-quorum-initial-group-size"),
            "{queue} kept as it was: {args}"
        );
    }
    kept.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_group_size_does_not_hide_another_difference() {
    let names = support::Names::new(support::fast_retry(2));
    let (conn, _ch) = support::raw_channel().await;
    // Made without a group size and with another delivery limit.
    let old = names.queue.clone().with_delivery_limit(7);
    let made = messaging::Topology::single_queue(&names.exchange, &names.dlx, old)
        .declare(&conn)
        .await;
    let again = names
        .topology()
        .with_initial_group_size(std::num::NonZeroU32::new(1))
        .declare(&conn)
        .await;
    names.cleanup().await;
    made.expect("the old queue");
    let err = again.expect_err("the delivery limit differs");
    assert!(err.to_string().contains("x-delivery-limit"), "{err}");
}
