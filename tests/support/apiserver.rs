//! An in-process Kubernetes API server stand-in for loopback tests: HTTPS (rustls, a test CA
//! of its own), HTTP/1.1, JSON, on a unique loopback address, and a kubeconfig that points
//! kube-rs at it.
//!
//! What it emulates, as the API server does it (k8s.io/apiserver, registry/authentication):
//! - **Authentication of its own clients**: every request needs `Authorization: Bearer
//!   <ADMIN_TOKEN>`; otherwise `401` with a `Status` (reason `Unauthorized`).
//! - **TokenReview** `POST /apis/authentication.k8s.io/v1/tokenreviews`: the answer is the
//!   request with a `status`. A token it did not issue, an expired token, a token whose bound
//!   pod is gone (or was re-created with another uid), and a token whose audiences do not
//!   include one of `spec.audiences` (no `spec.audiences`: the API server's own,
//!   [`API_AUDIENCE`]) are `authenticated: false` with an `error` saying why. An authenticated
//!   one has `user.username` `system:serviceaccount:NS:NAME`, `groups` (`system:serviceaccounts`,
//!   `system:serviceaccounts:NS`, `system:authenticated`), `extra` with
//!   `authentication.kubernetes.io/pod-name` and `pod-uid` for a pod-bound token, and
//!   `audiences` (those of the request the token carries).
//! - **Pods**: `GET /api/v1/namespaces/NS/pods/NAME` (`404` `Status` reason `NotFound` for none);
//!   `GET /api/v1/pods` and `GET /api/v1/namespaces/NS/pods` as a `PodList`, with
//!   `fieldSelector` terms (`,`-separated `f=v`, `f==v`, `f!=v`) over `metadata.name`,
//!   `metadata.namespace`, `spec.nodeName`, `spec.serviceAccountName` and `status.phase`; any
//!   other field is `400` (reason `BadRequest`, "field label not supported").
//! - **Resource versions**: one counter for the whole store, bumped by every write; each
//!   object carries the version of its last write and each list the current one. Pods get a
//!   `uid` at creation.
//!
//! What it does not emulate (yet): watch, label selectors, pagination (`limit`/`continue`),
//! writes through the API (tests write the store directly), other kinds, RBAC (every request
//! with the admin token may do everything). The store (one versioned map per kind, a global
//! resource version) is shaped so watch can be added by keeping an event log beside it.
//! Tokens are opaque strings, not JWTs: only this stand-in reads them, as only the real API
//! server reads real ones.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The token the API server's clients (here: `weft ca serve`) authenticate with.
pub const ADMIN_TOKEN: &str = "apiserver-admin-token";
/// The audience of tokens issued without one (the API server's own).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// A token the stand-in issued.
#[derive(Debug, Clone)]
struct TokenInfo {
    namespace: String,
    service_account: String,
    audiences: Vec<String>,
    expires: SystemTime,
    /// `(name, uid)` of the pod it is bound to.
    pod: Option<(String, String)>,
}

#[derive(Debug, Default)]
struct Store {
    resource_version: u64,
    next_uid: u64,
    /// `(namespace, name)` → pod.
    pods: BTreeMap<(String, String), Pod>,
    tokens: HashMap<String, TokenInfo>,
    next_token: u64,
    /// Every request, `METHOD path?query`.
    requests: Vec<String>,
}

