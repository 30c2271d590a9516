//! An in-process istiod stand-in for loopback tests: Envoy's delta ADS and Istio's
//! certificate service, served by tonic over TLS with a test PKI, on a unique loopback
//! address. It speaks the real protocols (the client under test cannot tell), records every
//! request with its credentials, and can be stopped and started again on the same address.
//!
//! The ADS side follows the delta protocol: per stream it remembers which resource versions
//! the client holds (starting from `initial_resource_versions`), answers each subscription
//! with the difference (changed resources and removals), and pushes later changes likewise.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use weft::config::ControlPlane;
use weft::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use weft::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use weft::proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use weft::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
#[allow(unused_imports)]
pub use weft::source::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

pub const TOKEN: &str = "test-token-1";
pub const CLUSTER_ID: &str = "test-cluster";

/// A CA: its certificate (PEM) and the issuer that signs with it.
struct TestCa {
    pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "cluster.local");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Signs `csr` with `san` as the only URI SAN, valid `ttl` from a minute ago.
    fn sign(&self, csr: &str, san: &str, ttl: Duration) -> Result<String, String> {
        let mut req = CertificateSigningRequestParams::from_pem(csr).map_err(|e| e.to_string())?;
        let now = SystemTime::now();
        req.params.subject_alt_names = vec![SanType::URI(
            san.try_into().map_err(|e: rcgen::Error| e.to_string())?,
        )];
        req.params.not_before = (now - Duration::from_secs(60)).into();
        req.params.not_after = (now + ttl).into();
        req.params.is_ca = IsCa::ExplicitNoCa;
        req.params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        req.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        req.params.use_authority_key_identifier_extension = true;
        Ok(req
            .signed_by(&self.issuer)
            .map_err(|e| e.to_string())?
            .pem())
    }
}

// === xDS ===

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Which stream (1-based, in order of arrival).
    pub stream: u64,
    pub request: DeltaDiscoveryRequest,
    pub authorization: Option<String>,
    pub cluster_id: Option<String>,
}

type Store = BTreeMap<String, BTreeMap<String, (String, prost_types::Any)>>;

/// The ADS side's shared state.
pub struct Xds {
    resources: Mutex<Store>,
    version: AtomicU64,
    nonce: AtomicU64,
    streams: AtomicU64,
    changed: watch::Sender<u64>,
    raw: broadcast::Sender<DeltaDiscoveryResponse>,
    kill: watch::Sender<u64>,
    seen: watch::Sender<Vec<Seen>>,
    /// Types whose subscriptions are not answered until released.
    held: Mutex<std::collections::HashSet<String>>,
}

impl Xds {
    /// Holds back the answer to subscriptions of `type_url`.
    pub fn hold(&self, type_url: &str) {
        self.held.lock().unwrap().insert(type_url.to_string());
    }

    /// Answers held subscriptions of `type_url` (and stops holding it).
    pub fn release(&self, type_url: &str) {
        self.held.lock().unwrap().remove(type_url);
        self.changed.send_modify(|g| *g += 1);
    }

    fn is_held(&self, type_url: &str) -> bool {
        self.held.lock().unwrap().contains(type_url)
    }

    fn new() -> Arc<Xds> {
        Arc::new(Xds {
            resources: Mutex::new(Store::new()),
            version: AtomicU64::new(0),
            nonce: AtomicU64::new(0),
            streams: AtomicU64::new(0),
            changed: watch::Sender::new(0),
            raw: broadcast::channel(16).0,
            kill: watch::Sender::new(0),
            seen: watch::Sender::new(Vec::new()),
            held: Mutex::new(Default::default()),
        })
    }

    /// Adds or replaces a resource (new version) and pushes it to connected clients.
    pub fn put<M: Message>(&self, type_url: &str, name: &str, m: &M) {
        let version = format!("v{}", self.version.fetch_add(1, Ordering::Relaxed) + 1);
        let any = prost_types::Any {
            type_url: type_url.to_string(),
            value: m.encode_to_vec(),
        };
        self.resources
            .lock()
            .unwrap()
            .entry(type_url.to_string())
            .or_default()
            .insert(name.to_string(), (version, any));
        self.changed.send_modify(|g| *g += 1);
    }

    /// Removes a resource and pushes the removal.
    pub fn remove(&self, type_url: &str, name: &str) {
        if let Some(m) = self.resources.lock().unwrap().get_mut(type_url) {
            m.remove(name);
        }
        self.changed.send_modify(|g| *g += 1);
    }

