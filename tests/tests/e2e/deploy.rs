//! The deployment files agree with the code: docker-compose.yml, the Kubernetes
//! manifests and the RabbitMQ definitions are parsed and checked against the
//! variables each service reads and the topology the code declares. No Docker
//! engine is needed.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_json::Value as Json;
use serde_norway::Value as Yaml;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every variable `service` may be given.
fn known_variables(service: &str) -> BTreeSet<&'static str> {
    let own = match service {
        "order-service" => order_service::config::variables(),
        "inventory-service" => inventory_service::config::variables(),
        "notification-service" => notification_service::config::variables(),
        other => panic!("unknown service {other}"),
    };
    own.into_iter()
        .chain(service_kit::config::PLATFORM_VARIABLES.iter().copied())
        .collect()
}

/// Checks one service's environment: nothing unknown, nothing required missing.
fn check_environment(service: &str, names: &BTreeSet<String>, origin: &str) {
    let known = known_variables(service);
    for name in names {
        assert!(
            known.contains(name.as_str()),
            "{origin}: {service} is given {name}, which it does not read"
        );
    }
    for (plain, file) in [
        ("DATABASE_URL", "DATABASE_URL_FILE"),
        ("AMQP_URL", "AMQP_URL_FILE"),
        // Deployed with bearer tokens (AUTH_MODE=jwt, the default).
        ("AUTH_JWKS_URL", "AUTH_JWKS_FILE"),
    ] {
        assert!(
            names.contains(plain) || names.contains(file),
            "{origin}: {service} needs {plain} or {file}"
        );
    }
    for name in ["AUTH_ISSUER", "AUTH_AUDIENCE"] {
        assert!(names.contains(name), "{origin}: {service} needs {name}");
    }
    assert!(
        !names.contains("AUTH_MODE"),
        "{origin}: {service} runs with tokens, the default (no AUTH_MODE)"
    );
}

// --- docker-compose.yml ------------------------------------------------------

/// The Compose Specification elements this file may use; anything else (a
/// misspelled key included) fails to parse.
#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Compose {
    name: Option<String>,
    services: BTreeMap<String, Service>,
    #[serde(default)]
    volumes: BTreeMap<String, Option<Yaml>>,
    #[serde(default)]
    secrets: BTreeMap<String, SecretFile>,
}

#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Service {
    image: Option<String>,
    build: Option<Build>,
    hostname: Option<String>,
    restart: Option<Restart>,
    #[serde(default)]
    depends_on: BTreeMap<String, DependsOn>,
    healthcheck: Option<Healthcheck>,
    #[serde(default)]
    environment: BTreeMap<String, Yaml>,
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    volumes: Vec<String>,
    entrypoint: Option<Vec<String>>,
    command: Option<Vec<String>>,
    #[serde(default)]
    profiles: Vec<String>,
}

#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Build {
    context: String,
    dockerfile: Option<String>,
    #[serde(default)]
    args: BTreeMap<String, String>,
}

#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Restart {
    #[serde(rename = "no")]
    No,
    Always,
    OnFailure,
    UnlessStopped,
}

#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DependsOn {
    condition: Condition,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
enum Condition {
    #[serde(rename = "service_started")]
    Started,
    #[serde(rename = "service_healthy")]
    Healthy,
    #[serde(rename = "service_completed_successfully")]
    CompletedSuccessfully,
}

#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Healthcheck {
    test: Vec<String>,
    interval: Option<String>,
    timeout: Option<String>,
    start_period: Option<String>,
    retries: Option<u32>,
}

#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFile {
    file: String,
}

fn compose() -> Compose {
    parse_compose(&read("docker-compose.yml"))
}

fn parse_compose(text: &str) -> Compose {
    let mut value: Yaml = serde_norway::from_str(text).expect("docker-compose.yml is YAML");
    value.apply_merge().expect("merge keys");
    // Extension fields (x-*) are free-form in the specification.
    if let Yaml::Mapping(map) = &mut value {
        map.retain(|k, _| !k.as_str().is_some_and(|k| k.starts_with("x-")));
    }
    serde_norway::from_value(value)
        .unwrap_or_else(|e| panic!("docker-compose.yml is not valid Compose: {e}"))
}

