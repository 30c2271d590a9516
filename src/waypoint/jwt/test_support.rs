//! Fixtures shared by the JWT tests: real keys (RSA from the `rsa` crate, EC and Ed25519
//! from rcgen/ring) and tokens signed by `jsonwebtoken`, rules, caches and requests, the
//! expected outcomes of [`JwtAuthenticator::authenticate`], and a JWKS server over HTTPS on
//! loopback that also publishes an OpenID configuration and redirects.
//!
//! Owns fixtures only: no test lives here, and nothing here is compiled outside tests. Must
//! not touch the code under test beyond its public (or `pub(super)`) surface.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::request::Parts;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};

use super::authn::unix_now;
use super::{AuthnResult, JwksCache, JwksConfig, JwtAuthenticator};
use crate::model::policy::{JwtRule, RequestAuthentication, RequestAuthenticationSpec};

// === keys ===

/// A signing key and its public JWK.
pub(super) struct TestKey {
    pub(super) alg: Algorithm,
    pub(super) kid: String,
    pub(super) enc: EncodingKey,
    pub(super) jwk: Value,
}

pub(super) fn rsa_key() -> &'static rsa::RsaPrivateKey {
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap())
}

pub(super) fn rsa_test_key(alg: Algorithm, kid: &str) -> TestKey {
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

pub(super) fn ec_test_key(alg: Algorithm, kid: &str) -> TestKey {
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

pub(super) fn ed_test_key(kid: &str) -> TestKey {
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
pub(super) struct Keys {
    pub(super) all: Vec<TestKey>,
}

impl Keys {
    pub(super) fn get(&self, alg: Algorithm) -> &TestKey {
        self.all.iter().find(|k| k.alg == alg).unwrap()
    }
}

pub(super) fn keys() -> &'static Keys {
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

pub(super) fn jwks_of(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

pub(super) fn inline_jwks() -> String {
    jwks_of(&keys().all.iter().collect::<Vec<_>>())
}

pub(super) fn sign(key: &TestKey, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.enc).unwrap()
}

pub(super) fn now() -> i64 {
    unix_now() as i64
}

pub(super) const ISS: &str = "https://issuer.example";
pub(super) const ISS_B: &str = "issuer-b@example.com";

pub(super) fn claims(iss: &str) -> Value {
    json!({ "iss": iss, "sub": "alice", "exp": now() + 600, "iat": now(), "aud": "svc.example" })
}

pub(super) fn with(mut claims: Value, k: &str, v: Value) -> Value {
    claims[k] = v;
    claims
}

pub(super) fn rs256(claims: &Value) -> String {
    sign(keys().get(Algorithm::RS256), claims)
}

// === rules and requests ===

pub(super) fn rule(issuer: &str) -> JwtRule {
    JwtRule {
        issuer: issuer.to_string(),
        jwks: Some(inline_jwks()),
        ..Default::default()
    }
}

pub(super) fn cache() -> Arc<JwksCache> {
    Arc::new(
        JwksCache::new(JwksConfig {
            system_roots: false,
            ..Default::default()
        })
        .unwrap(),
    )
}

pub(super) fn authn(rules: Vec<JwtRule>) -> JwtAuthenticator {
    JwtAuthenticator::new(rules, cache()).unwrap()
}

pub(super) fn request(uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::get(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

pub(super) fn bearer(token: &str) -> Parts {
    request("/", &[("authorization", &format!("Bearer {token}"))])
}

#[derive(Debug)]
pub(super) enum Expect {
    NoToken,
    /// Valid, with this principal (`None`: no `sub`).
    Valid(Option<&'static str>),
    /// Invalid, the reason containing this text.
    Invalid(&'static str),
}

pub(super) fn check(result: &AuthnResult, expect: &Expect) -> Result<(), String> {
    match (result, expect) {
        (AuthnResult::NoToken, Expect::NoToken) => Ok(()),
        (AuthnResult::Valid(c), Expect::Valid(p)) if c.principal.as_deref() == *p => Ok(()),
        (AuthnResult::Invalid(r), Expect::Invalid(s)) if r.contains(s) => Ok(()),
        _ => Err(format!("expected {expect:?}, got {result:?}")),
    }
}

pub(super) fn tamper_payload(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

// === configuration errors ===

pub(super) fn policy(name: &str, rules: Vec<JwtRule>) -> RequestAuthentication {
    RequestAuthentication {
        name: name.into(),
        namespace: "ns".into(),
        spec: RequestAuthenticationSpec {
            jwt_rules: rules,
            ..Default::default()
        },
    }
}

// === JWKS over HTTPS ===

/// A JWKS server on 127.0.0.1 with a self-signed certificate.
pub(super) struct JwksServer {
    pub(super) addr: std::net::SocketAddr,
    body: Arc<Mutex<String>>,
    /// The answer at `/.well-known/openid-configuration` (by default, naming [`JwksServer::uri`]).
    pub(super) config: Arc<Mutex<String>>,
    /// Where the key set is served (any other path is a 404).
    pub(super) jwks_path: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    config_hits: Arc<AtomicUsize>,
    /// Requests to `/loop`, which redirects to itself.
    pub(super) loop_hits: Arc<AtomicUsize>,
    pub(super) task: tokio::task::JoinHandle<()>,
    ca: tempfile::NamedTempFile,
}

impl JwksServer {
    pub(super) async fn start(body: String) -> JwksServer {
        use std::io::Write;
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let mut ca = tempfile::NamedTempFile::new().unwrap();
        ca.write_all(ck.cert.pem().as_bytes()).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
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

    pub(super) fn uri(&self) -> String {
        format!("https://127.0.0.1:{}/jwks.json", self.addr.port())
    }

    pub(super) fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub(super) fn config_hits(&self) -> usize {
        self.config_hits.load(Ordering::SeqCst)
    }

    /// The issuer whose OpenID configuration this server publishes.
    pub(super) fn issuer(&self) -> String {
        format!("https://127.0.0.1:{}/", self.addr.port())
    }

    /// A rule for [`JwksServer::issuer`] with neither `jwks` nor `jwksUri`.
    pub(super) fn discovered_rule(&self) -> JwtRule {
        JwtRule {
            issuer: self.issuer(),
            timeout: Some("2s".into()),
            ..Default::default()
        }
    }

    pub(super) fn serve(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }

    pub(super) fn cache(&self, min_refetch: Duration) -> Arc<JwksCache> {
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

    pub(super) fn rule(&self) -> JwtRule {
        JwtRule {
            issuer: ISS.into(),
            jwks_uri: Some(self.uri()),
            timeout: Some("2s".into()),
            ..Default::default()
        }
    }
}

/// Bounds every network test.
pub(super) async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test timed out")
}

pub(super) fn valid(r: &AuthnResult) -> bool {
    matches!(r, AuthnResult::Valid(_))
}
