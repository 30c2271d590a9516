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

use super::token::{Alg, Token};
use super::B64URL;

// === impl KeySet ===

/// The type of a public key, as far as the algorithms care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    /// RSA, for `RS*` and `PS*`.
    Rsa,
    /// EC P-256, for `ES256`.
    P256,
    /// EC P-384, for `ES384`.
    P384,
    /// EC P-521, for `ES512`.
    P521,
    /// OKP Ed25519, for `EdDSA`.
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

/// Why a JWKS document yields no usable key (part of [`JwtError`](super::JwtError)'s text).
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The document is not UTF-8.
    #[error("{0}")]
    NotUtf8(#[from] std::str::Utf8Error),
    /// The document is not a JSON object with a `keys` list.
    #[error("not a JWKS: {0}")]
    NotAJwks(#[source] serde_json::Error),
    /// `keys` is empty.
    #[error("the key set is empty")]
    Empty,
    /// Every key was skipped.
    #[error("no usable signing key ({})", skipped_text(.skipped))]
    NoUsableKey {
        /// Each key, and why it was skipped.
        skipped: Vec<SkippedKey>,
    },
}

/// A key of a JWKS that cannot verify a signature.
#[derive(Debug, thiserror::Error)]
#[error("key {index}: {reason}")]
pub struct SkippedKey {
    /// Its position in `keys`.
    pub index: usize,
    /// Why it cannot be used.
    #[source]
    pub reason: KeyError,
}

/// The skipped keys as one line, `; `-separated.
fn skipped_text(skipped: &[SkippedKey]) -> String {
    skipped
        .iter()
        .map(SkippedKey::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why one JWK cannot verify a signature.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not a JWK `jsonwebtoken` can read.
    #[error("not a JWK: {0}")]
    NotAJwk(#[source] serde_json::Error),
    /// A member of a P-521 JWK that is not a string.
    #[error("not a JWK: {field} is not a string")]
    NotAString {
        /// The member.
        field: &'static str,
    },
    /// A member a P-521 JWK lacks.
    #[error("not a JWK: no {field}")]
    Missing {
        /// The member.
        field: &'static str,
    },
    /// `use` is not `sig`.
    #[error("not a signature key (use)")]
    NotForSignatures,
    /// `alg` names an algorithm weft does not verify.
    #[error("alg {alg:?} is not accepted")]
    AlgNotAccepted {
        /// The `alg`.
        alg: KeyAlgorithm,
    },
    /// `alg` does not fit the key's type.
    #[error("alg {alg:?} does not fit a {key_type:?} key")]
    AlgDoesNotFit {
        /// The `alg`.
        alg: Algorithm,
        /// The key's type.
        key_type: KeyType,
    },
    /// `alg` of a P-521 key is not `ES512`.
    #[error("alg {alg:?} does not fit a P521 key")]
    AlgDoesNotFitP521 {
        /// The `alg`, as written.
        alg: String,
    },
    /// An EC or OKP curve weft does not verify with.
    #[error("unsupported {kty} curve {curve:?}")]
    UnsupportedCurve {
        /// `EC` or `OKP`.
        kty: &'static str,
        /// The curve.
        curve: EllipticCurve,
    },
    /// An `oct` key: a secret, never in a public key set.
    #[error("symmetric (oct) keys are not accepted")]
    Symmetric,
    /// Key material `jsonwebtoken` refuses.
    #[error("bad key material: {0}")]
    Material(#[source] jsonwebtoken::errors::Error),
    /// A P-521 coordinate that is not base64url.
    #[error("bad key material: {field}: {source}")]
    CoordinateEncoding {
        /// `x` or `y`.
        field: &'static str,
        /// The decoding error.
        #[source]
        source: base64::DecodeError,
    },
    /// A P-521 coordinate longer than 66 bytes.
    #[error("bad key material: {field} has {len} bytes, P-521 takes at most 66")]
    CoordinateTooLong {
        /// `x` or `y`.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// An Ed25519 `x` that is not 32 bytes.
    #[error("bad key material: x has {len} bytes, an Ed25519 key takes 32")]
    Ed25519Length {
        /// Its length.
        len: usize,
    },
    /// `x`, `y` is not a point on P-521.
    #[error("bad key material: not a point on P-521")]
    NotOnCurve,
}

/// Why no key of a set verifies a token's signature.
#[derive(Debug, thiserror::Error)]
pub(super) enum SignatureError {
    #[error("no {alg:?} key with kid {kid:?}")]
    NoKeyWithKid { alg: Alg, kid: String },
    #[error("no {alg:?} key")]
    NoKey { alg: Alg },
    #[error("signature verification failed")]
    Mismatch,
}

impl KeySet {
    /// Parses a JWKS document, keeping the keys that can verify a signature. Keys of other
    /// kinds (symmetric, encryption, unknown curves) are skipped; a set with no usable key
    /// is an error.
    pub fn parse(text: &str) -> Result<KeySet, JwksError> {
        #[derive(Deserialize)]
        struct Doc {
            keys: Vec<Value>,
        }
        let doc: Doc = serde_json::from_str(text).map_err(JwksError::NotAJwks)?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, raw) in doc.keys.into_iter().enumerate() {
            match VerifyKey::from_json(raw) {
                Ok(k) => keys.push(k),
                Err(reason) => skipped.push(SkippedKey { index: i, reason }),
            }
        }
        if keys.is_empty() {
            return Err(if skipped.is_empty() {
                JwksError::Empty
            } else {
                JwksError::NoUsableKey { skipped }
            });
        }
        if !skipped.is_empty() {
            tracing::debug!(skipped = %skipped_text(&skipped), "JWKS: keys skipped");
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
    pub(super) fn verify(&self, token: &Token<'_>) -> Result<(), SignatureError> {
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
            (0, Some(kid)) => SignatureError::NoKeyWithKid {
                alg: token.alg,
                kid: kid.clone(),
            },
            (0, None) => SignatureError::NoKey { alg: token.alg },
            _ => SignatureError::Mismatch,
        })
    }
}

impl VerifyKey {
    fn from_json(raw: Value) -> Result<VerifyKey, KeyError> {
        if raw.get("kty").and_then(Value::as_str) == Some("EC")
            && raw.get("crv").and_then(Value::as_str) == Some("P-521")
        {
            return VerifyKey::p521_from_json(&raw);
        }
        let jwk: Jwk = serde_json::from_value(raw).map_err(KeyError::NotAJwk)?;
        if let Some(u) = &jwk.common.public_key_use {
            if *u != PublicKeyUse::Signature {
                return Err(KeyError::NotForSignatures);
            }
        }
        let alg = match &jwk.common.key_algorithm {
            None => None,
            Some(a) => Some(signature_alg(a).ok_or(KeyError::AlgNotAccepted { alg: *a })?),
        };
        let ty = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyType::Rsa,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => KeyType::P256,
                EllipticCurve::P384 => KeyType::P384,
                ref c => {
                    return Err(KeyError::UnsupportedCurve {
                        kty: "EC",
                        curve: c.clone(),
                    })
                }
            },
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => {
                    // RFC 8037 §2: `x` is the 32-byte public key. `jsonwebtoken` slices its
                    // first 32 bytes when verifying, which panicked on a shorter key (and
                    // ignored the rest of a longer one), so the length is checked here. A
                    // key that is not base64url is left for `DecodingKey::from_jwk` to refuse.
                    if let Ok(x) = B64URL.decode(&p.x) {
                        if x.len() != 32 {
                            return Err(KeyError::Ed25519Length { len: x.len() });
                        }
                    }
                    KeyType::Ed25519
                }
                ref c => {
                    return Err(KeyError::UnsupportedCurve {
                        kty: "OKP",
                        curve: c.clone(),
                    })
                }
            },
            AlgorithmParameters::OctetKey(_) => return Err(KeyError::Symmetric),
        };
        if let Some(a) = alg {
            if !ty.fits(Alg::Jws(a)) {
                return Err(KeyError::AlgDoesNotFit {
                    alg: a,
                    key_type: ty,
                });
            }
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(KeyError::Material)?;
        Ok(VerifyKey {
            kid: jwk.common.key_id,
            alg: alg.map(Alg::Jws),
            ty,
            key: KeyMaterial::Jws(key),
        })
    }

    /// An EC P-521 JWK (RFC 7518 §6.2.1), which `jsonwebtoken` cannot read: the same checks
    /// as the others (`use`, `alg`), and a point on the curve.
    fn p521_from_json(raw: &Value) -> Result<VerifyKey, KeyError> {
        let field = |name: &'static str| match raw.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(KeyError::NotAString { field: name }),
        };
        if field("use")?.is_some_and(|u| u != "sig") {
            return Err(KeyError::NotForSignatures);
        }
        let alg = match field("alg")? {
            None => None,
            Some("ES512") => Some(Alg::ES512),
            Some(a) => return Err(KeyError::AlgDoesNotFitP521 { alg: a.to_string() }),
        };
        // RFC 7518 wants 66 bytes; like Envoy, shorter ones (leading zeros dropped, as some
        // issuers publish them) are taken as the same number.
        let coordinate = |name: &'static str| -> Result<Vec<u8>, KeyError> {
            let text = field(name)?.ok_or(KeyError::Missing { field: name })?;
            let bytes = B64URL
                .decode(text)
                .map_err(|source| KeyError::CoordinateEncoding {
                    field: name,
                    source,
                })?;
            if bytes.len() > 66 {
                return Err(KeyError::CoordinateTooLong {
                    field: name,
                    len: bytes.len(),
                });
            }
            Ok([vec![0; 66 - bytes.len()], bytes].concat())
        };
        // SEC1 uncompressed point: 0x04 || x || y.
        let point = [&[4u8][..], &coordinate("x")?, &coordinate("y")?].concat();
        let key =
            p521::ecdsa::VerifyingKey::from_sec1_bytes(&point).map_err(|_| KeyError::NotOnCurve)?;
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