#[test]
fn the_compose_file_is_valid_compose_with_everything_it_references() {
    let compose = compose();
    assert_eq!(compose.name.as_deref(), Some("shop"));
    for (name, service) in &compose.services {
        assert!(
            service.image.is_some() || service.build.is_some(),
            "{name} has neither image nor build"
        );
        if let Some(build) = &service.build {
            let dockerfile = build.dockerfile.as_deref().unwrap_or("Dockerfile");
            assert!(
                root().join(&build.context).join(dockerfile).exists(),
                "{name}: no {dockerfile}"
            );
        }
        for dependency in service.depends_on.keys() {
            assert!(
                compose.services.contains_key(dependency),
                "{name} depends on unknown {dependency}"
            );
        }
        for secret in &service.secrets {
            let file = &compose
                .secrets
                .get(secret)
                .unwrap_or_else(|| panic!("{name}: undefined secret {secret}"))
                .file;
            assert!(
                root().join(file).exists(),
                "secret {secret}: no file {file}"
            );
        }
        for volume in &service.volumes {
            let source = volume.split(':').next().unwrap_or_default();
            if source.starts_with("./") {
                assert!(root().join(source).exists(), "{name}: no {source}");
            } else {
                assert!(
                    compose.volumes.contains_key(source),
                    "{name}: undeclared volume {source}"
                );
            }
        }
        for port in &service.ports {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name}: {port} should be published on localhost only"
            );
        }
    }
    for required in [
        "rabbitmq",
        "postgres",
        "jaeger",
        "order-service",
        "inventory-service",
        "notification-service",
        "seed",
    ] {
        assert!(
            compose.services.contains_key(required),
            "no {required} service"
        );
    }
}

#[test]
fn compose_gives_each_service_only_variables_it_reads_and_all_it_requires() {
    let compose = compose();
    for service in e2e::SERVICES {
        let definition = &compose.services[service];
        let names: BTreeSet<String> = definition.environment.keys().cloned().collect();
        check_environment(service, &names, "docker-compose.yml");
        for (key, value) in &definition.environment {
            if let Some(path) = key.strip_suffix("_FILE").and(value.as_str()) {
                let secret = path
                    .strip_prefix("/run/secrets/")
                    .unwrap_or_else(|| panic!("{service}: {key}={path}"));
                assert!(
                    definition.secrets.iter().any(|s| s == secret),
                    "{service}: {key} names secret {secret} it does not mount"
                );
            }
        }
        for dependency in ["rabbitmq", "postgres"] {
            assert_eq!(
                definition.depends_on[dependency].condition,
                Condition::Healthy,
                "{service} → {dependency}"
            );
        }
        let health = definition
            .healthcheck
            .as_ref()
            .unwrap_or_else(|| panic!("{service}: no healthcheck"));
        assert_eq!(
            health.test,
            ["CMD", "/usr/local/bin/service", "healthcheck"],
            "{service}"
        );
        assert_eq!(
            definition
                .build
                .as_ref()
                .map(|b| b.args.get("SERVICE").map(String::as_str)),
            Some(Some(service))
        );
    }
    // The image puts the binary where the health check calls it.
    assert!(read("deploy/Dockerfile").contains("/usr/local/bin/service"));
}

#[test]
fn compose_runs_shopctl_on_demand_from_a_service_image_with_only_what_it_reads() {
    let compose = compose();
    let shopctl = &compose.services["shopctl"];
    assert_eq!(shopctl.profiles, ["tools"], "not started by `compose up`");
    let image = shopctl.image.as_deref().expect("image");
    assert!(
        e2e::SERVICES
            .iter()
            .any(|s| compose.services[*s].image.as_deref() == Some(image)),
        "{image} is built by a service"
    );
    assert_eq!(
        shopctl.entrypoint.as_deref(),
        Some(&["/usr/local/bin/shopctl".to_owned()][..])
    );
    assert!(read("deploy/Dockerfile").contains("/usr/local/bin/shopctl"));
    for (key, value) in &shopctl.environment {
        assert!(
            shopctl::VARIABLES.contains(&key.as_str()),
            "shopctl is given {key}, which it does not read"
        );
        if let Some(path) = key.strip_suffix("_FILE").and(value.as_str()) {
            let secret = path.strip_prefix("/run/secrets/").expect("a secret");
            assert!(
                shopctl.secrets.iter().any(|s| s == secret),
                "{key}: {secret}"
            );
        }
    }
}

#[test]
fn a_misspelled_variable_in_compose_is_caught() {
    let text = read("docker-compose.yml").replacen(
        "OTEL_EXPORTER_OTLP_ENDPOINT:",
        "OTEL_EXPORTER_OTLP_ENDPIONT:",
        1,
    );
    let compose = parse_compose(&text);
    let names: BTreeSet<String> = compose.services["order-service"]
        .environment
        .keys()
        .cloned()
        .collect();
    let outcome = std::panic::catch_unwind(|| {
        check_environment("order-service", &names, "docker-compose.yml")
    });
    let message = outcome.expect_err("the misspelling must fail the check");
    let message = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(message.contains("OTEL_EXPORTER_OTLP_ENDPIONT"), "{message}");
}

// --- RabbitMQ definitions ----------------------------------------------------

fn definitions() -> Json {
    serde_json::from_str(&read("deploy/rabbitmq/definitions.json")).expect("definitions are JSON")
}

