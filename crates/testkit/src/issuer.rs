//! A token issuer of a test's own: an ES256 key made for the test plus the
//! demo RSA key of `deploy/auth`, published as a JWKS file the services read
//! (`AUTH_JWKS_FILE`), and tokens signed with either — or forged, expired,
//! for another audience, with an unknown key — to prove what is refused.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The demo key pair (deploy/auth): RS256, kid `shop-demo-1`.
pub const DEMO_SIGNING_KEY: &str = include_str!("../../../deploy/auth/demo-signing-key.pem");
pub const DEMO_PUBLIC_KEY: &str = include_str!("../../../deploy/auth/demo-public-key.pem");
pub const DEMO_JWKS: &str = include_str!("../../../deploy/auth/demo-jwks.json");
pub const DEMO_KID: &str = "shop-demo-1";
/// What the demo configuration (compose, k8s, `shopctl token`) expects.
pub const DEMO_ISSUER: &str = "shop-demo";
pub const DEMO_AUDIENCE: &str = "shop";

/// One ES256 key pair made with `rcgen`.
struct EcKey {
    kid: String,
    /// PKCS#8 DER of the private key.
    private: Vec<u8>,
    /// Its public JWK.
    jwk: Value,
}

impl EcKey {
    fn generate() -> Self {
        let pair =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a P-256 key pair");
        // Uncompressed point: 0x04 ‖ x ‖ y.
        let point = pair.public_key_raw();
        assert_eq!(point.len(), 65, "an uncompressed P-256 point");
        let kid = crate::unique("es256");
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..]),
        });
        Self {
            kid,
            private: pair.serialize_der(),
            jwk,
        }
    }
}

/// The issuer: its JWKS file (removed on drop) and the keys to sign with.
pub struct Issuer {
    pub issuer: String,
    pub audience: String,
    dir: PathBuf,
    jwks: PathBuf,
    key: EcKey,
    /// A key the JWKS does not hold.
    stranger: EcKey,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Issuer({})", self.jwks.display())
    }
}

impl Default for Issuer {
    fn default() -> Self {
        Self::new()
    }
}

impl Issuer {
    /// A fresh ES256 key and the demo RSA key in a JWKS file; the demo issuer
    /// and audience.
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(crate::unique("issuer"));
        std::fs::create_dir_all(&dir).expect("issuer directory");
        let key = EcKey::generate();
        let mut jwks: Value = serde_json::from_str(DEMO_JWKS).expect("the demo JWKS");
        jwks["keys"]
            .as_array_mut()
            .expect("keys")
            .push(key.jwk.clone());
        let path = dir.join("jwks.json");
        std::fs::write(&path, jwks.to_string()).expect("write the JWKS");
        Self {
            issuer: DEMO_ISSUER.to_owned(),
            audience: DEMO_AUDIENCE.to_owned(),
            dir,
            jwks: path,
            key,
            stranger: EcKey::generate(),
        }
    }

    pub fn jwks_file(&self) -> &Path {
        &self.jwks
    }

    /// The variables a service needs to accept this issuer's tokens.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AUTH_MODE".into(), "jwt".into()),
            ("AUTH_JWKS_FILE".into(), self.jwks.display().to_string()),
            ("AUTH_ISSUER".into(), self.issuer.clone()),
            ("AUTH_AUDIENCE".into(), self.audience.clone()),
        ]
    }

    /// Claims valid for an hour: `sub`, the scopes, this issuer and audience.
    pub fn claims(&self, subject: &str, scopes: &[&str]) -> Value {
        let now = now();
        json!({
            "iss": self.issuer, "aud": self.audience, "sub": subject,
            "iat": now, "exp": now + 3600, "scope": scopes.join(" "),
        })
    }

    /// A valid ES256 token for `subject` with `scopes`.
    pub fn token(&self, subject: &str, scopes: &[&str]) -> String {
        self.sign_es256(&self.claims(subject, scopes))
    }

    /// `claims` signed with the issuer's ES256 key.
    pub fn sign_es256(&self, claims: &Value) -> String {
        sign(&self.key, claims)
    }

    /// The kid of the issuer's ES256 key.
    pub fn es256_kid(&self) -> &str {
        &self.key.kid
    }

    /// `claims` signed with the demo RSA key (RS256, in the JWKS).
    pub fn sign_rs256(&self, claims: &Value) -> String {
        self.sign_rs256_as(DEMO_KID, claims)
    }

    /// `claims` signed with the demo RSA key under `kid` (another key's kid:
    /// an algorithm that is not the named key's).
    pub fn sign_rs256_as(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        let key = EncodingKey::from_rsa_pem(DEMO_SIGNING_KEY.as_bytes()).expect("the demo key");
        jsonwebtoken::encode(&header, claims, &key).expect("sign")
    }

    /// `claims` signed with a key the JWKS does not hold, under its own kid.
    pub fn sign_unknown_kid(&self, claims: &Value) -> String {
        sign(&self.stranger, claims)
    }

    /// `claims` signed with a key the JWKS does not hold, under the kid of
    /// the issuer's key: a forged signature.
    pub fn forge(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key.kid.clone());
        let key = EncodingKey::from_ec_der(&self.stranger.private);
        jsonwebtoken::encode(&header, claims, &key).expect("sign")
    }

    /// `alg: none`: the claims with no signature at all.
    pub fn unsigned(&self, claims: &Value) -> String {
        let header = json!({"alg": "none", "typ": "JWT", "kid": self.key.kid});
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    /// HS256 keyed with the demo RSA *public* key under its kid: the
    /// algorithm-confusion attack on verifiers that let the token pick.
    pub fn hs256_with_public_key(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(DEMO_KID.to_owned());
        let key = EncodingKey::from_secret(DEMO_PUBLIC_KEY.as_bytes());
        jsonwebtoken::encode(&header, claims, &key).expect("sign")
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sign(key: &EcKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    let encoding = EncodingKey::from_ec_der(&key.private);
    jsonwebtoken::encode(&header, claims, &encoding).expect("sign")
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
