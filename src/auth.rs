//! Who is calling: bearer tokens (JWT, RFC 7519) verified against the configured keys into a
//! [`Principal`]. It knows nothing about HTTP; `http::access` decides what a principal may do.
//!
//! The keys come from one source: an HS256 secret, a PEM public key (RS256 or ES256), or a JWKS
//! file whose keys are chosen by `kid`, re-read by [`Verifier::reload`] (on SIGHUP) so that keys
//! can be rotated without a restart. Each key accepts exactly one algorithm, the one it was made
//! for, so that `alg: none` and HS/RS confusion (a public key used as an HMAC secret) fail.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// How much clock skew `exp` and `nbf` tolerate, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// The shortest HS256 secret accepted: RFC 7518 (3.2) asks for a key at least as long as the hash.
pub const MIN_SECRET_BYTES: usize = 32;

/// The longest `sub` accepted: a principal may stand for a customer, whose id is at most this.
pub const MAX_SUBJECT_CHARS: usize = crate::limits::CUSTOMER_ID_CHARS;

/// A secret setting (a key, a token): its `Debug` never shows it, so that a logged
/// configuration leaks nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares with `other` in time that does not depend on where they differ.
    pub fn matches(&self, other: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        if mine.len() != other.len() {
            return false;
        }
        mine.iter().zip(other).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Where the verification keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `AUTH_JWT_SECRET`: one HS256 secret.
    Secret(Secret),
    /// `AUTH_JWT_PUBLIC_KEY`: a PEM file holding one RSA (RS256) or P-256 (ES256) public key.
    PublicKey(PathBuf),
    /// `AUTH_JWT_JWKS`: a JWKS file; tokens name their key by `kid`.
    Jwks(PathBuf),
}

/// What a token must say besides its signature.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// The keys.
    pub source: KeySource,
    /// `AUTH_JWT_ISSUER`: the `iss` a token must carry, if set.
    pub issuer: Option<String>,
    /// `AUTH_JWT_AUDIENCE`: an `aud` a token must carry, if set.
    pub audience: Option<String>,
}

/// The keys could not be loaded: a startup error, or a reload that keeps the previous keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no key this service can use.
    #[error("{path}: {reason}")]
    Unusable {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HS256 secret is too short to be safe.
    #[error("AUTH_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes long (RFC 7518: as long as the hash)")]
    ShortSecret,
}

/// Why a token was refused. The HTTP answer never says which (so that it teaches an attacker
/// nothing); the log line at debug level does.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts with a known `alg`.
    #[error("malformed token: {0}")]
    Malformed(jsonwebtoken::errors::Error),
    /// No configured key has the token's `kid` (or it names none and several keys are loaded).
    #[error("no key for kid {0:?}")]
    UnknownKey(Option<String>),
    /// The signature, algorithm, or a registered claim (`exp`, `nbf`, `iss`, `aud`) failed.
    #[error("token refused: {0}")]
    Refused(jsonwebtoken::errors::Error),
    /// `sub` is missing, empty or too long.
    #[error("the token's sub must be 1 to {MAX_SUBJECT_CHARS} characters")]
    BadSubject,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `sub`: who it is; for a customer, the `customer_id` its orders carry.
    pub subject: String,
    /// The `orders` scope: a customer acting for `subject`.
    pub orders: bool,
    /// The `admin` scope: operators and the back office.
    pub admin: bool,
    /// When the token stops being accepted (`exp` plus the leeway), in seconds since the epoch:
    /// a stream it opened ends then.
    pub expires_at: u64,
}

/// The claims this service reads; the registered ones it checks are validated by jsonwebtoken.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Required and checked by the validation; read here for [`Principal::expires_at`].
    exp: Option<f64>,
    #[serde(default)]
    scope: Option<String>,
}

/// One verification key and the validation that goes with its algorithm.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

