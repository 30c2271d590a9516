//! [`IstioCa`]: workload certificates from Istio's CA (istiod's `IstioCertificateService`),
//! asked for the way ztunnel asks: one CSR per identity, on behalf of the workload.
//!
//! Owns: key and CSR generation (ECDSA P-256, with rcgen; the private key never leaves the
//! process), the `CreateCertificate` call with `ImpersonatedIdentity` in the request metadata
//! and istiod's credentials (`istiod`), and the validation of every chain that comes back
//! before anyone may use it. Does not own retries: a failed or refused issuance is an error,
//! and the [`CertManager`](super::CertManager) keeps the old certificate and retries with
//! backoff.
//!
//! Every failure is an [`IstioCaError`], naming istiod's address when it refused, or the
//! chain entry or check that failed.
//!
//! A response's `cert_chain` is, as istiod builds it: the leaf, then the signing CA's chain,
//! then, as its last entry, the trust root(s) (one PEM entry that may hold several
//! certificates during a root rotation). It is used only if all of these hold:
//! - every entry is PEM holding at least one certificate, each valid X.509, leaf first;
//! - there are at least two entries, the last one holding the roots, each usable as a trust
//!   anchor;
//! - the leaf's public key is the key generated for this request;
//! - the leaf has exactly one URI SAN, equal to the requested SPIFFE id;
//! - the leaf validates (webpki, client and server auth) through the entries between it and
//!   the last up to one of those roots.
//!
//! Those roots travel with the certificate ([`IssuedCert::roots`]): the data path trusts them
//! while that certificate is in use, until the next response brings the next ones, as
//! ztunnel does. `rootCertFile` authenticates only the connection to istiod (which is what
//! makes the roots in its answer trustworthy); it is checked at start so a bad file fails
//! early, and read again on every connection.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::CertificateDer;
use tonic::transport::Channel;

use super::ca::{read_certs, verify_leaf, CertificateAuthority, ChainError, IssuedCert};
use super::{Identity, IdentityError};
use crate::istiod::ControlPlane;
use crate::istiod::{Istiod, IstiodError};
use crate::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::istio::v1::auth::IstioCertificateRequest;

