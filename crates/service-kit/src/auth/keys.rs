//! The issuer's public keys (a JWKS), read from a file or fetched from a URL,
//! cached and refreshed: every [`REFRESH_EVERY`], and on a token whose `kid` is
//! not known (a key rotated in) at most once per [`UNKNOWN_KID_PAUSE`].
//!
//! Only signature keys for RS256 (RSA, 2048 bits or more) and ES256 (P-256)
//! are taken; each key is bound to its one algorithm, so a token can never
//! choose how its key is used (the HS256-with-an-RSA-public-key confusion).
//! Symmetric keys and other algorithms are skipped with a warning.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse},
};

use super::config::KeySource;

/// How often the keys are read again while they load.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// How soon after a failed load the next is tried.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);
/// At most one reload for unknown key ids in this time.
pub const UNKNOWN_KID_PAUSE: Duration = Duration::from_secs(30);
/// A JWKS larger than this is refused.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// Smallest RSA modulus accepted, in bytes (2048 bits).
const MIN_RSA_BYTES: usize = 256;
/// Largest RSA modulus accepted, in bytes (4096 bits: the verifier refuses more).
const MAX_RSA_BYTES: usize = 512;
/// The public demo issuer (deploy/auth/README.md): its key's kid (trusting it
/// is worth a warning), its `iss` and `aud`.
pub const DEMO_KID: &str = "shop-demo-1";
pub const DEMO_ISSUER: &str = "shop-demo";
pub const DEMO_AUDIENCE: &str = "shop";

/// A usable key: its verifier and the one algorithm it is for.
#[derive(Debug)]
pub struct Key {
    pub decoding: DecodingKey,
    pub algorithm: Algorithm,
}

/// The keys of one load, by `kid`.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: HashMap<String, Key>,
}

impl KeySet {
    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The usable keys of a JWKS document, and why each other key was skipped.
    pub fn parse(text: &str) -> Result<(Self, Vec<String>), String> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let document: Document = serde_json::from_str(text)
            .map_err(|e| format!("not a JWKS document ({{\"keys\": [...]}}): {e}"))?;
        let mut set = Self::default();
        let mut skipped = Vec::new();
        for (i, raw) in document.keys.into_iter().enumerate() {
            match usable(raw) {
                Ok((kid, key)) => {
                    if set.keys.insert(kid.clone(), key).is_some() {
                        return Err(format!("kid '{kid}' appears twice"));
                    }
                }
                Err(reason) => skipped.push(format!("key {i}: {reason}")),
            }
        }
        Ok((set, skipped))
    }
}

fn usable(raw: serde_json::Value) -> Result<(String, Key), String> {
    let jwk: Jwk = serde_json::from_value(raw).map_err(|e| format!("not a JWK: {e}"))?;
    let kid = jwk
        .common
        .key_id
        .clone()
        .filter(|k| !k.is_empty())
        .ok_or("no kid")?;
    if let Some(usage) = &jwk.common.public_key_use
        && *usage != PublicKeyUse::Signature
    {
        return Err(format!("{kid}: not a signature key (use)"));
    }
    let algorithm = match (&jwk.algorithm, &jwk.common.key_algorithm) {
        (AlgorithmParameters::RSA(rsa), None | Some(KeyAlgorithm::RS256)) => {
            let modulus = base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                rsa.n.trim_end_matches('='),
            )
            .map_err(|_| format!("{kid}: modulus is not base64url"))?;
            let bits = modulus.iter().skip_while(|b| **b == 0).count();
            if bits < MIN_RSA_BYTES {
                return Err(format!("{kid}: RSA key shorter than 2048 bits"));
            }
            if bits > MAX_RSA_BYTES {
                return Err(format!("{kid}: RSA key longer than 4096 bits"));
            }
            Algorithm::RS256
        }
        (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
            if ec.curve == EllipticCurve::P256 =>
        {
            Algorithm::ES256
        }
        (AlgorithmParameters::OctetKey(_), _) => {
            return Err(format!("{kid}: symmetric keys are never accepted"));
        }
        _ => {
            return Err(format!(
                "{kid}: only RS256 and ES256 (P-256) keys are accepted"
            ));
        }
    };
    let decoding = DecodingKey::from_jwk(&jwk).map_err(|e| format!("{kid}: {e}"))?;
    Ok((
        kid,
        Key {
            decoding,
            algorithm,
        },
    ))
}

