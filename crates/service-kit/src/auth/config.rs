//! `AUTH_*`: whether requests need a bearer token, and how tokens are checked.

use std::path::PathBuf;

use crate::config::{ConfigError, Env, optional};

/// The variables [`AuthConfig::from_env`] reads.
pub const VARIABLES: &[&str] = &[
    "AUTH_MODE",
    "AUTH_JWKS_URL",
    "AUTH_JWKS_FILE",
    "AUTH_ISSUER",
    "AUTH_AUDIENCE",
];

/// How requests to the API are authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthConfig {
    /// `AUTH_MODE=off`: no token needed, every request may do anything. Set
    /// explicitly only (development, tests, benchmarks).
    Off,
    /// `AUTH_MODE=jwt` (the default): a valid bearer token on every API request.
    Jwt(JwtConfig),
}

/// What a token must satisfy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtConfig {
    /// Where the issuer's public keys (a JWKS) are read from.
    pub keys: KeySource,
    /// The `iss` every token must carry (`AUTH_ISSUER`).
    pub issuer: String,
    /// The `aud` every token must carry (`AUTH_AUDIENCE`).
    pub audience: String,
}

/// Where the JWKS comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `AUTH_JWKS_URL`: fetched at startup and refreshed.
    Url(String),
    /// `AUTH_JWKS_FILE`: read at startup and again when it may have changed.
    File(PathBuf),
}

/// Shown in logs and the unauthenticated `/readyz`: a URL without its user
/// information, query and fragment (where secrets would be).
impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url(url) => match reqwest::Url::parse(url) {
                Ok(url) => write!(
                    f,
                    "{}://{}{}{}",
                    url.scheme(),
                    url.host_str().unwrap_or_default(),
                    url.port().map(|p| format!(":{p}")).unwrap_or_default(),
                    url.path()
                ),
                Err(_) => f.write_str("<invalid URL>"),
            },
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

impl AuthConfig {
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        match optional(env, "AUTH_MODE").as_deref() {
            Some("off") => Ok(Self::Off),
            None | Some("jwt") => jwt(env).map(Self::Jwt),
            Some(other) => Err(ConfigError::Invalid {
                name: "AUTH_MODE",
                reason: format!("'{other}' (jwt, the default, or off)"),
            }),
        }
    }
}

fn jwt(env: &impl Env) -> Result<JwtConfig, ConfigError> {
    let url = optional(env, "AUTH_JWKS_URL");
    let file = optional(env, "AUTH_JWKS_FILE");
    let issuer = optional(env, "AUTH_ISSUER");
    let audience = optional(env, "AUTH_AUDIENCE");
    let mut missing = Vec::new();
    if url.is_none() && file.is_none() {
        missing.push("AUTH_JWKS_URL or AUTH_JWKS_FILE");
    }
    if issuer.is_none() {
        missing.push("AUTH_ISSUER");
    }
    if audience.is_none() {
        missing.push("AUTH_AUDIENCE");
    }
    if !missing.is_empty() {
        return Err(ConfigError::Incomplete(format!(
            "bearer tokens (AUTH_MODE=jwt, the default) need {} set; \
             or set AUTH_MODE=off to serve without authentication",
            missing.join(", ")
        )));
    }
    let keys = match (url, file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::Invalid {
                name: "AUTH_JWKS_URL",
                reason: "set together with AUTH_JWKS_FILE (set one of them)".into(),
            });
        }
        (Some(url), None) => {
            check_url(&url)?;
            KeySource::Url(url)
        }
        (None, Some(file)) => KeySource::File(PathBuf::from(file)),
        (None, None) => unreachable!("checked above"),
    };
    Ok(JwtConfig {
        keys,
        issuer: issuer.unwrap_or_default(),
        audience: audience.unwrap_or_default(),
    })
}

/// An `https://` URL, or `http://` to this host only: keys fetched in the
/// clear could be replaced on the way.
fn check_url(raw: &str) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        name: "AUTH_JWKS_URL",
        reason,
    };
    let url = reqwest::Url::parse(raw).map_err(|e| invalid(format!("not a URL: {e}")))?;
    let loopback = match url.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(invalid(
            "http:// only to this host (localhost); keys from elsewhere need https://".into(),
        )),
        other => Err(invalid(format!("{other}:// is not http(s)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_pairs as env;

    #[test]
    fn unset_means_jwt_and_names_every_missing_variable() {
        let error = AuthConfig::from_env(&env(&[])).unwrap_err().to_string();
        for name in [
            "AUTH_JWKS_URL or AUTH_JWKS_FILE",
            "AUTH_ISSUER",
            "AUTH_AUDIENCE",
            "AUTH_MODE=off",
        ] {
            assert!(error.contains(name), "{error}");
        }
        assert!(!error.contains('\n'), "one line: {error}");
    }

    #[test]
    fn off_must_be_said() {
        assert_eq!(
            AuthConfig::from_env(&env(&[("AUTH_MODE", "off")])).unwrap(),
            AuthConfig::Off
        );
        let error = AuthConfig::from_env(&env(&[("AUTH_MODE", "none")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("AUTH_MODE"), "{error}");
    }

    #[test]
    fn a_complete_jwt_configuration() {
        let config = AuthConfig::from_env(&env(&[
            ("AUTH_JWKS_FILE", "/keys.json"),
            ("AUTH_ISSUER", "https://id.example"),
            ("AUTH_AUDIENCE", "shop"),
        ]))
        .unwrap();
        assert_eq!(
            config,
            AuthConfig::Jwt(JwtConfig {
                keys: KeySource::File("/keys.json".into()),
                issuer: "https://id.example".into(),
                audience: "shop".into(),
            })
        );
        let both = AuthConfig::from_env(&env(&[
            ("AUTH_JWKS_FILE", "/keys.json"),
            ("AUTH_JWKS_URL", "https://id.example/jwks"),
            ("AUTH_ISSUER", "i"),
            ("AUTH_AUDIENCE", "a"),
        ]));
        assert!(both.is_err());
        let not_a_url = AuthConfig::from_env(&env(&[
            ("AUTH_JWKS_URL", "id.example/jwks"),
            ("AUTH_ISSUER", "i"),
            ("AUTH_AUDIENCE", "a"),
        ]));
        assert!(not_a_url.unwrap_err().to_string().contains("AUTH_JWKS_URL"));
        let jwt = |url: &str| {
            AuthConfig::from_env(&env(&[
                ("AUTH_JWKS_URL", url),
                ("AUTH_ISSUER", "i"),
                ("AUTH_AUDIENCE", "a"),
            ]))
        };
        assert!(jwt("https://id.example/jwks").is_ok());
        assert!(jwt("http://127.0.0.1:9000/jwks").is_ok());
        assert!(jwt("http://localhost/jwks").is_ok());
        assert!(jwt("http://id.example/jwks").is_err(), "keys in the clear");
        assert!(jwt("ftp://id.example/jwks").is_err());
        let source = KeySource::Url("https://u:secret@id.example:8443/jwks?token=secret#x".into());
        assert_eq!(source.to_string(), "https://id.example:8443/jwks");
    }
}
