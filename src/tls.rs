//! mTLS for HBONE: rustls client and server configs built from workload certificates, and the
//! SPIFFE checks on both sides (ARCHITECTURE.md §6.4).
//!
//! Owns: TLS 1.3 only, ALPN `h2`, the cipher suites ztunnel offers, the client-side *secure
//! naming* check (the server's one URI SAN must be exactly the identity expected for the
//! destination) and reading the peer's identity from its certificate. Chains are validated
//! with webpki on both sides, against the trust roots that came with the certificate in use
//! ([`IssuedCert::roots`]: a root rotated at Istio's CA arrives with the next certificate).
//! Configs are cached per certificate (by serial), so a renewed certificate, and its roots,
//! are picked up by the next handshake while live connections keep theirs. It does not decide *which* identity a connection uses: the proxy
//! passes that in.

use arc_swap::ArcSwap;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::identity::{Identity, IssuedCert};

/// Errors building TLS configs or reading peer identities.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The trust roots are unusable.
    #[error("trust roots: {0}")]
    Roots(String),
    /// A workload certificate or key was refused by rustls.
    #[error("certificate for {identity}: {reason}")]
    Certificate {
        /// Whose certificate.
        identity: Identity,
        /// Why.
        reason: String,
    },
    /// The peer presented no certificate or one without exactly one SPIFFE URI SAN.
    #[error("peer identity: {0}")]
    PeerIdentity(String),
}

/// The crypto provider: aws-lc-rs, with the TLS 1.3 suites ztunnel offers and X25519 / P-256.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs as r;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            r::cipher_suite::TLS13_AES_256_GCM_SHA384,
            r::cipher_suite::TLS13_AES_128_GCM_SHA256,
            r::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![r::kx_group::X25519, r::kx_group::SECP256R1],
        ..r::default_provider()
    })
}

/// Makes aws-lc-rs rustls's process-wide default provider, for the TLS clients that weft's
/// dependencies build without naming a provider (kube-rs's API-server client calls
/// `ClientConfig::builder()`). Without a default, rustls picks one from its crate features
/// and panics if a dependency ever turns on a second one (ring). aws-lc-rs's own defaults,
/// not [`provider`]'s narrower set: those clients reach servers outside the mesh. Call first
/// thing in `main`; a later call keeps the first default.
pub fn install_process_default() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The identity in a certificate: its single `spiffe://` URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::PeerIdentity(format!("unparsable certificate: {e}")))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::PeerIdentity(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| TlsError::PeerIdentity("certificate has no subjectAltName".into()))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return Err(TlsError::PeerIdentity(
            "certificate must carry exactly one URI SAN".into(),
        ));
    };
    uri.parse::<Identity>()
        .map_err(|e| TlsError::PeerIdentity(format!("URI SAN {uri:?}: {e}")))
}

