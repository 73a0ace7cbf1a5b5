use std::{collections::HashSet, time::Duration};

use e2e::{
    Options, Stack,
    otlp::{self, KIND_CONSUMER, KIND_PRODUCER, KIND_SERVER, Protocol, Receiver},
};
use serde_json::Value;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn exporting_to(receiver: &Receiver) -> Options {
    let mut env = Vec::new();
    for service in e2e::SERVICES {
        env.push((
            service,
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            receiver.endpoint.clone(),
        ));
        env.push((
            service,
            "OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(),
            receiver.protocol.env_value().to_owned(),
        ));
        env.push((service, "LOG_FORMAT".to_owned(), "json".to_owned()));
    }
    Options {
        env,
        ..Options::default()
    }
}

/// Places an order carrying a client `traceparent` and waits until it is confirmed
/// and notified; returns the order id.
async fn traced_order(stack: &Stack) -> String {
    let sku = testkit::unique("T");
    stack.set_stock(&sku, 5).await;
    let response = stack
        .http
        .post(format!("{}/orders", stack.order()))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&serde_json::json!({"customer_id": "traced", "items": [{"sku": sku, "quantity": 1}]}))
        .send()
        .await
        .expect("POST /orders");
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(stack.settled(&id).await["status"], "confirmed");
    stack
        .wait_notified(&id, &["order.placed", "order.confirmed"])
        .await;
    id
}

