//! Public keys and signatures: a JWKS parsed into the keys that can verify a token, and the
//! verification itself.
//!
//! Owns [`KeySet`]: each JWK validated per key type (RSA, EC P-256/P-384/P-521, OKP Ed25519;
//! `use` and `alg` checked; symmetric and unknown keys skipped), which algorithm fits which
//! key ([`Alg`], [`KeyType`]), the key selection of `jwt_verify_lib` (`kid`, `alg`, type), and
//! signature verification: `jsonwebtoken`'s, and ES512 on P-521 with `p521`, which it lacks.
//!
//! Must not touch: where a key set comes from or when it is fetched (`jwks`), and the claims
//! of a token (`token`, `authn`).

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::Value;

use super::token::Token;
use super::B64URL;

// === impl KeySet ===

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

/// The type of a public key, as far as the algorithms care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyType {
    Rsa,
    P256,
    P384,
    P521,
    Ed25519,
}

impl KeyType {
    fn fits(self, alg: Alg) -> bool {
        use Algorithm::*;
        match alg {
            Alg::ES512 => self == KeyType::P521,
            Alg::Jws(RS256 | RS384 | RS512 | PS256 | PS384 | PS512) => self == KeyType::Rsa,
            Alg::Jws(ES256) => self == KeyType::P256,
            Alg::Jws(ES384) => self == KeyType::P384,
            Alg::Jws(EdDSA) => self == KeyType::Ed25519,
            Alg::Jws(HS256 | HS384 | HS512) => false,
        }
    }
}

/// One usable public key.
struct VerifyKey {
    kid: Option<String>,
    alg: Option<Alg>,
    ty: KeyType,
    key: KeyMaterial,
}

/// A public key as its verifier wants it.
enum KeyMaterial {
    Jws(DecodingKey),
    P521(Box<p521::ecdsa::VerifyingKey>),
}

impl KeyMaterial {
    /// Whether `signature` (base64url) is `alg`'s signature of `input` by this key.
    fn verifies(&self, alg: Alg, input: &[u8], signature: &str) -> bool {
        match (self, alg) {
            (KeyMaterial::Jws(key), Alg::Jws(alg)) => {
                jsonwebtoken::crypto::verify(signature, input, key, alg).unwrap_or(false)
            }
            (KeyMaterial::P521(key), Alg::ES512) => {
                use p521::ecdsa::signature::Verifier as _;
                // JWS: the fixed-size r || s (RFC 7518 §3.4), 2 × 66 bytes for P-521.
                B64URL
                    .decode(signature)
                    .ok()
                    .and_then(|raw| p521::ecdsa::Signature::from_slice(&raw).ok())
                    .is_some_and(|sig| key.verify(input, &sig).is_ok())
            }
            _ => false,
        }
    }
}

/// A parsed JWKS: its usable signing keys.
pub struct KeySet {
    keys: Vec<VerifyKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (&k.kid, k.alg, k.ty)))
            .finish()
    }
}

impl KeySet {
    /// Parses a JWKS document, keeping the keys that can verify a signature. Keys of other
    /// kinds (symmetric, encryption, unknown curves) are skipped; a set with no usable key
    /// is an error.
    pub fn parse(text: &str) -> Result<KeySet, String> {
        #[derive(Deserialize)]
        struct Doc {
            keys: Vec<Value>,
        }
        let doc: Doc = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, raw) in doc.keys.into_iter().enumerate() {
            match VerifyKey::from_json(raw) {
                Ok(k) => keys.push(k),
                Err(why) => skipped.push(format!("key {i}: {why}")),
            }
        }
        if keys.is_empty() {
            return Err(if skipped.is_empty() {
                "the key set is empty".to_string()
            } else {
                format!("no usable signing key ({})", skipped.join("; "))
            });
        }
        if !skipped.is_empty() {
            tracing::debug!(skipped = %skipped.join("; "), "JWKS: keys skipped");
        }
        Ok(KeySet { keys })
    }

    /// How many usable keys the set holds.
    pub(super) fn key_count(&self) -> usize {
        self.keys.len()
    }

    pub(super) fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// Tries every key that may have signed the token (`jwt_verify_lib`'s selection).
    pub(super) fn verify(&self, token: &Token<'_>) -> Result<(), String> {
        let mut tried = 0;
        for key in &self.keys {
            let kid_fits = match (&token.kid, &key.kid) {
                (Some(t), Some(k)) => t == k,
                _ => true,
            };
            if !kid_fits || key.alg.is_some_and(|a| a != token.alg) || !key.ty.fits(token.alg) {
                continue;
            }
            tried += 1;
            if key
                .key
                .verifies(token.alg, token.signing_input.as_bytes(), token.signature)
            {
                return Ok(());
            }
        }
        Err(match (tried, &token.kid) {
            (0, Some(kid)) => format!("no {:?} key with kid {kid:?}", token.alg),
            (0, None) => format!("no {:?} key", token.alg),
            _ => "signature verification failed".to_string(),
        })
    }
}

