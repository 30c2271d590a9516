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
use std::sync::Arc;

use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::Value;

use super::B64URL;

/// A signature algorithm weft verifies: `jsonwebtoken`'s, and ES512, which it lacks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Alg {
    Jws(Algorithm),
    ES512,
}

impl std::fmt::Debug for Alg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Alg::Jws(a) => a.fmt(f),
            Alg::ES512 => f.write_str("ES512"),
        }
    }
}

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

/// The part of a token a decoding error is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Segment {
    Header,
    Payload,
}

impl std::fmt::Display for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Segment::Header => "header",
            Segment::Payload => "payload",
        })
    }
}

/// Why a token is refused before any key is tried. Its text is the reason logged (and shown
/// by the admin API) for [`AuthnResult::Invalid`](super::AuthnResult::Invalid).
#[derive(Clone, Debug, thiserror::Error)]
pub(super) enum TokenError {
    #[error("malformed token: not three dot-separated segments")]
    Segments,
    #[error("malformed token: empty header or payload")]
    EmptySegment,
    #[error("malformed token {segment}: {source}")]
    Base64 {
        segment: Segment,
        #[source]
        source: base64::DecodeError,
    },
    /// Shared, so the error of a token read at several locations can be reported by each.
    #[error("malformed token {segment}: {source}")]
    Json {
        segment: Segment,
        #[source]
        source: Arc<serde_json::Error>,
    },
    #[error("malformed token payload: not a JSON object")]
    PayloadNotAnObject,
    #[error("token header has no alg")]
    NoAlg,
    #[error("alg none is not accepted")]
    AlgNone,
    #[error("alg {alg} is not accepted: keys of a JWKS are public, HMAC keys are secrets")]
    Hmac { alg: String },
    #[error("unsupported alg {alg:?}")]
    UnsupportedAlg { alg: String },
    #[error("token has no signature")]
    NoSignature,
    #[error("token has no iss")]
    NoIssuer,
    /// `iss` or `sub`.
    #[error("token {claim} is not a string")]
    NotAString { claim: &'static str },
    #[error("token aud is not a string or list of strings")]
    Audience,
    /// `exp`, `nbf` or `iat`.
    #[error("token {claim} is not a non-negative integer")]
    NotATime { claim: &'static str },
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
    pub(super) fn parse(raw: &'a str) -> Result<Token<'a>, TokenError> {
        let mut parts = raw.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Segments);
        };
        if h.is_empty() || p.is_empty() {
            return Err(TokenError::EmptySegment);
        }
        let header: RawHeader = decode_json(h, Segment::Header)?;
        let alg = match header.alg.as_deref() {
            None => return Err(TokenError::NoAlg),
            Some("none") => return Err(TokenError::AlgNone),
            Some(a @ ("HS256" | "HS384" | "HS512")) => {
                return Err(TokenError::Hmac { alg: a.to_string() })
            }
            Some("ES512") => Alg::ES512,
            Some(a) => Alg::Jws(
                Algorithm::from_str(a)
                    .map_err(|_| TokenError::UnsupportedAlg { alg: a.to_string() })?,
            ),
        };
        if s.is_empty() {
            return Err(TokenError::NoSignature);
        }
        let payload: Value = decode_json(p, Segment::Payload)?;
        if !payload.is_object() {
            return Err(TokenError::PayloadNotAnObject);
        }
        let issuer = match payload.get("iss") {
            Some(Value::String(s)) => s.clone(),
            None => return Err(TokenError::NoIssuer),
            Some(_) => return Err(TokenError::NotAString { claim: "iss" }),
        };
        match payload.get("sub") {
            None | Some(Value::String(_)) => {}
            Some(_) => return Err(TokenError::NotAString { claim: "sub" }),
        }
        match payload.get("aud") {
            None | Some(Value::String(_)) => {}
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
            Some(_) => return Err(TokenError::Audience),
        }
        let time = |claim: &'static str| match payload.get(claim) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or(TokenError::NotATime { claim }),
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

/// One segment of a token: base64url (padded or not), then JSON.
fn decode_json<T: serde::de::DeserializeOwned>(
    text: &str,
    segment: Segment,
) -> Result<T, TokenError> {
    let bytes = B64URL
        .decode(text)
        .map_err(|source| TokenError::Base64 { segment, source })?;
    serde_json::from_slice(&bytes).map_err(|e| TokenError::Json {
        segment,
        source: Arc::new(e),
    })
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