/// Verifies bearer tokens against the configured keys.
pub struct Verifier {
    settings: AuthSettings,
    keys: RwLock<Arc<Vec<Key>>>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl Verifier {
    /// Loads the keys of `settings`, refusing a configuration that cannot verify anything.
    pub fn load(settings: AuthSettings) -> Result<Self, KeyError> {
        let keys = load_keys(&settings)?;
        Ok(Self { settings, keys: RwLock::new(Arc::new(keys)) })
    }

    /// Re-reads the key files (a JWKS after a rotation); returns how many keys are now loaded.
    /// On error the previous keys stay in force.
    pub fn reload(&self) -> Result<usize, KeyError> {
        let keys = load_keys(&self.settings)?;
        let count = keys.len();
        *self.keys.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(keys);
        Ok(count)
    }

    /// The principal a token proves, or why it proves nothing.
    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(TokenError::Malformed)?;
        let keys = Arc::clone(&self.keys.read().unwrap_or_else(|poisoned| poisoned.into_inner()));
        let key = match (&header.kid, keys.as_slice()) {
            // A single key (a secret, a PEM file, a one-key JWKS) needs no kid; a kid given for
            // it must still match when the key has one.
            (_, [one]) if header.kid.is_none() || one.kid.is_none() || one.kid == header.kid => one,
            (Some(kid), keys) => keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| TokenError::UnknownKey(header.kid.clone()))?,
            (None, _) => return Err(TokenError::UnknownKey(None)),
        };
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation).map_err(TokenError::Refused)?;
        let subject = data.claims.sub.filter(|s| {
            let n = s.chars().count();
            (1..=MAX_SUBJECT_CHARS).contains(&n) && !s.chars().any(char::is_control)
        });
        let subject = subject.ok_or(TokenError::BadSubject)?;
        let scope = data.claims.scope.unwrap_or_default();
        let has = |name: &str| scope.split(' ').any(|s| s == name);
        let expires_at = data.claims.exp.map_or(0, |exp| exp.max(0.0) as u64).saturating_add(LEEWAY_SECS);
        Ok(Principal { subject, orders: has("orders"), admin: has("admin"), expires_at })
    }
}

/// The validation of tokens signed with `alg`: only that algorithm, `exp` required, `nbf`
/// honoured, both with [`LEEWAY_SECS`]; `iss` and `aud` when configured.
fn validation(alg: Algorithm, settings: &AuthSettings) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = LEEWAY_SECS;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp"]);
    if let Some(issuer) = &settings.issuer {
        validation.set_issuer(&[issuer]);
    }
    match &settings.audience {
        Some(audience) => validation.set_audience(&[audience]),
        // With no audience configured, a token's `aud` is not this service's concern.
        None => validation.validate_aud = false,
    }
    validation
}

fn load_keys(settings: &AuthSettings) -> Result<Vec<Key>, KeyError> {
    let key = |kid, alg, key| Key { kid, key, validation: validation(alg, settings) };
    match &settings.source {
        KeySource::Secret(secret) => {
            if secret.expose().len() < MIN_SECRET_BYTES {
                return Err(KeyError::ShortSecret);
            }
            Ok(vec![key(None, Algorithm::HS256, DecodingKey::from_secret(secret.expose().as_bytes()))])
        }
        KeySource::PublicKey(path) => {
            let pem = read(path)?;
            let (alg, decoding) = if let Ok(rsa) = DecodingKey::from_rsa_pem(&pem) {
                (Algorithm::RS256, rsa)
            } else if let Ok(ec) = DecodingKey::from_ec_pem(&pem) {
                (Algorithm::ES256, ec)
            } else {
                return Err(unusable(path, "not a PEM RSA or EC (P-256) public key"));
            };
            Ok(vec![key(None, alg, decoding)])
        }
        KeySource::Jwks(path) => {
            let text = read(path)?;
            let set: JwkSet =
                serde_json::from_slice(&text).map_err(|e| unusable(path, format!("not a JWKS document: {e}")))?;
            let mut keys = Vec::new();
            for (i, jwk) in set.keys.iter().enumerate() {
                let kid = jwk.common.key_id.clone();
                let Some(kid) = kid.filter(|k| !k.is_empty()) else {
                    return Err(unusable(path, format!("key {i} has no kid; tokens choose keys by kid")));
                };
                let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                    (_, Some(declared)) => Algorithm::from_str(&declared.to_string())
                        .map_err(|_| unusable(path, format!("key {kid:?}: algorithm {declared:?} is not supported")))?,
                    (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
                    (AlgorithmParameters::EllipticCurve(ec), None) if ec.curve == EllipticCurve::P256 => {
                        Algorithm::ES256
                    }
                    (AlgorithmParameters::EllipticCurve(ec), None) if ec.curve == EllipticCurve::P384 => {
                        Algorithm::ES384
                    }
                    (AlgorithmParameters::OctetKeyPair(_), None) => Algorithm::EdDSA,
                    _ => return Err(unusable(path, format!("key {kid:?}: say its alg"))),
                };
                // A declared alg of another family (an RSA key marked ES256) would refuse every
                // token; say so at load rather than at the first request.
                let fits = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => matches!(
                        alg,
                        Algorithm::RS256
                            | Algorithm::RS384
                            | Algorithm::RS512
                            | Algorithm::PS256
                            | Algorithm::PS384
                            | Algorithm::PS512
                    ),
                    AlgorithmParameters::EllipticCurve(_) => matches!(alg, Algorithm::ES256 | Algorithm::ES384),
                    AlgorithmParameters::OctetKeyPair(_) => alg == Algorithm::EdDSA,
                    AlgorithmParameters::OctetKey(_) => {
                        matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
                    }
                };
                if !fits {
                    return Err(unusable(path, format!("key {kid:?}: alg {alg:?} does not fit the key's type")));
                }
                let decoding = DecodingKey::from_jwk(jwk).map_err(|e| unusable(path, format!("key {kid:?}: {e}")))?;
                keys.push(key(Some(kid), alg, decoding));
            }
            if keys.is_empty() {
                return Err(unusable(path, "the JWKS holds no key"));
            }
            Ok(keys)
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read { path: path.display().to_string(), source })
}