/// What the code declares: the union of every service's topology.
struct Declared {
    exchanges: BTreeSet<(String, String)>,
    queues: BTreeMap<String, Json>,
    bindings: BTreeSet<(String, String, String, String)>,
}

fn declared() -> Declared {
    use contracts::topology::{Owner, for_service};
    let mut exchanges = BTreeSet::new();
    let mut queues = BTreeMap::new();
    let mut bindings = BTreeSet::new();
    for owner in [Owner::Order, Owner::Inventory, Owner::Notification] {
        let topology = for_service(owner, messaging::RetryPolicy::default());
        for e in &topology.exchanges {
            let kind = match e.kind {
                messaging::ExchangeType::Topic => "topic",
                messaging::ExchangeType::Fanout => "fanout",
                messaging::ExchangeType::Direct => "direct",
            };
            exchanges.insert((e.name.clone(), kind.to_owned()));
        }
        for b in &topology.exchange_bindings {
            bindings.insert((
                b.source.clone(),
                b.destination.clone(),
                "exchange".to_owned(),
                b.routing_key.clone(),
            ));
        }
        for q in &topology.queues {
            let common = serde_json::json!({"x-queue-type": "quorum", "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"});
            let mut main = common.clone();
            main["x-dead-letter-exchange"] = q.dead_letter_exchange.clone().into();
            main["x-dead-letter-routing-key"] = q.name.clone().into();
            main["x-delivery-limit"] = q.delivery_limit.into();
            queues.insert(q.name.clone(), main);
            let mut dlq = common.clone();
            dlq["x-delivery-limit"] = messaging::topology::DLQ_DELIVERY_LIMIT.into();
            queues.insert(q.dlq_name(), dlq);
            bindings.insert((
                q.dead_letter_exchange.clone(),
                q.dlq_name(),
                "queue".to_owned(),
                q.name.clone(),
            ));
            for delay in &q.retry.delays {
                let mut retry = common.clone();
                retry["x-dead-letter-exchange"] = "".into();
                retry["x-dead-letter-routing-key"] = q.name.clone().into();
                retry["x-message-ttl"] = u64::try_from(delay.as_millis()).expect("ms").into();
                queues.insert(q.retry_queue_name(*delay), retry);
            }
            for (exchange, key) in &q.bindings {
                bindings.insert((
                    exchange.clone(),
                    q.name.clone(),
                    "queue".to_owned(),
                    key.clone(),
                ));
            }
        }
    }
    Declared {
        exchanges,
        queues,
        bindings,
    }
}