/// Verifies a server's chain against the roots and that it is exactly `expected`.
struct SpiffeServerVerifier {
    roots: Arc<Vec<CertificateDer<'static>>>,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected.to_string())
            .finish()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchors = self
            .roots
            .iter()
            .map(webpki::anchor_from_trusted_cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| rustls::Error::General(format!("trust anchor: {e}")))?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("server certificate chain: {e}")))?;
        let got = identity_of(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if got != self.expected {
            return Err(rustls::Error::General(format!(
                "secure naming: server is {got}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

type ClientKey = (Identity, String, Identity);

/// Builds and caches TLS configs for workload identities.
pub struct TlsConfigs {
    provider: Arc<CryptoProvider>,
    /// Read without a lock on every HBONE handshake; replaced copy-on-write when a config is
    /// built (a new identity or a renewed certificate).
    servers: ArcSwap<imbl::HashMap<Identity, (String, Arc<ServerConfig>)>>,
    clients: ArcSwap<imbl::HashMap<ClientKey, Arc<ClientConfig>>>,
}

impl Default for TlsConfigs {
    fn default() -> TlsConfigs {
        TlsConfigs::new()
    }
}

impl TlsConfigs {
    /// An empty cache; each config trusts the roots of the certificate it is built for.
    pub fn new() -> TlsConfigs {
        TlsConfigs {
            provider: provider(),
            servers: ArcSwap::default(),
            clients: ArcSwap::default(),
        }
    }

    /// The roots `cert` came with, refused when there are none or one cannot be an anchor.
    fn roots_of(&self, cert: &IssuedCert) -> Result<RootCertStore, TlsError> {
        let fail = |reason: String| {
            TlsError::Roots(format!("the certificate of {}: {reason}", cert.identity))
        };
        if cert.roots.is_empty() {
            return Err(fail("came with no trust roots".into()));
        }
        let mut store = RootCertStore::empty();
        for r in &cert.roots {
            store.add(r.clone()).map_err(|e| fail(e.to_string()))?;
        }
        Ok(store)
    }

    fn certified_key(
        &self,
        cert: &IssuedCert,
    ) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
        let fail = |reason: String| TlsError::Certificate {
            identity: cert.identity.clone(),
            reason,
        };
        let key = self
            .provider
            .key_provider
            .load_private_key(cert.key_der())
            .map_err(|e| fail(e.to_string()))?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            cert.chain_der.clone(),
            key,
        )))
    }

    /// The server config presenting `cert` and requiring a client certificate from the mesh.
    pub fn server(&self, cert: &IssuedCert) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some((serial, cfg)) = self.servers.load().get(&cert.identity) {
            if *serial == cert.serial_hex {
                return Ok(cfg.clone());
            }
        }
        let ck = self.certified_key(cert)?;
        let client_verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots_of(cert)?),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Roots(e.to_string()))?;
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Roots(e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_cert_resolver(Arc::new(SingleCert(ck)));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        let cfg = Arc::new(cfg);
        self.servers.rcu(|servers| {
            servers.update(
                cert.identity.clone(),
                (cert.serial_hex.clone(), cfg.clone()),
            )
        });
        Ok(cfg)
    }

    /// The client config presenting `cert` and accepting only a server that is `expected`.
    pub fn client(
        &self,
        cert: &IssuedCert,
        expected: &Identity,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let key = (
            cert.identity.clone(),
            cert.serial_hex.clone(),
            expected.clone(),
        );
        if let Some(cfg) = self.clients.load().get(&key) {
            return Ok(cfg.clone());
        }
        let ck = self.certified_key(cert)?;
        self.roots_of(cert)?;
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: Arc::new(cert.roots.clone()),
            expected: expected.clone(),
            provider: self.provider.clone(),
        });
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Roots(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SingleCert(ck)));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        // Session resumption would skip the secure-naming check on resumed sessions' peers;
        // keep every handshake full (pooling makes handshakes rare anyway).
        cfg.resumption = rustls::client::Resumption::disabled();
        let cfg = Arc::new(cfg);
        self.clients.rcu(|clients| {
            let mut clients = imbl::HashMap::clone(clients);
            // Old serials of the same identity are dead weight after a renewal.
            clients.retain(|(id, serial, _), _| id != &key.0 || serial == &key.1);
            clients.insert(key.clone(), cfg.clone());
            clients
        });
        Ok(cfg)
    }
}

/// Presents one certificate whatever the peer asks.
#[derive(Debug)]
struct SingleCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for SingleCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for SingleCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::BuiltinCa;
    use std::time::Duration;

    #[test]
    fn configs_are_built_once_per_certificate_and_again_after_a_renewal() {
        let dir = tempfile::tempdir().unwrap();
        crate::identity::ca::init_dir(dir.path(), "cluster.local").unwrap();
        let ca = BuiltinCa::load(dir.path()).unwrap();
        let tls = TlsConfigs::new();
        let (a, b) = (
            Identity::new("cluster.local", "ns", "a").unwrap(),
            Identity::new("cluster.local", "ns", "b").unwrap(),
        );
        let day = Duration::from_secs(86_400);
        let (a1, b1) = (ca.issue(&a, day).unwrap(), ca.issue(&b, day).unwrap());
        let server = tls.server(&a1).unwrap();
        assert!(Arc::ptr_eq(&server, &tls.server(&a1).unwrap()));
        let to_b = tls.client(&a1, &b).unwrap();
        assert!(Arc::ptr_eq(&to_b, &tls.client(&a1, &b).unwrap()));
        // Another identity, another expected peer: their own configs.
        assert!(!Arc::ptr_eq(&server, &tls.server(&b1).unwrap()));
        let to_a = tls.client(&a1, &a).unwrap();
        assert!(!Arc::ptr_eq(&to_b, &to_a));
        // Renewed: new configs, and the old serial's client configs are dropped.
        let a2 = ca.issue(&a, day).unwrap();
        assert_ne!(a1.serial_hex, a2.serial_hex);
        assert!(!Arc::ptr_eq(&server, &tls.server(&a2).unwrap()));
        assert!(!Arc::ptr_eq(&to_b, &tls.client(&a2, &b).unwrap()));
        let clients = tls.clients.load();
        assert_eq!(clients.len(), 1, "old serials kept");
        assert!(clients
            .keys()
            .all(|(id, serial, _)| id == &a && serial == &a2.serial_hex));
    }
}