/// How long one `CreateCertificate` call may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The request-metadata key ztunnel uses to ask for a workload's identity (caclient.rs).
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Why Istio's CA gave no usable certificate: asking failed (naming istiod's address where it
/// answered), or the chain it returned failed a check of the module doc (naming the entry).
#[derive(Debug, thiserror::Error)]
pub enum IstioCaError {
    /// Generating the key for the CSR failed.
    #[error("generating a key: {0}")]
    GenerateKey(rcgen::Error),
    /// The identity's URI could not be put in the CSR's URI SAN.
    #[error("URI SAN: {0}")]
    UriSan(rcgen::Error),
    /// Building or encoding the CSR failed.
    #[error("building the CSR: {0}")]
    Csr(rcgen::Error),
    /// istiod's credentials could not be attached to the request.
    #[error("{0}")]
    Authorize(IstiodError),
    /// No channel to istiod.
    #[error("{0}")]
    Connect(IstiodError),
    /// istiod answered `CreateCertificate` with an error status.
    #[error("{address} refused: {code}: {message}")]
    Refused {
        /// istiod's address.
        address: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// An entry of the returned `cert_chain` is not PEM.
    #[error("istiod returned an unusable chain: cert_chain[{index}] is not valid PEM: {source}")]
    ChainNotPem {
        /// Which entry of `cert_chain`.
        index: usize,
        /// The PEM parser's error.
        source: std::io::Error,
    },
    /// An entry of the returned `cert_chain` holds no certificate.
    #[error("istiod returned an unusable chain: cert_chain[{index}] holds no PEM certificate")]
    ChainEntryEmpty {
        /// Which entry of `cert_chain`.
        index: usize,
    },
    /// The returned `cert_chain` is empty.
    #[error("istiod returned an unusable chain: cert_chain is empty")]
    ChainEmpty,
    /// A certificate of the chain is not X.509.
    #[error(
        "istiod returned an unusable chain: certificate #{number} is not valid X.509: {source}"
    )]
    NotX509 {
        /// Its position in the chain, from 1 (the leaf).
        number: usize,
        /// The parser's error.
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    /// The leaf certifies another key than the CSR's.
    #[error("istiod returned an unusable chain: the leaf's public key is not the key of our CSR")]
    LeafKeyMismatch,
    /// The leaf's subjectAltName extension does not parse.
    #[error("istiod returned an unusable chain: the leaf's subjectAltName is malformed: {0}")]
    MalformedSan(x509_parser::error::X509Error),
    /// The leaf has no subjectAltName extension.
    #[error("istiod returned an unusable chain: the leaf has no subjectAltName")]
    NoSan,
    /// The leaf's one URI SAN is another identity.
    #[error("istiod returned an unusable chain: the leaf is for {found:?}, not {wanted:?}")]
    OtherIdentity {
        /// The URI SAN the leaf has.
        found: String,
        /// The SPIFFE id asked for.
        wanted: String,
    },
    /// The leaf has no or several URI SANs.
    #[error(
        "istiod returned an unusable chain: the leaf has {} URI SANs {found:?}; exactly one \
         ({wanted:?}) is required",
        found.len()
    )]
    UriSanCount {
        /// The URI SANs the leaf has.
        found: Vec<String>,
        /// The SPIFFE id asked for.
        wanted: String,
    },
    /// The chain has no entry for the roots after the leaf.
    #[error(
        "istiod returned an unusable chain: cert_chain has {entries} entry, so no root \
         (its last entry must hold the trust root(s))"
    )]
    NoRoots {
        /// How many entries `cert_chain` has.
        entries: usize,
    },
    /// A certificate of the last entry cannot be a trust anchor.
    #[error(
        "istiod returned an unusable chain: root #{number} of the last entry cannot be a \
         trust anchor: {reason}"
    )]
    BadRoot {
        /// Its position in the last entry, from 1.
        number: usize,
        /// webpki's reason.
        reason: String,
    },
    /// The chain does not validate up to the roots of its last entry.
    #[error(
        "istiod returned an unusable chain: the chain does not lead to a trusted root (the \
         roots of its last entry): {0}"
    )]
    Untrusted(ChainError),
}

/// Istio's CA as a [`CertificateAuthority`].
pub struct IstioCa {
    istiod: Istiod,
    root_cert_file: PathBuf,
    /// The roots of the latest accepted response (none before the first), for display: the
    /// data path reads each certificate's own.
    roots: Mutex<Vec<CertificateDer<'static>>>,
    /// The connected channel, dropped after a transport failure so the next call reconnects
    /// (and re-reads `rootCertFile`).
    channel: tokio::sync::Mutex<Option<Channel>>,
}

impl std::fmt::Debug for IstioCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioCa")
            .field("address", &self.istiod.address())
            .field("root_cert_file", &self.root_cert_file)
            .finish_non_exhaustive()
    }
}

impl IstioCa {
    /// Checks the trust roots of `config.root_cert_file`, which istiod's serving certificate
    /// must chain to (a missing or malformed file fails start-up, naming it); connects
    /// nothing yet: istiod may come up later. Reads a file synchronously: call it at
    /// start-up or from `spawn_blocking`.
    pub fn new(config: ControlPlane) -> Result<IstioCa, IdentityError> {
        let roots = read_certs(&config.root_cert_file)?;
        for root in &roots {
            webpki::anchor_from_trusted_cert(root).map_err(|e| IdentityError::InvalidFile {
                path: config.root_cert_file.clone(),
                reason: format!("holds a certificate that cannot be a trust anchor: {e}"),
            })?;
        }
        tracing::info!(
            address = %config.address,
            root_cert_file = %config.root_cert_file.display(),
            roots = roots.len(),
            "using Istio's CA"
        );
        Ok(IstioCa {
            root_cert_file: config.root_cert_file.clone(),
            istiod: Istiod::new(config),
            roots: Mutex::new(Vec::new()),
            channel: tokio::sync::Mutex::new(None),
        })
    }

