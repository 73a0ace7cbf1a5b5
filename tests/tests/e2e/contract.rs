//! The API contract: every service serves an OpenAPI 3.1 document built from
//! its code, every documented operation is routed and every route is
//! documented, and schemathesis fuzzes each service from its document with
//! thousands of generated requests (no 5xx; status codes, content types,
//! headers and bodies as documented).

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use e2e::Stack;
use serde_json::Value;

/// What each service serves: its own routes and the platform's.
const ROUTES: [(&str, &[(&str, &str)]); 3] = [
    (
        "order-service",
        &[
            ("post", "/orders"),
            ("get", "/orders"),
            ("get", "/orders/{id}"),
            ("get", "/orders/{id}/events"),
            ("post", "/orders/{id}/cancel"),
        ],
    ),
    (
        "inventory-service",
        &[
            ("get", "/stock"),
            ("get", "/stock/{sku}"),
            ("put", "/stock/{sku}"),
            ("get", "/reservations/{order_id}"),
        ],
    ),
    ("notification-service", &[("get", "/notifications")]),
];

const PLATFORM_ROUTES: [(&str, &str); 4] = [
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

async fn document(stack: &Stack, url: &str) -> Value {
    let response = stack
        .http
        .get(format!("{url}/openapi.json"))
        .send()
        .await
        .expect("GET /openapi.json");
    assert_eq!(response.status(), 200);
    response.json().await.expect("a JSON document")
}

fn operations(document: &Value) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            operations.insert((method.clone(), path.clone()));
        }
    }
    operations
}

#[tokio::test(flavor = "multi_thread")]
async fn every_service_documents_exactly_the_operations_it_routes() {
    let stack = Stack::start().await;
    for (service, routes) in ROUTES {
        let url = stack.url(service);
        let document = document(&stack, &url).await;
        assert!(
            document["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1")),
            "{service}: OpenAPI 3.1, got {}",
            document["openapi"]
        );
        let expected: BTreeSet<(String, String)> = routes
            .iter()
            .chain(&PLATFORM_ROUTES)
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        assert_eq!(operations(&document), expected, "{service}");
        assert!(
            document["components"]["schemas"]["Problem"].is_object(),
            "{service}: the problem+json schema"
        );
        // Every documented operation is routed: the router answers it (any
        // status but the fallback's 404 and a 405 for an unrouted method).
        for (method, path) in &expected {
            let concrete = path
                .replace("{id}", "00000000-0000-0000-0000-000000000000")
                .replace("{order_id}", "00000000-0000-0000-0000-000000000000")
                .replace("{sku}", "CONTRACT-1");
            let request = match method.as_str() {
                "get" => stack.http.get(format!("{url}{concrete}")),
                "post" => stack.http.post(format!("{url}{concrete}")),
                "put" => stack.http.put(format!("{url}{concrete}")),
                other => panic!("{service}: unexpected method {other}"),
            };
            let response = request
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            assert!(
                status != 405 && !(status == 404 && body.contains("no such resource")),
                "{service}: {method} {path} is documented but not routed ({status} {body})"
            );
        }
    }
    stack.stop().await;
}

/// The first fuzzing run's finding: a NUL character in a query parameter
/// reached PostgreSQL, which refuses it, and the service answered 500.
#[tokio::test(flavor = "multi_thread")]
async fn a_nul_character_in_a_query_or_path_is_a_400_with_a_reason() {
    let stack = Stack::start().await;
    for url in [
        format!("{}/stock?cursor=%00A", stack.inventory()),
        format!("{}/orders?customer_id=a%00b", stack.order()),
        format!("{}/stock/A%00", stack.inventory()),
    ] {
        let response = stack.http.get(&url).send().await.expect("request");
        assert_eq!(response.status(), 400, "{url}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{url}"
        );
        let problem: Value = response.json().await.expect("problem");
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains("NUL")),
            "{url}: {problem}"
        );
    }
    stack.stop().await;
}

/// Every route reaches the router through `OpenApiRouter::routes`, which puts
/// it in the document: no service or platform code adds one past it (axum's
/// `route`, `route_service`, `nest`, or a plain `Router`).
#[test]
fn no_route_bypasses_the_document() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in [
        "crates/order-service/src",
        "crates/inventory-service/src",
        "crates/notification-service/src",
        "crates/service-kit/src",
    ] {
        collect_rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "found the sources: {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("source");
        for (n, line) in text.lines().enumerate() {
            let bypass = [".route(", ".route_service(", ".nest(", "Router::new()"]
                .iter()
                .any(|b| line.contains(b))
                && !line.contains("OpenApiRouter");
            assert!(
                !bypass,
                "{}:{}: a route outside the OpenAPI document: {line}",
                file.display(),
                n + 1
            );
        }
    }
}

