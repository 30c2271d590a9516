//! `weft ca serve`: Istio's `IstioCertificateService` served from a plugin-CA directory, so
//! the CA key lives in its own Deployment and node daemons (`ca.istio`) never hold it.
//!
//! Owns: the gRPC service (`CreateCertificate` as istiod answers it: authenticate, authorize
//! the impersonated identity, sign the CSR's key, answer `[leaf, intermediates..., roots]`
//! with the root(s) as the last entry, one PEM entry), its TLS listener and serving
//! certificate (issued from the same CA for the `--server-name`s, renewed at half its life, so
//! clients trust it through `root-cert.pem`), and the lifetime of requested certificates.
//! `review` owns authentication (TokenReview) and node authorization against the API server.
//!
//! Stateless: nothing but the CA directory (read once at start) and the API server (asked on
//! every request), so any number of replicas serve the same CA.
//!
//! Does not own: the CA's files and signing (`identity::ca::BuiltinCa`), the client side
//! (`identity::istio`).

pub mod review;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::identity::ca::BuiltinCa;
use crate::identity::IdentityError;
use crate::proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
pub use review::{Caller, Refusal, Reviewer, ServiceAccount};

/// The request-metadata key a node proxy names the workload's identity with.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The lifetime of a certificate whose request asks for none (istiod's
/// `DEFAULT_WORKLOAD_CERT_TTL`).
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest lifetime a request may ask for (istiod's `MAX_WORKLOAD_CERT_TTL`).
pub const MAX_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 60 * 60);
/// The serving certificate's lifetime; it is renewed at half of it.
const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `weft ca serve` could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum CaServerError {
    /// The CA directory is unusable.
    #[error("CA directory {dir}: {source}")]
    Ca {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        source: IdentityError,
    },
    /// The serving certificate could not be issued.
    #[error("serving certificate for {names:?}: {reason}")]
    ServingCert {
        /// The names asked for.
        names: Vec<String>,
        /// Why.
        reason: String,
    },
    /// The listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The kubeconfig or in-cluster configuration is unusable.
    #[error("API server configuration: {0}")]
    Kube(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(tonic::transport::Error),
}

/// What `weft ca serve` is told.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The plugin-CA directory (Istio's `cacerts` layout).
    pub ca_dir: PathBuf,
    /// The trust domain of the identities issued.
    pub trust_domain: String,
    /// ServiceAccounts allowed to ask for the identities of pods on their node.
    pub trusted_node_accounts: BTreeSet<ServiceAccount>,
    /// The names of the serving certificate (what clients dial): DNS names or IP addresses.
    pub server_names: Vec<String>,
}

/// A loaded CA server, ready to serve on listeners.
#[derive(Clone)]
pub struct CaServer {
    ca: Arc<BuiltinCa>,
    reviewer: Reviewer,
    tls: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for CaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaServer")
            .field("reviewer", &self.reviewer)
            .finish_non_exhaustive()
    }
}

impl CaServer {
    /// Loads the CA directory (blocking file reads: call at start-up), issues the serving
    /// certificate, and keeps `client` to review callers with.
    pub fn new(settings: &Settings, client: kube::Client) -> Result<CaServer, CaServerError> {
        let ca =
            Arc::new(
                BuiltinCa::load(&settings.ca_dir).map_err(|source| CaServerError::Ca {
                    dir: settings.ca_dir.clone(),
                    source,
                })?,
            );
        let resolver = ServingCert::new(ca.clone(), settings.server_names.clone())?;
        let mut tls = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| CaServerError::ServingCert {
                names: settings.server_names.clone(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(CaServer {
            ca,
            reviewer: Reviewer::new(
                client,
                settings.trust_domain.clone(),
                settings.trusted_node_accounts.clone(),
            ),
            tls: Arc::new(tls),
        })
    }

    /// Serves `IstioCertificateService` over TLS on `listener` until `shutdown` is cancelled.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), CaServerError> {
        let acceptor = TlsAcceptor::from(self.tls.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        // A child: cancelled with `shutdown`, and by this function when the server returns.
        let accept_stop = shutdown.child_token();
        // Handshakes run in tasks of their own so a slow client holds up nobody; every one
        // ends with its timeout or `shutdown`, and `handshakes` is waited for before return.
        let handshakes = tokio_util::task::TaskTracker::new();
        let stop_all = accept_stop.clone();
        let tracker = handshakes.clone();
        let accept = tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = accept_stop.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let stop = accept_stop.clone();
                tracker.spawn(async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    let result = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = handshake => r,
                    };
                    match result {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        let service = CaService {
            ca: self.ca.clone(),
            reviewer: self.reviewer.clone(),
        };
        let result = tonic::transport::Server::builder()
            .add_service(IstioCertificateServiceServer::new(service))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                shutdown.clone().cancelled_owned(),
            )
            .await
            .map_err(CaServerError::Serve);
        // The server returns on `shutdown` or on an error; either way the accept loop and the
        // handshakes in flight end now.
        stop_all.cancel();
        let _ = accept.await;
        handshakes.close();
        handshakes.wait().await;
        result
    }
}

/// Binds `listen`, connects to the API server (`kubeconfig`, else in-cluster), and serves
/// until `shutdown` is cancelled: `weft ca serve`.
pub async fn run(
    settings: Settings,
    listen: SocketAddr,
    kubeconfig: Option<PathBuf>,
    shutdown: CancellationToken,
) -> Result<(), CaServerError> {
    let client = crate::kubeapi::client(kubeconfig.as_deref())
        .await
        .map_err(|e| CaServerError::Kube(e.to_string()))?;
    let server = tokio::task::spawn_blocking(move || CaServer::new(&settings, client))
        .await
        .map_err(|e| CaServerError::Kube(format!("loading the CA: {e}")))??;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| CaServerError::Listen {
            addr: listen,
            source,
        })?;
    tracing::info!(%listen, "serving Istio's certificate service");
    server.serve(listener, shutdown).await
}

// === impl CaService ===

/// `IstioCertificateService` over a [`BuiltinCa`] and a [`Reviewer`].
struct CaService {
    ca: Arc<BuiltinCa>,
    reviewer: Reviewer,
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let peer = request.remote_addr();
        match self.create(request).await {
            Ok(r) => Ok(tonic::Response::new(r)),
            Err(refusal) => {
                tracing::warn!(?peer, reason = %refusal, "certificate request refused");
                Err(refusal.into())
            }
        }
    }
}

