//! The deployment files agree with the code: docker-compose.yml, the Kubernetes
//! manifests and the RabbitMQ definitions are parsed and checked against the
//! variables each service reads and the topology the code declares. No Docker
//! engine is needed.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
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
    ] {
        assert!(
            names.contains(plain) || names.contains(file),
            "{origin}: {service} needs {plain} or {file}"
        );
    }
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

/// The permissions each service needs, and the ones it must not have.
fn check_permissions(user: &str, configure: &str, write: &str, read: &str, origin: &str) {
    let Declared {
        exchanges, queues, ..
    } = declared();
    let re = |pattern: &str| {
        regex::Regex::new(pattern).unwrap_or_else(|e| panic!("{origin}: {user}: {pattern}: {e}"))
    };
    let (configure, write, read) = (re(configure), re(write), re(read));
    let own = match user {
        "order-service" => contracts::names::ORDER_QUEUE,
        "inventory-service" => contracts::names::INVENTORY_QUEUE,
        "notification-service" => contracts::names::NOTIFICATION_QUEUE,
        other => panic!("{origin}: unexpected user {other}"),
    };
    // Every service declares (configure) and binds (write) the whole topology.
    for name in exchanges
        .iter()
        .map(|e| e.0.as_str())
        .chain(queues.keys().map(String::as_str))
    {
        assert!(
            configure.is_match(name),
            "{origin}: {user} cannot declare {name}"
        );
        assert!(
            write.is_match(name),
            "{origin}: {user} cannot write to {name}"
        );
    }
    // Retries and dead letters are published through the default exchange.
    assert!(
        write.is_match("amq.default"),
        "{origin}: {user} cannot publish retries"
    );
    // It reads its own queue and the exchanges it binds from, nothing else.
    for name in [
        own,
        contracts::names::EVENTS_EXCHANGE,
        contracts::names::NOTIFICATIONS_EXCHANGE,
        contracts::names::DEAD_LETTER_EXCHANGE,
    ] {
        assert!(read.is_match(name), "{origin}: {user} cannot read {name}");
    }
    for other in [
        contracts::names::ORDER_QUEUE,
        contracts::names::INVENTORY_QUEUE,
        contracts::names::NOTIFICATION_QUEUE,
    ] {
        if other != own {
            assert!(
                !read.is_match(other),
                "{origin}: {user} may consume {other} (least privilege)"
            );
            assert!(
                !read.is_match(&format!("{other}.dlq")),
                "{origin}: {user} may consume {other}.dlq"
            );
        }
    }
    assert!(
        !configure.is_match("amq.gen-x") && !configure.is_match("other.queue"),
        "{origin}: {user} configures too much"
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
            }
            Some("Permission") => {
                let p = &document["spec"]["permissions"];
                let user = document["spec"]["user"].as_str().expect("user");
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
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.vhost])
            .output();
        for user in [
            "order-service",
            "inventory-service",
            "notification-service",
            "shop-admin",
        ] {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["delete_user", &format!("{user}-{}", self.suffix)])
                .output();
        }
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

    // order-service's user may not consume inventory's queue.
    let conn = lapin::Connection::connect(&imported.url("order-service"), Default::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    let refused = channel
        .basic_consume(
            "inventory.order-events".into(),
            "intruder".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .expect_err("order-service must not consume inventory's queue");
    assert!(refused.to_string().contains("ACCESS_REFUSED"), "{refused}");
    stack.stop().await;
}
