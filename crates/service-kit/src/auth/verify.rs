//! One bearer token checked: its header names an accepted algorithm and a
//! known key bound to that algorithm, the signature holds, and the claims say
//! who (`sub`), for whom (`aud`), from whom (`iss`), until when (`exp`, with
//! [`LEEWAY`] of clock skew) and what else it may do (`scope`, RFC 9068).

use jsonwebtoken::{Algorithm, Validation, errors::ErrorKind};
use serde::Deserialize;

use super::{Principal, config::JwtConfig, keys::Keys};

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY: u64 = 30;
/// Longest token taken (a header this long is an attack, not a token).
const MAX_TOKEN: usize = 8 * 1024;

/// Why a request is not authenticated.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token that does not pass; the reason is safe to show.
    Invalid(String),
    /// The service has no keys to check with (the issuer unreachable since
    /// startup): not the client's fault.
    NoKeys,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
}

/// The token of an `Authorization` header value: `Bearer <token>`, the scheme
/// in any case (RFC 9110).
pub fn bearer(value: Option<&str>) -> Result<&str, Denied> {
    let value = value.ok_or(Denied::Missing)?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Denied::Missing);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Denied::Invalid("empty bearer token".into()));
    }
    if token.len() > MAX_TOKEN {
        return Err(Denied::Invalid("token too long".into()));
    }
    Ok(token)
}

/// Checks `token` against `config` with the keys of `keys`.
pub async fn verify(keys: &Keys, config: &JwtConfig, token: &str) -> Result<Principal, Denied> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|_| Denied::Invalid("malformed token or unsupported algorithm".into()))?;
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
        return Err(Denied::Invalid(format!(
            "algorithm {:?} is not accepted (RS256 or ES256)",
            header.alg
        )));
    }
    let kid = header
        .kid
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Denied::Invalid("the token names no key (kid)".into()))?;
    // No keys yet: the background retry loads them, requests do not hammer
    // an issuer that does not answer. A kid not in the set: the issuer may
    // have rotated a key in; load again (at most once per UNKNOWN_KID_PAUSE).
    let mut set = keys.current().ok_or(Denied::NoKeys)?;
    if set.get(&kid).is_none() {
        set = keys.reload_for_unknown_kid().await.unwrap_or(set);
    }
    let key = set
        .get(&kid)
        .ok_or_else(|| Denied::Invalid("unknown signing key (kid)".into()))?;
    if key.algorithm != header.alg {
        return Err(Denied::Invalid(
            "the algorithm does not match the key's".into(),
        ));
    }
    let mut validation = Validation::new(key.algorithm);
    validation.leeway = LEEWAY;
    validation.validate_nbf = true;
    validation.set_issuer(&[&config.issuer]);
    validation.set_audience(&[&config.audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
        .map_err(|e| Denied::Invalid(reason(e.kind()).into()))?;
    let subject = data.claims.sub;
    // The subject is compared as it is (a customer's orders are its own):
    // white space around it or control characters would make one customer
    // two, so such a token is refused.
    if subject.is_empty() || subject.trim() != subject || subject.chars().any(char::is_control) {
        return Err(Denied::Invalid(
            "the subject (sub) is empty, padded with white space or not text".into(),
        ));
    }
    let scopes = data
        .claims
        .scope
        .unwrap_or_default()
        .split_ascii_whitespace()
        .map(str::to_owned)
        .collect();
    Ok(Principal::Subject { subject, scopes })
}

fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not valid yet (nbf)",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidSignature => "signature does not verify",
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "exp" => "no expiry (exp)",
            "iss" => "no issuer (iss)",
            "aud" => "no audience (aud)",
            "sub" => "no subject (sub)",
            _ => "a required claim is missing",
        },
        ErrorKind::InvalidAlgorithm => "the algorithm does not match the key's",
        ErrorKind::Json(_) | ErrorKind::Utf8(_) | ErrorKind::Base64(_) => "malformed token claims",
        _ => "invalid token",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_in_any_case() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Ok("abc"));
        assert_eq!(bearer(None), Err(Denied::Missing));
        assert_eq!(bearer(Some("Basic YTpi")), Err(Denied::Missing));
        assert!(matches!(bearer(Some("Bearer ")), Err(Denied::Invalid(_))));
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN + 1));
        assert!(matches!(bearer(Some(&long)), Err(Denied::Invalid(_))));
    }
}
