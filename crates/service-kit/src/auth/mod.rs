//! Who is asking: bearer tokens (JWT) checked on every API request, and the
//! [`Principal`] handlers authorize with.
//!
//! ```text
//!  config     AUTH_* → AuthConfig (jwt by default; off only when said)
//!  keys       the issuer's JWKS, cached and refreshed; each key bound to one algorithm
//!  verify     one token → Principal, or why not
//!  this file  the middleware (401 with WWW-Authenticate), Principal (scopes,
//!             the customer it is limited to), denials (403/404, logged)
//! ```
//!
//! The probes (`/healthz`, `/readyz`), `/metrics` and `/openapi.json` need no
//! token: they are for the platform and belong on an internal network.

mod config;
mod keys;
mod verify;

use std::sync::Arc;

use axum::{
    extract::{FromRequestParts, Request, State},
    http::{HeaderValue, StatusCode, header, request::Parts},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tokio_util::sync::CancellationToken;

pub use config::{AuthConfig, JwtConfig, KeySource, VARIABLES};
pub use keys::{DEMO_AUDIENCE, DEMO_ISSUER, DEMO_KID, KeySet, Keys};
pub use verify::{Denied, LEEWAY};

use crate::problem::Problem;

/// The scope that may set stock levels.
pub const STOCK_WRITE: &str = "stock:write";
/// The scope of operators: every order, the histories, notifications, shopctl.
pub const OPS: &str = "ops";
/// The realm named in `WWW-Authenticate`.
const REALM: &str = "shop";

/// Who a request is from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// `AUTH_MODE=off`: anyone, allowed everything.
    Anyone,
    /// The holder of a valid token.
    Subject {
        subject: String,
        scopes: Vec<String>,
    },
}

impl Principal {
    /// The token's subject, for logs (`-` without authentication).
    pub fn subject(&self) -> &str {
        match self {
            Self::Anyone => "-",
            Self::Subject { subject, .. } => subject,
        }
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        match self {
            Self::Anyone => true,
            Self::Subject { scopes, .. } => scopes.iter().any(|s| s == scope),
        }
    }

    /// The one customer whose orders this principal may see: its subject,
    /// unless it is an operator (`ops`) or authentication is off (`None`: all).
    pub fn customer(&self) -> Option<&str> {
        match self {
            Self::Subject { subject, .. } if !self.has_scope(OPS) => Some(subject),
            _ => None,
        }
    }

    /// Ok when the principal has `scope`; otherwise a 403 naming the scope,
    /// logged as a denial.
    pub fn require(&self, scope: &str) -> Result<(), Problem> {
        if self.has_scope(scope) {
            return Ok(());
        }
        self.denied(&format!("lacks the scope {scope}"));
        Err(Problem::new(
            StatusCode::FORBIDDEN,
            format!("this needs a token with the scope {scope}"),
        )
        .with_challenge(format!(
            "Bearer realm=\"{REALM}\", error=\"insufficient_scope\", scope=\"{scope}\""
        )))
    }

    /// Logs a denial with the subject (the request span adds the trace id);
    /// never the token.
    pub fn denied(&self, reason: &str) {
        tracing::warn!(subject = self.subject(), reason, "request denied");
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        parts.extensions.get::<Self>().cloned().ok_or_else(|| {
            Problem::internal(
                &"a handler asked for the principal of a route without authentication",
            )
        })
    }
}

/// The service's authentication: its mode and, with tokens, the keys.
pub struct Auth {
    mode: Mode,
}

enum Mode {
    Off,
    Jwt { config: JwtConfig, keys: Box<Keys> },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.mode {
            Mode::Off => f.write_str("Auth(off)"),
            Mode::Jwt { keys, .. } => write!(f, "Auth(jwt, keys from {})", keys.source()),
        }
    }
}

/// Why the keys could not be loaded at startup (a file: the configuration is
/// wrong; a URL that does not answer is retried instead).
#[derive(Debug, thiserror::Error)]
#[error("AUTH_JWKS_FILE: {0}")]
pub struct KeysError(String);

