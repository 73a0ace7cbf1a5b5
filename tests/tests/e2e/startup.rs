use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use e2e::{Vhost, binary};

/// Runs `name` with `env` and `AUTH_MODE=off`.
fn run(name: &str, env: &[(&str, String)]) -> (i32, String) {
    let mut env = env.to_vec();
    env.insert(0, ("AUTH_MODE", "off".to_owned()));
    run_bare(name, &env)
}

/// Runs `name` with `env` only (and a free port) until it exits: its exit code
/// and what it wrote to stderr. One still running after [`EXIT_DEADLINE`]
/// started when it should not have: it is killed and the test fails.
fn run_bare(name: &str, env: &[(&str, String)]) -> (i32, String) {
    let mut child = Command::new(binary(name))
        .env_clear()
        .env("HTTP_ADDR", "127.0.0.1:0")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = Instant::now() + EXIT_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} still runs after {EXIT_DEADLINE:?}: it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    (status.code().unwrap_or(-1), stderr)
}

/// How long a service that must refuse to start may take to exit.
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn a_service_without_database_url_exits_non_zero_with_one_clear_line() {
    for name in e2e::SERVICES {
        let (code, stderr) = run(name, &[("AMQP_URL", testkit::amqp_url())]);
        assert_ne!(code, 0, "{name}");
        assert_eq!(
            stderr.trim(),
            format!("{name}: DATABASE_URL is not set (required)")
        );
    }
}

#[test]
fn a_refused_amqp_password_exits_non_zero_with_one_clear_line_without_the_password() {
    let vhost = Vhost::create();
    let url = vhost
        .amqp_url()
        .replace("guest:guest@", "guest:not-the-password@");
    let (code, stderr) = run(
        "order-service",
        &[("AMQP_URL", url), ("DATABASE_URL", testkit::database_url())],
    );
    assert_ne!(code, 0);
    let lines: Vec<&str> = stderr.trim().lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("order-service: RabbitMQ refused access for user 'guest'"),
        "{stderr}"
    );
    assert!(
        lines[0].contains(&format!("vhost '{}'", vhost.name)),
        "{stderr}"
    );
    assert!(!stderr.contains("not-the-password"));
}

#[test]
fn an_unreachable_database_is_named_with_the_cause() {
    let (code, stderr) = run(
        "inventory-service",
        &[
            ("AMQP_URL", testkit::amqp_url()),
            (
                "DATABASE_URL",
                "postgres://postgres:pw@127.0.0.1:1/inventory".into(),
            ),
        ],
    );
    assert_ne!(code, 0);
    let line = stderr.trim();
    assert!(
        line.starts_with(
            "inventory-service: cannot connect to PostgreSQL database 'inventory' at 127.0.0.1:1"
        ),
        "{line}"
    );
    assert!(line.contains("refused"), "{line}");
    assert!(!line.contains(":pw@"));
}

#[test]
fn an_invalid_variable_is_named() {
    let (code, stderr) = run(
        "notification-service",
        &[
            ("AMQP_URL", testkit::amqp_url()),
            ("DATABASE_URL", testkit::database_url()),
            ("NOTIFY_WEBHOOK_URL", "ftp://example".into()),
        ],
    );
    assert_ne!(code, 0);
    assert!(
        stderr
            .trim()
            .starts_with("notification-service: NOTIFY_WEBHOOK_URL is invalid"),
        "{stderr}"
    );
}

/// Secure by default: no `AUTH_MODE` means bearer tokens, and without keys,
/// issuer and audience a service does not start.
#[test]
fn a_service_without_auth_mode_or_keys_exits_non_zero_with_one_line_naming_the_variables() {
    for name in e2e::SERVICES {
        let (code, stderr) = run_bare(
            name,
            &[
                ("AMQP_URL", testkit::amqp_url()),
                ("DATABASE_URL", testkit::database_url()),
            ],
        );
        assert_ne!(code, 0, "{name}");
        let lines: Vec<&str> = stderr.trim().lines().collect();
        assert_eq!(lines.len(), 1, "{name}: {stderr}");
        for variable in [
            "AUTH_JWKS_URL",
            "AUTH_JWKS_FILE",
            "AUTH_ISSUER",
            "AUTH_AUDIENCE",
            "AUTH_MODE=off",
        ] {
            assert!(
                lines[0].contains(variable),
                "{name}: {variable} in {stderr}"
            );
        }
        assert!(lines[0].starts_with(&format!("{name}: ")), "{stderr}");
    }
}

/// A key file that cannot be used is a configuration error, named at startup.
#[test]
fn an_unusable_key_file_is_named_at_startup() {
    let dir = std::env::temp_dir().join(testkit::unique("jwks"));
    std::fs::create_dir_all(&dir).expect("dir");
    let symmetric = dir.join("symmetric.json");
    std::fs::write(
        &symmetric,
        r#"{"keys":[{"kty":"oct","kid":"k","k":"c2VjcmV0"}]}"#,
    )
    .expect("write");
    for (file, expected) in [
        (dir.join("missing.json"), "cannot read"),
        (symmetric, "symmetric keys are never accepted"),
    ] {
        let (code, stderr) = run_bare(
            "order-service",
            &[
                ("AMQP_URL", testkit::amqp_url()),
                ("DATABASE_URL", testkit::database_url()),
                ("AUTH_JWKS_FILE", file.display().to_string()),
                ("AUTH_ISSUER", "shop-demo".into()),
                ("AUTH_AUDIENCE", "shop".into()),
            ],
        );
        assert_ne!(code, 0);
        let line = stderr.trim();
        assert!(
            line.starts_with("order-service: AUTH_JWKS_FILE: ") && line.contains(expected),
            "{line}"
        );
        assert_eq!(line.lines().count(), 1, "{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