async fn one_trace_across_all_services(protocol: Protocol) {
    let receiver = Receiver::start(protocol).await;
    let stack = Stack::start_with(exporting_to(&receiver)).await;

    let order_id = traced_order(&stack).await;

    // Wait (with a deadline) until the last hop, notification-service processing
    // order.confirmed, is exported and every span's parent is too; then the
    // assertions below say precisely what is missing if anything is.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = receiver.spans.in_trace(CLIENT_TRACE);
        let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        let last_hop = spans.iter().any(|s| {
            s.service == "notification-service"
                && s.kind == KIND_CONSUMER
                && s.attributes
                    .get("messaging.rabbitmq.destination.routing_key")
                    .map(String::as_str)
                    == Some("order.confirmed")
        });
        let complete = spans
            .iter()
            .all(|s| s.parent_span_id == CLIENT_SPAN || ids.contains(s.parent_span_id.as_str()));
        if (last_hop && complete) || tokio::time::Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        HashSet::from(["order-service", "inventory-service", "notification-service"])
    );

    // One tree: the POST /orders server span is the only child of the client's
    // span, and every other span's parent is in the trace.
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<_> = spans
        .iter()
        .filter(|s| s.parent_span_id == CLIENT_SPAN)
        .collect();
    assert_eq!(roots.len(), 1, "{roots:#?}");
    assert_eq!(roots[0].name, "POST /orders");
    assert_eq!(roots[0].kind, KIND_SERVER);
    assert_eq!(
        roots[0].attributes.get("http.route").map(String::as_str),
        Some("/orders")
    );
    assert_eq!(
        roots[0]
            .attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("202")
    );
    for span in &spans {
        assert!(
            span.parent_span_id == CLIENT_SPAN || ids.contains(span.parent_span_id.as_str()),
            "{} ({}) hangs outside the tree",
            span.name,
            span.service
        );
    }

    // Producer → consumer through the outbox and the broker, with the messaging
    // conventions and the order id.
    let by_id: std::collections::HashMap<&str, &otlp::Span> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let consumers: Vec<_> = spans.iter().filter(|s| s.kind == KIND_CONSUMER).collect();
    let consumer_services: HashSet<&str> = consumers.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        consumer_services.len(),
        3,
        "every service consumed: {consumer_services:?}"
    );
    for consumer in &consumers {
        let parent = by_id[consumer.parent_span_id.as_str()];
        assert_eq!(
            parent.kind, KIND_PRODUCER,
            "{} is the child of {}",
            consumer.name, parent.name
        );
        for key in [
            "messaging.system",
            "messaging.operation.type",
            "messaging.destination.name",
            "messaging.destination.subscription.name",
            "messaging.message.id",
        ] {
            assert!(
                consumer.attributes.contains_key(key),
                "{} lacks {key}",
                consumer.name
            );
        }
        assert_eq!(consumer.attributes["messaging.system"], "rabbitmq");
        assert!(consumer.name.starts_with("process "), "{}", consumer.name);
        assert_eq!(
            consumer.attributes.get("shop.order_id"),
            Some(&order_id),
            "{}",
            consumer.name
        );
    }
    assert_eq!(roots[0].attributes.get("shop.order_id"), Some(&order_id));
    for producer in spans.iter().filter(|s| s.kind == KIND_PRODUCER) {
        assert_eq!(producer.name, "publish shop.events");
        assert_eq!(producer.attributes.get("shop.order_id"), Some(&order_id));
    }

    // A log line from a consumer carries the trace id of its span.
    let inventory = stack
        .processes
        .iter()
        .find(|p| p.name == "inventory-service")
        .expect("inventory");
    let log = std::fs::read_to_string(&inventory.log).expect("inventory log");
    let line: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "order handled" && l["trace_id"] == CLIENT_TRACE)
        .unwrap_or_else(|| panic!("no 'order handled' line in trace {CLIENT_TRACE}:\n{log}"));
    let span_id = line["span_id"].as_str().expect("span_id");
    assert!(
        ids.contains(span_id),
        "the log line's span {span_id} is in the trace"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_covers_every_service_over_otlp_grpc() {
    one_trace_across_all_services(Protocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_covers_every_service_over_otlp_http_protobuf() {
    one_trace_across_all_services(Protocol::HttpProtobuf).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_with_the_saga() {
    let stack = Stack::start().await;

    traced_order(&stack).await;

    let order = stack.order();
    let inventory = stack.inventory();
    let notification = stack.notification();
    let checks = [
        (
            &order,
            "http_server_requests_total{method=\"POST\",route=\"/orders\",status=\"202\"}",
        ),
        (
            &order,
            "http_server_request_duration_seconds_count{method=\"POST\",route=\"/orders\",status=\"202\"}",
        ),
        (&order, "outbox_published_total"),
        (
            &order,
            "messaging_consumed_total{queue=\"order.inventory-events\",outcome=\"ack\"}",
        ),
        (
            &order,
            "messaging_handler_duration_seconds_count{queue=\"order.inventory-events\"}",
        ),
        (
            &order,
            "messaging_handler_duration_seconds_bucket{queue=\"order.inventory-events\",le=\"5\"}",
        ),
        (&inventory, "outbox_published_total"),
        (
            &inventory,
            "messaging_consumed_total{queue=\"inventory.order-events\",outcome=\"ack\"}",
        ),
        (
            &notification,
            "messaging_consumed_total{queue=\"notification.order-events\",outcome=\"ack\"}",
        ),
        (&order, "broker_connected"),
    ];
    for (url, sample) in checks {
        testkit::wait_until(
            &format!("{sample} > 0 on {url}"),
            Duration::from_secs(10),
            || async { stack.metric(url, sample).await > 0.0 },
        )
        .await;
    }
    // The backlog gauge is refreshed a few times a second, so it may still
    // count the last confirmation for a moment after it was published.
    testkit::wait_until(
        &format!("outbox_backlog == 0 on {order}"),
        Duration::from_secs(10),
        || async { stack.metric(&order, "outbox_backlog").await == 0.0 },
    )
    .await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_stays_ready_while_the_broker_connection_is_cut_and_reports_it_in_the_body() {
    let proxy = testkit::TcpProxy::start("127.0.0.1:5672")
        .await
        .expect("proxy");
    let stack = Stack::start_with(Options {
        amqp_port: vec![("order-service", proxy.port())],
        ..Options::default()
    })
    .await;
    let probe = |path: &'static str| {
        let url = format!("{}{path}", stack.order());
        let http = stack.http.clone();
        async move {
            match http.get(&url).send().await {
                Ok(r) => (
                    r.status().as_u16(),
                    r.json::<Value>().await.unwrap_or(Value::Null),
                ),
                Err(_) => (0, Value::Null),
            }
        }
    };
    assert_eq!(probe("/readyz").await.0, 200);

    proxy.block();
    // The outbox holds orders while the broker is away: the replica stays in
    // service, and says in the body what is down.
    let body = testkit::wait_for(
        "the broker reported down",
        Duration::from_secs(15),
        || async {
            let (status, body) = probe("/readyz").await;
            assert_eq!(status, 200, "readyz while the broker is away: {body}");
            let broker = body["checks"]
                .as_array()?
                .iter()
                .find(|c| c["name"] == "broker")?
                .clone();
            (broker["ok"] == false).then_some(body)
        },
    )
    .await;
    assert_eq!(body["ready"], true, "{body}");
    let (live, liveness) = probe("/healthz").await;
    assert_eq!(
        live, 200,
        "a dependency down is no reason to restart: {liveness}"
    );
    let accepted = stack
        .http
        .post(format!("{}/orders", stack.order()))
        .json(&serde_json::json!({"customer_id": "while-away", "items": [{"sku": "NONE-1", "quantity": 1}]}))
        .send()
        .await
        .expect("POST /orders");
    assert_eq!(accepted.status().as_u16(), 202);

    proxy.restore();
    testkit::wait_until(
        "the broker reported up again",
        Duration::from_secs(30),
        || async {
            let (status, body) = probe("/readyz").await;
            status == 200
                && body["checks"].as_array().is_some_and(|checks| {
                    checks
                        .iter()
                        .any(|c| c["name"] == "broker" && c["ok"] == true)
                })
        },
    )
    .await;
    assert!(
        stack
            .metric(&stack.order(), "broker_reconnects_total")
            .await
            >= 1.0
    );
    // And it works again: an order placed now completes.
    traced_order(&stack).await;
    stack.stop().await;
}
