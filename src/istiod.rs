//! The connection to Istio's control plane (istiod, `:15012`), shared by the xDS source and
//! the Istio CA client: a gRPC channel over TLS whose server certificate must chain to
//! `rootCertFile`, and the per-request credentials istiod expects, a bearer token read from
//! `tokenFile` and the `clusterid` header (as ztunnel sends them).
//!
//! Both files are read again on every connect (and the token on every request), so a rotated
//! projected token or a rotated root takes effect on the next attempt without a restart.
//! Owns no retry policy: callers decide when to connect again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How long establishing TCP + TLS + h2 to istiod may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// h2 pings keep long-lived xDS streams alive through NAT and detect a dead istiod; sent
/// only while a stream is open (see [`ControlPlane::keepalive`]).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors reaching istiod, each naming the file or address involved.
#[derive(Debug, thiserror::Error)]
pub enum IstiodError {
    /// `rootCertFile` or `tokenFile` could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file's content is unusable.
    #[error("{}: {reason}", path.display())]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The channel could not be set up or connected.
    #[error("connecting to {address}: {reason}")]
    Connect {
        /// istiod's address.
        address: String,
        /// Why (with the transport's cause chain).
        reason: String,
    },
}

/// How to reach an Istio control plane (istiod) over gRPC: the daemon config's `mesh.xds`
/// and `ca.istio` sections (validated by `config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlPlane {
    /// `https://host:port`, e.g. `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// PEM trust root(s) that istiod's serving certificate must chain to (Istio's
    /// `istio-ca-root-cert` ConfigMap). For the CA these are also the data path's roots.
    pub root_cert_file: PathBuf,
    /// A Kubernetes ServiceAccount token (audience `istio-ca`), sent as a bearer token; read
    /// again on every connection, so a rotated token is picked up.
    pub token_file: PathBuf,
    /// The cluster id (header `clusterid`, node metadata `CLUSTER_ID`); default `Kubernetes`.
    pub cluster_id: String,
    /// How often an h2 PING is sent on a connection with an open stream (the xDS stream);
    /// never on one without (the CA channel between renewals). istiod enforces grpc-go's
    /// keepalive policy: pings closer than 15 s apart (`MinTime`, half its 30 s keepalive
    /// time), or any ping while no stream is open (`PermitWithoutStream` false), are strikes,
    /// and after the third it closes the connection with GOAWAY `too_many_pings`. Not a
    /// config key: [`KEEPALIVE_INTERVAL`] (30 s) everywhere but tests.
    pub keepalive: Duration,
}

/// A handle on one istiod: knows how to connect and how to authenticate requests.
#[derive(Clone, Debug)]
pub struct Istiod {
    config: ControlPlane,
}

impl Istiod {
    /// A handle for `config`; connects nothing yet.
    pub fn new(config: ControlPlane) -> Istiod {
        Istiod { config }
    }

    /// The configured address.
    pub fn address(&self) -> &str {
        &self.config.address
    }

    /// The configured cluster id.
    pub fn cluster_id(&self) -> &str {
        &self.config.cluster_id
    }

    /// Reads `rootCertFile` now and connects a fresh channel that verifies istiod against it.
    pub async fn connect(&self) -> Result<Channel, IstiodError> {
        let pem = read(&self.config.root_cert_file).await?;
        check_pem_certs(&self.config.root_cert_file, &pem)?;
        let address = &self.config.address;
        let connect_err = |reason: String| IstiodError::Connect {
            address: address.clone(),
            reason,
        };
        let endpoint = Endpoint::from_shared(address.clone())
            .map_err(|e| connect_err(chain(&e)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(self.config.keepalive)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            // No pings on an idle channel: istiod counts each as a strike (see `keepalive`).
            .keep_alive_while_idle(false)
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| connect_err(chain(&e)))?;
        endpoint.connect().await.map_err(|e| connect_err(chain(&e)))
    }

    /// Reads `tokenFile` now and adds `authorization: Bearer <token>` and
    /// `clusterid: <cluster id>` to `metadata`.
    pub async fn authorize(&self, metadata: &mut MetadataMap) -> Result<(), IstiodError> {
        let path = &self.config.token_file;
        let token = read(path).await?;
        let token = String::from_utf8(token).map_err(|_| IstiodError::InvalidFile {
            path: path.clone(),
            reason: "token is not UTF-8 text".into(),
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(IstiodError::InvalidFile {
                path: path.clone(),
                reason: "token file is empty".into(),
            });
        }
        let bearer = AsciiMetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            IstiodError::InvalidFile {
                path: path.clone(),
                reason: "token has characters not allowed in a header".into(),
            }
        })?;
        metadata.insert("authorization", bearer);
        // Validated as a header value by the config.
        if let Ok(cluster) = AsciiMetadataValue::try_from(self.config.cluster_id.as_str()) {
            metadata.insert("clusterid", cluster);
        }
        Ok(())
    }
}

async fn read(path: &Path) -> Result<Vec<u8>, IstiodError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| IstiodError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// Fails unless `pem` holds at least one parsable certificate (tonic's own error for a bad
/// root would not name the file).
fn check_pem_certs(path: &Path, pem: &[u8]) -> Result<(), IstiodError> {
    let mut count = 0;
    for item in rustls_pemfile::certs(&mut &pem[..]) {
        let der = item.map_err(|e| IstiodError::InvalidFile {
            path: path.to_path_buf(),
            reason: format!("is not valid PEM: {e}"),
        })?;
        x509_parser::parse_x509_certificate(&der).map_err(|e| IstiodError::InvalidFile {
            path: path.to_path_buf(),
            reason: format!("certificate #{} is not valid X.509: {e}", count + 1),
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(IstiodError::InvalidFile {
            path: path.to_path_buf(),
            reason: "contains no PEM CERTIFICATE block".into(),
        });
    }
    Ok(())
}

/// An error with its sources, `a: b: c` (tonic's transport errors hide the cause otherwise).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}