#[test]
fn the_rabbitmq_definitions_hold_exactly_the_topology_the_code_declares() {
    let defs = definitions();
    let Declared {
        exchanges,
        queues,
        bindings,
    } = declared();
    let text = |v: &Json| v.as_str().unwrap_or_default().to_owned();
    let got_exchanges: BTreeSet<(String, String)> = defs["exchanges"]
        .as_array()
        .expect("exchanges")
        .iter()
        .inspect(|e| assert_eq!(e["durable"], true, "{e}"))
        .map(|e| (text(&e["name"]), text(&e["type"])))
        .collect();
    assert_eq!(got_exchanges, exchanges);
    let got_queues: BTreeMap<String, Json> = defs["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .inspect(|q| assert_eq!(q["durable"], true, "{q}"))
        .map(|q| (text(&q["name"]), q["arguments"].clone()))
        .collect();
    assert_eq!(got_queues, queues);
    let got_bindings: BTreeSet<(String, String, String, String)> = defs["bindings"]
        .as_array()
        .expect("bindings")
        .iter()
        .map(|b| {
            (
                text(&b["source"]),
                text(&b["destination"]),
                text(&b["destination_type"]),
                text(&b["routing_key"]),
            )
        })
        .collect();
    assert_eq!(got_bindings, bindings);
    assert!(
        defs["users"]
            .as_array()
            .expect("users")
            .iter()
            .all(|u| u["name"] != "guest"),
        "no guest user"
    );
}

/// The permissions each service needs to declare what it declares (the whole
/// topology, in any start order), and the ones it must not have.
///
/// RabbitMQ checks, on creating a queue: configure on it; with a dead-letter
/// exchange, also read on the queue and write on that exchange. Binding needs
/// write on the queue and read on the exchange; publishing, write on the
/// exchange. So a service that may be the first to start must read every
/// queue it declares with a dead-letter exchange: the other services' main
/// queues too, but not their DLQs and retry queues.
fn check_permissions(user: &str, configure: &str, write: &str, read: &str, origin: &str) {
    use contracts::topology::{Owner, for_service};
    let re = |pattern: &str| {
        regex::Regex::new(pattern).unwrap_or_else(|e| panic!("{origin}: {user}: {pattern}: {e}"))
    };
    let (configure, write, read) = (re(configure), re(write), re(read));
    let owner = match user {
        "order-service" => Owner::Order,
        "inventory-service" => Owner::Inventory,
        "notification-service" => Owner::Notification,
        other => panic!("{origin}: unexpected user {other}"),
    };
    let topology = for_service(owner, messaging::RetryPolicy::default());
    for exchange in &topology.exchanges {
        let name = exchange.name.as_str();
        assert!(
            configure.is_match(name),
            "{origin}: {user} cannot declare {name}"
        );
        assert!(
            write.is_match(name),
            "{origin}: {user} cannot publish to {name}"
        );
        assert!(
            read.is_match(name),
            "{origin}: {user} cannot bind from {name}"
        );
    }
    for queue in &topology.queues {
        // The queue and its retry queues have a dead-letter exchange; the DLQ not.
        let with_dlx = std::iter::once(queue.name.clone()).chain(
            queue
                .retry
                .delays
                .iter()
                .map(|d| queue.retry_queue_name(*d)),
        );
        for name in queue.queue_names() {
            assert!(
                configure.is_match(&name),
                "{origin}: {user} cannot declare {name}"
            );
            assert!(write.is_match(&name), "{origin}: {user} cannot bind {name}");
        }
        for name in with_dlx {
            assert!(
                read.is_match(&name),
                "{origin}: {user} cannot create {name} (a dead-letter exchange needs read)"
            );
        }
    }
    // Retries and dead letters are published through the default exchange.
    assert!(
        write.is_match("amq.default"),
        "{origin}: {user} cannot publish retries"
    );
    let own = contracts::topology::queue(owner, messaging::RetryPolicy::default()).name;
    for other in [
        contracts::names::ORDER_QUEUE,
        contracts::names::INVENTORY_QUEUE,
        contracts::names::NOTIFICATION_QUEUE,
    ] {
        if other != own {
            for name in [format!("{other}.dlq"), format!("{other}.retry.1000ms")] {
                assert!(
                    !read.is_match(&name),
                    "{origin}: {user} may consume {name} (least privilege)"
                );
            }
        }
    }
    assert!(
        !configure.is_match("amq.gen-x") && !configure.is_match("other.queue"),
        "{origin}: {user} configures too much"
    );
    assert!(
        !read.is_match("other.queue"),
        "{origin}: {user} reads too much"
    );
}

#[test]
fn each_service_user_in_the_definitions_has_least_privilege() {
    let defs = definitions();
    let mut users = BTreeSet::new();
    for p in defs["permissions"].as_array().expect("permissions") {
        let user = p["user"].as_str().expect("user");
        if user == "shop-admin" {
            continue;
        }
        users.insert(user.to_owned());
        let get = |k: &str| p[k].as_str().expect("pattern").to_owned();
        check_permissions(
            user,
            &get("configure"),
            &get("write"),
            &get("read"),
            "definitions.json",
        );
    }
    assert_eq!(
        users,
        e2e::SERVICES.iter().map(|s| (*s).to_owned()).collect()
    );
}

// --- Kubernetes --------------------------------------------------------------

#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
struct Kustomization {
    resources: Vec<String>,
    #[serde(rename = "configMapGenerator", default)]
    config_maps: Vec<Generator>,
    #[serde(rename = "secretGenerator", default)]
    secrets: Vec<Generator>,
}

#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
struct Generator {
    name: String,
    #[serde(default)]
    literals: Vec<String>,
    #[serde(default)]
    files: Vec<String>,
    #[serde(default)]
    options: GeneratorOptions,
}

#[derive(Debug, Default, Deserialize)]
struct GeneratorOptions {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Container {
    name: String,
    image: String,
    #[serde(default)]
    ports: Vec<Yaml>,
    #[serde(default)]
    env: Vec<EnvVar>,
    #[serde(default)]
    env_from: Vec<Yaml>,
    #[serde(default)]
    volume_mounts: Vec<Yaml>,
    readiness_probe: Probe,
    liveness_probe: Probe,
    startup_probe: Option<Probe>,
    resources: Resources,
    security_context: Option<Yaml>,
}

#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvVar {
    name: String,
    value: Option<String>,
}

#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Probe {
    http_get: HttpGet,
    period_seconds: Option<u32>,
    timeout_seconds: Option<u32>,
    failure_threshold: Option<u32>,
}

#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpGet {
    path: String,
    port: Yaml,
}

#[allow(dead_code)] // every field is parsed to check the file; not all are read
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Resources {
    requests: BTreeMap<String, String>,
    #[serde(default)]
    limits: BTreeMap<String, String>,
}