impl CaService {
    async fn create(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, Refusal> {
        let token = bearer_token(request.metadata())?;
        let request = request.into_inner();
        let ttl = lifetime(request.validity_duration)?;
        let caller = self.reviewer.authenticate(&token).await?;
        let impersonated = request
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s.as_str()),
                _ => None,
            });
        let id = self.reviewer.authorize(&caller, impersonated).await?;
        let leaf = self
            .ca
            .sign_csr(&request.csr, &id, ttl)
            .map_err(|e| Refusal::InvalidArgument(format!("cannot sign for {id}: {e}")))?;
        tracing::info!(
            identity = %id,
            caller = %caller.service_account,
            serial = %leaf.serial_hex,
            "issued certificate"
        );
        // istiod's shape: one entry per certificate of the chain, then all the roots in one
        // last entry (a client cannot tell the roots apart otherwise).
        let mut cert_chain = vec![leaf.pem];
        cert_chain.extend(self.ca.chain_pem().iter().cloned());
        cert_chain.push(self.ca.roots_pem().concat());
        Ok(IstioCertificateResponse { cert_chain })
    }
}

/// The caller's `authorization: Bearer <token>`.
fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<String, Refusal> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Refusal::Unauthenticated("no bearer token (authorization header)".into()))?;
    let value = value.to_str().map_err(|_| {
        Refusal::Unauthenticated("the authorization header is not ASCII text".into())
    })?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() => {
            Ok(token.trim().to_string())
        }
        _ => Err(Refusal::Unauthenticated(
            "the authorization header is not \"Bearer <token>\"".into(),
        )),
    }
}

/// The lifetime a request asks for: the default for none, refused above the maximum.
fn lifetime(validity_seconds: i64) -> Result<Duration, Refusal> {
    if validity_seconds <= 0 {
        return Ok(DEFAULT_CERT_TTL);
    }
    let asked = Duration::from_secs(validity_seconds.unsigned_abs());
    if asked > MAX_CERT_TTL {
        return Err(Refusal::InvalidArgument(format!(
            "the requested lifetime {}s is longer than the maximum {}s",
            asked.as_secs(),
            MAX_CERT_TTL.as_secs()
        )));
    }
    Ok(asked)
}

// === impl ServingCert ===

/// The serving certificate, issued from the CA for the DNS names and renewed on the first
/// handshake after half its life (issuing takes well under a millisecond).
#[derive(Debug)]
struct ServingCert {
    ca: Arc<BuiltinCa>,
    names: Vec<String>,
    current: Mutex<(Arc<CertifiedKey>, SystemTime)>,
}

impl ServingCert {
    fn new(ca: Arc<BuiltinCa>, names: Vec<String>) -> Result<ServingCert, CaServerError> {
        if names.is_empty() {
            return Err(CaServerError::ServingCert {
                names,
                reason: "at least one name is needed".into(),
            });
        }
        let current = issue_serving(&ca, &names).map_err(|reason| CaServerError::ServingCert {
            names: names.clone(),
            reason,
        })?;
        Ok(ServingCert {
            ca,
            names,
            current: Mutex::new(current),
        })
    }
}

/// A serving certificate for `names` and when to renew it.
fn issue_serving(
    ca: &BuiltinCa,
    names: &[String],
) -> Result<(Arc<CertifiedKey>, SystemTime), String> {
    let (chain, key, not_after) = ca
        .issue_server(names, SERVING_CERT_TTL)
        .map_err(|e| e.to_string())?;
    let key = CertifiedKey::from_der(chain, key.into(), &crate::tls::provider())
        .map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    let half = not_after.duration_since(now).unwrap_or_default() / 2;
    Ok((Arc::new(key), now + half))
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = crate::sync::lock(&self.current);
        if SystemTime::now() >= current.1 {
            match issue_serving(&self.ca, &self.names) {
                Ok(next) => *current = next,
                Err(e) => tracing::warn!(error = %e, "cannot renew the serving certificate"),
            }
        }
        Some(current.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_without_lifetime_gets_a_day_and_a_too_long_one_is_refused() {
        assert_eq!(lifetime(0).unwrap(), DEFAULT_CERT_TTL);
        assert_eq!(lifetime(3600).unwrap(), Duration::from_secs(3600));
        let e = lifetime(100 * 24 * 3600).unwrap_err().to_string();
        assert!(e.contains("longer than the maximum"), "{e}");
    }

    #[test]
    fn only_a_bearer_token_is_taken() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert!(bearer_token(&md)
            .unwrap_err()
            .to_string()
            .contains("no bearer token"));
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert!(bearer_token(&md).is_err());
        md.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&md).unwrap(), "abc");
    }

    #[test]
    fn service_accounts_parse_as_namespace_slash_name() {
        let sa: ServiceAccount = "istio-system/weft".parse().unwrap();
        assert_eq!(sa.to_string(), "istio-system/weft");
        assert!("weft".parse::<ServiceAccount>().is_err());
        assert!("a/b/c".parse::<ServiceAccount>().is_err());
        assert!("/b".parse::<ServiceAccount>().is_err());
    }
}
