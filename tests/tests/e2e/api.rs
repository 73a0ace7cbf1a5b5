use e2e::Stack;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_replays_the_first_response_and_refuses_another_body() {
    let stack = Stack::start().await;
    let sku = testkit::unique("A");
    stack.set_stock(&sku, 10).await;
    let body = json!({"customer_id": "idem", "items": [{"sku": sku, "quantity": 1}]});
    let post = |body: Value, key: &'static str| {
        stack
            .http
            .post(format!("{}/orders", stack.order()))
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };

    let first = post(body.clone(), "key-1").await.expect("first");
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.expect("json");
    let replay = post(body.clone(), "key-1").await.expect("replay");
    assert_eq!(replay.status(), 202);
    assert_eq!(
        replay
            .headers()
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let replay: Value = replay.json().await.expect("json");
    assert_eq!(replay, first, "the same response");
    let other = post(
        json!({"customer_id": "idem", "items": [{"sku": sku, "quantity": 2}]}),
        "key-1",
    )
    .await
    .expect("other");
    assert_eq!(other.status(), 422);
    assert!(
        other
            .text()
            .await
            .expect("text")
            .contains("Idempotency-Key")
    );

    let listed: Value = stack.list_orders("customer_id=idem").await;
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(1),
        "one order: {listed}"
    );
    stack.stop().await;
}

/// A hostile request: name, method, path, content type, body, expected status.
type Hostile = (
    &'static str,
    &'static str,
    String,
    &'static str,
    Vec<u8>,
    u16,
);