/// What the cache holds now.
#[derive(Debug, Default)]
struct State {
    set: Option<Arc<KeySet>>,
    loaded_at: Option<Instant>,
    /// The last load's failure, while it is the latest news.
    error: Option<String>,
    /// The last reload for an unknown kid.
    kid_reload: Option<Instant>,
}

/// The cached keys of one source.
#[derive(Debug)]
pub struct Keys {
    source: KeySource,
    http: reqwest::Client,
    state: RwLock<State>,
    /// One load at a time.
    loading: tokio::sync::Mutex<()>,
}

impl Keys {
    pub fn new(source: KeySource) -> Self {
        // A redirect could lead the fetch to keys of someone else's choosing.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self {
            source,
            http,
            state: RwLock::new(State::default()),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// The keys of the last successful load.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .set
            .clone()
    }

    /// Loads the keys again; on failure the previous keys stay in use.
    pub async fn refresh(&self) -> Result<usize, String> {
        let _one = self.loading.lock().await;
        let loaded = self.load().await;
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        match loaded {
            Ok((set, skipped)) => {
                for reason in &skipped {
                    tracing::warn!(source = %self.source, reason, "JWKS key skipped");
                }
                let count = set.len();
                if set.get(DEMO_KID).is_some() {
                    tracing::warn!(
                        source = %self.source,
                        "the JWKS holds the public DEMO key {DEMO_KID} (deploy/auth): anyone can mint tokens this service accepts"
                    );
                }
                state.set = Some(Arc::new(set));
                state.loaded_at = Some(Instant::now());
                state.error = None;
                Ok(count)
            }
            Err(error) => {
                tracing::warn!(source = %self.source, %error, "cannot load the token signing keys");
                state.error = Some(error.clone());
                Err(error)
            }
        }
    }

    /// Reloads for a `kid` not in the current set, unless that was done within
    /// [`UNKNOWN_KID_PAUSE`] (a flood of made-up kids must not hammer the issuer);
    /// then it waits for a load still running, so a request that arrives
    /// during the reload of a rotated key gets the new keys.
    pub async fn reload_for_unknown_kid(&self) -> Option<Arc<KeySet>> {
        let reload = {
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            let recent = state
                .kid_reload
                .is_some_and(|at| at.elapsed() < UNKNOWN_KID_PAUSE);
            if !recent {
                state.kid_reload = Some(Instant::now());
            }
            !recent
        };
        if reload {
            let _ = self.refresh().await;
        } else {
            drop(self.loading.lock().await);
        }
        self.current()
    }

    /// One line for `/readyz`: how many keys, from where, how old; or why none.
    pub fn describe(&self) -> (bool, String) {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        match (&state.set, &state.error) {
            (Some(set), error) => {
                let age = state.loaded_at.map_or(0, |at| at.elapsed().as_secs());
                let mut text = format!(
                    "{} signing key(s) from {}, loaded {age}s ago",
                    set.len(),
                    self.source
                );
                if set.get(DEMO_KID).is_some() {
                    text.push_str(&format!(
                        "; WARNING: the public DEMO key {DEMO_KID} is trusted (deploy/auth/README.md)"
                    ));
                }
                if let Some(error) = error {
                    text.push_str(&format!("; the last reload failed: {error}"));
                }
                (true, text)
            }
            (None, error) => (
                false,
                format!(
                    "no signing keys from {}: {}",
                    self.source,
                    error.as_deref().unwrap_or("not loaded yet")
                ),
            ),
        }
    }