/// Every document of every resource file: (file, document).
fn manifests() -> (Kustomization, Vec<(String, Yaml)>) {
    let kustomization: Kustomization =
        serde_norway::from_str(&read("deploy/k8s/kustomization.yaml")).expect("kustomization");
    let mut documents = Vec::new();
    for file in &kustomization.resources {
        let text = read(&format!("deploy/k8s/{file}"));
        for document in serde_norway::Deserializer::from_str(&text) {
            let value =
                Yaml::deserialize(document).unwrap_or_else(|e| panic!("{file} is not YAML: {e}"));
            for key in ["apiVersion", "kind"] {
                assert!(
                    value[key].as_str().is_some_and(|v| !v.is_empty()),
                    "{file}: a document without {key}"
                );
            }
            assert!(
                value["metadata"]["name"].as_str().is_some(),
                "{file}: a document without metadata.name"
            );
            documents.push((file.clone(), value));
        }
    }
    (kustomization, documents)
}

#[test]
fn the_kubernetes_manifests_are_valid_and_agree_with_the_services() {
    let (kustomization, documents) = manifests();
    for generator in kustomization
        .config_maps
        .iter()
        .chain(&kustomization.secrets)
    {
        for file in &generator.files {
            let path = file.split_once('=').map_or(file.as_str(), |(_, p)| p);
            assert!(
                root().join("deploy/k8s").join(path).exists(),
                "{}: no {path}",
                generator.name
            );
        }
    }
    let config_map_names: BTreeSet<String> = kustomization
        .config_maps
        .iter()
        .flat_map(|g| {
            g.literals
                .iter()
                .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
        })
        .collect();
    let kinds: BTreeSet<(String, String)> = documents
        .iter()
        .map(|(_, d)| {
            (
                d["apiVersion"].as_str().unwrap_or_default().to_owned(),
                d["kind"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for expected in [
        ("rabbitmq.com/v1beta1", "RabbitmqCluster"),
        ("postgresql.cnpg.io/v1", "Cluster"),
        ("apps/v1", "Deployment"),
    ] {
        assert!(
            kinds.contains(&(expected.0.to_owned(), expected.1.to_owned())),
            "no {expected:?}"
        );
    }
    let mut deployments = 0;
    for (file, document) in &documents {
        match document["kind"].as_str() {
            Some("Deployment") => {
                deployments += 1;
                let name = document["metadata"]["name"].as_str().expect("name");
                assert!(
                    document["spec"]["replicas"]
                        .as_u64()
                        .is_some_and(|r| r >= 2),
                    "{file}: {name} needs 2+ replicas"
                );
                let containers: Vec<Container> = serde_norway::from_value(
                    document["spec"]["template"]["spec"]["containers"].clone(),
                )
                .unwrap_or_else(|e| panic!("{file}: {name}: invalid container: {e}"));
                let container = &containers[0];
                assert_eq!(container.name, name);
                assert!(container.image.contains(name));
                let mut names: BTreeSet<String> =
                    container.env.iter().map(|e| e.name.clone()).collect();
                names.extend(config_map_names.iter().cloned());
                check_environment(name, &names, file);
                for probe in [&container.readiness_probe, &container.liveness_probe]
                    .into_iter()
                    .chain(&container.startup_probe)
                {
                    assert!(
                        ["/healthz", "/readyz"].contains(&probe.http_get.path.as_str()),
                        "{file}: probe {}",
                        probe.http_get.path
                    );
                }
                assert_eq!(container.readiness_probe.http_get.path, "/readyz");
                assert!(
                    container.resources.requests.contains_key("cpu")
                        && container.resources.requests.contains_key("memory")
                );
            }
            Some("RabbitmqCluster") => {
                assert_eq!(
                    document["spec"]["replicas"].as_u64(),
                    Some(3),
                    "{file}: a 3-node cluster"
                );
                let resources = &document["spec"]["resources"];
                assert_eq!(
                    resources["requests"]["memory"], resources["limits"]["memory"],
                    "{file}: RabbitMQ's memory request equals its limit"
                );
            }
            Some("Permission") => {
                let p = &document["spec"]["permissions"];
                // A reference, not a name: the operator then waits for the
                // User and owns the Permission with it.
                assert!(
                    document["spec"]["user"].is_null(),
                    "{file}: Permission names its user by userReference"
                );
                let user = document["spec"]["userReference"]["name"]
                    .as_str()
                    .expect("userReference.name");
                check_permissions(
                    user,
                    p["configure"].as_str().expect("c"),
                    p["write"].as_str().expect("w"),
                    p["read"].as_str().expect("r"),
                    file,
                );
            }
            _ => {}
        }
    }
    assert_eq!(deployments, 3);
}

/// The secret a generator of the kustomization makes, by name.
fn generated<'a>(kustomization: &'a Kustomization, name: &str) -> &'a Generator {
    kustomization
        .secrets
        .iter()
        .find(|g| g.name == name)
        .unwrap_or_else(|| panic!("no secretGenerator {name}"))
}

#[test]
fn the_kubernetes_secrets_carry_what_the_operators_need() {
    let (kustomization, documents) = manifests();
    // No value with trailing white space: the operators take the bytes as they
    // are, while the URLs carry the password without them.
    for generator in &kustomization.secrets {
        for file in &generator.files {
            let path = file.split_once('=').map_or(file.as_str(), |(_, p)| p);
            let value = read(&format!("deploy/k8s/{path}"));
            assert_eq!(
                value.trim_end(),
                value,
                "{}: {path} ends in white space (a newline?)",
                generator.name
            );
        }
        for literal in &generator.literals {
            assert_eq!(
                literal.trim_end(),
                literal,
                "{}: {literal:?}",
                generator.name
            );
        }
    }
    let mut users = 0;
    let mut roles = 0;
    for (file, document) in &documents {
        match document["kind"].as_str() {
            // The topology operator (1.20+) reads only labelled secrets.
            Some("User") => {
                users += 1;
                let name = document["spec"]["importCredentialsSecret"]["name"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{file}: User without importCredentialsSecret"));
                assert_eq!(
                    generated(&kustomization, name)
                        .options
                        .labels
                        .get("rabbitmq.com/topology-operator")
                        .map(String::as_str),
                    Some("true"),
                    "{file}: secret {name} lacks the label rabbitmq.com/topology-operator"
                );
            }
            // CloudNativePG applies a changed role secret only when labelled.
            Some("Cluster") if document["apiVersion"] == "postgresql.cnpg.io/v1" => {
                let spec = &document["spec"];
                let secrets = std::iter::once(&spec["bootstrap"]["initdb"]["secret"]["name"])
                    .chain(
                        spec["managed"]["roles"]
                            .as_sequence()
                            .into_iter()
                            .flatten()
                            .map(|r| &r["passwordSecret"]["name"]),
                    );
                for name in secrets {
                    let name = name.as_str().expect("secret name");
                    roles += 1;
                    assert_eq!(
                        generated(&kustomization, name)
                            .options
                            .labels
                            .get("cnpg.io/reload")
                            .map(String::as_str),
                        Some("true"),
                        "{file}: secret {name} lacks the label cnpg.io/reload"
                    );
                }
            }
            _ => {}
        }
    }
    assert_eq!((users, roles), (3, 3), "three RabbitMQ users, three roles");
}

// --- The definitions on the real broker --------------------------------------

/// The definitions imported under a private vhost and private user names, so the
/// test cannot disturb anything else on the broker.
struct ImportedDefinitions {
    vhost: String,
    suffix: String,
}

impl ImportedDefinitions {
    fn import() -> Self {
        let suffix = testkit::unique("d");
        let vhost = format!("shop-{suffix}");
        let mut defs = definitions();
        let rename = |user: &str| format!("{user}-{suffix}");
        for section in ["queues", "exchanges", "bindings"] {
            for item in defs[section].as_array_mut().expect("section") {
                item["vhost"] = vhost.clone().into();
            }
        }
        defs["vhosts"] = serde_json::json!([{ "name": vhost }]);
        for user in defs["users"].as_array_mut().expect("users") {
            user["name"] = rename(user["name"].as_str().expect("name")).into();
        }
        for p in defs["permissions"].as_array_mut().expect("permissions") {
            p["user"] = rename(p["user"].as_str().expect("user")).into();
            p["vhost"] = vhost.clone().into();
        }
        let path = std::env::temp_dir().join(format!("{suffix}.json"));
        std::fs::write(&path, defs.to_string()).expect("write definitions");
        e2e::rabbitmqctl(&["import_definitions", &path.display().to_string()]);
        let _ = std::fs::remove_file(path);
        Self { vhost, suffix }
    }

    /// The URL a service uses, with the demo password from deploy/secrets.
    fn url(&self, service: &str) -> String {
        let password = read(&format!("deploy/secrets/{service}-amqp-password"));
        format!(
            "amqp://{service}-{}:{}@127.0.0.1:5672/{}",
            self.suffix,
            password.trim(),
            self.vhost
        )
    }
}

impl Drop for ImportedDefinitions {
    fn drop(&mut self) {
        let users = [
            "order-service",
            "inventory-service",
            "notification-service",
            "shop-admin",
        ]
        .map(|user| format!("{user}-{}", self.suffix));
        remove_vhost_and_users(&self.vhost, &users);
    }
}

/// Deletes a test's private vhost and users (what is gone already is no error).
fn remove_vhost_and_users(vhost: &str, users: &[String]) {
    let _ = std::process::Command::new("rabbitmqctl")
        .args(["delete_vhost", vhost])
        .output();
    for user in users {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", user])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_services_run_on_the_definitions_with_least_privilege_users() {
    let imported = tokio::task::spawn_blocking(ImportedDefinitions::import)
        .await
        .expect("import");
    let env = e2e::SERVICES
        .iter()
        .map(|s| (*s, "AMQP_URL".to_owned(), imported.url(s)))
        .collect();
    // The services declare the whole topology over the imported one: any
    // difference in arguments would stop them at startup (PRECONDITION_FAILED),
    // and any missing permission would too (ACCESS_REFUSED).
    let stack = e2e::Stack::start_with(e2e::Options {
        env,
        ..e2e::Options::default()
    })
    .await;
    let sku = testkit::unique("DEF");
    stack.set_stock(&sku, 3).await;
    let id = stack.place("definitions", &[(&sku, 1)]).await;
    assert_eq!(stack.settled(&id).await["status"], "confirmed");
    stack
        .wait_notified(&id, &["order.placed", "order.confirmed"])
        .await;

    // order-service's user may not consume inventory's dead letters (it may
    // read inventory's queue: creating it, as the first service to start may,
    // needs that).
    let conn = lapin::Connection::connect(&imported.url("order-service"), Default::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    let refused = channel
        .basic_consume(
            "inventory.order-events.dlq".into(),
            "intruder".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .expect_err("order-service must not consume inventory's DLQ");
    assert!(refused.to_string().contains("ACCESS_REFUSED"), "{refused}");
    stack.stop().await;
}

// --- The Kubernetes users on the real broker ---------------------------------

/// The Kubernetes manifests' RabbitMQ users and permissions, created under a
/// private vhost and private user names on the local broker, with nothing
/// else: no queue exists until a service declares it.
struct KubernetesUsers {
    vhost: String,
    suffix: String,
}

impl KubernetesUsers {
    fn create() -> Self {
        let suffix = testkit::unique("k");
        let vhost = format!("shop-{suffix}");
        e2e::rabbitmqctl(&["add_vhost", &vhost]);
        let users = Self { vhost, suffix };
        let (_, documents) = manifests();
        for (_, document) in documents.iter().filter(|(_, d)| d["kind"] == "Permission") {
            let service = document["spec"]["userReference"]["name"]
                .as_str()
                .expect("userReference.name");
            let p = &document["spec"]["permissions"];
            let user = users.user(service);
            e2e::rabbitmqctl(&["add_user", &user, &Self::password(service)]);
            e2e::rabbitmqctl(&[
                "set_permissions",
                "-p",
                &users.vhost,
                &user,
                p["configure"].as_str().expect("configure"),
                p["write"].as_str().expect("write"),
                p["read"].as_str().expect("read"),
            ]);
        }
        users
    }

    fn user(&self, service: &str) -> String {
        format!("{service}-{}", self.suffix)
    }

    /// The demo password of deploy/k8s/secrets, exactly as the operator takes it.
    fn password(service: &str) -> String {
        read(&format!("deploy/k8s/secrets/{service}-amqp-password"))
    }

    fn url(&self, service: &str) -> String {
        format!(
            "amqp://{}:{}@127.0.0.1:5672/{}",
            self.user(service),
            Self::password(service),
            self.vhost
        )
    }
}

impl Drop for KubernetesUsers {
    fn drop(&mut self) {
        let users = e2e::SERVICES.map(|service| self.user(service));
        remove_vhost_and_users(&self.vhost, &users);
    }
}

/// Every order the three services can be started in.
fn start_orders() -> Vec<[&'static str; 3]> {
    let [a, b, c] = e2e::SERVICES;
    vec![
        [a, b, c],
        [a, c, b],
        [b, a, c],
        [b, c, a],
        [c, a, b],
        [c, b, a],
    ]
}

/// Starts the three services in `order` under the Kubernetes users on an empty
/// vhost; each must become ready without a restart, and an order completes.
async fn start_in_order(order: [&'static str; 3]) {
    let users = tokio::task::spawn_blocking(KubernetesUsers::create)
        .await
        .expect("users");
    let env = e2e::SERVICES
        .iter()
        .map(|s| (*s, "AMQP_URL".to_owned(), users.url(s)))
        .collect();
    let mut stack = e2e::Stack::start_with(e2e::Options {
        env,
        held_back: e2e::SERVICES.to_vec(),
        ..e2e::Options::default()
    })
    .await;
    // Each one ready in turn, without a restart: the first declares the whole
    // topology under its own user (start_service fails if it exits).
    for service in order {
        stack.start_service(service).await;
    }
    for service in e2e::SERVICES {
        let url = format!("{}/readyz", stack.url(service));
        let http = stack.http.clone();
        // Consumers subscribe just after the service answers ready.
        testkit::wait_until(
            &format!("{service} connected and consuming after {order:?}"),
            Duration::from_secs(30),
            || async {
                let Ok(response) = http.get(&url).send().await else {
                    return false;
                };
                let ready: Json = response.json().await.unwrap_or_default();
                ready["checks"]
                    .as_array()
                    .is_some_and(|checks| checks.iter().all(|c| c["ok"] == true))
            },
        )
        .await;
    }
    let sku = testkit::unique("K8S");
    stack.set_stock(&sku, 3).await;
    let id = stack.place("k8s-users", &[(&sku, 1)]).await;
    assert_eq!(
        stack.settled(&id).await["status"],
        "confirmed",
        "after {order:?}"
    );
    stack.stop().await;
    drop(users);
}

#[tokio::test(flavor = "multi_thread")]
async fn under_the_kubernetes_users_the_services_start_in_any_order_on_an_empty_vhost() {
    // Two orders at a time, each on a vhost and databases of its own.
    for pair in start_orders().chunks(2) {
        futures_util::future::join_all(pair.iter().map(|order| start_in_order(*order))).await;
    }
}

// --- bearer tokens -------------------------------------------------------------

/// Compose and Kubernetes run with tokens of the demo issuer (deploy/auth): its
/// issuer and audience, its JWKS mounted where AUTH_JWKS_FILE points, the k8s
/// copy of the JWKS equal to the original, and shopctl given the signing key.
#[test]
fn both_deployments_check_tokens_of_the_demo_issuer() {
    use testkit::issuer::{DEMO_AUDIENCE, DEMO_ISSUER, DEMO_JWKS};
    assert_eq!(
        read("deploy/k8s/auth/demo-jwks.json"),
        DEMO_JWKS,
        "deploy/k8s/auth/demo-jwks.json is a copy of deploy/auth/demo-jwks.json"
    );
    let compose = compose();
    for service in e2e::SERVICES {
        let definition = &compose.services[service];
        let env = |name: &str| {
            definition.environment[name]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(env("AUTH_ISSUER"), DEMO_ISSUER, "{service}");
        assert_eq!(env("AUTH_AUDIENCE"), DEMO_AUDIENCE, "{service}");
        let secret = env("AUTH_JWKS_FILE").replace("/run/secrets/", "");
        assert_eq!(
            compose.secrets[&secret].file, "./deploy/auth/demo-jwks.json",
            "{service}"
        );
    }
    for tool in ["shopctl", "seed"] {
        let definition = &compose.services[tool];
        let key = definition.environment["AUTH_SIGNING_KEY_FILE"]
            .as_str()
            .expect("AUTH_SIGNING_KEY_FILE")
            .replace("/run/secrets/", "");
        assert!(definition.secrets.contains(&key), "{tool} mounts {key}");
        assert_eq!(
            compose.secrets[&key].file,
            "./deploy/auth/demo-signing-key.pem"
        );
    }

    let (kustomization, documents) = manifests();
    let literals: Vec<&str> = kustomization
        .config_maps
        .iter()
        .flat_map(|g| g.literals.iter().map(String::as_str))
        .collect();
    assert!(literals.contains(&format!("AUTH_ISSUER={DEMO_ISSUER}").as_str()));
    assert!(literals.contains(&format!("AUTH_AUDIENCE={DEMO_AUDIENCE}").as_str()));
    let keys = kustomization
        .config_maps
        .iter()
        .find(|g| g.files.iter().any(|f| f.ends_with("auth/demo-jwks.json")))
        .expect("a configMap of the JWKS");
    let file_name = keys.files[0].split_once('=').map_or("", |(k, _)| k);
    for (file, document) in &documents {
        if document["kind"].as_str() != Some("Deployment") {
            continue;
        }
        let spec = &document["spec"]["template"]["spec"];
        let container = &spec["containers"][0];
        let jwks_file = container["env"]
            .as_sequence()
            .and_then(|env| {
                env.iter()
                    .find(|e| e["name"].as_str() == Some("AUTH_JWKS_FILE"))
            })
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("{file}: no AUTH_JWKS_FILE"));
        let (dir, name) = jwks_file.rsplit_once('/').expect("a path");
        assert_eq!(name, file_name, "{file}");
        let volume = container["volumeMounts"]
            .as_sequence()
            .and_then(|m| m.iter().find(|m| m["mountPath"].as_str() == Some(dir)))
            .and_then(|m| m["name"].as_str())
            .unwrap_or_else(|| panic!("{file}: nothing mounted at {dir}"));
        let source = spec["volumes"]
            .as_sequence()
            .and_then(|v| v.iter().find(|v| v["name"].as_str() == Some(volume)))
            .unwrap_or_else(|| panic!("{file}: no volume {volume}"));
        assert_eq!(
            source["configMap"]["name"].as_str(),
            Some(keys.name.as_str()),
            "{file}"
        );
    }
}
