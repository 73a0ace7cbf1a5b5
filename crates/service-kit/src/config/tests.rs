//! Unit tests of reading configuration: errors name the variable, secrets stay
//! hidden, values parse with their units and defaults.

use std::{collections::HashMap, time::Duration};

use super::{
    Common, ConfigError, LogFormat, amqp, database_url, duration, http_addr, log_format, parsed,
    required, retry_policy,
};

use super::from_pairs as env;

#[test]
fn a_missing_variable_is_named() {
    let err = required(&env(&[]), "DATABASE_URL").expect_err("missing");
    assert_eq!(err.to_string(), "DATABASE_URL is not set (required)");
    let err = required(&env(&[("DATABASE_URL", "  ")]), "DATABASE_URL").expect_err("blank");
    assert!(matches!(err, ConfigError::Missing("DATABASE_URL")));
}

#[test]
fn an_invalid_variable_is_named_with_the_value() {
    let err = http_addr(&env(&[("HTTP_ADDR", "nope")]), "0.0.0.0:8080").expect_err("bad");
    assert!(
        err.to_string().starts_with("HTTP_ADDR is invalid: 'nope'"),
        "{err}"
    );
    let err = log_format(&env(&[("LOG_FORMAT", "xml")])).expect_err("bad");
    assert!(err.to_string().contains("LOG_FORMAT"), "{err}");
}

#[test]
fn an_amqp_url_error_hides_the_password() {
    let err = amqp(&env(&[("AMQP_URL", "http://u:s3cret@h")])).expect_err("bad");
    assert!(err.to_string().starts_with("AMQP_URL is invalid"), "{err}");
    assert!(!err.to_string().contains("s3cret"));
}

#[test]
fn a_secret_file_wins_and_its_errors_name_the_file_variable() {
    let dir = std::env::temp_dir().join(format!("secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("db");
    std::fs::write(&file, "postgres://from-file/db\n").expect("write");
    let path = file.display().to_string();
    let both = env(&[
        ("DATABASE_URL", "postgres://inline/db"),
        ("DATABASE_URL_FILE", &path),
    ]);
    assert_eq!(
        database_url(&both).expect("file"),
        "postgres://from-file/db"
    );
    let missing = env(&[("DATABASE_URL_FILE", "/nonexistent/secret")]);
    let err = database_url(&missing).expect_err("unreadable");
    assert!(
        err.to_string()
            .starts_with("DATABASE_URL_FILE is invalid: cannot read /nonexistent/secret"),
        "{err}"
    );
    assert!(matches!(
        database_url(&env(&[])),
        Err(ConfigError::Missing("DATABASE_URL"))
    ));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn debug_output_of_the_config_never_shows_a_password() {
    let common = Common::from_env(
        &env(&[
            ("DATABASE_URL", "postgres://shop:db-s3cret@db/orders"),
            ("AMQP_URL", "amqp://shop:mq-s3cret@mq/shop"),
            ("AUTH_MODE", "off"),
        ]),
        "order-service",
        "0.0.0.0:8080",
    )
    .expect("config");
    let printed = format!("{common:?} {common:#?} {}", common.database_url);
    assert!(!printed.contains("db-s3cret"), "{printed}");
    assert!(!printed.contains("mq-s3cret"), "{printed}");
    assert_eq!(
        common.database_url.expose(),
        "postgres://shop:db-s3cret@db/orders"
    );
}

#[test]
fn retry_delays_and_timeouts_take_units_and_name_the_variable_when_wrong() {
    let policy = retry_policy(&env(&[("RETRY_DELAYS", "250ms, 5s,2m")])).expect("valid");
    assert_eq!(
        policy.delays,
        [
            Duration::from_millis(250),
            Duration::from_secs(5),
            Duration::from_secs(120)
        ]
    );
    for bad in ["5", "1s,,2s", "0s", "3 days", "-1s"] {
        let err = retry_policy(&env(&[("RETRY_DELAYS", bad)])).expect_err(bad);
        assert!(
            err.to_string().starts_with("RETRY_DELAYS is invalid"),
            "{err}"
        );
    }
    let err = duration(
        &env(&[("HANDLER_TIMEOUT", "soon")]),
        "HANDLER_TIMEOUT",
        Duration::ZERO,
    )
    .expect_err("bad");
    assert!(
        err.to_string().starts_with("HANDLER_TIMEOUT is invalid"),
        "{err}"
    );
}

#[test]
fn defaults_apply_when_unset() {
    assert_eq!(
        http_addr(&env(&[]), "0.0.0.0:8081")
            .expect("default")
            .port(),
        8081
    );
    assert_eq!(parsed(&env(&[]), "X", 5u32).expect("default"), 5);
    assert_eq!(log_format(&env(&[])).expect("default"), LogFormat::Text);
}

#[test]
fn a_crash_point_is_refused_exactly_by_builds_without_crash_points() {
    let asked: HashMap<String, String> = HashMap::from([("CRASH_POINT".into(), "x".into())]);
    assert_eq!(
        super::crash_point_supported(&asked).is_ok(),
        messaging::FAULT_INJECTION
    );
    assert!(super::crash_point_supported(&HashMap::new()).is_ok());
}

#[test]
fn the_quorum_group_size_is_a_number_of_nodes_or_left_to_rabbitmq() {
    let base = [
        ("DATABASE_URL", "postgres://localhost/x"),
        ("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        ("AUTH_MODE", "off"),
    ];
    let read = |size: Option<&str>| {
        let mut pairs = base.to_vec();
        pairs.extend(size.map(|s| ("AMQP_QUORUM_INITIAL_GROUP_SIZE", s)));
        Common::from_env(&env(&pairs), "test", "127.0.0.1:0")
    };
    assert_eq!(read(None).expect("unset").quorum_group_size, None);
    assert_eq!(
        read(Some("3")).expect("3").quorum_group_size,
        std::num::NonZeroU32::new(3)
    );
    for bad in ["0", "three", "-1"] {
        let err = read(Some(bad)).expect_err(bad).to_string();
        assert!(
            err.starts_with("AMQP_QUORUM_INITIAL_GROUP_SIZE is invalid"),
            "{err}"
        );
    }
}