    async fn load(&self) -> Result<(KeySet, Vec<String>), String> {
        let text = match &self.source {
            KeySource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|bytes| {
                    if bytes.len() > MAX_JWKS_BYTES {
                        Err(format!("{} is larger than 1 MiB", path.display()))
                    } else {
                        String::from_utf8(bytes)
                            .map_err(|_| format!("{} is not UTF-8", path.display()))
                    }
                })?,
            KeySource::Url(url) => {
                let response = self
                    .http
                    .get(url)
                    .send()
                    .await
                    .map_err(|e| format!("GET {}: {}", self.source, e.without_url()))?;
                if !response.status().is_success() {
                    return Err(format!("GET {}: {}", self.source, response.status()));
                }
                if response
                    .content_length()
                    .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
                {
                    return Err(format!("GET {}: larger than 1 MiB", self.source));
                }
                let bytes = response
                    .bytes()
                    .await
                    .map_err(|e| format!("GET {}: {}", self.source, e.without_url()))?;
                if bytes.len() > MAX_JWKS_BYTES {
                    return Err(format!("GET {}: larger than 1 MiB", self.source));
                }
                String::from_utf8(bytes.to_vec())
                    .map_err(|_| format!("GET {}: not UTF-8", self.source))?
            }
        };
        let (set, skipped) = KeySet::parse(&text)?;
        if set.is_empty() {
            return Err(format!(
                "no usable key (RS256 or ES256 with a kid){}",
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(": {}", skipped.join("; "))
                }
            ));
        }
        Ok((set, skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = include_str!("../../../../deploy/auth/demo-jwks.json");

    #[test]
    fn the_demo_key_is_an_rs256_key_and_other_kinds_are_skipped_with_a_reason() {
        let (set, skipped) = KeySet::parse(DEMO).expect("the demo JWKS");
        assert_eq!(set.len(), 1);
        assert_eq!(
            set.get(DEMO_KID).map(|k| k.algorithm),
            Some(Algorithm::RS256)
        );
        assert!(skipped.is_empty());

        let demo: serde_json::Value = serde_json::from_str(DEMO).expect("JSON");
        let rsa = demo["keys"][0].clone();
        let mut short = rsa.clone();
        short["kid"] = "short".into();
        short["n"] = "AQAB".into();
        let mut for_hs = rsa.clone();
        for_hs["kid"] = "hs".into();
        for_hs["alg"] = "HS256".into();
        let mut encryption = rsa.clone();
        encryption["kid"] = "enc".into();
        encryption["use"] = "enc".into();
        let mut no_kid = rsa.clone();
        no_kid.as_object_mut().expect("object").remove("kid");
        let document = serde_json::json!({"keys": [
            rsa,
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
            short, for_hs, encryption, no_kid,
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
        ]});
        let (set, skipped) = KeySet::parse(&document.to_string()).expect("parsed");
        assert_eq!(set.len(), 1, "{skipped:?}");
        let reasons = skipped.join("\n");
        for reason in [
            "symmetric keys are never accepted",
            "shorter than 2048 bits",
            "only RS256 and ES256",
            "not a signature key",
            "no kid",
        ] {
            assert!(reasons.contains(reason), "{reason} in {reasons}");
        }
        assert_eq!(skipped.len(), 6, "{reasons}");
    }

    #[test]
    fn a_kid_twice_or_no_keys_array_is_refused() {
        let demo: serde_json::Value = serde_json::from_str(DEMO).expect("JSON");
        let key = demo["keys"][0].clone();
        let twice = serde_json::json!({"keys": [key.clone(), key]});
        assert!(KeySet::parse(&twice.to_string()).is_err());
        assert!(KeySet::parse("{}").is_err());
        assert!(KeySet::parse("not json").is_err());
    }
}