fn unusable(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError::Unusable { path: path.display().to_string(), reason: reason.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn verifier() -> Verifier {
        let settings = AuthSettings {
            source: KeySource::Secret(SECRET.parse().unwrap()),
            issuer: Some("https://issuer.example".into()),
            audience: Some("order-saga".into()),
        };
        Verifier::load(settings).unwrap()
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn token(claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    }

    fn good() -> serde_json::Value {
        json!({"sub": "alice", "scope": "orders", "exp": now() + 600, "iss": "https://issuer.example", "aud": "order-saga"})
    }

    #[test]
    fn a_good_token_names_its_principal_and_scopes() {
        let claims = good();
        let p = verifier().verify(&token(claims.clone())).unwrap();
        let expires_at = claims["exp"].as_u64().unwrap() + LEEWAY_SECS;
        assert_eq!(p, Principal { subject: "alice".into(), orders: true, admin: false, expires_at });
        let mut both = good();
        both["scope"] = json!("admin orders");
        assert!(verifier().verify(&token(both)).unwrap().admin);
    }

    #[test]
    fn registered_claims_are_checked_with_leeway() {
        let v = verifier();
        let mut c = good();
        c["exp"] = json!(now() - 10);
        assert!(v.verify(&token(c.clone())).is_ok(), "10 s past exp is within the leeway");
        c["exp"] = json!(now() - 120);
        assert!(matches!(v.verify(&token(c)), Err(TokenError::Refused(_))));
        let mut c = good();
        c.as_object_mut().unwrap().remove("exp");
        assert!(matches!(v.verify(&token(c)), Err(TokenError::Refused(_))), "exp is required");
        let mut c = good();
        c["nbf"] = json!(now() + 120);
        assert!(matches!(v.verify(&token(c)), Err(TokenError::Refused(_))));
        for (claim, value) in [("iss", "https://other.example"), ("aud", "another-service")] {
            let mut c = good();
            c[claim] = json!(value);
            assert!(matches!(v.verify(&token(c)), Err(TokenError::Refused(_))), "{claim}");
        }
        let mut c = good();
        c["sub"] = json!("");
        assert!(matches!(v.verify(&token(c)), Err(TokenError::BadSubject)));
    }

    #[test]
    fn alg_none_and_a_wrong_secret_are_refused() {
        let v = verifier();
        let b64 = |v: &serde_json::Value| base64url(v.to_string().as_bytes());
        let none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&good()));
        assert!(matches!(v.verify(&none), Err(TokenError::Malformed(_))));
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &good(),
            &EncodingKey::from_secret(b"not-the-secret-not-the-secret!!"),
        )
        .unwrap();
        assert!(matches!(v.verify(&forged), Err(TokenError::Refused(_))));
    }

    #[test]
    fn short_secrets_are_refused_and_secrets_never_print() {
        let settings =
            AuthSettings { source: KeySource::Secret("short".parse().unwrap()), issuer: None, audience: None };
        assert!(matches!(Verifier::load(settings.clone()), Err(KeyError::ShortSecret)));
        assert!(!format!("{settings:?}").contains("short"));
    }

    #[test]
    fn a_jwks_key_whose_alg_does_not_fit_its_type_is_refused_at_load() {
        let dir = std::env::temp_dir().join(format!("order-saga-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.json");
        let oct =
            |alg: &str| json!({"keys": [{"kty": "oct", "kid": "k", "alg": alg, "k": base64url(SECRET.as_bytes())}]});
        std::fs::write(&path, oct("HS256").to_string()).unwrap();
        let load =
            || Verifier::load(AuthSettings { source: KeySource::Jwks(path.clone()), issuer: None, audience: None });
        assert!(load().is_ok());
        std::fs::write(&path, oct("ES256").to_string()).unwrap();
        let error = load().unwrap_err().to_string();
        assert!(error.contains("does not fit"), "{error}");
        std::fs::remove_dir_all(&dir).ok();
    }

    fn base64url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
