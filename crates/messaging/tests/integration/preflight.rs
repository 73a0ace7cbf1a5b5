use messaging::{Broker, ConnectError, Topology};

use crate::support;

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_gives_one_line_naming_user_and_vhost_but_not_the_password() {
    let settings = support::settings().with_password("definitely-wrong-pw");

    let err = Broker::connect(settings, Topology::default())
        .await
        .expect_err("refused");

    let line = err.to_string();
    assert!(matches!(err, ConnectError::AccessRefused { .. }), "{line}");
    assert!(
        line.contains("user 'guest'") && line.contains("vhost '/'"),
        "{line}"
    );
    assert!(!line.contains("definitely-wrong-pw"), "{line}");
    assert!(!line.contains('\n'), "one line: {line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_port_gives_one_line_saying_unreachable() {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let settings = support::settings().with_host_port("127.0.0.1", free);

    let err = Broker::connect(settings, Topology::default())
        .await
        .expect_err("unreachable");

    let line = err.to_string();
    assert!(matches!(err, ConnectError::Unreachable { .. }), "{line}");
    assert!(line.contains(&format!("127.0.0.1:{free}")), "{line}");
    assert!(!line.contains('\n'), "one line: {line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_vhost_is_named() {
    let settings = support::settings().with_vhost("no-such-vhost-here");

    let err = Broker::connect(settings, Topology::default())
        .await
        .expect_err("no vhost");

    let line = err.to_string();
    assert!(matches!(err, ConnectError::VhostNotFound { .. }), "{line}");
    assert!(line.contains("no-such-vhost-here"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_against_a_plain_port_is_reported_as_a_tls_failure() {
    let url = testkit::amqp_url().replacen("amqp://", "amqps://", 1);
    let settings = messaging::AmqpSettings::from_url(&url)
        .expect("url")
        .with_host_port("127.0.0.1", 5672);

    let err = Broker::connect(settings, Topology::default())
        .await
        .expect_err("not TLS");

    let line = err.to_string();
    assert!(matches!(err, ConnectError::Tls { .. }), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn amqps_with_a_configured_ca_file_connects_and_round_trips() {
    support::init_tracing();
    let proxy = testkit::TlsProxy::start("127.0.0.1:5672")
        .await
        .expect("tls proxy");
    let dir = TempDir(std::env::temp_dir().join(testkit::unique("ca")));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, proxy.ca_pem()).expect("write CA");
    let url = testkit::amqp_url().replacen("amqp://", "amqps://", 1);
    let mut fixture = support::Fixture::without_database(support::fast_retry(3)).await;
    let mut settings = messaging::AmqpSettings::from_url(&url)
        .expect("url")
        .with_host_port("localhost", proxy.port());
    settings.ca_file = Some(ca_file.clone());

    let broker = fixture
        .connect_with(settings.clone())
        .await
        .expect("amqps connect");
    let message =
        messaging::OutgoingMessage::new(&fixture.names.exchange, "k", "t", b"over tls".to_vec());
    messaging::Publisher::new(broker.clone(), "test")
        .publish(&message)
        .await
        .expect("confirmed over TLS");

    // Without the CA the same endpoint is an untrusted certificate.
    settings.ca_file = None;
    let err = Broker::connect(settings, Topology::default())
        .await
        .expect_err("untrusted");
    assert!(matches!(err, ConnectError::Tls { .. }), "{err}");
    fixture.finish().await;
}

/// A directory removed on drop, also when the test fails.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