    /// Generates a key, asks istiod to sign a CSR for `id`, and validates what comes back.
    pub async fn issue(&self, id: &Identity, ttl: Duration) -> Result<IssuedCert, IdentityError> {
        let fail = |e: IstioCaError| IdentityError::Issue {
            identity: id.clone(),
            reason: e.into(),
        };
        let (key, csr) = csr_for(id).map_err(fail)?;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(prost_types::Struct {
                fields: BTreeMap::from([(
                    IMPERSONATED_IDENTITY.to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                    },
                )]),
            }),
        });
        request.set_timeout(REQUEST_TIMEOUT);
        self.istiod
            .authorize(request.metadata_mut())
            .await
            .map_err(|e| fail(IstioCaError::Authorize(e)))?;
        let channel = self
            .channel()
            .await
            .map_err(|e| fail(IstioCaError::Connect(e)))?;
        let response = match IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => {
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) {
                    *self.channel.lock().await = None;
                }
                return Err(fail(IstioCaError::Refused {
                    address: self.istiod.address().to_string(),
                    code: status.code(),
                    message: status.message().to_string(),
                }));
            }
        };
        let checked = check_chain(id, &key, &response.cert_chain).map_err(fail)?;
        {
            let mut roots = crate::sync::lock(&self.roots);
            if *roots != checked.roots {
                tracing::info!(
                    identity = %id,
                    roots = checked.roots.len(),
                    "trust roots from Istio's CA changed; new connections use them"
                );
                roots.clone_from(&checked.roots);
            }
        }
        tracing::debug!(identity = %id, serial = %checked.serial_hex, "certificate from Istio's CA");
        Ok(IssuedCert::from_parts(
            id.clone(),
            &key,
            checked.chain,
            checked.serial_hex,
            checked.not_before,
            checked.not_after,
            checked.roots,
        ))
    }

    async fn channel(&self) -> Result<Channel, IstiodError> {
        let mut guard = self.channel.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = self.istiod.connect().await?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// The file the trust roots come from.
    pub fn root_cert_file(&self) -> &Path {
        &self.root_cert_file
    }
}

impl CertificateAuthority for IstioCa {
    fn sign(
        &self,
        id: &Identity,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<IssuedCert, IdentityError>> + Send + '_>> {
        let id = id.clone();
        Box::pin(async move { self.issue(&id, ttl).await })
    }

    fn roots_der(&self) -> Vec<CertificateDer<'static>> {
        crate::sync::lock(&self.roots).clone()
    }
}

/// A fresh P-256 key and a PEM CSR for `id`: empty subject, the SPIFFE id as the only
/// (URI) SAN, like ztunnel's.
fn csr_for(id: &Identity) -> Result<(KeyPair, String), IstioCaError> {
    let key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(IstioCaError::GenerateKey)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    // An Identity's URI is ASCII (see `Identity::new`), so this cannot fail in practice.
    let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(IstioCaError::UriSan)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(IstioCaError::Csr)?;
    Ok((key, csr))
}