fn hostile_requests() -> Vec<Hostile> {
    let order = |v: Value| serde_json::to_vec(&v).expect("json");
    vec![
        (
            "malformed JSON",
            "POST",
            "/orders".into(),
            "application/json",
            b"{\"customer_id\": \"x\", ".to_vec(),
            400,
        ),
        (
            "bad UTF-8",
            "POST",
            "/orders".into(),
            "application/json",
            b"{\"customer_id\": \"\xff\xfe\"}".to_vec(),
            400,
        ),
        (
            "wrong content type",
            "POST",
            "/orders".into(),
            "text/plain",
            order(json!({"customer_id": "x", "items": []})),
            415,
        ),
        (
            "empty items",
            "POST",
            "/orders".into(),
            "application/json",
            order(json!({"customer_id": "hostile", "items": []})),
            422,
        ),
        (
            "quantity 0",
            "POST",
            "/orders".into(),
            "application/json",
            order(json!({"customer_id": "hostile", "items": [{"sku": "A", "quantity": 0}]})),
            422,
        ),
        (
            "negative quantity",
            "POST",
            "/orders".into(),
            "application/json",
            order(json!({"customer_id": "hostile", "items": [{"sku": "A", "quantity": -5}]})),
            422,
        ),
        (
            "absurd quantity",
            "POST",
            "/orders".into(),
            "application/json",
            order(
                json!({"customer_id": "hostile", "items": [{"sku": "A", "quantity": 99999999999u64}]}),
            ),
            422,
        ),
        (
            "overflowing quantity",
            "POST",
            "/orders".into(),
            "application/json",
            b"{\"customer_id\":\"hostile\",\"items\":[{\"sku\":\"A\",\"quantity\":1e400}]}"
                .to_vec(),
            400,
        ),
        (
            "quantity of the wrong type",
            "POST",
            "/orders".into(),
            "application/json",
            order(json!({"customer_id": "hostile", "items": [{"sku": "A", "quantity": "1"}]})),
            422,
        ),
        (
            "unknown field",
            "POST",
            "/orders".into(),
            "application/json",
            order(
                json!({"customer_id": "hostile", "status": "confirmed", "items": [{"sku": "A", "quantity": 1}]}),
            ),
            422,
        ),
        (
            "server-owned id",
            "POST",
            "/orders".into(),
            "application/json",
            order(
                json!({"id": "00000000-0000-0000-0000-000000000000", "customer_id": "hostile", "items": [{"sku": "A", "quantity": 1}]}),
            ),
            422,
        ),
        (
            "missing customer",
            "POST",
            "/orders".into(),
            "application/json",
            order(json!({"items": [{"sku": "A", "quantity": 1}]})),
            422,
        ),
        (
            "over-long customer id",
            "POST",
            "/orders".into(),
            "application/json",
            order(json!({"customer_id": "x".repeat(101), "items": [{"sku": "A", "quantity": 1}]})),
            422,
        ),
        (
            "over-long SKU",
            "POST",
            "/orders".into(),
            "application/json",
            order(
                json!({"customer_id": "hostile", "items": [{"sku": "S".repeat(65), "quantity": 1}]}),
            ),
            422,
        ),
        (
            "huge item list",
            "POST",
            "/orders".into(),
            "application/json",
            order(
                json!({"customer_id": "hostile", "items": (0..500).map(|i| json!({"sku": format!("S{i}"), "quantity": 1})).collect::<Vec<_>>()}),
            ),
            422,
        ),
        (
            "oversized body",
            "POST",
            "/orders".into(),
            "application/json",
            order(
                json!({"customer_id": "hostile", "items": [{"sku": "A", "quantity": 1}], "pad": "x".repeat(200_000)}),
            ),
            413,
        ),
        (
            "non-UUID order id",
            "GET",
            "/orders/not-a-uuid".into(),
            "",
            vec![],
            400,
        ),
        (
            "non-UUID cancel",
            "POST",
            "/orders/12345/cancel".into(),
            "",
            vec![],
            400,
        ),
        (
            "unknown order",
            "GET",
            format!("/orders/{}", uuid::Uuid::new_v4()),
            "",
            vec![],
            404,
        ),
        (
            "bad status filter",
            "GET",
            "/orders?status=shipped".into(),
            "",
            vec![],
            400,
        ),
        (
            "bad limit",
            "GET",
            "/orders?limit=100000".into(),
            "",
            vec![],
            400,
        ),
        (
            "unknown query parameter",
            "GET",
            "/orders?colour=red".into(),
            "",
            vec![],
            400,
        ),
        (
            "bad cursor",
            "GET",
            "/orders?cursor=zzz".into(),
            "",
            vec![],
            400,
        ),
        ("unknown route", "GET", "/nope".into(), "", vec![], 404),
        (
            "bad Idempotency-Key",
            "POST",
            "/orders".into(),
            "application/json",
            order(json!({"customer_id": "hostile", "items": [{"sku": "A", "quantity": 1}]})),
            400,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_4xx_with_a_reason_and_writes_and_publishes_nothing() {
    let stack = Stack::start().await;
    let published_before = stack.metric(&stack.order(), "outbox_published_total").await;

    for (name, method, path, content_type, body, expected) in hostile_requests() {
        let mut request = stack
            .http
            .request(
                method.parse().expect("method"),
                format!("{}{path}", stack.order()),
            )
            .body(body);
        if !content_type.is_empty() {
            request = request.header("content-type", content_type);
        }
        if name == "bad Idempotency-Key" {
            request = request.header("Idempotency-Key", "has spaces in it");
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let status = response.status().as_u16();
        if status == 413 {
            // The unread rest of the body is still on the wire: the server must
            // not invite the client to reuse this connection.
            assert_eq!(
                response
                    .headers()
                    .get("connection")
                    .and_then(|v| v.to_str().ok()),
                Some("close"),
                "{name}"
            );
        }
        let kind = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, expected, "{name}: {text}");
        assert_eq!(kind, "application/problem+json", "{name}: {text}");
        let problem: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}: {text}"));
        assert!(
            problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{name}: no reason: {text}"
        );
    }
    // Stock with a bad path or body is refused too.
    let r = stack
        .http
        .put(format!("{}/stock/bad%20sku", stack.inventory()))
        .json(&json!({"available": 1}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 400);
    let r = stack
        .http
        .put(format!("{}/stock/OK", stack.inventory()))
        .json(&json!({"available": -1}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 422);
    let r = stack
        .http
        .get(format!(
            "{}/notifications?order_id=nope",
            stack.notification()
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 400);

    let listed: Value = stack.list_orders("customer_id=hostile").await;
    assert_eq!(listed["items"], json!([]), "nothing written");
    let all: Value = stack.list_orders("").await;
    assert_eq!(all["items"], json!([]), "nothing written at all");
    assert_eq!(
        stack.metric(&stack.order(), "outbox_published_total").await,
        published_before,
        "nothing published"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_are_listed_newest_first_by_customer_and_status_in_pages() {
    let stack = Stack::start().await;
    let sku = testkit::unique("A");
    stack.set_stock(&sku, 100).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(stack.place("lister", &[(&sku, 1)]).await);
    }
    for id in &ids {
        stack.settled(id).await;
    }

    let page = |cursor: Option<String>| {
        let mut url = format!(
            "{}/orders?customer_id=lister&status=confirmed&limit=2",
            stack.order()
        );
        if let Some(c) = cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let http = stack.http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .expect("list")
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let p = page(cursor).await;
        for item in p["items"].as_array().expect("items") {
            seen.push(item["id"].as_str().expect("id").to_owned());
        }
        match p["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, every order once");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_concurrent_duplicates_with_one_idempotency_key_creates_one_order() {
    let stack = Stack::start().await;
    let sku = testkit::unique("A");
    let body = json!({"customer_id": "burst", "items": [{"sku": sku, "quantity": 1}]});

    let responses = futures_util::future::join_all((0..20).map(|_| {
        stack
            .http
            .post(format!("{}/orders", stack.order()))
            .header("Idempotency-Key", "burst-key")
            .json(&body)
            .send()
    }))
    .await;

    let mut ids = Vec::new();
    for response in responses {
        let response = response.expect("response");
        match response.status().as_u16() {
            202 => ids.push(response.json::<Value>().await.expect("json")["id"].clone()),
            409 => assert!(
                response
                    .text()
                    .await
                    .expect("text")
                    .contains("still being processed")
            ),
            other => panic!(
                "unexpected {other}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
    }
    assert!(!ids.is_empty(), "at least the first succeeded");
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "every 202 names the same order: {ids:?}"
    );
    let listed: Value = stack.list_orders("customer_id=burst").await;
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    stack.stop().await;
}