/// The stand-in; stops serving when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    ca_pem: String,
    dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeApiServer {
    /// Starts serving on a unique loopback address.
    pub async fn start() -> FakeApiServer {
        let ip: IpAddr = super::unique_loopback();
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();

        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "kubernetes test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::IpAddress(ip),
            SanType::DnsName("kubernetes.default.svc".try_into().unwrap()),
        ];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(weft::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let store = Arc::new(Mutex::new(Store::default()));
        let stop = CancellationToken::new();
        let (s, st) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = st.cancelled() => return,
                    r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
                };
                let (acceptor, store, st) = (acceptor.clone(), s.clone(), st.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let store = store.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&store, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        FakeApiServer {
            addr,
            store,
            ca_pem: ca_cert.pem(),
            dir: tempfile::tempdir().unwrap(),
            stop,
        }
    }

    /// `https://IP:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A kubeconfig file for `weft ca serve --kubeconfig`: this server, its CA, the admin token.
    pub fn kubeconfig(&self) -> PathBuf {
        use base64::Engine as _;
        let path = self.dir.path().join("kubeconfig");
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    \
                 server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: ca\n  \
                 user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: test\n  context:\n    \
                 cluster: test\n    user: ca\ncurrent-context: test\n",
                self.url()
            ),
        )
        .unwrap();
        path
    }

    /// Adds a running pod `namespace/name` with `service_account` on `node`; returns its uid.
    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        service_account: &str,
        node: &str,
    ) -> String {
        let mut store = self.store.lock().unwrap();
        store.next_uid += 1;
        store.resource_version += 1;
        let uid = format!("00000000-0000-4000-8000-{:012}", store.next_uid);
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                uid: Some(uid.clone()),
                resource_version: Some(store.resource_version.to_string()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                service_account_name: Some(service_account.into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                ..PodStatus::default()
            }),
        };
        store.pods.insert((namespace.into(), name.into()), pod);
        uid
    }

    /// Deletes pod `namespace/name`.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let mut store = self.store.lock().unwrap();
        store.resource_version += 1;
        store.pods.remove(&(namespace.into(), name.into()));
    }

    /// Issues a token of the pod `namespace/pod`'s ServiceAccount, bound to that pod, for
    /// `audiences`, valid until `expires` (a projected ServiceAccount token).
    pub fn pod_token(
        &self,
        namespace: &str,
        pod: &str,
        audiences: &[&str],
        expires: SystemTime,
    ) -> String {
        let mut store = self.store.lock().unwrap();
        let p = store
            .pods
            .get(&(namespace.into(), pod.into()))
            .expect("pod exists")
            .clone();
        let info = TokenInfo {
            namespace: namespace.into(),
            service_account: p.spec.unwrap().service_account_name.unwrap(),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expires,
            pod: Some((pod.into(), p.metadata.uid.unwrap())),
        };
        store.next_token += 1;
        let token = format!("test-sa-token-{}", store.next_token);
        store.tokens.insert(token.clone(), info);
        token
    }

    /// Issues a token of ServiceAccount `namespace/service_account` bound to no pod (as
    /// `kubectl create token` without `--bound-object-kind Pod`).
    pub fn unbound_token(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        expires: SystemTime,
    ) -> String {
        let mut store = self.store.lock().unwrap();
        store.next_token += 1;
        let token = format!("test-sa-token-{}", store.next_token);
        store.tokens.insert(
            token.clone(),
            TokenInfo {
                namespace: namespace.into(),
                service_account: service_account.into(),
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                expires,
                pod: None,
            },
        );
        token
    }

    /// Every request served so far, `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.store.lock().unwrap().requests.clone()
    }
}

// === serving ===

fn json_response(code: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// A `Status` object, as the API server answers errors.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

async fn handle(
    store: &Mutex<Store>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    store
        .lock()
        .unwrap()
        .requests
        .push(format!("{method} {path}?{query}"));
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {ADMIN_TOKEN}"));
    if !authorized {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            let review: TokenReview = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
            };
            let review = review_token(&store.lock().unwrap(), review);
            json_response(StatusCode::CREATED, serde_json::to_value(review).unwrap())
        }
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
            let store = store.lock().unwrap();
            match store.pods.get(&(ns.to_string(), name.to_string())) {
                Some(pod) => json_response(StatusCode::OK, pod_json(pod)),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("pods \"{name}\" not found"),
                ),
            }
        }
        ("GET", ["api", "v1", "pods"]) => list_pods(&store.lock().unwrap(), None, &query),
        ("GET", ["api", "v1", "namespaces", ns, "pods"]) => {
            list_pods(&store.lock().unwrap(), Some(ns), &query)
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({method} {path})"),
        ),
    }
}

fn pod_json(pod: &Pod) -> serde_json::Value {
    let mut v = serde_json::to_value(pod).unwrap();
    v["kind"] = json!("Pod");
    v["apiVersion"] = json!("v1");
    v
}