fn collect_rust_files(dir: &std::path::Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("source directory").flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// Where `scripts/test` installs schemathesis (`SCHEMATHESIS` overrides).
fn schemathesis() -> PathBuf {
    let path = std::env::var_os("SCHEMATHESIS").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/schemathesis/bin/schemathesis")
        },
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: scripts/test installs schemathesis (or set SCHEMATHESIS)",
        path.display()
    );
    path
}

/// Test cases per operation (schemathesis' `--max-examples`), by service: the
/// operations without parameters (probes, the document) saturate early, so a
/// service with few others needs more to reach [`CASES_PER_SERVICE`].
const EXAMPLES: [(&str, &str); 3] = [
    ("order-service", "150"),
    ("inventory-service", "300"),
    ("notification-service", "1200"),
];

/// At least this many generated test cases (requests) per service.
const CASES_PER_SERVICE: u64 = 1000;

/// Test cases per operation of the run without a token: every API operation
/// answers 401 before it looks at its input, so a few show it.
const EXAMPLES_WITHOUT_TOKEN: &str = "10";

/// The checks: no 5xx; status codes, content types, headers and bodies as
/// documented; input the document forbids is refused; and the rest of what
/// schemathesis checks except `positive_data_acceptance`, which would demand
/// that every input the document allows be accepted: the API also refuses
/// what no schema can say (an email address without a dot in its domain, a
/// SKU twice in one order, a cursor that was never handed out).
const EXCLUDED_CHECKS: &str = "positive_data_acceptance";

/// The services check bearer tokens: each is fuzzed with an operator's token
/// (which may do everything; schemathesis' `ignored_auth` check then also
/// sends requests without it and demands a 401), and again without any.
#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_nothing_in_any_service() {
    let schemathesis = schemathesis();
    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| "20261205".into());
    let issuer = std::sync::Arc::new(testkit::Issuer::new());
    let stack = Stack::start_with(e2e::Options {
        auth: Some(issuer),
        ..e2e::Options::default()
    })
    .await;
    let authorization = format!(
        "Authorization: Bearer {}",
        stack.operator_token().expect("an operator token")
    );
    // Some stock, so generated orders are sometimes confirmed, not only rejected.
    for sku in ["0", "A", "B-1"] {
        stack.set_stock(sku, 1_000_000).await;
    }
    let workdir = TempDir::new();
    let runs = EXAMPLES
        .iter()
        .map(|(service, examples)| (*service, *examples, Some(authorization.clone())))
        .chain(
            EXAMPLES
                .iter()
                .map(|(service, _)| (*service, EXAMPLES_WITHOUT_TOKEN, None)),
        );
    for (service, examples, header) in runs {
        let url = stack.url(service);
        let with = if header.is_some() {
            "an operator's token"
        } else {
            "no token"
        };
        let output = tokio::task::spawn_blocking({
            let schemathesis = schemathesis.clone();
            let seed = seed.clone();
            let dir = workdir.0.clone();
            move || {
                let mut command = Command::new(&schemathesis);
                command.current_dir(dir).arg("run");
                if let Some(header) = header {
                    command.args(["--header", &header]);
                }
                command
                    .args([
                        &format!("{url}/openapi.json"),
                        "--checks",
                        "all",
                        "--exclude-checks",
                        EXCLUDED_CHECKS,
                        "--max-examples",
                        examples,
                        "--seed",
                        &seed,
                        "--request-timeout",
                        "10",
                        "--generation-database",
                        "none",
                        "--no-color",
                    ])
                    .output()
                    .expect("run schemathesis")
            }
        })
        .await
        .expect("schemathesis task");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "schemathesis found problems in {service} with {with} (seed {seed}):\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let cases = generated(&stdout)
            .unwrap_or_else(|| panic!("no test case count in the output:\n{stdout}"));
        println!(
            "schemathesis {service} with {with}: {cases} generated requests, no finding (seed {seed})"
        );
        let least = if examples == EXAMPLES_WITHOUT_TOKEN {
            10
        } else {
            CASES_PER_SERVICE
        };
        assert!(
            cases >= least,
            "{service} with {with}: only {cases} test cases generated:\n{stdout}"
        );
    }
    stack.stop().await;
}

/// The `N` of schemathesis' summary line `N generated, …`.
fn generated(stdout: &str) -> Option<u64> {
    stdout.lines().find_map(|line| {
        let (count, rest) = line.trim().split_once(' ')?;
        rest.starts_with("generated").then(|| count.parse().ok())?
    })
}

/// A scratch directory (schemathesis writes its report there), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(testkit::unique("schemathesis"));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
