//! `weft ca serve` (the real server, started in-process through `weft::ca_server::run` with a
//! kubeconfig, as the CLI starts it) against the API server stand-in, asked by weft's own
//! Istio CA client (`IstioCa`, as a node daemon with `ca.istio` asks): certificates for the
//! ServiceAccounts of pods on the caller's node, chaining to the CA directory's root; every
//! refusal with its reason; two replicas on one CA directory.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use support::apiserver::{FakeApiServer, API_AUDIENCE};
use tokio_util::sync::CancellationToken;
use weft::config::ControlPlane;
use weft::identity::ca::IssuedCert;
use weft::identity::istio::IstioCaError;
use weft::identity::{Identity, IdentityError, IstioCa};

const HOUR: Duration = Duration::from_secs(3600);

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).unwrap()
}

/// A CA directory (`weft ca init`) in a temporary directory.
fn ca_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cacerts");
    weft::identity::ca::init_dir(&dir, "cluster.local").unwrap();
    (tmp, dir)
}

/// A running `weft ca serve`; stops when dropped.
struct CaServe {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for CaServe {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl CaServe {
    /// Starts `weft ca serve --ca-dir DIR --listen IP:15012 --server-name IP --kubeconfig ...`
    /// (trusting `istio-system/weft`) and waits until it listens.
    async fn start(api: &FakeApiServer, dir: &Path) -> CaServe {
        let ip = support::unique_loopback();
        let addr = SocketAddr::new(ip, 15012);
        let settings = weft::ca_server::Settings {
            ca_dir: dir.to_path_buf(),
            trust_domain: "cluster.local".into(),
            trusted_node_accounts: BTreeSet::from(["istio-system/weft".parse().unwrap()]),
            server_names: vec![ip.to_string()],
        };
        let stop = CancellationToken::new();
        let handle = tokio::spawn(weft::ca_server::run(
            settings,
            addr,
            Some(api.kubeconfig()),
            stop.clone(),
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                !handle.is_finished(),
                "weft ca serve stopped: {:?}",
                handle.await
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "weft ca serve is not listening"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        CaServe { addr, stop }
    }

    /// weft's Istio CA client as a node daemon has it: this server, `root-cert.pem` to
    /// verify it with, `token` as the node's token.
    fn client(&self, dir: &Path, token: &str, tmp: &Path) -> IstioCa {
        let token_file = tmp.join(format!("token-{}", self.addr.ip()));
        std::fs::write(&token_file, token).unwrap();
        IstioCa::new(ControlPlane {
            address: format!("https://{}", self.addr),
            root_cert_file: dir.join("root-cert.pem"),
            token_file,
            cluster_id: "Kubernetes".into(),
            keepalive: weft::istiod::KEEPALIVE_INTERVAL,
        })
        .unwrap()
    }
}

fn roots_of(dir: &Path) -> Vec<CertificateDer<'static>> {
    let pem = std::fs::read(dir.join("root-cert.pem")).unwrap();
    rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The leaf validates, through the chain presented, to `roots` (both usages a mesh needs).
fn assert_chains_to(cert: &IssuedCert, roots: &[CertificateDer<'static>]) {
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&cert.chain_der[0]).unwrap();
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &cert.chain_der[1..],
            rustls::pki_types::UnixTime::now(),
            usage,
            None,
            None,
        )
        .unwrap();
    }
}

/// The gRPC status code and message a refusal came with.
fn refusal(e: IdentityError) -> (tonic::Code, String) {
    match e {
        IdentityError::Issue {
            reason: weft::identity::IssueError::Istio(IstioCaError::Refused { code, message, .. }),
            ..
        } => (code, message),
        other => panic!("not a refusal by the CA: {other}"),
    }
}

/// The cluster of these tests: node-1 runs weft (`istio-system/weft-n1`) and `shop/cart-1`;
/// node-2 runs `shop/pay-1`.
async fn cluster() -> FakeApiServer {
    let api = FakeApiServer::start().await;
    api.add_pod("istio-system", "weft-n1", "weft", "node-1");
    api.add_pod("shop", "cart-1", "cart", "node-1");
    api.add_pod("shop", "pay-1", "pay", "node-2");
    api
}

fn in_an_hour() -> SystemTime {
    SystemTime::now() + HOUR
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_certificates_for_the_service_accounts_of_pods_on_its_node() {
    let api = cluster().await;
    let (tmp, dir) = ca_dir();
    let serve = CaServe::start(&api, &dir).await;
    let token = api.pod_token("istio-system", "weft-n1", &["istio-ca"], in_an_hour());
    let ca = serve.client(&dir, &token, tmp.path());

    let cert = ca.issue(&id("shop", "cart"), HOUR).await.unwrap();
    assert_eq!(cert.identity, id("shop", "cart"));
    assert_eq!(
        weft::tls::identity_of(&cert.chain_der[0]).unwrap(),
        id("shop", "cart")
    );
    // The roots the certificate travels with are the CA directory's, and it chains to them.
    let roots = roots_of(&dir);
    assert_eq!(cert.roots, roots);
    assert_chains_to(&cert, &roots);
    let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
    assert!(lifetime >= HOUR && lifetime < 2 * HOUR, "{lifetime:?}");
    // The key the node holds is the leaf's (the CA signed the CSR's key).
    rustls::sign::CertifiedKey::from_der(
        cert.chain_der.clone(),
        cert.key_der(),
        &weft::tls::provider(),
    )
    .expect("key matches the leaf");

    // It asked the API server as istiod does: a TokenReview, the caller's pod, the node's pods.
    let requests = api.requests();
    let asked = |prefix: &str, part: &str| {
        requests
            .iter()
            .any(|r| r.starts_with(prefix) && r.contains(part))
    };
    assert!(
        asked("POST /apis/authentication.k8s.io/v1/tokenreviews?", ""),
        "{requests:#?}"
    );
    assert!(
        asked("GET /api/v1/namespaces/istio-system/pods/weft-n1?", ""),
        "{requests:#?}"
    );
    assert!(
        asked("GET /api/v1/pods?", "fieldSelector=spec.nodeName%3Dnode-1"),
        "{requests:#?}"
    );

    // Its own ServiceAccount's identity too (a weft pod runs on node-1).
    let own = ca.issue(&id("istio-system", "weft"), HOUR).await.unwrap();
    assert_chains_to(&own, &roots);
}

/// A cluster, a CA directory and `weft ca serve` on it; kept alive together.
struct Setup {
    api: FakeApiServer,
    tmp: tempfile::TempDir,
    dir: PathBuf,
    serve: CaServe,
}

impl Setup {
    async fn new() -> Setup {
        let api = cluster().await;
        let (tmp, dir) = ca_dir();
        let serve = CaServe::start(&api, &dir).await;
        Setup {
            api,
            tmp,
            dir,
            serve,
        }
    }

    /// The client of node-1's weft with a token for `audience`, valid until `expires`.
    fn node_client(&self, audience: &str, expires: SystemTime) -> IstioCa {
        let token = self
            .api
            .pod_token("istio-system", "weft-n1", &[audience], expires);
        self.client(&token)
    }

    fn client(&self, token: &str) -> IstioCa {
        self.serve.client(&self.dir, token, self.tmp.path())
    }
}

/// How `ca` refuses `id`: the status code and its message.
async fn refused(ca: &IstioCa, id: &Identity) -> (tonic::Code, String) {
    refusal(ca.issue(id, HOUR).await.unwrap_err())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_with_no_pod_on_the_callers_node_is_refused_naming_the_node() {
    let s = Setup::new().await;
    let ca = s.node_client("istio-ca", in_an_hour());
    // shop/pay runs on node-2 only.
    let (code, message) = refused(&ca, &id("shop", "pay")).await;
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(
        message.contains("no pod with ServiceAccount shop/pay runs on node \"node-1\""),
        "{message}"
    );
    assert!(message.contains("istio-system/weft"), "{message}");

    // Served for a local one; refused again once its pod is gone from the node.
    ca.issue(&id("shop", "cart"), HOUR).await.unwrap();
    s.api.delete_pod("shop", "cart-1");
    let (code, message) = refused(&ca, &id("shop", "cart")).await;
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(
        message.contains("shop/cart runs on node \"node-1\""),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_an_untrusted_service_account_is_refused_naming_the_account() {
    let s = Setup::new().await;
    let cart_token = s
        .api
        .pod_token("shop", "cart-1", &["istio-ca"], in_an_hour());
    let (code, message) = refused(&s.client(&cart_token), &id("shop", "cart")).await;
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(
        message.contains("the caller shop/cart is not a trusted node account"),
        "{message}"
    );
    assert!(
        message.contains("spiffe://cluster.local/ns/shop/sa/cart"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_token_bound_to_no_pod_has_no_node_and_is_refused_saying_so() {
    let s = Setup::new().await;
    let token = s
        .api
        .unbound_token("istio-system", "weft", &["istio-ca"], in_an_hour());
    let (code, message) = refused(&s.client(&token), &id("shop", "cart")).await;
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(
        message.contains("the token of istio-system/weft is not bound to a pod"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_a_deleted_node_pod_is_refused_by_the_api_server() {
    let s = Setup::new().await;
    let ca = s.node_client("istio-ca", in_an_hour());
    s.api.delete_pod("istio-system", "weft-n1");
    let (code, message) = refused(&ca, &id("shop", "cart")).await;
    assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
    assert!(message.contains("\"weft-n1\" not found"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_audience_is_refused_with_the_api_servers_reason() {
    let s = Setup::new().await;
    let ca = s.node_client(API_AUDIENCE, in_an_hour());
    let (code, message) = refused(&ca, &id("shop", "cart")).await;
    assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
    assert!(
        message.contains("not authenticated (audience istio-ca)"),
        "{message}"
    );
    assert!(message.contains("token audiences"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_with_the_api_servers_reason() {
    let s = Setup::new().await;
    let ca = s.node_client("istio-ca", SystemTime::now() - Duration::from_secs(1));
    let (code, message) = refused(&ca, &id("shop", "cart")).await;
    assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
    assert!(message.contains("has expired"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_of_another_trust_domain_is_refused_naming_ours() {
    let s = Setup::new().await;
    let ca = s.node_client("istio-ca", in_an_hour());
    let other = Identity::new("other.domain", "shop", "cart").unwrap();
    let (code, message) = refused(&ca, &other).await;
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(message.contains("trust domain cluster.local"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_ca_directory_issue_certificates_of_the_same_root() {
    let api = cluster().await;
    let (tmp, dir) = ca_dir();
    let one = CaServe::start(&api, &dir).await;
    let two = CaServe::start(&api, &dir).await;
    let token = api.pod_token("istio-system", "weft-n1", &["istio-ca"], in_an_hour());
    let roots = roots_of(&dir);
    let a = one
        .client(&dir, &token, tmp.path())
        .issue(&id("shop", "cart"), HOUR)
        .await
        .unwrap();
    let b = two
        .client(&dir, &token, tmp.path())
        .issue(&id("shop", "cart"), HOUR)
        .await
        .unwrap();
    assert_ne!(a.serial_hex, b.serial_hex, "two certificates");
    assert_eq!(a.roots, roots);
    assert_eq!(b.roots, roots);
    assert_chains_to(&a, &roots);
    assert_chains_to(&b, &roots);
    // Each chain also validates with the other's intermediates: the same signing CA.
    assert_eq!(a.chain_der[1..], b.chain_der[1..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_impersonation_the_caller_gets_its_own_identity_in_istiods_chain_shape() {
    use weft::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
    use weft::proto::istio::v1::auth::IstioCertificateRequest;

    let s = Setup::new().await;
    // Any authenticated ServiceAccount, trusted node account or not, may have its own.
    let token = s
        .api
        .pod_token("shop", "cart-1", &["istio-ca"], in_an_hour());
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let root_pem = std::fs::read_to_string(s.dir.join("root-cert.pem")).unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("https://{}", s.serve.addr))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&root_pem)),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let chain = IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    // [leaf, ca-cert.pem, the rest of cert-chain.pem..., root-cert.pem]
    let certs = |pem: &str| -> Vec<CertificateDer<'static>> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let leaf = certs(&chain[0]);
    assert_eq!(leaf.len(), 1);
    assert_eq!(
        weft::tls::identity_of(&leaf[0]).unwrap(),
        id("shop", "cart")
    );
    let ca_cert = std::fs::read_to_string(s.dir.join("ca-cert.pem")).unwrap();
    assert_eq!(certs(&chain[1]), certs(&ca_cert));
    assert_eq!(chain.last().unwrap(), &root_pem);
    // No lifetime asked: istiod's default, a day.
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf[0]).unwrap();
    let v = parsed.validity();
    let lifetime = v.not_after.timestamp() - v.not_before.timestamp();
    assert!(
        (24 * 3600..24 * 3600 + 120).contains(&lifetime),
        "{lifetime}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_weft_binary_serves_with_its_cli_flags_and_stops_on_sigterm() {
    let api = cluster().await;
    let (tmp, dir) = ca_dir();
    let ip = support::unique_loopback();
    let addr = SocketAddr::new(ip, 15012);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["ca", "serve", "--ca-dir"])
        .arg(&dir)
        .args(["--listen", &addr.to_string()])
        .args([
            "--trusted-node-accounts",
            "kube-system/other,istio-system/weft",
        ])
        .args(["--server-name", &format!("weft-ca.istio-system.svc,{ip}")])
        .arg("--kubeconfig")
        .arg(api.kubeconfig())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(child.try_wait().unwrap().is_none(), "weft ca serve exited");
        assert!(std::time::Instant::now() < deadline, "never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let serve = CaServe {
        addr,
        stop: CancellationToken::new(),
    };
    let token = api.pod_token("istio-system", "weft-n1", &["istio-ca"], in_an_hour());
    let cert = serve
        .client(&dir, &token, tmp.path())
        .issue(&id("shop", "cart"), HOUR)
        .await
        .unwrap();
    assert_chains_to(&cert, &roots_of(&dir));

    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("weft ca serve did not stop on SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}