/// A chain that passed every check of the module doc.
#[derive(Debug)]
struct CheckedChain {
    /// The leaf and the intermediates (what we present).
    chain: Vec<CertificateDer<'static>>,
    /// The roots of the last entry.
    roots: Vec<CertificateDer<'static>>,
    serial_hex: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// Checks a `cert_chain` from istiod for `id` and `key` (the module doc's list).
fn check_chain(
    id: &Identity,
    key: &KeyPair,
    pem_chain: &[String],
) -> Result<CheckedChain, IstioCaError> {
    let mut entries: Vec<Vec<CertificateDer<'static>>> = Vec::with_capacity(pem_chain.len());
    for (index, pem) in pem_chain.iter().enumerate() {
        let certs = rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| IstioCaError::ChainNotPem { index, source })?;
        if certs.is_empty() {
            return Err(IstioCaError::ChainEntryEmpty { index });
        }
        entries.push(certs);
    }
    if entries.is_empty() {
        return Err(IstioCaError::ChainEmpty);
    }
    let all: Vec<&CertificateDer<'static>> = entries.iter().flatten().collect();
    let parsed = all
        .iter()
        .enumerate()
        .map(|(i, der)| {
            x509_parser::parse_x509_certificate(der)
                .map(|(_, c)| c)
                .map_err(|source| IstioCaError::NotX509 {
                    number: i + 1,
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let Some((roots, signed)) = entries.split_last().filter(|(_, rest)| !rest.is_empty()) else {
        return Err(IstioCaError::NoRoots {
            entries: entries.len(),
        });
    };
    for (i, root) in roots.iter().enumerate() {
        webpki::anchor_from_trusted_cert(root).map_err(|e| IstioCaError::BadRoot {
            number: i + 1,
            reason: e.to_string(),
        })?;
    }
    let chain: Vec<CertificateDer<'static>> = signed.iter().flatten().cloned().collect();
    let (leaf_der, intermediates) = chain.split_first().ok_or(IstioCaError::ChainEmpty)?;
    let leaf = &parsed[0];
    if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(IstioCaError::LeafKeyMismatch);
    }
    let san = leaf
        .subject_alternative_name()
        .map_err(IstioCaError::MalformedSan)?
        .ok_or(IstioCaError::NoSan)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let wanted = id.to_string();
    match uris.as_slice() {
        [uri] if *uri == wanted => {}
        [uri] => {
            return Err(IstioCaError::OtherIdentity {
                found: uri.to_string(),
                wanted,
            })
        }
        _ => {
            return Err(IstioCaError::UriSanCount {
                found: uris.iter().map(|u| u.to_string()).collect(),
                wanted,
            })
        }
    }
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        verify_leaf(leaf_der, intermediates, roots, usage).map_err(IstioCaError::Untrusted)?;
    }
    let validity = leaf.validity();
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok(CheckedChain {
        serial_hex: hex::encode(leaf.raw_serial()),
        not_before: at(validity.not_before.timestamp()),
        not_after: at(validity.not_after.timestamp()),
        roots: roots.clone(),
        chain,
    })
}

/// What [`IstioCa::issue`] does with the bytes of a `CreateCertificate` response, for the
/// fuzz targets (`crate::fuzzing`): decoded as protobuf, its chain checked against `key` for
/// `id`, and the certificate assembled. Errors are flattened to text: the fuzzer
/// only looks for panics.
pub(crate) fn accept_response_bytes(
    bytes: &[u8],
    id: &Identity,
    key: &KeyPair,
) -> Result<IssuedCert, String> {
    use prost::Message as _;
    let response = crate::proto::istio::v1::auth::IstioCertificateResponse::decode(bytes)
        .map_err(|e| e.to_string())?;
    let checked = check_chain(id, key, &response.cert_chain).map_err(|e| e.to_string())?;
    Ok(IssuedCert::from_parts(
        id.clone(),
        key,
        checked.chain,
        checked.serial_hex,
        checked.not_before,
        checked.not_after,
        checked.roots,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::tests::test_ca;
    use rcgen::{CertificateSigningRequestParams, Issuer};

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "ns1", sa).unwrap()
    }

    /// Signs `csr` with a throwaway CA that keeps its issuer; returns (chain PEMs, root DER).
    fn sign_with_new_ca(csr: &str, uri: &str) -> (Vec<String>, CertificateDer<'static>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "other root");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let mut req = CertificateSigningRequestParams::from_pem(csr).unwrap();
        req.params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        let leaf = req.signed_by(&issuer).unwrap();
        (vec![leaf.pem(), ca_cert.pem()], ca_cert.der().clone())
    }

    #[test]
    fn the_csr_carries_only_the_spiffe_uri_and_our_key() {
        let (key, csr) = csr_for(&id("a")).unwrap();
        let req = CertificateSigningRequestParams::from_pem(&csr).unwrap();
        assert_eq!(
            req.params.subject_alt_names,
            vec![SanType::URI(
                "spiffe://cluster.local/ns/ns1/sa/a".try_into().unwrap()
            )]
        );
        assert_eq!(
            rcgen::PublicKeyData::der_bytes(&req.public_key),
            key.public_key_raw()
        );
    }

    #[test]
    fn a_chain_for_another_identity_is_refused() {
        let (key, csr) = csr_for(&id("a")).unwrap();
        let (chain, _) = sign_with_new_ca(&csr, "spiffe://cluster.local/ns/ns1/sa/b");
        let e = check_chain(&id("a"), &key, &chain).unwrap_err().to_string();
        assert!(
            e.contains("not \"spiffe://cluster.local/ns/ns1/sa/a\""),
            "{e}"
        );
    }

    #[test]
    fn a_chain_that_does_not_lead_to_its_own_roots_is_refused() {
        let (key, csr) = csr_for(&id("a")).unwrap();
        let (mut chain, _root) = sign_with_new_ca(&csr, "spiffe://cluster.local/ns/ns1/sa/a");
        let (_dir, other) = test_ca();
        chain[1] = other.roots_pem().concat();
        let e = check_chain(&id("a"), &key, &chain).unwrap_err().to_string();
        assert!(e.contains("does not lead to a trusted root"), "{e}");
    }

    #[test]
    fn a_chain_with_no_root_entry_is_refused() {
        let (key, csr) = csr_for(&id("a")).unwrap();
        let (chain, _) = sign_with_new_ca(&csr, "spiffe://cluster.local/ns/ns1/sa/a");
        let e = check_chain(&id("a"), &key, &chain[..1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("has 1 entry, so no root"), "{e}");
    }

    #[test]
    fn a_chain_for_another_key_is_refused() {
        let (_key, csr) = csr_for(&id("a")).unwrap();
        let (other_key, _) = csr_for(&id("a")).unwrap();
        let (chain, _) = sign_with_new_ca(&csr, "spiffe://cluster.local/ns/ns1/sa/a");
        let e = check_chain(&id("a"), &other_key, &chain)
            .unwrap_err()
            .to_string();
        assert!(e.contains("public key"), "{e}");
    }

    #[test]
    fn garbage_and_empty_chains_are_refused() {
        let (key, _) = csr_for(&id("a")).unwrap();
        assert!(check_chain(&id("a"), &key, &[])
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(check_chain(&id("a"), &key, &["hello".into()])
            .unwrap_err()
            .to_string()
            .contains("no PEM certificate"));
        let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(check_chain(&id("a"), &key, &[junk.into()])
            .unwrap_err()
            .to_string()
            .contains("not valid X.509"));
    }

    #[test]
    fn a_good_chain_passes_and_brings_the_roots_of_its_last_entry() {
        let (key, csr) = csr_for(&id("a")).unwrap();
        let (mut chain, root) = sign_with_new_ca(&csr, "spiffe://cluster.local/ns/ns1/sa/a");
        let checked = check_chain(&id("a"), &key, &chain).unwrap();
        assert_eq!(
            checked.chain.len(),
            1,
            "the leaf; the root is not presented"
        );
        assert_eq!(checked.roots, vec![root.clone()]);
        assert!(checked.not_after > checked.not_before);
        // During a rotation the last entry holds two roots: both are trusted.
        let (_dir, other) = test_ca();
        chain[1] = format!("{}{}", chain[1], other.roots_pem().concat());
        let checked = check_chain(&id("a"), &key, &chain).unwrap();
        assert_eq!(checked.roots.len(), 2);
        assert_eq!(checked.roots[0], root);
    }
}
