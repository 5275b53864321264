//! What the authentication tests share: keys made at test time with the `openssl` CLI, tokens
//! minted with `jsonwebtoken`, JWKS documents, and requests that carry an `Authorization` header.
#![allow(dead_code, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

/// A directory of its own under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join("order-saga-tests").join(format!("keys-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the `openssl` CLI, panicking with its stderr if it fails; returns its stdout.
pub fn openssl(args: &[&str]) -> Vec<u8> {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("the openssl CLI is needed to make test keys: {e}"));
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

/// A key pair made by `openssl genpkey`: the PKCS#8 private key and the SPKI public key, as
/// PEM files in `dir` and as text.
pub struct KeyPair {
    pub private_path: PathBuf,
    pub public_path: PathBuf,
    pub private_pem: String,
    pub public_pem: String,
}

impl KeyPair {
    fn generate(dir: &Path, name: &str, genpkey: &[&str]) -> Self {
        let private_path = dir.join(format!("{name}.key.pem"));
        let public_path = dir.join(format!("{name}.pub.pem"));
        let private = private_path.to_str().unwrap();
        let public = public_path.to_str().unwrap();
        let mut args = vec!["genpkey"];
        args.extend_from_slice(genpkey);
        args.extend_from_slice(&["-out", private]);
        openssl(&args);
        openssl(&["pkey", "-in", private, "-pubout", "-out", public]);
        let private_pem = std::fs::read_to_string(&private_path).unwrap();
        let public_pem = std::fs::read_to_string(&public_path).unwrap();
        KeyPair { private_path, public_path, private_pem, public_pem }
    }

    /// A 2048-bit RSA key (RS256).
    pub fn rsa(dir: &Path, name: &str) -> Self {
        Self::generate(dir, name, &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
    }

    /// A P-256 key (ES256).
    pub fn ec(dir: &Path, name: &str) -> Self {
        Self::generate(dir, name, &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
    }

    pub fn rsa_encoding_key(&self) -> EncodingKey {
        EncodingKey::from_rsa_pem(self.private_pem.as_bytes()).expect("an RSA private key")
    }

    pub fn ec_encoding_key(&self) -> EncodingKey {
        EncodingKey::from_ec_pem(self.private_pem.as_bytes()).expect("a P-256 private key")
    }

    /// The public key as an RSA JWK (RFC 7518, 6.3): `n` from `openssl rsa -modulus`, `e` from
    /// its text form. `alg` is included only if given.
    pub fn rsa_jwk(&self, kid: &str, alg: Option<&str>) -> Value {
        let public = self.public_path.to_str().unwrap();
        let modulus = String::from_utf8(openssl(&["rsa", "-pubin", "-in", public, "-noout", "-modulus"])).unwrap();
        let hex = modulus.trim().strip_prefix("Modulus=").expect("openssl prints Modulus=HEX");
        let mut n = hex_bytes(hex);
        while n.first() == Some(&0) {
            n.remove(0);
        }
        let text = String::from_utf8(openssl(&["rsa", "-pubin", "-in", public, "-noout", "-text"])).unwrap();
        assert!(text.contains("Exponent: 65537 (0x10001)"), "openssl genpkey's RSA exponent: {text}");
        let mut jwk = json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64url(&n), "e": b64url(&[1, 0, 1])});
        if let Some(alg) = alg {
            jwk["alg"] = json!(alg);
        }
        jwk
    }

    /// The public key as a P-256 JWK (RFC 7518, 6.2): `x` and `y` are the two halves of the
    /// uncompressed point that ends the SPKI DER of a P-256 key.
    pub fn ec_jwk(&self, kid: &str, alg: Option<&str>) -> Value {
        let public = self.public_path.to_str().unwrap();
        let der = openssl(&["pkey", "-pubin", "-in", public, "-outform", "DER"]);
        assert_eq!(der.len(), 91, "the SPKI DER of a P-256 key is 91 bytes");
        let point = &der[26..];
        assert_eq!(point[0], 0x04, "an uncompressed point");
        let mut jwk = json!({
            "kty": "EC", "kid": kid, "use": "sig", "crv": "P-256",
            "x": b64url(&point[1..33]), "y": b64url(&point[33..65]),
        });
        if let Some(alg) = alg {
            jwk["alg"] = json!(alg);
        }
        jwk
    }
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "even hex: {hex}");
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect()
}

/// Base64url without padding (RFC 7515, 2).
pub fn b64url(bytes: &[u8]) -> String {
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

/// Seconds since the epoch.
pub fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Claims for `sub` with `scope`, valid for ten minutes, with no `iss` or `aud`.
pub fn claims(sub: &str, scope: &str) -> Value {
    json!({"sub": sub, "scope": scope, "iat": now(), "exp": now() + 600})
}

/// A token signed with `alg` by `key`, naming `kid` if given.
pub fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, key).expect("the token encodes")
}

/// An HS256 token signed with `secret`.
pub fn hs256(secret: &[u8], claims: &Value) -> String {
    sign(Algorithm::HS256, None, &EncodingKey::from_secret(secret), claims)
}

/// An unsecured JWT (RFC 7519, 6): `alg: none` and an empty signature.
pub fn alg_none(claims: &Value) -> String {
    let header = json!({"alg": "none", "typ": "JWT"});
    format!("{}.{}.", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()))
}

/// How a request authenticates.
#[derive(Debug, Clone)]
pub enum Auth {
    /// No `Authorization` header.
    Nothing,
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// `Authorization: <raw value>`.
    Raw(String),
}

impl Auth {
    pub fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Auth::Nothing => request,
            Auth::Bearer(token) => request.bearer_auth(token),
            Auth::Raw(value) => request.header("authorization", value),
        }
    }
}

/// A response header as a string, if present.
pub fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).map(|v| v.to_str().expect("an ASCII header").to_string())
}

/// Asserts an RFC 9457 problem answer with `status` and `code` and returns its body.
pub async fn problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    let got = response.status().as_u16();
    let content_type = header(&response, "content-type").unwrap_or_default();
    let text = response.text().await.expect("a readable body");
    assert_eq!(got, status, "expected {status} {code}; body: {text}");
    assert_eq!(content_type, "application/problem+json", "body: {text}");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("problem body is not JSON ({e}): {text}"));
    assert_eq!(body["status"], json!(status), "{body}");
    assert_eq!(body["code"], json!(code), "{body}");
    body
}

/// Asserts a JSON success answer with `status` and returns its body.
pub async fn success(response: reqwest::Response, status: u16) -> Value {
    let got = response.status().as_u16();
    let text = response.text().await.expect("a readable body");
    assert_eq!(got, status, "body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"))
}
