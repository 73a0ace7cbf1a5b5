//! Bearer tokens: the one shopctl sends to the services, and `shopctl token`,
//! which mints a development token with a signing key (the demo key of
//! `deploy/auth` by default; never a production issuer's).
//!
//! The token sent is `SHOP_TOKEN` (or the file in `SHOP_TOKEN_FILE`); without
//! one, and only when `AUTH_SIGNING_KEY_FILE` names a key (the compose stack
//! sets it), shopctl mints itself a five-minute operator token with that key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::{Error, cli::Cli};

/// Where `shopctl token` finds a key when neither `--key` nor
/// `AUTH_SIGNING_KEY_FILE` says.
pub const DEMO_KEY: &str = "deploy/auth/demo-signing-key.pem";
pub use service_kit::auth::{DEMO_AUDIENCE, DEMO_ISSUER, DEMO_KID};
/// Scopes of the token shopctl mints for its own calls.
const OPERATOR_SCOPES: &[&str] = &["ops", "stock:write"];

/// What a minted token says.
#[derive(Debug)]
pub struct Claims<'a> {
    pub subject: &'a str,
    pub scopes: &'a [String],
    pub issuer: &'a str,
    pub audience: &'a str,
    pub kid: &'a str,
    pub ttl: Duration,
}

/// A token signed with the PEM key at `key_file` (RSA → RS256, P-256 → ES256).
pub fn mint(key_file: &str, claims: &Claims<'_>) -> Result<(String, u64), Error> {
    let pem = std::fs::read(key_file)
        .map_err(|e| Error::Config(format!("cannot read the signing key {key_file}: {e}")))?;
    let (key, algorithm) = if let Ok(key) = EncodingKey::from_rsa_pem(&pem) {
        (key, Algorithm::RS256)
    } else if let Ok(key) = EncodingKey::from_ec_pem(&pem) {
        (key, Algorithm::ES256)
    } else {
        return Err(Error::Config(format!(
            "{key_file} is not a PEM RSA or P-256 private key"
        )));
    };
    if claims.subject.trim().is_empty() {
        return Err(Error::Config("--sub must not be empty".into()));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let expires = now + claims.ttl.as_secs().max(1);
    let mut header = Header::new(algorithm);
    header.kid = Some(claims.kid.to_owned());
    let body = json!({
        "iss": claims.issuer,
        "aud": claims.audience,
        "sub": claims.subject,
        "iat": now,
        "exp": expires,
        "scope": claims.scopes.join(" "),
    });
    let token = jsonwebtoken::encode(&header, &body, &key)
        .map_err(|e| Error::Config(format!("cannot sign with {key_file}: {e}")))?;
    Ok((token, expires))
}

/// The token shopctl's API calls carry, if any (see the module docs).
pub fn for_calls(cli: &Cli) -> Result<Option<String>, Error> {
    if let Some(token) = cli.token.as_deref().filter(|t| !t.trim().is_empty()) {
        return Ok(Some(token.trim().to_owned()));
    }
    if let Some(path) = std::env::var_os("SHOP_TOKEN_FILE") {
        let token = std::fs::read_to_string(&path).map_err(|e| {
            Error::Config(format!(
                "cannot read SHOP_TOKEN_FILE ({}): {e}",
                path.to_string_lossy()
            ))
        })?;
        return Ok(Some(token.trim().to_owned()));
    }
    match std::env::var("AUTH_SIGNING_KEY_FILE") {
        Ok(key) if !key.trim().is_empty() => {
            let scopes: Vec<String> = OPERATOR_SCOPES.iter().map(|s| (*s).to_owned()).collect();
            let claims = Claims {
                subject: "shopctl",
                scopes: &scopes,
                issuer: &env_or("AUTH_ISSUER", DEMO_ISSUER),
                audience: &env_or("AUTH_AUDIENCE", DEMO_AUDIENCE),
                kid: &env_or("AUTH_KID", DEMO_KID),
                ttl: Duration::from_secs(300),
            };
            mint(key.trim(), &claims).map(|(token, _)| Some(token))
        }
        _ => Ok(None),
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}
