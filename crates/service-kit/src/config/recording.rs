//! Test support for the services: an environment that records what was asked
//! for, so each service's test can prove its declared variables match its code.

use super::Env;

/// An environment that records every variable asked for and answers with a
/// plausible value for the required ones, so a test can prove which variables a
/// `Config` reads.
#[derive(Debug, Default)]
pub struct RecordingEnv(pub std::cell::RefCell<std::collections::BTreeSet<String>>);

impl Env for RecordingEnv {
    fn get(&self, name: &str) -> Option<String> {
        self.0.borrow_mut().insert(name.to_owned());
        match name {
            "DATABASE_URL" => Some("postgres://postgres@127.0.0.1/db".into()),
            "AMQP_URL" => Some("amqp://guest:guest@127.0.0.1/%2f".into()),
            // Tokens (the default) need keys, an issuer and an audience; each
            // is read whether or not the others are set.
            "AUTH_JWKS_FILE" => Some("/keys/jwks.json".into()),
            "AUTH_ISSUER" => Some("issuer".into()),
            "AUTH_AUDIENCE" => Some("audience".into()),
            _ => None,
        }
    }
}

/// Asserts that `from_env` reads exactly the variables `declared` (for each
/// service's own test, so its list cannot drift from its code).
pub fn assert_reads_exactly<C, E: std::fmt::Debug>(
    from_env: impl Fn(&RecordingEnv) -> Result<C, E>,
    declared: &[&str],
) {
    let env = RecordingEnv::default();
    if let Err(e) = from_env(&env) {
        panic!("the recorded environment should give a valid config: {e:?}");
    }
    let read = env.0.into_inner();
    let declared: std::collections::BTreeSet<String> =
        declared.iter().map(|v| (*v).to_owned()).collect();
    assert_eq!(read, declared, "variables read vs declared");
}
