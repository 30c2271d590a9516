//! Client-side L7 helpers for tests of the in-binary waypoint: an ES256 signing key with its
//! JWK, tokens it signs, and one HTTP/1.1 request on a kept-alive connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// A P-256 key that signs tokens, and its public JWK.
pub struct SigningKey {
    enc: EncodingKey,
    /// The public key as a JWK (`kid`, `alg` ES256).
    pub jwk: serde_json::Value,
}

/// A fresh ES256 key named `kid`.
pub fn es256(kid: &str) -> SigningKey {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    SigningKey {
        enc: EncodingKey::from_ec_der(&kp.serialize_der()),
        jwk: serde_json::json!({"kty": "EC", "kid": kid, "crv": "P-256", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..])}),
    }
}

impl SigningKey {
    /// A token of `issuer` for subject `alice`, header `kid`, expiring `exp_offset` seconds
    /// from now (negative: already expired).
    pub fn token(&self, issuer: &str, kid: &str, exp_offset: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(
            &h,
            &serde_json::json!({"iss": issuer, "sub": "alice", "exp": now + exp_offset, "iat": now}),
            &self.enc,
        )
        .unwrap()
    }
}

/// One HTTP/1.1 request on a kept-alive connection; returns (status, body, connection kept).
pub fn send(s: &mut TcpStream, raw: &str) -> (u16, String, bool) {
    s.write_all(raw.as_bytes()).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut status_line = String::new();
    if r.read_line(&mut status_line).unwrap_or(0) == 0 {
        return (0, String::new(), false);
    }
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (mut len, mut close) = (0usize, false);
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if l == "connection: close" {
            close = true;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    (status, String::from_utf8_lossy(&body).into_owned(), !close)
}
