//! Tests of RequestAuthentication with real keys: RSA from the `rsa` crate, EC and Ed25519
//! from rcgen/ring, tokens signed by `jsonwebtoken`, JWKS served over HTTPS on loopback.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::traits::PublicKeyParts;
use serde_json::json;

use super::*;
use crate::model::policy::{ClaimToHeader, JwtHeader, RequestAuthenticationSpec};

// === keys ===

/// A signing key and its public JWK.
struct TestKey {
    alg: Algorithm,
    kid: String,
    enc: EncodingKey,
    jwk: Value,
}

fn rsa_key() -> &'static rsa::RsaPrivateKey {
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap())
}

fn rsa_test_key(alg: Algorithm, kid: &str) -> TestKey {
    let key = rsa_key();
    let der = key.to_pkcs1_der().unwrap();
    TestKey {
        alg,
        kid: kid.to_string(),
        enc: EncodingKey::from_rsa_der(der.as_bytes()),
        jwk: json!({
            "kty": "RSA", "kid": kid, "use": "sig",
            "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
        }),
    }
}

fn ec_test_key(alg: Algorithm, kid: &str) -> TestKey {
    let (sig_alg, crv, len) = match alg {
        Algorithm::ES256 => (&rcgen::PKCS_ECDSA_P256_SHA256, "P-256", 32),
        Algorithm::ES384 => (&rcgen::PKCS_ECDSA_P384_SHA384, "P-384", 48),
        _ => unreachable!(),
    };
    let kp = rcgen::KeyPair::generate_for(sig_alg).unwrap();
    let raw = kp.public_key_raw();
    assert_eq!(raw.len(), 1 + 2 * len);
    TestKey {
        alg,
        kid: kid.to_string(),
        enc: EncodingKey::from_ec_der(&kp.serialize_der()),
        jwk: json!({
            "kty": "EC", "kid": kid, "crv": crv, "alg": format!("{alg:?}"),
            "x": URL_SAFE_NO_PAD.encode(&raw[1..1 + len]),
            "y": URL_SAFE_NO_PAD.encode(&raw[1 + len..]),
        }),
    }
}

fn ed_test_key(kid: &str) -> TestKey {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    TestKey {
        alg: Algorithm::EdDSA,
        kid: kid.to_string(),
        enc: EncodingKey::from_ed_der(&kp.serialize_der()),
        jwk: json!({
            "kty": "OKP", "kid": kid, "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(kp.public_key_raw()),
        }),
    }
}

/// One key per algorithm, kid = the algorithm's name.
struct Keys {
    all: Vec<TestKey>,
}

impl Keys {
    fn get(&self, alg: Algorithm) -> &TestKey {
        self.all.iter().find(|k| k.alg == alg).unwrap()
    }
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        use Algorithm::*;
        let mut all: Vec<TestKey> = [RS256, RS384, RS512, PS256, PS384, PS512]
            .into_iter()
            .map(|a| rsa_test_key(a, &format!("{a:?}")))
            .collect();
        all.push(ec_test_key(ES256, "ES256"));
        all.push(ec_test_key(ES384, "ES384"));
        all.push(ed_test_key("EdDSA"));
        Keys { all }
    })
}

fn jwks_of(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

fn inline_jwks() -> String {
    jwks_of(&keys().all.iter().collect::<Vec<_>>())
}

fn sign(key: &TestKey, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.enc).unwrap()
}

fn now() -> i64 {
    unix_now() as i64
}

const ISS: &str = "https://issuer.example";
const ISS_B: &str = "issuer-b@example.com";

fn claims(iss: &str) -> Value {
    json!({ "iss": iss, "sub": "alice", "exp": now() + 600, "iat": now(), "aud": "svc.example" })
}

fn with(mut claims: Value, k: &str, v: Value) -> Value {
    claims[k] = v;
    claims
}

fn rs256(claims: &Value) -> String {
    sign(keys().get(Algorithm::RS256), claims)
}

// === rules and requests ===

fn rule(issuer: &str) -> JwtRule {
    JwtRule {
        issuer: issuer.to_string(),
        jwks: Some(inline_jwks()),
        ..Default::default()
    }
}

fn cache() -> Arc<JwksCache> {
    Arc::new(
        JwksCache::new(JwksConfig {
            system_roots: false,
            ..Default::default()
        })
        .unwrap(),
    )
}

fn authn(rules: Vec<JwtRule>) -> JwtAuthenticator {
    JwtAuthenticator::new(rules, cache()).unwrap()
}