impl Auth {
    /// Loads the keys once. A key file that cannot be used is an error; an
    /// issuer URL that does not answer is retried by [`Self::refresh_until`]
    /// (requests are answered 503 until the keys are in).
    pub async fn start(config: AuthConfig) -> Result<Arc<Self>, KeysError> {
        let mode = match config {
            AuthConfig::Off => {
                tracing::warn!(
                    "AUTH_MODE=off: requests are served without authentication; \
                     anyone who reaches this service may do anything"
                );
                Mode::Off
            }
            AuthConfig::Jwt(config) => {
                let keys = Box::new(Keys::new(config.keys.clone()));
                match (keys.refresh().await, &config.keys) {
                    (Ok(count), _) => {
                        tracing::info!(keys = count, source = %config.keys, "token signing keys loaded");
                    }
                    (Err(error), KeySource::File(_)) => return Err(KeysError(error)),
                    (Err(_), KeySource::Url(_)) => {}
                }
                Mode::Jwt { config, keys }
            }
        };
        Ok(Arc::new(Self { mode }))
    }

    pub fn is_on(&self) -> bool {
        matches!(self.mode, Mode::Jwt { .. })
    }

    /// Reloads the keys until `shutdown`: every few minutes, sooner after a
    /// failure.
    pub async fn refresh_until(self: Arc<Self>, shutdown: CancellationToken) {
        let Mode::Jwt { keys, .. } = &self.mode else {
            return;
        };
        let mut wait = if keys.current().is_some() {
            keys::REFRESH_EVERY
        } else {
            keys::RETRY_AFTER_FAILURE
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = match keys.refresh().await {
                Ok(_) => keys::REFRESH_EVERY,
                Err(_) => keys::RETRY_AFTER_FAILURE,
            };
        }
    }

    /// The `/readyz` line: reported, never critical.
    pub fn check(&self) -> (bool, String) {
        match &self.mode {
            Mode::Off => (
                true,
                "WARNING: AUTH_MODE=off: no authentication, anyone may do anything".into(),
            ),
            Mode::Jwt { keys, .. } => keys.describe(),
        }
    }

    /// `authorization`: the request's `Authorization` header, if any.
    async fn principal(&self, authorization: Option<HeaderValue>) -> Result<Principal, Denied> {
        match &self.mode {
            Mode::Off => Ok(Principal::Anyone),
            Mode::Jwt { config, keys } => {
                let value = match authorization.as_ref().map(HeaderValue::to_str) {
                    None => None,
                    Some(Ok(v)) => Some(v),
                    Some(Err(_)) => {
                        return Err(Denied::Invalid("malformed Authorization header".into()));
                    }
                };
                let token = verify::bearer(value)?;
                verify::verify(keys, config, token).await
            }
        }
    }
}

/// The middleware of every API route: puts the request's [`Principal`] in its
/// extensions, or answers 401 (503 while no key could be loaded yet).
pub async fn authenticate(
    State(auth): State<Arc<Auth>>,
    mut request: Request,
    next: Next,
) -> Response {
    let authorization = request.headers().get(header::AUTHORIZATION).cloned();
    match auth.principal(authorization).await {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(denied) => refusal(&denied).into_response(),
    }
}

fn refusal(denied: &Denied) -> Problem {
    match denied {
        Denied::Missing => {
            tracing::warn!(subject = "-", reason = "no bearer token", "request denied");
            Problem::new(StatusCode::UNAUTHORIZED, "this needs a bearer token")
                .with_challenge(format!("Bearer realm=\"{REALM}\""))
        }
        Denied::Invalid(reason) => {
            tracing::warn!(subject = "-", reason, "request denied");
            Problem::new(StatusCode::UNAUTHORIZED, format!("invalid token: {reason}"))
                .with_challenge(format!(
                    "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{reason}\""
                ))
        }
        Denied::NoKeys => {
            tracing::error!("a request could not be authenticated: no token signing keys");
            Problem::unavailable("the token signing keys are not available; try again")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(subject: &str, scopes: &[&str]) -> Principal {
        Principal::Subject {
            subject: subject.into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn a_customer_is_limited_to_itself_an_operator_and_anyone_are_not() {
        assert_eq!(token("ada", &[]).customer(), Some("ada"));
        assert_eq!(token("ada", &[STOCK_WRITE]).customer(), Some("ada"));
        assert_eq!(token("bob", &[OPS]).customer(), None);
        assert_eq!(Principal::Anyone.customer(), None);
    }

    #[test]
    fn scopes_are_whole_words() {
        let p = token("ada", &["stock:write:extra", "opsx"]);
        assert!(!p.has_scope(STOCK_WRITE));
        assert!(!p.has_scope(OPS));
        assert!(p.require(STOCK_WRITE).is_err());
        assert!(Principal::Anyone.require(STOCK_WRITE).is_ok());
    }
}
