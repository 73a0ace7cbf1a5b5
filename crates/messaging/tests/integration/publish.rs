use std::time::Duration;

use lapin::{
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable},
};
use messaging::{OutgoingMessage, PublishError, Publisher};
use opentelemetry::{
    Context,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
};

use crate::support::{self, Fixture};

#[tokio::test(flavor = "multi_thread")]
async fn a_published_message_arrives_with_every_envelope_property_and_trace_header() {
    let fixture = Fixture::without_database(support::fast_retry(3)).await;
    let publisher = Publisher::new(fixture.broker.clone(), "test-service");
    let trace_id = TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736u128);
    let parent_span = SpanId::from(0x00f067aa0ba902b7u64);
    let parent = Context::new().with_remote_span_context(SpanContext::new(
        trace_id,
        parent_span,
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value([("shop", "test")]).expect("tracestate"),
    ));
    let mut message = OutgoingMessage::new(
        &fixture.names.exchange,
        "order.placed",
        "shop.events.v1.OrderPlaced",
        b"payload".to_vec(),
    );
    message.correlation_id = Some("order-1".into());
    message.timestamp = Some(1_767_225_600);
    message.parent = Some(parent);

    publisher.publish(&message).await.expect("confirmed");

    let got = fixture.get().await.expect("message in queue");
    let p = &got.delivery.properties;
    assert_eq!(
        p.message_id().as_ref().map(|s| s.as_str()),
        Some(message.message_id.as_str())
    );
    assert_eq!(
        p.kind().as_ref().map(|s| s.as_str()),
        Some("shop.events.v1.OrderPlaced")
    );
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/x-protobuf")
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(*p.timestamp(), Some(1_767_225_600));
    assert_eq!(
        p.app_id().as_ref().map(|s| s.as_str()),
        Some("test-service")
    );
    assert_eq!(
        p.correlation_id().as_ref().map(|s| s.as_str()),
        Some("order-1")
    );
    assert_eq!(got.delivery.routing_key.as_str(), "order.placed");
    assert_eq!(got.delivery.data, b"payload");
    let headers = p.headers().clone().expect("headers");
    let traceparent =
        messaging::consumer::header_str(&headers, "traceparent").expect("traceparent");
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    assert_eq!(fields[1], trace_id.to_string(), "same trace");
    assert_ne!(
        fields[2],
        parent_span.to_string(),
        "the producer span is a child, not the parent"
    );
    assert_eq!(
        messaging::consumer::header_str(&headers, "tracestate").as_deref(),
        Some("shop=test")
    );
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unroutable_publish_is_an_error() {
    let fixture = Fixture::without_database(support::fast_retry(3)).await;
    let publisher = fixture.publisher();
    // The only binding is on `names.exchange`; the DLX has no queue for this key.
    let message = OutgoingMessage::new(&fixture.names.dlx, "no-such-queue", "t", b"x".to_vec());

    let result = publisher.publish(&message).await;

    assert!(
        matches!(result, Err(PublishError::Unroutable { .. })),
        "{result:?}"
    );
    // The channel is still usable afterwards.
    let ok = OutgoingMessage::new(&fixture.names.exchange, "k", "t", b"x".to_vec());
    publisher
        .publish(&ok)
        .await
        .expect("routable publish after a return");
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nacked_publish_is_an_error() {
    let fixture = Fixture::without_database(support::fast_retry(3)).await;
    let publisher = fixture.publisher();
    // A queue that holds nothing and rejects publishes when full: the broker nacks.
    // Exclusive: it goes with the fixture's connection, also when the test fails.
    let full = testkit::unique("t.full");
    let ch = fixture.channel();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(full.as_str().into(), exclusive, args)
        .await
        .expect("declare full queue");

    let result = publisher
        .publish(&OutgoingMessage::new("", &full, "t", b"x".to_vec()))
        .await;

    assert!(matches!(result, Err(PublishError::Nacked)), "{result:?}");
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_confirms_every_message_and_reports_each_result() {
    let fixture = Fixture::without_database(support::fast_retry(3)).await;
    let names = &fixture.names;
    let mut batch: Vec<_> = (0..500)
        .map(|i| OutgoingMessage::new(&names.exchange, format!("k.{i}"), "t", vec![0u8; 256]))
        .collect();
    batch[250] = OutgoingMessage::new(&names.dlx, "nowhere", "t", vec![]);

    let results = fixture.publisher().publish_batch(&batch).await;

    assert_eq!(results.len(), 500);
    let errors: Vec<_> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_err())
        .map(|(i, r)| format!("{i}: {r:?}"))
        .collect();
    assert!(
        matches!(results[250], Err(PublishError::Unroutable { .. })),
        "{errors:?}"
    );
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 499);
    testkit::wait_until("499 messages queued", Duration::from_secs(10), || async {
        fixture.ready().await == 499
    })
    .await;
    fixture.finish().await;
}
