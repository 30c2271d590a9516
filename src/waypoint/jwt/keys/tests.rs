//! Tests of [`KeySet`] beyond what the authenticator's table covers: ES512 tokens on P-521
//! keys (verified outside `jsonwebtoken`), the checks of a P-521 JWK, and RFC 7515's ES512
//! example.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use super::super::test_support::*;
use super::*;
use crate::model::policy::JwtRule;

// === ES512 (P-521), verified outside jsonwebtoken ===

/// A P-521 public JWK.
fn p521_jwk(key: &p521::ecdsa::SigningKey, kid: &str, alg: &str) -> Value {
    let point = p521::ecdsa::VerifyingKey::from(key).to_encoded_point(false);
    json!({
        "kty": "EC", "crv": "P-521", "kid": kid, "use": "sig", "alg": alg,
        "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()),
        "y": URL_SAFE_NO_PAD.encode(point.y().unwrap()),
    })
}

/// An ES512 token (RFC 7518 §3.4: SHA-512, the signature as r || s).
fn es512(key: &p521::ecdsa::SigningKey, kid: &str, claims: &Value) -> String {
    use p521::ecdsa::signature::Signer as _;
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(json!({"alg": "ES512", "typ": "JWT", "kid": kid}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig: p521::ecdsa::Signature = key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

#[tokio::test]
async fn es512_tokens_are_verified_with_p521_keys() {
    let key = p521::ecdsa::SigningKey::random(&mut rsa::rand_core::OsRng);
    let other = p521::ecdsa::SigningKey::random(&mut rsa::rand_core::OsRng);
    let k = keys();
    let set =
        json!({ "keys": [k.get(Algorithm::ES256).jwk.clone(), p521_jwk(&key, "p521", "ES512")] });
    let a = authn(vec![JwtRule {
        issuer: ISS.into(),
        jwks: Some(set.to_string()),
        ..Default::default()
    }]);
    let base = claims(ISS);
    let good = es512(&key, "p521", &base);
    let r = a.authenticate(&bearer(&good)).await;
    check(&r, &Expect::Valid(Some("https://issuer.example/alice"))).unwrap();
    // The other algorithms of the set still work beside it.
    assert!(valid(
        &a.authenticate(&bearer(&sign(k.get(Algorithm::ES256), &base)))
            .await
    ));
    for (name, token, why) in [
        (
            "tampered payload",
            tamper_payload(&good, &with(base.clone(), "sub", json!("mallory"))),
            "signature",
        ),
        (
            "another P-521 key",
            es512(&other, "p521", &base),
            "signature",
        ),
        (
            "no key with the kid",
            es512(&key, "elsewhere", &base),
            "no ES512 key with kid",
        ),
        (
            "short signature",
            format!("{}.c2ln", &good[..good.rfind('.').unwrap()]),
            "signature",
        ),
    ] {
        let r = a.authenticate(&bearer(&token)).await;
        check(&r, &Expect::Invalid(why))
            .map_err(|e| format!("{name}: {e}"))
            .unwrap();
    }
}

#[test]
fn p521_keys_are_checked_like_the_others() {
    let key = p521::ecdsa::SigningKey::random(&mut rsa::rand_core::OsRng);
    let mut long_x = p521_jwk(&key, "k", "ES512");
    long_x["x"] = json!(URL_SAFE_NO_PAD.encode([1u8; 67]));
    let mut short_x = p521_jwk(&key, "k", "ES512");
    short_x["x"] = json!(URL_SAFE_NO_PAD.encode([1u8; 32]));
    let mut off_curve = p521_jwk(&key, "k", "ES512");
    off_curve["y"] = json!(URL_SAFE_NO_PAD.encode([7u8; 66]));
    let mut enc = p521_jwk(&key, "k", "ES512");
    enc["use"] = json!("enc");
    for (jwk, why) in [
        (p521_jwk(&key, "k", "ES256"), "does not fit a P521 key"),
        (long_x, "at most 66"),
        // Left-padded to 66 bytes, then not on the curve.
        (short_x, "not a point on P-521"),
        (off_curve, "not a point on P-521"),
        (enc, "not a signature key"),
    ] {
        let err = KeySet::parse(&json!({ "keys": [jwk] }).to_string()).unwrap_err();
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
    // Without alg it is taken, as other keys are.
    let mut no_alg = p521_jwk(&key, "k", "ES512");
    no_alg.as_object_mut().unwrap().remove("alg");
    let set = KeySet::parse(&json!({ "keys": [no_alg] }).to_string()).unwrap();
    assert!(set.has_kid("k"));
}

#[test]
fn the_rfc_7515_es512_example_verifies() {
    // RFC 7515 Appendix A.4: a P-521 key and an ES512 JWS signed elsewhere, so signing and
    // verifying do not share this crate's encoding.
    let set = KeySet::parse(
        r#"{"keys":[{"kty":"EC","crv":"P-521",
        "x":"AekpBQ8ST8a8VcfVOTNl353vSrDCLLJXmPk06wTjxrrjcBpXp5EOnYG_NjFZ6OvLFV1jSfS9tsz4qUxcWceqwQGk",
        "y":"ADSmRA43Z1DSNx_RvcLI87cdL07l6jQyyBXMoxVg_l2Th-x3S1WDhjDly79ajL4Kkd0AZMaZmh9ubmf63e3kyMj2"}]}"#,
    )
    .unwrap();
    let input = b"eyJhbGciOiJFUzUxMiJ9.UGF5bG9hZA";
    let sig = "AdwMgeerwtHoh-l192l60hp9wAHZFVJbLfD_UxMi70cwnZOYaRI1bKPWROc-mZZqwqT2SI-KGDKB34XO0aw_7XdtAG8GaSwFKdCAPZgoXD2YBJZCPEX3xKpRwcdOO8KpEHwJjyqOgzDO7iKvU8vcnwNrmxYbSW9ERBXukOXolLzeO_Jn";
    let key = &set.keys[0].key;
    assert!(key.verifies(Alg::ES512, input, sig));
    // Its y starts with a zero byte: published as 65 bytes, it is the same key (left-padded,
    // as Envoy reads it).
    let y = B64URL
        .decode("ADSmRA43Z1DSNx_RvcLI87cdL07l6jQyyBXMoxVg_l2Th-x3S1WDhjDly79ajL4Kkd0AZMaZmh9ubmf63e3kyMj2")
        .unwrap();
    assert_eq!((y.len(), y[0]), (66, 0));
    let short = KeySet::parse(
        &json!({"keys": [{"kty": "EC", "crv": "P-521",
            "x": "AekpBQ8ST8a8VcfVOTNl353vSrDCLLJXmPk06wTjxrrjcBpXp5EOnYG_NjFZ6OvLFV1jSfS9tsz4qUxcWceqwQGk",
            "y": URL_SAFE_NO_PAD.encode(&y[1..])}]})
        .to_string(),
    )
    .unwrap();
    assert!(short.keys[0].key.verifies(Alg::ES512, input, sig));
    assert!(!key.verifies(Alg::ES512, b"eyJhbGciOiJFUzUxMiJ9.UGF5bG9hZB", sig));
    assert!(!key.verifies(Alg::Jws(Algorithm::ES384), input, sig));
}

// === Ed25519 key length ===

#[test]
fn an_ed25519_key_of_another_length_than_32_bytes_is_skipped_not_a_panic_later() {
    // Found by the `jwks` fuzz target (fuzz/regressions/jwks/): a 26-byte `x` parsed, and the
    // first EdDSA token checked against it panicked inside jsonwebtoken.
    for len in [0, 26, 31, 33, 64] {
        let text = json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(vec![7u8; len])},
        ]})
        .to_string();
        let e = KeySet::parse(&text).unwrap_err().to_string();
        assert!(e.contains(&format!("x has {len} bytes")), "{len}: {e}");
    }
    let good = ed_test_key("ed");
    let keys = KeySet::parse(&json!({"keys": [good.jwk]}).to_string()).unwrap();
    assert_eq!(keys.key_count(), 1);
}