fn request(uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::get(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn bearer(token: &str) -> Parts {
    request("/", &[("authorization", &format!("Bearer {token}"))])
}

#[derive(Debug)]
enum Expect {
    NoToken,
    /// Valid, with this principal (`None`: no `sub`).
    Valid(Option<&'static str>),
    /// Invalid, the reason containing this text.
    Invalid(&'static str),
}

fn check(result: &AuthnResult, expect: &Expect) -> Result<(), String> {
    match (result, expect) {
        (AuthnResult::NoToken, Expect::NoToken) => Ok(()),
        (AuthnResult::Valid(c), Expect::Valid(p)) if c.principal.as_deref() == *p => Ok(()),
        (AuthnResult::Invalid(r), Expect::Invalid(s)) if r.contains(s) => Ok(()),
        _ => Err(format!("expected {expect:?}, got {result:?}")),
    }
}

fn tamper_payload(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

fn unsigned(header: &Value, claims: &Value, sig: &str) -> String {
    format!(
        "{}.{}.{sig}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// One table case: the rules, the request, what must come out.
struct Case {
    name: &'static str,
    rules: Vec<JwtRule>,
    req: Parts,
    expect: Expect,
}

fn case(name: &'static str, rules: Vec<JwtRule>, req: Parts, expect: Expect) -> Case {
    Case {
        name,
        rules,
        req,
        expect,
    }
}

fn cases() -> Vec<Case> {
    use Algorithm::*;
    use Expect::*;
    let k = keys();
    let base = claims(ISS);
    let one = || vec![rule(ISS)];
    let mut out = Vec::new();
    for (name, alg) in [
        ("rs256_token_is_valid", RS256),
        ("rs384_token_is_valid", RS384),
        ("rs512_token_is_valid", RS512),
        ("ps256_token_is_valid", PS256),
        ("ps384_token_is_valid", PS384),
        ("ps512_token_is_valid", PS512),
        ("es256_token_is_valid", ES256),
        ("es384_token_is_valid", ES384),
        ("eddsa_token_is_valid", EdDSA),
    ] {
        out.push(case(
            name,
            one(),
            bearer(&sign(k.get(alg), &base)),
            Valid(Some("https://issuer.example/alice")),
        ));
    }
    let mut aud_rule = rule(ISS);
    aud_rule.audiences = vec!["other.example".into(), "svc.example".into()];
    let mut aud_url_rule = rule(ISS);
    aud_url_rule.audiences = vec!["https://svc.example/".into()];
    let mut header_rule = rule(ISS);
    header_rule.from_headers = vec![JwtHeader {
        name: "x-jwt-assertion".into(),
        prefix: Some("Token ".into()),
    }];
    let mut param_rule = rule(ISS);
    param_rule.from_params = vec!["my_token".into()];
    let mut cookie_rule = rule(ISS);
    cookie_rule.from_cookies = vec!["session".into()];
    let mut two_locations = rule(ISS);
    two_locations.from_headers = vec![
        JwtHeader {
            name: "authorization".into(),
            prefix: Some("Bearer ".into()),
        },
        JwtHeader {
            name: "x-jwt".into(),
            prefix: None,
        },
    ];
    let mut b_on_x = rule(ISS_B);
    b_on_x.from_headers = vec![JwtHeader {
        name: "x-jwt-b".into(),
        prefix: None,
    }];
    let tok_b = rs256(&claims(ISS_B));
    let hs_with_rsa_pub = {
        let pub_pem = rsa_key()
            .to_public_key()
            .to_pkcs1_pem(Default::default())
            .unwrap();
        let mut h = Header::new(HS256);
        h.kid = Some("RS256".into());
        jsonwebtoken::encode(&h, &base, &EncodingKey::from_secret(pub_pem.as_bytes())).unwrap()
    };
    let valid = rs256(&base);
    let mut wrong_sig = valid.clone();
    wrong_sig.truncate(valid.len() - 4);
    wrong_sig.push_str("AAAA");

    out.extend([
        case(
            "token_expired_beyond_the_leeway_is_invalid",
            one(),
            bearer(&rs256(&with(base.clone(), "exp", json!(now() - 120)))),
            Invalid("expired"),
        ),
        case(
            "token_expired_within_the_leeway_is_valid",
            one(),
            bearer(&rs256(&with(base.clone(), "exp", json!(now() - 30)))),
            Valid(Some("https://issuer.example/alice")),
        ),
        case(
            "token_not_yet_valid_beyond_the_leeway_is_invalid",
            one(),
            bearer(&rs256(&with(base.clone(), "nbf", json!(now() + 120)))),
            Invalid("not valid yet"),
        ),
        case(
            "token_not_yet_valid_within_the_leeway_is_valid",
            one(),
            bearer(&rs256(&with(base.clone(), "nbf", json!(now() + 30)))),
            Valid(Some("https://issuer.example/alice")),
        ),
        case(
            "token_without_exp_is_valid_as_in_envoy",
            one(),
            bearer(&rs256(&json!({"iss": ISS, "sub": "bob"}))),
            Valid(Some("https://issuer.example/bob")),
        ),
        case(
            "token_without_sub_has_no_principal",
            one(),
            bearer(&rs256(&json!({"iss": ISS}))),
            Valid(None),
        ),
        case(
            "token_of_another_issuer_is_invalid",
            one(),
            bearer(&rs256(&claims("https://evil.example"))),
            Invalid("issuer"),
        ),
        case(
            "audience_outside_the_list_is_invalid",
            vec![aud_rule.clone()],
            bearer(&rs256(&with(base.clone(), "aud", json!("nope.example")))),
            Invalid("audiences"),
        ),
        case(
            "token_without_aud_fails_a_configured_audience",
            vec![aud_rule.clone()],
            bearer(&rs256(&json!({"iss": ISS, "sub": "alice"}))),
            Invalid("audiences"),
        ),
        case(
            "one_matching_audience_of_a_list_is_enough",
            vec![aud_rule],
            bearer(&rs256(&with(
                base.clone(),
                "aud",
                json!(["x.example", "svc.example"]),
            ))),
            Valid(Some("https://issuer.example/alice")),
        ),
        case(
            "audiences_compare_without_scheme_and_trailing_slash",
            vec![aud_url_rule],
            bearer(&rs256(&base)),
            Valid(Some("https://issuer.example/alice")),
        ),
        case(
            "alg_none_is_invalid",
            one(),
            bearer(&unsigned(&json!({"alg": "none"}), &base, "")),
            Invalid("alg none"),
        ),
        case(
            "alg_none_with_a_signature_is_invalid",
            one(),
            bearer(&unsigned(&json!({"alg": "none"}), &base, "c2ln")),
            Invalid("alg none"),
        ),
        case(
            "hs256_signed_with_the_rsa_public_key_is_invalid",
            one(),
            bearer(&hs_with_rsa_pub),
            Invalid("HS256"),
        ),
        case(
            "alg_that_does_not_fit_the_kid_key_is_invalid",
            one(),
            bearer(&unsigned(
                &json!({"alg": "ES256", "kid": "RS256"}),
                &base,
                valid.rsplit('.').next().unwrap(),
            )),
            Invalid("no ES256 key with kid"),
        ),
        case(
            "unknown_kid_is_invalid",
            one(),
            bearer(&{
                let mut h = Header::new(RS256);
                h.kid = Some("rotated".into());
                jsonwebtoken::encode(&h, &base, &k.get(RS256).enc).unwrap()
            }),
            Invalid("kid"),
        ),
        case(
            "tampered_payload_is_invalid",
            one(),
            bearer(&tamper_payload(
                &valid,
                &with(base.clone(), "sub", json!("admin")),
            )),
            Invalid("signature"),
        ),
        case(
            "tampered_signature_is_invalid",
            one(),
            bearer(&wrong_sig),
            Invalid("signature"),
        ),
        case(
            "token_in_a_custom_header_with_prefix_is_valid",
            vec![header_rule.clone()],
            request("/", &[("x-jwt-assertion", &format!("Token {valid}"))]),
            Valid(Some("https://issuer.example/alice")),
        ),
        case(
            "custom_header_without_its_prefix_is_no_token",
            vec![header_rule.clone()],
            request("/", &[("x-jwt-assertion", &valid)]),
            NoToken,
        ),
        case(
            "custom_header_rule_ignores_the_default_location",
            vec![header_rule],
            bearer(&valid),
            NoToken,
        ),
        case(
            "token_in_the_default_access_token_param_is_valid",
            one(),
            request(&format!("/p?a=1&access_token={valid}"), &[]),
            Valid(Some("https://issuer.example/alice")),
        ),
        case(
            "token_in_a_custom_param_is_valid",
            vec![param_rule],
            request(&format!("/p?my_token={valid}"), &[]),
            Valid(Some("https://issuer.example/alice")),
        ),
        case(
            "token_in_a_cookie_is_valid",
            vec![cookie_rule],
            request(
                "/",
                &[("cookie", &format!("theme=dark; session={valid}; x=1"))],
            ),
            Valid(Some("https://issuer.example/alice")),
        ),
        case("no_token_is_no_token", one(), request("/", &[]), NoToken),
        case(
            "basic_authorization_is_no_token",
            one(),
            request("/", &[("authorization", "Basic YWxhZGRpbjpvcGVu")]),
            NoToken,
        ),
        case(
            "bearer_garbage_is_invalid",
            one(),
            request("/", &[("authorization", "Bearer !!!")]),
            Invalid("malformed"),
        ),
        case(
            "second_issuer_of_a_workload_is_selected_by_iss",
            vec![rule(ISS), rule(ISS_B)],
            bearer(&tok_b),
            Valid(Some("issuer-b@example.com/alice")),
        ),
        case(
            "first_issuer_of_a_workload_is_selected_by_iss",
            vec![rule(ISS), rule(ISS_B)],
            bearer(&valid),
            Valid(Some("https://issuer.example/alice")),
        ),
        case(
            "issuer_no_rule_accepts_is_invalid",
            vec![rule(ISS), rule(ISS_B)],
            bearer(&rs256(&claims("https://third.example"))),
            Invalid("issuer"),
        ),
        case(
            "issuer_not_reading_that_location_is_invalid",
            vec![rule(ISS), b_on_x.clone()],
            bearer(&tok_b),
            Invalid("issuer"),
        ),
        case(
            "every_token_of_a_rule_must_verify",
            vec![two_locations],
            request(
                "/",
                &[
                    ("authorization", &format!("Bearer {valid}")),
                    ("x-jwt", "a.b.c"),
                ],
            ),
            Invalid("malformed"),
        ),
        case(
            "a_rule_whose_tokens_all_verify_passes_as_in_istio",
            vec![rule(ISS), b_on_x],
            request(
                "/",
                &[
                    ("authorization", &format!("Bearer {valid}")),
                    ("x-jwt-b", "a.b.c"),
                ],
            ),
            Valid(Some("https://issuer.example/alice")),
        ),
        case(
            "two_segments_is_invalid",
            one(),
            bearer("eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0"),
            Invalid("three"),
        ),
        case(
            "four_segments_is_invalid",
            one(),
            bearer(&format!("{valid}.AAAA")),
            Invalid("three"),
        ),
        case(
            "bad_base64_is_invalid",
            one(),
            bearer("eyJhbGciOiJSUzI1NiJ9.e$$$.c2ln"),
            Invalid("malformed"),
        ),
        case(
            "bad_json_payload_is_invalid",
            one(),
            bearer(&format!(
                "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
                URL_SAFE_NO_PAD.encode("{not json")
            )),
            Invalid("malformed token payload"),
        ),
        case(
            "payload_that_is_not_an_object_is_invalid",
            one(),
            bearer(&unsigned(&json!({"alg": "RS256"}), &json!([1, 2]), "c2ln")),
            Invalid("not a JSON object"),
        ),
        case(
            "bad_json_header_is_invalid",
            one(),
            bearer(&format!(
                "{}.{}.c2ln",
                URL_SAFE_NO_PAD.encode("{\"alg\":"),
                URL_SAFE_NO_PAD.encode(base.to_string())
            )),
            Invalid("malformed token header"),
        ),
        case(
            "token_without_iss_is_invalid",
            one(),
            bearer(&rs256(&json!({"sub": "x"}))),
            Invalid("no iss"),
        ),
        case(
            "exp_that_is_not_a_number_is_invalid",
            one(),
            bearer(&rs256(&with(base.clone(), "exp", json!("tomorrow")))),
            Invalid("exp"),
        ),
        case(
            "unsupported_alg_is_invalid",
            one(),
            bearer(&unsigned(&json!({"alg": "ES256K"}), &base, "c2ln")),
            Invalid("unsupported alg"),
        ),
    ]);
    out
}

#[tokio::test]
async fn request_authentication_table() {
    let cases = cases();
    assert!(cases.len() >= 30, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let a = authn(c.rules.clone());
        let result = a.authenticate(&c.req).await;
        if let Err(e) = check(&result, &c.expect) {
            failures.push(format!("{}: {e}", c.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn malformed_input_never_panics() {
    let a = authn(vec![rule(ISS)]);
    let valid = rs256(&claims(ISS));
    let mut inputs: Vec<String> = (0..valid.len()).map(|n| valid[..n].to_string()).collect();
    inputs.extend(
        [
            "",
            ".",
            "..",
            "...",
            "a.b.c",
            "=.=.=",
            "e30.e30.",
            "e30.e30.e30",
            "eyJhbGciOiJSUzI1NiJ9.bnVsbA.c2ln",
            "eyJhbGciOiJSUzI1NiJ9.MQ.c2ln",
            "eyJhbGciOjF9.e30.c2ln",
            "eyJhbGciOiJSUzI1NiIsImtpZCI6MX0.e30.c2ln",
        ]
        .map(String::from),
    );
    for input in inputs {
        let r = a.authenticate(&bearer(&input)).await;
        assert!(
            matches!(r, AuthnResult::Invalid(_) | AuthnResult::NoToken),
            "{input:?}: {r:?}"
        );
    }
}

// === claims ===

#[tokio::test]
async fn claims_are_looked_up_as_istio_matches_them() {
    let a = authn(vec![rule(ISS)]);
    let token = rs256(&json!({
        "iss": ISS, "sub": "alice", "azp": "web-client",
        "aud": ["a.example", "b.example"],
        "groups": ["dev", "ops", 7],
        "scope": "read write  admin",
        "org": { "team": { "name": "core" }, "ids": ["x", "y"] },
        "n": 5,
    }));
    let AuthnResult::Valid(c) = a.authenticate(&bearer(&token)).await else {
        panic!("token should verify");
    };
    let p = |path: &[&str]| c.claim(&path.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(c.principal.as_deref(), Some("https://issuer.example/alice"));
    assert_eq!(c.audiences, ["a.example", "b.example"]);
    assert_eq!(c.presenter.as_deref(), Some("web-client"));
    assert_eq!(p(&["sub"]), ["alice"]);
    assert_eq!(p(&["groups"]), ["dev", "ops"]);
    assert_eq!(p(&["scope"]), ["read", "write", "admin"]);
    assert_eq!(p(&["org", "team", "name"]), ["core"]);
    assert_eq!(p(&["org", "ids"]), ["x", "y"]);
    assert!(
        p(&["org", "team"]).is_empty(),
        "objects do not match strings"
    );
    assert!(p(&["n"]).is_empty(), "numbers do not match strings");
    assert!(p(&["missing"]).is_empty());
    assert!(p(&["sub", "deeper"]).is_empty());
    assert!(p(&[]).is_empty());
}

// === rewrite ===

#[tokio::test]
async fn rewrite_removes_the_token_and_writes_payload_and_claims() {
    let mut r = rule(ISS);
    r.output_payload_to_header = Some("x-jwt-payload".into());
    r.output_claim_to_headers = vec![
        ClaimToHeader {
            header: "x-sub".into(),
            claim: "sub".into(),
        },
        ClaimToHeader {
            header: "x-team".into(),
            claim: "org.team".into(),
        },
        ClaimToHeader {
            header: "x-level".into(),
            claim: "level".into(),
        },
        ClaimToHeader {
            header: "x-admin".into(),
            claim: "admin".into(),
        },
        ClaimToHeader {
            header: "x-org".into(),
            claim: "org".into(),
        },
        ClaimToHeader {
            header: "x-missing".into(),
            claim: "missing".into(),
        },
    ];
    let a = authn(vec![r]);
    let payload = json!({
        "iss": ISS, "sub": "alice", "level": 3, "admin": true, "org": {"team": "core"}
    });
    let token = rs256(&payload);
    let mut req = request(
        "/",
        &[
            ("authorization", &format!("Bearer {token}")),
            ("x-missing", "forged"),
            ("x-sub", "forged"),
        ],
    );
    let result = a.authenticate(&req).await;
    assert!(matches!(result, AuthnResult::Valid(_)), "{result:?}");
    a.rewrite(&mut req, &result);
    let h = |n: &str| req.headers.get(n).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(h("authorization"), None, "token removed by default");
    assert_eq!(
        h("x-jwt-payload").as_deref(),
        token.split('.').nth(1),
        "payload as the token's base64url segment"
    );
    let decoded: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h("x-jwt-payload").unwrap()).unwrap())
            .unwrap();
    assert_eq!(decoded, payload);
    assert_eq!(h("x-sub").as_deref(), Some("alice"));
    assert_eq!(req.headers.get_all("x-sub").iter().count(), 1);
    assert_eq!(h("x-team").as_deref(), Some("core"));
    assert_eq!(h("x-level").as_deref(), Some("3"));
    assert_eq!(h("x-admin").as_deref(), Some("true"));
    assert_eq!(
        h("x-org").as_deref(),
        Some(STANDARD.encode(r#"{"team":"core"}"#).as_str())
    );
    assert_eq!(h("x-missing"), None, "a forged output header is removed");
}

#[tokio::test]
async fn rewrite_keeps_the_token_when_forwarding_is_asked() {
    let mut r = rule(ISS);
    r.forward_original_token = true;
    let a = authn(vec![r]);
    let token = rs256(&claims(ISS));
    let mut req = bearer(&token);
    let result = a.authenticate(&req).await;
    a.rewrite(&mut req, &result);
    assert_eq!(
        req.headers.get("authorization").unwrap().to_str().unwrap(),
        format!("Bearer {token}")
    );
}

#[tokio::test]
async fn rewrite_without_a_valid_token_only_removes_forged_outputs() {
    let mut r = rule(ISS);
    r.output_payload_to_header = Some("x-jwt-payload".into());
    let a = authn(vec![r]);
    let mut req = request(
        "/?access_token=abc",
        &[("x-jwt-payload", "forged"), ("x-other", "kept")],
    );
    let result = a.authenticate(&req).await;
    assert!(matches!(result, AuthnResult::Invalid(_)));
    a.rewrite(&mut req, &result);
    assert!(req.headers.get("x-jwt-payload").is_none());
    assert!(req.headers.get("x-other").is_some());
    assert_eq!(
        req.uri.query(),
        Some("access_token=abc"),
        "params are left as is"
    );
}

// === configuration errors ===

fn policy(name: &str, rules: Vec<JwtRule>) -> RequestAuthentication {
    RequestAuthentication {
        name: name.into(),
        namespace: "ns".into(),
        spec: RequestAuthenticationSpec {
            jwt_rules: rules,
            ..Default::default()
        },
    }
}

#[test]
fn bad_policies_are_reported_by_name() {
    let jwks = cache();
    let bad_inline = JwtRule {
        issuer: ISS.into(),
        jwks: Some("{\"keys\": 3}".into()),
        ..Default::default()
    };
    let oct_only = JwtRule {
        issuer: ISS.into(),
        jwks: Some(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.into()),
        ..Default::default()
    };
    let bad_timeout = JwtRule {
        issuer: ISS.into(),
        jwks_uri: Some("https://127.0.0.1:1/jwks".into()),
        timeout: Some("soon".into()),
        ..Default::default()
    };
    // Neither jwks nor jwksUri: discovered from an issuer that is a URL (ISS), refused for
    // one that is not (ISS_B).
    let discovered = JwtRule {
        issuer: ISS.into(),
        ..Default::default()
    };
    let no_source = JwtRule {
        issuer: ISS_B.into(),
        ..Default::default()
    };
    let errors = jwks
        .update(&[
            policy("good", vec![rule(ISS)]),
            policy("bad-inline", vec![bad_inline.clone()]),
            policy("oct-only", vec![oct_only]),
            policy("bad-timeout", vec![bad_timeout]),
            policy("no-source", vec![no_source]),
            policy("discovered", vec![discovered]),
        ])
        .unwrap_err();
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(text.len(), 4, "{text:#?}");
    assert!(text[0].contains("ns/bad-inline") && text[0].contains("inline jwks"));
    assert!(text[1].contains("ns/oct-only") && text[1].contains("symmetric"));
    assert!(text[2].contains("ns/bad-timeout") && text[2].contains("soon"));
    assert!(
        text[3].contains("ns/no-source")
            && text[3].contains("neither jwks nor jwksUri")
            && text[3].contains("OpenID discovery"),
        "{}",
        text[3]
    );
    let p = policy("bad-inline", vec![bad_inline]);
    let err = JwtAuthenticator::for_policies(&[&p], jwks).unwrap_err();
    assert!(err
        .to_string()
        .contains("RequestAuthentication ns/bad-inline"));
}

// === JWKS over HTTPS ===

/// A JWKS server on 127.0.0.1 with a self-signed certificate.
struct JwksServer {
    addr: std::net::SocketAddr,
    body: Arc<Mutex<String>>,
    /// The answer at `/.well-known/openid-configuration` (by default, naming [`JwksServer::uri`]).
    config: Arc<Mutex<String>>,
    /// Where the key set is served (any other path is a 404).
    jwks_path: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    config_hits: Arc<AtomicUsize>,
    /// Requests to `/loop`, which redirects to itself.
    loop_hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    ca: tempfile::NamedTempFile,
}

impl JwksServer {
    async fn start(body: String) -> JwksServer {
        use std::io::Write;
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let mut ca = tempfile::NamedTempFile::new().unwrap();
        ca.write_all(ck.cert.pem().as_bytes()).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![ck.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body));
        let config = Arc::new(Mutex::new(format!(
            r#"{{"issuer":"https://127.0.0.1:{0}","jwks_uri":"https://127.0.0.1:{0}/jwks.json"}}"#,
            addr.port()
        )));
        let hits = Arc::new(AtomicUsize::new(0));
        let config_hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        let (c, ch) = (config.clone(), config_hits.clone());
        let loop_hits = Arc::new(AtomicUsize::new(0));
        let lh = loop_hits.clone();
        let jwks_path = Arc::new(Mutex::new("/jwks.json".to_string()));
        let jp = jwks_path.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set, so aborting the server ends them too.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, b, h) = (acceptor.clone(), b.clone(), h.clone());
                let (c, ch, jp, lh) = (c.clone(), ch.clone(), jp.clone(), lh.clone());
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let path = req.uri().path().to_string();
                        // `/redirect` sends to the key set, `/loop` to itself.
                        let to = match path.as_str() {
                            "/redirect" => Some(jp.lock().unwrap().clone()),
                            "/loop" => {
                                lh.fetch_add(1, Ordering::SeqCst);
                                Some("/loop".to_string())
                            }
                            _ => None,
                        };
                        let found = if path == "/.well-known/openid-configuration" {
                            ch.fetch_add(1, Ordering::SeqCst);
                            Some(c.lock().unwrap().clone())
                        } else if path == *jp.lock().unwrap() {
                            h.fetch_add(1, Ordering::SeqCst);
                            Some(b.lock().unwrap().clone())
                        } else {
                            None
                        };
                        async move {
                            let mut resp = hyper::Response::new(http_body_util::Full::new(
                                Bytes::from(found.clone().unwrap_or_default()),
                            ));
                            if let Some(to) = to {
                                *resp.status_mut() = http::StatusCode::FOUND;
                                resp.headers_mut()
                                    .insert(http::header::LOCATION, to.parse().unwrap());
                            } else if found.is_none() {
                                *resp.status_mut() = http::StatusCode::NOT_FOUND;
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        JwksServer {
            addr,
            body,
            config,
            jwks_path,
            hits,
            config_hits,
            loop_hits,
            task,
            ca,
        }
    }

    fn uri(&self) -> String {
        format!("https://127.0.0.1:{}/jwks.json", self.addr.port())
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn config_hits(&self) -> usize {
        self.config_hits.load(Ordering::SeqCst)
    }

    /// The issuer whose OpenID configuration this server publishes.
    fn issuer(&self) -> String {
        format!("https://127.0.0.1:{}/", self.addr.port())
    }

    /// A rule for [`JwksServer::issuer`] with neither `jwks` nor `jwksUri`.
    fn discovered_rule(&self) -> JwtRule {
        JwtRule {
            issuer: self.issuer(),
            timeout: Some("2s".into()),
            ..Default::default()
        }
    }

    fn serve(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }

    fn cache(&self, min_refetch: Duration) -> Arc<JwksCache> {
        Arc::new(
            JwksCache::new(JwksConfig {
                extra_ca_file: Some(self.ca.path().to_path_buf()),
                system_roots: false,
                min_refetch_interval: min_refetch,
                ..Default::default()
            })
            .unwrap(),
        )
    }

    fn rule(&self) -> JwtRule {
        JwtRule {
            issuer: ISS.into(),
            jwks_uri: Some(self.uri()),
            timeout: Some("2s".into()),
            ..Default::default()
        }
    }
}

/// Bounds every network test.
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test timed out")
}

fn valid(r: &AuthnResult) -> bool {
    matches!(r, AuthnResult::Valid(_))
}

#[tokio::test]
async fn jwks_is_fetched_over_https_once_and_cached() {
    bounded(async {
        let k = keys();
        let server = JwksServer::start(jwks_of(&[k.get(Algorithm::RS256)])).await;
        let jwks = server.cache(Duration::ZERO);
        let a = JwtAuthenticator::new(vec![server.rule()], jwks.clone()).unwrap();
        let req = bearer(&rs256(&claims(ISS)));
        assert!(valid(&a.authenticate(&req).await));
        assert_eq!(server.hits(), 1);
        assert!(valid(&a.authenticate(&req).await));
        assert!(valid(&a.authenticate(&req).await));
        assert_eq!(server.hits(), 1, "keys are cached");
        // Another authenticator of the same jwksUri shares the keys.
        let b = JwtAuthenticator::new(vec![server.rule()], jwks.clone()).unwrap();
        assert!(valid(&b.authenticate(&req).await));
        assert_eq!(server.hits(), 1);
        assert_eq!(jwks.fetch_count(), 1);
    })
    .await
}

#[tokio::test]
async fn unknown_kid_triggers_a_refetch() {
    bounded(async {
        let k = keys();
        let server = JwksServer::start(jwks_of(&[k.get(Algorithm::RS256)])).await;
        let a = JwtAuthenticator::new(vec![server.rule()], server.cache(Duration::ZERO)).unwrap();
        assert!(valid(&a.authenticate(&bearer(&rs256(&claims(ISS)))).await));
        // The issuer rotates to a new key.
        let rotated = ec_test_key(Algorithm::ES256, "rotated");
        let token = sign(&rotated, &claims(ISS));
        server.serve(jwks_of(&[k.get(Algorithm::RS256), &rotated]));
        assert!(valid(&a.authenticate(&bearer(&token)).await));
        assert_eq!(server.hits(), 2);
        // A kid nobody publishes refetches once per request (rate limit zero here) and fails.
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("never".into());
        let forged = jsonwebtoken::encode(&h, &claims(ISS), &rotated.enc).unwrap();
        let r = a.authenticate(&bearer(&forged)).await;
        assert!(
            matches!(&r, AuthnResult::Invalid(m) if m.contains("kid")),
            "{r:?}"
        );
        assert_eq!(server.hits(), 3);
    })
    .await
}

#[tokio::test]
async fn unknown_kid_refetches_are_rate_limited() {
    bounded(async {
        let k = keys();
        let server = JwksServer::start(jwks_of(&[k.get(Algorithm::RS256)])).await;
        let a = JwtAuthenticator::new(vec![server.rule()], server.cache(Duration::from_secs(600)))
            .unwrap();
        assert!(valid(&a.authenticate(&bearer(&rs256(&claims(ISS)))).await));
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("never".into());
        let forged = jsonwebtoken::encode(&h, &claims(ISS), &k.get(Algorithm::RS256).enc).unwrap();
        for _ in 0..5 {
            let r = a.authenticate(&bearer(&forged)).await;
            assert!(matches!(r, AuthnResult::Invalid(_)));
        }
        assert_eq!(server.hits(), 1, "the first fetch was just now: no refetch");
    })
    .await
}

#[tokio::test]
async fn keys_are_kept_when_a_refresh_gets_garbage_or_no_answer() {
    bounded(async {
        let k = keys();
        let server = JwksServer::start(jwks_of(&[k.get(Algorithm::RS256)])).await;
        let jwks = server.cache(Duration::ZERO);
        let a = JwtAuthenticator::new(vec![server.rule()], jwks.clone()).unwrap();
        let req = bearer(&rs256(&claims(ISS)));
        assert!(valid(&a.authenticate(&req).await));

        server.serve("<html>oops</html>".into());
        jwks.refresh_all().await;
        assert_eq!(server.hits(), 2);
        assert!(
            valid(&a.authenticate(&req).await),
            "garbage keeps the old keys"
        );

        server.serve(r#"{"keys": []}"#.into());
        jwks.refresh_all().await;
        assert!(
            valid(&a.authenticate(&req).await),
            "an empty set keeps the old keys"
        );

        server.task.abort();
        let _ = (&mut { server.task }).await;
        jwks.refresh_all().await;
        assert!(
            valid(&a.authenticate(&req).await),
            "no server keeps the old keys"
        );
    })
    .await
}

#[tokio::test]
async fn tokens_are_invalid_while_keys_were_never_fetched() {
    bounded(async {
        let server = JwksServer::start("not json".into()).await;
        let a = JwtAuthenticator::new(vec![server.rule()], server.cache(Duration::ZERO)).unwrap();
        let r = a.authenticate(&bearer(&rs256(&claims(ISS)))).await;
        assert!(
            matches!(&r, AuthnResult::Invalid(m) if m.contains("no keys")),
            "{r:?}"
        );
        // Untrusted certificate: a cache without the extra CA cannot fetch either.
        server.serve(jwks_of(&[keys().get(Algorithm::RS256)]));
        let untrusted = cache();
        let b = JwtAuthenticator::new(vec![server.rule()], untrusted).unwrap();
        let r = b.authenticate(&bearer(&rs256(&claims(ISS)))).await;
        assert!(matches!(r, AuthnResult::Invalid(_)), "{r:?}");
        // The trusted one recovers on the next request.
        assert!(valid(&a.authenticate(&bearer(&rs256(&claims(ISS)))).await));
    })
    .await
}

#[tokio::test]
async fn a_silent_jwks_server_is_bounded_by_the_rule_timeout() {
    bounded(async {
        // Accepts TCP and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let jwks = cache();
        let rule = JwtRule {
            issuer: ISS.into(),
            jwks_uri: Some(format!("https://127.0.0.1:{port}/jwks")),
            timeout: Some("300ms".into()),
            ..Default::default()
        };
        let a = JwtAuthenticator::new(vec![rule], jwks).unwrap();
        let req = bearer(&rs256(&claims(ISS)));
        let started = std::time::Instant::now();
        let r = a.authenticate(&req).await;
        assert!(matches!(r, AuthnResult::Invalid(_)));
        assert!(started.elapsed() < Duration::from_secs(3));
        hold.abort();
    })
    .await
}

#[tokio::test]
async fn the_refresher_fetches_new_sources_and_stops_on_shutdown() {
    bounded(async {
        let server = JwksServer::start(jwks_of(&[keys().get(Algorithm::RS256)])).await;
        let jwks = server.cache(Duration::from_secs(600));
        let shutdown = CancellationToken::new();
        let refresher = jwks.spawn_refresher(shutdown.clone());
        jwks.update(&[policy("remote", vec![server.rule()])])
            .unwrap();
        while server.hits() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let a = JwtAuthenticator::new(vec![server.rule()], jwks.clone()).unwrap();
        assert!(valid(&a.authenticate(&bearer(&rs256(&claims(ISS)))).await));
        assert_eq!(server.hits(), 1, "the request used the prefetched keys");
        shutdown.cancel();
        refresher.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn an_oversized_jwks_is_refused_and_a_good_one_later_is_used() {
    bounded(async {
        let k = keys();
        let good = jwks_of(&[k.get(Algorithm::RS256)]);
        // Over the 1 MiB limit (padding the valid document, so only its size is wrong).
        let big = format!("{{\"pad\":\"{}\",{}", "x".repeat(1_100_000), &good[1..]);
        let server = JwksServer::start(big).await;
        let a = JwtAuthenticator::new(vec![server.rule()], server.cache(Duration::ZERO)).unwrap();
        let req = bearer(&rs256(&claims(ISS)));
        let r = a.authenticate(&req).await;
        assert!(matches!(r, AuthnResult::Invalid(_)), "{r:?}");
        server.serve(good);
        assert!(valid(&a.authenticate(&req).await));
    })
    .await
}

/// A server publishing an OpenID configuration and an RS256 key set; an authenticator whose
/// rule discovers them; a request with a token of that issuer.
async fn discovering() -> (JwksServer, Arc<JwksCache>, JwtAuthenticator, Parts) {
    let server = JwksServer::start(jwks_of(&[keys().get(Algorithm::RS256)])).await;
    let jwks = server.cache(Duration::ZERO);
    let a = JwtAuthenticator::new(vec![server.discovered_rule()], jwks.clone()).unwrap();
    let req = bearer(&rs256(&claims(&server.issuer())));
    (server, jwks, a, req)
}

#[tokio::test]
async fn without_jwks_or_jwks_uri_the_keys_are_found_by_openid_discovery() {
    bounded(async {
        // The issuer's trailing slash is dropped before the well-known path, as istiod does.
        let (server, jwks, a, req) = discovering().await;
        assert!(valid(&a.authenticate(&req).await));
        assert_eq!((server.config_hits(), server.hits()), (1, 1));
        assert!(valid(&a.authenticate(&req).await));
        assert_eq!(
            (server.config_hits(), server.hits()),
            (1, 1),
            "keys are cached"
        );
        // The configuration is read again on every fetch: a moved key set is followed.
        let moved = ec_test_key(Algorithm::ES256, "moved");
        server.serve(jwks_of(&[&moved]));
        *server.jwks_path.lock().unwrap() = "/elsewhere/keys".to_string();
        *server.config.lock().unwrap() = format!(
            r#"{{"jwks_uri":"https://127.0.0.1:{}/elsewhere/keys"}}"#,
            server.addr.port()
        );
        jwks.refresh_all().await;
        assert_eq!((server.config_hits(), server.hits()), (2, 2));
        assert!(valid(
            &a.authenticate(&bearer(&sign(&moved, &claims(&server.issuer()))))
                .await
        ));
    })
    .await
}

#[tokio::test]
async fn a_bad_openid_configuration_keeps_the_keys_in_force_and_no_keys_fail_closed() {
    bounded(async {
        let (server, jwks, a, req) = discovering().await;
        assert!(valid(&a.authenticate(&req).await));
        for (i, bad) in [
            "not json",
            r#"{"issuer":"x"}"#,
            r#"{"jwks_uri":42}"#,
            r#"{"jwks_uri":"/relative/keys"}"#,
        ]
        .into_iter()
        .enumerate()
        {
            *server.config.lock().unwrap() = bad.to_string();
            jwks.refresh_all().await;
            assert_eq!(server.config_hits(), 2 + i, "{bad}: not read again");
            assert!(
                valid(&a.authenticate(&req).await),
                "{bad}: the keys in force were lost"
            );
        }
        assert_eq!(
            server.hits(),
            1,
            "a key set was fetched from a bad configuration"
        );
        // A fresh cache that never got keys: tokens are invalid (fail closed).
        let fresh = server.cache(Duration::ZERO);
        let b = JwtAuthenticator::new(vec![server.discovered_rule()], fresh).unwrap();
        let r = b.authenticate(&req).await;
        assert!(
            matches!(&r, AuthnResult::Invalid(m) if m.contains("no keys")),
            "{r:?}"
        );
    })
    .await
}

#[test]
fn the_jwks_uri_of_an_openid_configuration_is_checked() {
    let ok = jwks_uri_of(r#"{"issuer":"i","jwks_uri":"https://idp.example/keys"}"#).unwrap();
    assert_eq!(ok.to_string(), "https://idp.example/keys");
    for (doc, why) in [
        ("<html>", "not JSON"),
        ("{}", "no jwks_uri"),
        (r#"{"jwks_uri":["https://a/k"]}"#, "not a string"),
        (r#"{"jwks_uri":"keys.json"}"#, "not an absolute http(s) URI"),
        (
            r#"{"jwks_uri":"ftp://idp.example/keys"}"#,
            "not an absolute http(s) URI",
        ),
    ] {
        let err = jwks_uri_of(doc).unwrap_err();
        assert!(err.contains(why), "{doc}: {err}");
    }
}

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
        assert!(err.contains(why), "{why}: {err}");
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

#[tokio::test]
async fn jwks_redirects_are_followed_as_istiod_does_and_a_loop_ends() {
    bounded(async {
        let server = JwksServer::start(jwks_of(&[keys().get(Algorithm::RS256)])).await;
        let at = |path: &str| JwtRule {
            jwks_uri: Some(format!("https://127.0.0.1:{}{path}", server.addr.port())),
            ..server.rule()
        };
        let req = bearer(&rs256(&claims(ISS)));
        let a = JwtAuthenticator::new(vec![at("/redirect")], server.cache(Duration::ZERO)).unwrap();
        assert!(valid(&a.authenticate(&req).await));
        assert_eq!(server.hits(), 1);
        // A redirect loop ends (10 at most): no keys, so tokens fail closed.
        let b = JwtAuthenticator::new(vec![at("/loop")], server.cache(Duration::ZERO)).unwrap();
        let r = b.authenticate(&req).await;
        assert!(
            matches!(&r, AuthnResult::Invalid(m) if m.contains("no keys")),
            "{r:?}"
        );
        // The first request and 10 redirects, as istiod's client: the limit ended it, not the
        // rule's timeout.
        assert_eq!(server.loop_hits.load(Ordering::SeqCst), 11);
    })
    .await
}