impl VerifyKey {
    fn from_json(raw: Value) -> Result<VerifyKey, String> {
        if raw.get("kty").and_then(Value::as_str) == Some("EC")
            && raw.get("crv").and_then(Value::as_str) == Some("P-521")
        {
            return VerifyKey::p521_from_json(&raw);
        }
        let jwk: Jwk = serde_json::from_value(raw).map_err(|e| format!("not a JWK: {e}"))?;
        if let Some(u) = &jwk.common.public_key_use {
            if *u != PublicKeyUse::Signature {
                return Err("not a signature key (use)".to_string());
            }
        }
        let alg = match &jwk.common.key_algorithm {
            None => None,
            Some(a) => Some(Alg::Jws(
                signature_alg(a).ok_or_else(|| format!("alg {a:?} is not accepted"))?,
            )),
        };
        let ty = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyType::Rsa,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => KeyType::P256,
                EllipticCurve::P384 => KeyType::P384,
                ref c => return Err(format!("unsupported EC curve {c:?}")),
            },
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => KeyType::Ed25519,
                ref c => return Err(format!("unsupported OKP curve {c:?}")),
            },
            AlgorithmParameters::OctetKey(_) => {
                return Err("symmetric (oct) keys are not accepted".to_string())
            }
        };
        if let Some(a) = alg {
            if !ty.fits(a) {
                return Err(format!("alg {a:?} does not fit a {ty:?} key"));
            }
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("bad key material: {e}"))?;
        Ok(VerifyKey {
            kid: jwk.common.key_id,
            alg,
            ty,
            key: KeyMaterial::Jws(key),
        })
    }

    /// An EC P-521 JWK (RFC 7518 §6.2.1), which `jsonwebtoken` cannot read: the same checks
    /// as the others (`use`, `alg`), and a point on the curve.
    fn p521_from_json(raw: &Value) -> Result<VerifyKey, String> {
        let field = |name: &str| match raw.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("not a JWK: {name} is not a string")),
        };
        if field("use")?.is_some_and(|u| u != "sig") {
            return Err("not a signature key (use)".to_string());
        }
        let alg = match field("alg")? {
            None => None,
            Some("ES512") => Some(Alg::ES512),
            Some(a) => return Err(format!("alg {a:?} does not fit a P521 key")),
        };
        // RFC 7518 wants 66 bytes; like Envoy, shorter ones (leading zeros dropped, as some
        // issuers publish them) are taken as the same number.
        let coordinate = |name: &str| -> Result<Vec<u8>, String> {
            let text = field(name)?.ok_or_else(|| format!("not a JWK: no {name}"))?;
            let bytes = B64URL
                .decode(text)
                .map_err(|e| format!("bad key material: {name}: {e}"))?;
            if bytes.len() > 66 {
                return Err(format!(
                    "bad key material: {name} has {} bytes, P-521 takes at most 66",
                    bytes.len()
                ));
            }
            Ok([vec![0; 66 - bytes.len()], bytes].concat())
        };
        // SEC1 uncompressed point: 0x04 || x || y.
        let point = [&[4u8][..], &coordinate("x")?, &coordinate("y")?].concat();
        let key = p521::ecdsa::VerifyingKey::from_sec1_bytes(&point)
            .map_err(|_| "bad key material: not a point on P-521".to_string())?;
        Ok(VerifyKey {
            kid: field("kid")?.map(str::to_string),
            alg,
            ty: KeyType::P521,
            key: KeyMaterial::P521(Box::new(key)),
        })
    }
}

/// The signature algorithm a JWK's `alg` names; `None` for anything weft does not verify.
fn signature_alg(a: &KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
