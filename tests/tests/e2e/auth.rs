//! Authentication and object-level authorization on the real services:
//! tokens that are not valid are 401 with the challenge, a customer's token
//! reaches only that customer's orders (another's answer 404), scopes guard
//! stock and the operator endpoints, every denial is logged with the subject
//! and the trace id (never the token), and the probes need no token.

use std::sync::Arc;

use e2e::{Options, Stack};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use testkit::{Issuer, issuer::now};

/// A stack whose services check this issuer's tokens.
async fn stack_with(issuer: &Arc<Issuer>) -> Stack {
    Stack::start_with(Options {
        auth: Some(issuer.clone()),
        ..Options::default()
    })
    .await
}

/// A client without the stack's operator token.
fn anonymous() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("client")
}

/// One request with `token` (if any); the status and the body as JSON (or null).
async fn call(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = anonymous().request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

/// `field` of each item of a page (`{"items": [...]}`).
fn of_items<'a>(page: &'a Value, field: &str) -> Vec<&'a str> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|o| o[field].as_str())
        .collect()
}

fn challenge(headers: &reqwest::header::HeaderMap) -> String {
    headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_customer_reads_lists_and_cancels_only_its_own_orders_and_orders_only_for_itself() {
    let issuer = Arc::new(Issuer::new());
    let stack = stack_with(&issuer).await;
    let orders = format!("{}/orders", stack.order());
    let ada = issuer.token("ada", &[]);
    let bob = issuer.token("bob", &[]);
    let item = json!([{"sku": "AUTH-1", "quantity": 1}]);

    // Ada orders for herself: the customer comes from her token.
    let (status, _, placed) = call(
        Method::POST,
        &orders,
        Some(&ada),
        Some(json!({"items": item})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    let id = placed["id"].as_str().expect("id").to_owned();
    let order = format!("{orders}/{id}");
    let (status, _, read) = call(Method::GET, &order, Some(&ada), None).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["customer_id"], "ada");
    // Naming herself is fine; naming Bob is not.
    let (status, _, _) = call(
        Method::POST,
        &orders,
        Some(&ada),
        Some(json!({"customer_id": "ada", "items": item})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, headers, problem) = call(
        Method::POST,
        &orders,
        Some(&ada),
        Some(json!({"customer_id": "bob", "items": item})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{problem}");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(
        problem["detail"].as_str().unwrap_or("").contains("itself"),
        "{problem}"
    );

    // Idempotency keys are each customer's own: Bob's request with the key
    // Ada used is a new order of his, neither a replay nor a conflict.
    let keyed = |token: &str, key: &str| {
        anonymous()
            .post(&orders)
            .bearer_auth(token.to_owned())
            .header("idempotency-key", key.to_owned())
            .json(&json!({"items": item}))
            .send()
    };
    let ada_keyed = keyed(&ada, "shared-key").await.expect("request");
    assert_eq!(ada_keyed.status(), StatusCode::ACCEPTED);
    let ada_first: Value = ada_keyed.json().await.expect("JSON");
    let bob_keyed = keyed(&bob, "shared-key").await.expect("request");
    assert_eq!(bob_keyed.status(), StatusCode::ACCEPTED);
    assert!(bob_keyed.headers().get("idempotent-replayed").is_none());
    let bob_first: Value = bob_keyed.json().await.expect("JSON");
    assert_ne!(ada_first["id"], bob_first["id"]);
    let ada_again: Value = keyed(&ada, "shared-key")
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        ada_again["id"], ada_first["id"],
        "Ada's key still replays hers"
    );

    // Bob can neither read, nor list, nor cancel Ada's order: each a 404, as
    // for an order that does not exist.
    let (status, _, problem) = call(Method::GET, &order, Some(&bob), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    let missing = format!("{orders}/{}", uuid::Uuid::now_v7());
    let (_, _, unknown) = call(Method::GET, &missing, Some(&bob), None).await;
    assert_eq!(
        problem["detail"].as_str().map(|d| d.replace(&id, "<id>")),
        unknown["detail"]
            .as_str()
            .map(|d| d.replace(missing.rsplit('/').next().unwrap_or(""), "<id>")),
        "the same answer as for no order at all"
    );
    let (status, _, _) = call(
        Method::GET,
        &format!("{orders}?customer_id=ada"),
        Some(&bob),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, page) = call(Method::GET, &orders, Some(&bob), None).await;
    assert_eq!(status, StatusCode::OK);
    let customers = of_items(&page, "customer_id");
    assert_eq!(
        customers,
        ["bob"],
        "Bob's list holds only Bob's order: {page}"
    );
    let before = call(Method::GET, &order, Some(&ada), None).await.2;
    let (status, _, _) = call(Method::POST, &format!("{order}/cancel"), Some(&bob), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let after = call(Method::GET, &order, Some(&ada), None).await.2;
    assert_eq!(
        before["status"], after["status"],
        "Bob's cancel changed nothing"
    );
    // A customer's token is no operator's: the order's history is not his.
    let (status, headers, _) =
        call(Method::GET, &format!("{order}/events"), Some(&ada), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(challenge(&headers).contains("insufficient_scope"));

    // Ada lists and cancels her own; an operator sees every order.
    let (status, _, page) = call(Method::GET, &orders, Some(&ada), None).await;
    assert_eq!(status, StatusCode::OK);
    let ids = of_items(&page, "id");
    assert!(ids.contains(&id.as_str()), "{page}");
    let (status, _, answer) =
        call(Method::POST, &format!("{order}/cancel"), Some(&ada), None).await;
    assert!(
        status == StatusCode::OK || status == StatusCode::CONFLICT,
        "her own order: cancelled or too late to, never hidden ({status} {answer})"
    );
    let operator = stack.operator_token().expect("an operator token");
    let (status, _, _) = call(Method::GET, &order, Some(&operator), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(
        Method::GET,
        &format!("{order}/events"),
        Some(&operator),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scopes_guard_stock_writes_and_the_operator_endpoints() {
    let issuer = Arc::new(Issuer::new());
    let stack = stack_with(&issuer).await;
    let ada = issuer.token("ada", &[]);
    let keeper = issuer.token("stock-keeper", &["stock:write"]);
    let stock = format!("{}/stock/AUTH-S", stack.inventory());
    let body = json!({"available": 5});

    let (status, headers, problem) =
        call(Method::PUT, &stock, Some(&ada), Some(body.clone())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{problem}");
    assert_eq!(headers["content-type"], "application/problem+json");
    let challenge = challenge(&headers);
    assert!(
        challenge.contains("error=\"insufficient_scope\"") && challenge.contains("stock:write"),
        "{challenge}"
    );
    // Without the scope, the body is not even looked at.
    let (status, _, problem) = call(
        Method::PUT,
        &stock,
        Some(&ada),
        Some(json!({"available": "many"})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{problem}");
    let (status, _, _) = call(Method::PUT, &stock, Some(&keeper), Some(body)).await;
    assert_eq!(status, StatusCode::OK);
    // Reading stock needs a token, no scope.
    let (status, _, level) = call(Method::GET, &stock, Some(&ada), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(level["available"], 5);

    let order_id = uuid::Uuid::now_v7();
    for url in [
        format!("{}/notifications?order_id={order_id}", stack.notification()),
        format!("{}/reservations/{order_id}", stack.inventory()),
    ] {
        let (status, _, _) = call(Method::GET, &url, Some(&keeper), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{url}");
        let operator = stack.operator_token().expect("operator");
        let (status, _, _) = call(Method::GET, &url, Some(&operator), None).await;
        assert_ne!(status, StatusCode::FORBIDDEN, "{url}");
        assert_ne!(status, StatusCode::UNAUTHORIZED, "{url}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_that_are_not_valid_are_401_with_the_challenge_and_the_probes_need_none() {
    let issuer = Arc::new(Issuer::new());
    let stack = stack_with(&issuer).await;
    let url = format!("{}/orders", stack.order());
    let valid = issuer.claims("ada", &[]);
    let with = |change: &dyn Fn(&mut Value)| {
        let mut claims = valid.clone();
        change(&mut claims);
        claims
    };
    let now = now();

    // Accepted: ES256 and RS256 from the JWKS, and a token a few seconds past
    // its expiry (clock skew).
    for (what, token) in [
        ("ES256", issuer.token("ada", &[])),
        ("RS256", issuer.sign_rs256(&valid)),
        (
            "expired 10 s ago",
            issuer.sign_es256(&with(&|c| c["exp"] = json!(now - 10))),
        ),
    ] {
        let (status, _, body) = call(Method::GET, &url, Some(&token), None).await;
        assert_eq!(status, StatusCode::OK, "{what}: {body}");
    }

    let refused = [
        ("forged signature", issuer.forge(&valid)),
        ("alg none", issuer.unsigned(&valid)),
        (
            "HS256 keyed with the RSA public key",
            issuer.hs256_with_public_key(&valid),
        ),
        ("unknown kid", issuer.sign_unknown_kid(&valid)),
        (
            "RS256 under the kid of the ES256 key",
            issuer.sign_rs256_as(issuer.es256_kid(), &valid),
        ),
        (
            "a subject padded with white space",
            issuer.sign_es256(&with(&|c| c["sub"] = json!(" ada"))),
        ),
        (
            "expired",
            issuer.sign_es256(&with(&|c| c["exp"] = json!(now - 120))),
        ),
        (
            "wrong audience",
            issuer.sign_es256(&with(&|c| c["aud"] = json!("another-api"))),
        ),
        (
            "wrong issuer",
            issuer.sign_es256(&with(&|c| c["iss"] = json!("someone-else"))),
        ),
        (
            "no expiry",
            issuer.sign_es256(&with(&|c| {
                c.as_object_mut().expect("claims").remove("exp");
            })),
        ),
        (
            "exp as a string",
            issuer.sign_es256(&with(&|c| c["exp"] = json!((now + 600).to_string()))),
        ),
        (
            "not yet valid",
            issuer.sign_es256(&with(&|c| c["nbf"] = json!(now + 600))),
        ),
        ("garbage", "not.a.token".to_owned()),
    ];
    for (what, token) in &refused {
        let (status, headers, problem) = call(Method::GET, &url, Some(token), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {problem}");
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "{what}"
        );
        let challenge = challenge(&headers);
        assert!(
            challenge.starts_with("Bearer ") && challenge.contains("error=\"invalid_token\""),
            "{what}: {challenge}"
        );
    }

    // No token at all, on every service's API: 401 with a bare challenge.
    for url in [
        url.clone(),
        format!("{}/stock", stack.inventory()),
        format!(
            "{}/notifications?order_id={}",
            stack.notification(),
            uuid::Uuid::now_v7()
        ),
    ] {
        let (status, headers, problem) = call(Method::GET, &url, None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{url}: {problem}");
        assert!(challenge(&headers).starts_with("Bearer realm="), "{url}");
    }
    // The probes, metrics and the document need no token.
    for service in e2e::SERVICES {
        let base = stack.url(service);
        for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
            let (status, _, _) = call(Method::GET, &format!("{base}{path}"), None, None).await;
            assert_eq!(status, StatusCode::OK, "{service}{path}");
        }
        let (_, _, ready) = call(Method::GET, &format!("{base}/readyz"), None, None).await;
        let auth = ready["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "auth"))
            .cloned()
            .unwrap_or(Value::Null);
        assert_eq!(auth["ok"], true, "{service}: {ready}");
        assert!(
            auth["detail"]
                .as_str()
                .unwrap_or("")
                .contains("signing key"),
            "{service}: {auth}"
        );
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_denial_is_logged_with_the_subject_and_the_trace_id_never_the_token() {
    let issuer = Arc::new(Issuer::new());
    let stack = stack_with(&issuer).await;
    let ada = issuer.token("ada", &[]);
    let mallory = issuer.token("mallory", &[]);
    let id = {
        let (status, _, placed) = call(
            Method::POST,
            &format!("{}/orders", stack.order()),
            Some(&ada),
            Some(json!({"items": [{"sku": "AUTH-L", "quantity": 1}]})),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        placed["id"].as_str().expect("id").to_owned()
    };
    let trace_id = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
    let forged = issuer.forge(&issuer.claims("ada", &[]));
    for (token, path) in [
        (&mallory, format!("/orders/{id}")),
        (&forged, format!("/orders/{id}")),
        (&ada, format!("/orders/{id}/events")),
    ] {
        let response = anonymous()
            .get(format!("{}{path}", stack.order()))
            .bearer_auth(token)
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .send()
            .await
            .expect("request");
        assert!(response.status().is_client_error());
    }
    let process = stack
        .processes
        .iter()
        .find(|p| p.name == "order-service")
        .expect("order-service");
    let log = testkit::wait_for(
        "both denials in the log",
        std::time::Duration::from_secs(10),
        || async {
            let text = std::fs::read_to_string(&process.log).unwrap_or_default();
            let denials: Vec<String> = text
                .lines()
                .filter(|l| l.contains("request denied") && l.contains(&trace_id))
                .map(str::to_owned)
                .collect();
            (denials.len() >= 3).then_some((text, denials))
        },
    )
    .await;
    let (text, denials) = log;
    assert!(
        denials
            .iter()
            .any(|l| l.contains("mallory") && l.contains("another customer")),
        "{denials:?}"
    );
    assert!(
        denials.iter().any(|l| l.contains("signature")),
        "{denials:?}"
    );
    assert!(
        denials
            .iter()
            .any(|l| l.contains("ada") && l.contains("lacks the scope ops")),
        "{denials:?}"
    );
    for token in [&ada, &mallory, &forged] {
        let signature = token.rsplit('.').next().unwrap_or_default();
        assert!(!text.contains(signature), "a token in the log");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_declares_the_bearer_scheme_on_every_api_operation_only() {
    let issuer = Arc::new(Issuer::new());
    let stack = stack_with(&issuer).await;
    for service in e2e::SERVICES {
        let document: Value = anonymous()
            .get(format!("{}/openapi.json", stack.url(service)))
            .send()
            .await
            .expect("document")
            .json()
            .await
            .expect("JSON");
        let scheme = &document["components"]["securitySchemes"]["bearer"];
        assert_eq!(scheme["type"], "http", "{service}");
        assert_eq!(scheme["scheme"], "bearer", "{service}");
        for (path, item) in document["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("item") {
                let open =
                    ["/healthz", "/readyz", "/metrics", "/openapi.json"].contains(&path.as_str());
                let secured = operation["security"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
                assert_eq!(secured, !open, "{service} {method} {path}");
                assert_eq!(
                    operation["responses"].get("401").is_some(),
                    !open,
                    "{service} {method} {path}"
                );
                // And the service does as its document says: without a
                // token, every secured operation is a 401.
                let concrete = path
                    .replace("{id}", "00000000-0000-0000-0000-000000000000")
                    .replace("{order_id}", "00000000-0000-0000-0000-000000000000")
                    .replace("{sku}", "AUTH-D");
                let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
                let (status, _, _) = call(
                    method.clone(),
                    &format!("{}{concrete}", stack.url(service)),
                    None,
                    Some(json!({})),
                )
                .await;
                let expected = if open {
                    StatusCode::OK
                } else {
                    StatusCode::UNAUTHORIZED
                };
                assert_eq!(
                    status, expected,
                    "{service} {method} {path} without a token"
                );
            }
        }
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_auth_off_readiness_warns_that_anyone_may_do_anything() {
    let stack = Stack::start().await;
    for service in e2e::SERVICES {
        let (_, _, ready) = call(
            Method::GET,
            &format!("{}/readyz", stack.url(service)),
            None,
            None,
        )
        .await;
        let detail = ready["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "auth"))
            .and_then(|c| c["detail"].as_str())
            .unwrap_or_default()
            .to_owned();
        assert!(detail.contains("AUTH_MODE=off"), "{service}: {ready}");
        let process = stack
            .processes
            .iter()
            .find(|p| p.name == service)
            .expect("process");
        let log = std::fs::read_to_string(&process.log).unwrap_or_default();
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains("AUTH_MODE=off")),
            "{service} warns at startup:\n{}",
            process.log_tail()
        );
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shopctl_mints_tokens_the_services_accept_and_calls_them_with_an_operators_token() {
    let issuer = Arc::new(Issuer::new());
    let stack = stack_with(&issuer).await;
    let demo_key = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/auth/demo-signing-key.pem")
        .display()
        .to_string();

    // `shopctl token` with the demo key: a customer's token, accepted.
    let minted = stack
        .shopctl(&["token", "--sub", "ada", "--key", &demo_key], &[])
        .await;
    assert_eq!(minted.code, Some(0), "{minted:?}");
    let token = minted.stdout.trim().to_owned();
    let (status, _, page) = call(
        Method::GET,
        &format!("{}/orders", stack.order()),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let (status, _, _) = call(
        Method::PUT,
        &format!("{}/stock/AUTH-T", stack.inventory()),
        Some(&token),
        Some(json!({"available": 1})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a customer's token sets no stock"
    );

    // With the stack's operator token (SHOP_TOKEN), shopctl sets stock and
    // reads orders; without any, it fails with one line saying what to set.
    let set = stack
        .shopctl(&["--json", "stock", "set", "AUTH-T=7"], &[])
        .await;
    assert_eq!(set.json()[0]["available"], 7);
    let stuck = stack.shopctl(&["--json", "orders", "stuck"], &[]).await;
    stuck.json();
    let refused = stack
        .shopctl(&["stock", "set", "AUTH-T=8"], &[("SHOP_TOKEN", "")])
        .await;
    refused.assert_fails_with("SHOP_TOKEN");
    // With only a signing key (as in the compose stack), shopctl mints its
    // own short operator token.
    let own = stack
        .shopctl(
            &["--json", "stock", "set", "AUTH-T=9"],
            &[("SHOP_TOKEN", ""), ("AUTH_SIGNING_KEY_FILE", &demo_key)],
        )
        .await;
    assert_eq!(own.json()[0]["available"], 9);
    stack.stop().await;
}

/// A JWKS served over HTTP for one test: what it answers can change, and it
/// counts the fetches.
struct JwksServer {
    url: String,
    body: Arc<std::sync::Mutex<Option<String>>>,
    fetches: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
        let body: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn({
            let (body, fetches) = (body.clone(), fetches.clone());
            async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let answer = match body.lock().expect("lock").clone() {
                        Some(json) => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
                            json.len()
                        ),
                        None => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned(),
                    };
                    let _ = socket.write_all(answer.as_bytes()).await;
                }
            }
        });
        Self {
            url,
            body,
            fetches,
            task,
        }
    }

    fn serve(&self, jwks: Option<&str>) {
        *self.body.lock().expect("lock") = jwks.map(str::to_owned);
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keys from `AUTH_JWKS_URL`: a service starts while the issuer does not
/// answer (503 until the keys are in, reported in /readyz), picks up a key
/// rotated in when a token names it, and a flood of unknown kids does not
/// hammer the issuer.
#[tokio::test(flavor = "multi_thread")]
async fn keys_from_a_url_are_fetched_late_rotated_in_and_not_refetched_per_request() {
    let issuer = Arc::new(Issuer::new());
    let server = JwksServer::start().await;
    server.serve(None);
    let env = e2e::SERVICES
        .iter()
        .flat_map(|s| {
            [
                (*s, "AUTH_JWKS_FILE".to_owned(), String::new()),
                (*s, "AUTH_JWKS_URL".to_owned(), server.url.clone()),
            ]
        })
        .collect();
    let mut stack = Stack::start_with(Options {
        auth: Some(issuer.clone()),
        env,
        held_back: e2e::SERVICES.to_vec(),
        ..Options::default()
    })
    .await;
    // Started without waiting for readiness: it cannot be ready yet.
    let process = e2e::Process::spawn("order-service", &stack.env_for("order-service"));
    let base = process.url.clone();
    stack.processes.push(process);
    let orders = format!("{base}/orders");
    let rs256 = issuer.sign_rs256(&issuer.claims("ada", &[]));

    // The issuer does not answer: the service runs (alive), is not ready and
    // says why, and answers API requests 503.
    testkit::wait_until(
        "the service to answer",
        std::time::Duration::from_secs(30),
        || async {
            anonymous()
                .get(format!("{base}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        },
    )
    .await;
    let (status, _, ready) = call(Method::GET, &format!("{base}/readyz"), None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert!(ready.to_string().contains("no signing keys"), "{ready}");
    let (status, _, problem) = call(Method::GET, &orders, Some(&rs256), None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");

    // The issuer answers with the demo key only: loaded by the retry.
    server.serve(Some(testkit::issuer::DEMO_JWKS));
    testkit::wait_until(
        "the keys to load",
        std::time::Duration::from_secs(30),
        || async { call(Method::GET, &orders, Some(&rs256), None).await.0 == StatusCode::OK },
    )
    .await;
    let (status, _, ready) = call(Method::GET, &format!("{base}/readyz"), None, None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "ready once the keys are in: {ready}"
    );
    assert!(
        ready.to_string().contains("DEMO key"),
        "the demo key is flagged: {ready}"
    );

    // A key rotated in is taken when a token first names it.
    let jwks = std::fs::read_to_string(issuer.jwks_file()).expect("the issuer's JWKS");
    server.serve(Some(&jwks));
    let before = server.fetches();
    let (status, _, body) = call(Method::GET, &orders, Some(&issuer.token("ada", &[])), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(server.fetches(), before + 1, "one fetch for the new kid");

    // Unknown kids, many of them: at most one more fetch.
    let stranger = issuer.sign_unknown_kid(&issuer.claims("ada", &[]));
    for _ in 0..20 {
        let (status, _, _) = call(Method::GET, &orders, Some(&stranger), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert!(
        server.fetches() <= before + 2,
        "{} fetches for 20 unknown kids",
        server.fetches() - before
    );
    stack.stop().await;
}
