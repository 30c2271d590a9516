//! A token as it arrives: a compact JWS split, decoded, and its registered claims
//! type-checked, before any key is involved.
//!
//! Owns [`Token`]: what `jwt_verify_lib` checks before verifying (three segments, base64url
//! JSON objects, a supported `alg`, HMAC and `none` refused, `iss` present, `sub`, `aud`,
//! `exp`, `nbf`, `iat` well typed), and reading `aud` as a list.
//!
//! Must not touch: keys and signatures (`keys`), and what the claims must say to be accepted
//! by a rule (issuer, time, audiences: `authn`).

use std::str::FromStr;

use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::Value;

use super::keys::Alg;
use super::B64URL;

// === impl Token ===

/// A token split and decoded, not yet verified.
#[derive(Debug)]
pub(super) struct Token<'a> {
    pub(super) alg: Alg,
    pub(super) kid: Option<String>,
    /// `header.payload`, the signed bytes.
    pub(super) signing_input: &'a str,
    pub(super) signature: &'a str,
    pub(super) payload_b64: &'a str,
    pub(super) payload: Value,
    pub(super) issuer: String,
    pub(super) audiences: Vec<String>,
    pub(super) exp: Option<u64>,
    pub(super) nbf: Option<u64>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

impl<'a> Token<'a> {
    /// Splits and decodes a compact JWS, checking what `jwt_verify_lib` checks before any
    /// key is used: three segments, base64url JSON objects, a supported `alg`, well-typed
    /// registered claims.
    pub(super) fn parse(raw: &'a str) -> Result<Token<'a>, String> {
        let mut parts = raw.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("malformed token: not three dot-separated segments".to_string());
        };
        if h.is_empty() || p.is_empty() {
            return Err("malformed token: empty header or payload".to_string());
        }
        let header_bytes = B64URL
            .decode(h)
            .map_err(|e| format!("malformed token header: {e}"))?;
        let header: RawHeader = serde_json::from_slice(&header_bytes)
            .map_err(|e| format!("malformed token header: {e}"))?;
        let alg = match header.alg.as_deref() {
            None => return Err("token header has no alg".to_string()),
            Some("none") => return Err("alg none is not accepted".to_string()),
            Some(a @ ("HS256" | "HS384" | "HS512")) => {
                return Err(format!(
                    "alg {a} is not accepted: keys of a JWKS are public, HMAC keys are secrets"
                ))
            }
            Some("ES512") => Alg::ES512,
            Some(a) => {
                Alg::Jws(Algorithm::from_str(a).map_err(|_| format!("unsupported alg {a:?}"))?)
            }
        };
        if s.is_empty() {
            return Err("token has no signature".to_string());
        }
        let payload_bytes = B64URL
            .decode(p)
            .map_err(|e| format!("malformed token payload: {e}"))?;
        let payload: Value = serde_json::from_slice(&payload_bytes)
            .map_err(|e| format!("malformed token payload: {e}"))?;
        if !payload.is_object() {
            return Err("malformed token payload: not a JSON object".to_string());
        }
        let issuer = match payload.get("iss") {
            Some(Value::String(s)) => s.clone(),
            None => return Err("token has no iss".to_string()),
            Some(_) => return Err("token iss is not a string".to_string()),
        };
        match payload.get("sub") {
            None | Some(Value::String(_)) => {}
            Some(_) => return Err("token sub is not a string".to_string()),
        }
        match payload.get("aud") {
            None | Some(Value::String(_)) => {}
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
            Some(_) => return Err("token aud is not a string or list of strings".to_string()),
        }
        let time = |k: &str| match payload.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("token {k} is not a non-negative integer")),
        };
        let exp = time("exp")?;
        let nbf = time("nbf")?;
        time("iat")?;
        let audiences = audiences_of(&payload);
        Ok(Token {
            alg,
            kid: header.kid,
            signing_input: &raw[..h.len() + 1 + p.len()],
            signature: s,
            payload_b64: p,
            payload,
            issuer,
            audiences,
            exp,
            nbf,
        })
    }
}

/// `aud` as a list (a string is one audience).
pub(super) fn audiences_of(payload: &Value) -> Vec<String> {
    match payload.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}