    /// Sends `response` as is (with a fresh nonce) on every stream, bypassing the store.
    pub fn push_raw(&self, mut response: DeltaDiscoveryResponse) -> String {
        response.nonce = self.next_nonce();
        let nonce = response.nonce.clone();
        let _ = self.raw.send(response);
        nonce
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.borrow().clone()
    }

    /// Waits (up to 10 s) for a request matching `f`; returns it.
    pub async fn wait_for(&self, what: &str, f: impl Fn(&Seen) -> bool) -> Seen {
        let mut rx = self.seen.subscribe();
        let found = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|all| all.iter().any(&f)),
        )
        .await
        .unwrap_or_else(|_| panic!("no request {what} within 10 s: {:#?}", self.seen()))
        .unwrap()
        .iter()
        .find(|s| f(s))
        .cloned();
        found.unwrap()
    }

    fn next_nonce(&self) -> String {
        format!("n{}", self.nonce.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// The response that brings a client holding `have` up to date for `type_url`.
    fn diff(&self, type_url: &str, have: &mut HashMap<String, String>) -> DeltaDiscoveryResponse {
        let store = self.resources.lock().unwrap();
        let empty = BTreeMap::new();
        let now = store.get(type_url).unwrap_or(&empty);
        let mut response = DeltaDiscoveryResponse {
            type_url: type_url.to_string(),
            ..Default::default()
        };
        for (name, (version, any)) in now {
            if have.get(name) != Some(version) {
                response.resources.push(Resource {
                    name: name.clone(),
                    version: version.clone(),
                    resource: Some(any.clone()),
                    ..Default::default()
                });
            }
        }
        for name in have.keys() {
            if !now.contains_key(name) {
                response.removed_resources.push(name.clone());
            }
        }
        *have = now
            .iter()
            .map(|(n, (v, _))| (n.clone(), v.clone()))
            .collect();
        response
    }
}

struct XdsService(Arc<Xds>);

type ResponseStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

fn header(req: &tonic::metadata::MetadataMap, key: &str) -> Option<String> {
    req.get(key).and_then(|v| v.to_str().ok()).map(String::from)
}

fn check_token(md: &tonic::metadata::MetadataMap) -> Result<(), Status> {
    if header(md, "authorization").as_deref() == Some(&format!("Bearer {TOKEN}")) {
        Ok(())
    } else {
        Err(Status::unauthenticated("bad or missing bearer token"))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        check_token(request.metadata())?;
        let xds = self.0.clone();
        let stream = xds.streams.fetch_add(1, Ordering::Relaxed) + 1;
        let authorization = header(request.metadata(), "authorization");
        let cluster_id = header(request.metadata(), "clusterid");
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<DeltaDiscoveryResponse, Status>>(16);
        tokio::spawn(async move {
            let mut have: HashMap<String, HashMap<String, String>> = HashMap::new();
            let mut answered: std::collections::HashSet<String> = Default::default();
            let mut changed = xds.changed.subscribe();
            let mut raw = xds.raw.subscribe();
            let mut kill = xds.kill.subscribe();
            kill.borrow_and_update();
            loop {
                tokio::select! {
                    msg = incoming.message() => {
                        let Ok(Some(req)) = msg else { return };
                        xds.seen.send_modify(|s| s.push(Seen {
                            stream,
                            request: req.clone(),
                            authorization: authorization.clone(),
                            cluster_id: cluster_id.clone(),
                        }));
                        let subscribing = req.response_nonce.is_empty()
                            && !have.contains_key(&req.type_url);
                        if subscribing {
                            let mut h: HashMap<String, String> =
                                req.initial_resource_versions.clone().into_iter().collect();
                            if xds.is_held(&req.type_url) {
                                have.insert(req.type_url.clone(), h);
                                continue;
                            }
                            let mut resp = xds.diff(&req.type_url, &mut h);
                            have.insert(req.type_url.clone(), h);
                            answered.insert(req.type_url.clone());
                            resp.nonce = xds.next_nonce();
                            if tx.send(Ok(resp)).await.is_err() { return }
                        }
                    }
                    r = changed.changed() => {
                        if r.is_err() { return }
                        for (type_url, h) in have.iter_mut() {
                            if xds.is_held(type_url) {
                                continue;
                            }
                            let mut resp = xds.diff(type_url, h);
                            let first = answered.insert(type_url.clone());
                            if !first && resp.resources.is_empty() && resp.removed_resources.is_empty() {
                                continue;
                            }
                            resp.nonce = xds.next_nonce();
                            if tx.send(Ok(resp)).await.is_err() { return }
                        }
                    }
                    r = raw.recv() => {
                        let Ok(resp) = r else { return };
                        if tx.send(Ok(resp)).await.is_err() { return }
                    }
                    _ = kill.changed() => {
                        let _ = tx.send(Err(Status::unavailable("istiod going away"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

// === CA ===

/// What the certificate service answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaMode {
    /// A proper chain for the requested identity.
    Good,
    /// A chain for another SPIFFE id.
    WrongIdentity,
    /// A chain for the right id whose leaf does not lead to the root sent with it.
    UnrootedLeaf,
    /// A chain without the root entry (only the leaf).
    NoRoot,
    /// A root rotation under way: the leaf from the new root, the last entry holding the old
    /// root and the new one (as istiod sends both while a plugin CA's roots overlap).
    Rotating,
    /// The rotation done: the leaf and the last entry from the new root only.
    Rotated,
    /// Not a certificate at all.
    Garbage,
}

/// One `CreateCertificate` call as the server saw it.
#[derive(Clone, Debug)]
pub struct CaCall {
    pub impersonated: Option<String>,
    pub validity_seconds: i64,
    pub authorization: Option<String>,
    pub cluster_id: Option<String>,
}

pub struct Ca {
    root: Arc<TestCa>,
    other: TestCa,
    pub mode: Mutex<CaMode>,
    calls: watch::Sender<Vec<CaCall>>,
}

impl Ca {
    pub fn set_mode(&self, mode: CaMode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn calls(&self) -> Vec<CaCall> {
        self.calls.borrow().clone()
    }

    /// Waits (up to `limit`) until at least `n` calls were made.
    pub async fn wait_for_calls(&self, n: usize, limit: Duration) {
        let mut rx = self.calls.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|c| c.len() >= n))
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} CA calls within {limit:?}"))
            .unwrap();
    }
}

struct CaService(Arc<Ca>);

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        check_token(request.metadata())?;
        let authorization = header(request.metadata(), "authorization");
        let cluster_id = header(request.metadata(), "clusterid");
        let req = request.into_inner();
        let impersonated = req.metadata.as_ref().and_then(|m| {
            match m.fields.get("ImpersonatedIdentity")?.kind.as_ref()? {
                prost_types::value::Kind::StringValue(s) => Some(s.clone()),
                _ => None,
            }
        });
        self.0.calls.send_modify(|c| {
            c.push(CaCall {
                impersonated: impersonated.clone(),
                validity_seconds: req.validity_duration,
                authorization,
                cluster_id,
            })
        });
        let id = impersonated.ok_or_else(|| Status::invalid_argument("no ImpersonatedIdentity"))?;
        let ttl = Duration::from_secs(u64::try_from(req.validity_duration.max(1)).unwrap_or(60));
        let mode = *self.0.mode.lock().unwrap();
        let sign = |ca: &TestCa, san: &str| {
            ca.sign(&req.csr, san, ttl)
                .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))
        };
        let cert_chain = match mode {
            CaMode::Good => vec![sign(&self.0.root, &id)?, self.0.root.pem.clone()],
            CaMode::WrongIdentity => vec![
                sign(&self.0.root, "spiffe://cluster.local/ns/evil/sa/impostor")?,
                self.0.root.pem.clone(),
            ],
            CaMode::UnrootedLeaf => vec![sign(&self.0.other, &id)?, self.0.root.pem.clone()],
            CaMode::NoRoot => vec![sign(&self.0.root, &id)?],
            CaMode::Rotating => vec![
                sign(&self.0.other, &id)?,
                format!("{}{}", self.0.root.pem, self.0.other.pem),
            ],
            CaMode::Rotated => vec![sign(&self.0.other, &id)?, self.0.other.pem.clone()],
            CaMode::Garbage => vec![
                "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n".into(),
            ],
        };
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

// === The server ===

/// A running (or stopped) istiod stand-in.
pub struct FakeIstiod {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub xds: Arc<Xds>,
    pub ca: Arc<Ca>,
    identity: (String, String),
    running: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
}

impl FakeIstiod {
    /// A stand-in on a fresh loopback address, not yet serving; its root certificate and
    /// token are written to files.
    pub fn new() -> FakeIstiod {
        FakeIstiod::new_at(super::unique_loopback())
    }

    /// A stand-in that will serve on `ip` (its certificate names that address).
    pub fn new_at(ip: std::net::IpAddr) -> FakeIstiod {
        let addr = SocketAddr::new(ip, 15012);
        let root = Arc::new(TestCa::new("istiod test root"));
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["istiod.istio-system.svc".to_string()]).unwrap();
        params.subject_alt_names.push(SanType::IpAddress(ip));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving = params.signed_by(&key, &root.issuer).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("root-cert.pem"), &root.pem).unwrap();
        std::fs::write(dir.path().join("istio-token"), format!("{TOKEN}\n")).unwrap();
        FakeIstiod {
            addr,
            xds: Xds::new(),
            ca: Arc::new(Ca {
                root,
                other: TestCa::new("some other root"),
                mode: Mutex::new(CaMode::Good),
                calls: watch::Sender::new(Vec::new()),
            }),
            dir,
            identity: (serving.pem(), key.serialize_pem()),
            running: None,
        }
    }

    /// A stand-in already serving.
    pub async fn start() -> FakeIstiod {
        let mut f = FakeIstiod::new();
        f.serve().await;
        f
    }

    /// istiod's serving certificate and key (PEM), for a stand-in in front of it.
    pub fn serving_identity(&self) -> (&str, &str) {
        (&self.identity.0, &self.identity.1)
    }

    /// A plugin-CA directory (Istio's `cacerts` layout) for a peer's built-in CA that signs
    /// with the first root (`old`) or with the root `CaMode::Rotating` and `CaMode::Rotated`
    /// move to, and trusts both roots.
    pub fn plugin_ca_dir(&self, old: bool) -> tempfile::TempDir {
        let ca = if old { &*self.ca.root } else { &self.ca.other };
        let dir = tempfile::tempdir().unwrap();
        let both = format!("{}{}", self.ca.root.pem, self.ca.other.pem);
        std::fs::write(dir.path().join("ca-cert.pem"), &ca.pem).unwrap();
        std::fs::write(dir.path().join("ca-key.pem"), &ca.key_pem).unwrap();
        std::fs::write(dir.path().join("cert-chain.pem"), &ca.pem).unwrap();
        std::fs::write(dir.path().join("root-cert.pem"), both).unwrap();
        dir
    }

    /// The root istiod's serving certificate chains to (PEM).
    pub fn root_pem(&self) -> String {
        std::fs::read_to_string(self.root_cert_file()).unwrap()
    }

    pub fn root_cert_file(&self) -> PathBuf {
        self.dir.path().join("root-cert.pem")
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("istio-token")
    }

    pub fn address(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// As the daemon config has it.
    pub fn control_plane(&self) -> ControlPlane {
        ControlPlane {
            address: self.address(),
            root_cert_file: self.root_cert_file(),
            token_file: self.token_file(),
            cluster_id: CLUSTER_ID.to_string(),
            keepalive: weft::istiod::KEEPALIVE_INTERVAL,
        }
    }

    /// The same as a YAML flow mapping for a daemon config.
    pub fn control_plane_yaml(&self) -> String {
        format!(
            "{{address: '{}', rootCertFile: '{}', tokenFile: '{}', clusterId: {CLUSTER_ID}}}",
            self.address(),
            self.root_cert_file().display(),
            self.token_file().display()
        )
    }

    /// Starts serving on a listener made elsewhere (e.g. inside a network namespace).
    pub async fn serve_on(&mut self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        self.serve_listener(listener).await;
    }

    /// Starts serving (again) on the same address.
    pub async fn serve(&mut self) {
        assert!(self.running.is_none(), "already serving");
        let listener = {
            let mut tries = 0;
            loop {
                match tokio::net::TcpListener::bind(self.addr).await {
                    Ok(l) => break l,
                    Err(e) if tries < 50 => {
                        tries += 1;
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("bind {}: {e}", self.addr),
                }
            }
        };
        self.serve_listener(listener).await;
    }

    async fn serve_listener(&mut self, listener: tokio::net::TcpListener) {
        let tls = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&self.identity.0, &self.identity.1),
        );
        let (stop, mut stop_rx) = watch::channel(false);
        let server = tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(AggregatedDiscoveryServiceServer::new(XdsService(
                self.xds.clone(),
            )))
            .add_service(IstioCertificateServiceServer::new(CaService(
                self.ca.clone(),
            )));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let _ = server
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await;
        });
        self.running = Some((stop, task));
    }

    /// Goes away: ends every xDS stream with UNAVAILABLE and stops listening.
    pub async fn stop(&mut self) {
        let Some((stop, task)) = self.running.take() else {
            return;
        };
        self.xds.kill.send_modify(|k| *k += 1);
        stop.send_replace(true);
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            self.xds.kill.send_modify(|k| *k += 1);
            stop.send_replace(true);
            task.abort();
        }
    }
}