/// The API server's TokenReview (module doc).
fn review_token(store: &Store, mut review: TokenReview) -> TokenReview {
    let wanted: Vec<String> = review
        .spec
        .audiences
        .clone()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| vec![API_AUDIENCE.to_string()]);
    let token = review.spec.token.clone().unwrap_or_default();
    let refuse = |error: String| TokenReviewStatus {
        authenticated: Some(false),
        error: Some(error),
        ..TokenReviewStatus::default()
    };
    let status = match store.tokens.get(&token) {
        None => refuse(
            "[invalid bearer token, square/go-jose: error in cryptographic primitive]".into(),
        ),
        Some(info) if SystemTime::now() >= info.expires => {
            refuse("[invalid bearer token, service account token has expired]".into())
        }
        Some(info) if !info.audiences.iter().any(|a| wanted.contains(a)) => refuse(format!(
            "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
            info.audiences, wanted
        )),
        Some(info) => {
            let bound_pod_alive = match &info.pod {
                None => Ok(()),
                Some((name, uid)) => {
                    match store.pods.get(&(info.namespace.clone(), name.clone())) {
                        None => Err(format!("[invalid bearer token, pods \"{name}\" not found]")),
                        Some(p) if p.metadata.uid.as_deref() != Some(uid) => Err(format!(
                        "[invalid bearer token, pod \"{name}\" (uid {uid}) does not exist any more]"
                    )),
                        Some(_) => Ok(()),
                    }
                }
            };
            match bound_pod_alive {
                Err(e) => refuse(e),
                Ok(()) => {
                    let mut extra = BTreeMap::new();
                    if let Some((name, uid)) = &info.pod {
                        extra.insert(
                            "authentication.kubernetes.io/pod-name".to_string(),
                            vec![name.clone()],
                        );
                        extra.insert(
                            "authentication.kubernetes.io/pod-uid".to_string(),
                            vec![uid.clone()],
                        );
                    }
                    TokenReviewStatus {
                        authenticated: Some(true),
                        audiences: Some(
                            info.audiences
                                .iter()
                                .filter(|a| wanted.contains(a))
                                .cloned()
                                .collect(),
                        ),
                        user: Some(UserInfo {
                            username: Some(format!(
                                "system:serviceaccount:{}:{}",
                                info.namespace, info.service_account
                            )),
                            uid: Some(format!(
                                "sa-uid-{}-{}",
                                info.namespace, info.service_account
                            )),
                            groups: Some(vec![
                                "system:serviceaccounts".into(),
                                format!("system:serviceaccounts:{}", info.namespace),
                                "system:authenticated".into(),
                            ]),
                            extra: Some(extra),
                        }),
                        error: None,
                    }
                }
            }
        }
    };
    review.status = Some(status);
    review
}

/// One term of a field selector.
enum Term {
    Eq(String, String),
    Ne(String, String),
}

fn parse_field_selector(selector: &str) -> Result<Vec<Term>, String> {
    selector
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            if let Some((f, v)) = t.split_once("!=") {
                Ok(Term::Ne(f.into(), v.into()))
            } else if let Some((f, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Ok(Term::Eq(f.into(), v.into()))
            } else {
                Err(format!(
                    "invalid selector: '{selector}'; can't understand '{t}'"
                ))
            }
        })
        .collect()
}

fn pod_field(pod: &Pod, field: &str) -> Result<String, String> {
    let spec = pod.spec.as_ref();
    Ok(match field {
        "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
        "metadata.namespace" => pod.metadata.namespace.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.phase" => pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default(),
        other => return Err(format!("field label not supported: {other}")),
    })
}

fn list_pods(store: &Store, namespace: Option<&str>, query: &str) -> Response<Full<Bytes>> {
    let selector = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "fieldSelector")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let terms = match parse_field_selector(&selector) {
        Ok(t) => t,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let mut items = Vec::new();
    for pod in store.pods.values() {
        if namespace.is_some_and(|ns| pod.metadata.namespace.as_deref() != Some(ns)) {
            continue;
        }
        let mut keep = true;
        for term in &terms {
            let (field, value, equal) = match term {
                Term::Eq(f, v) => (f, v, true),
                Term::Ne(f, v) => (f, v, false),
            };
            match pod_field(pod, field) {
                Ok(actual) => keep &= (actual == *value) == equal,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
            }
        }
        if keep {
            items.push(pod_json(pod));
        }
    }
    json_response(
        StatusCode::OK,
        json!({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": store.resource_version.to_string()},
            "items": items,
        }),
    )
}
