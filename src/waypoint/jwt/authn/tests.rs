//! Tests of [`JwtAuthenticator`] with real keys: the RequestAuthentication table (locations,
//! rule selection, time, audiences, algorithms, malformed tokens), claims as
//! AuthorizationPolicy reads them, and the rewrite of the forwarded request.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPublicKey;
use serde_json::json;

use super::super::test_support::*;
use super::*;
use crate::model::policy::{ClaimToHeader, JwtHeader};

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
