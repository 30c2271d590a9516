//! Certificate authorities: the [`CertificateAuthority`] abstraction every backend implements,
//! and the built-in CA ([`BuiltinCa`]) that signs workload certificates locally with the key
//! of an intermediate CA kept in Istio's plugin-CA file layout.
//!
//! The layout (one directory, the same on every node that must trust the others):
//!
//! | file | content |
//! |---|---|
//! | `root-cert.pem` | the trust root(s); may hold several certificates |
//! | `ca-cert.pem` | the signing (intermediate) CA certificate |
//! | `ca-key.pem` | its private key: PKCS#8, SEC1 `EC PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY` |
//! | `cert-chain.pem` | `ca-cert.pem` followed by the rest of the chain up to the root |
//!
//! Owns the trait, the file names of the layout and the path validation every backend runs on
//! a leaf ([`verify_leaf`], failing with a [`ChainError`]). The rest lives in sub-modules:
//! - `certificate`: [`IssuedCert`], what every backend hands out, and the encodings of its
//!   fields (random serials, whole-second times, PEM);
//! - `init`: creating a plugin-CA directory ([`init_dir`], `weft ca init`);
//! - `builtin`: validating and loading one ([`BuiltinCa::load`]) and issuing SPIFFE leaves;
//! - `files`: reading the PEM files of the layout, every failure naming its file;
//! - `key`: turning the CA key's accepted formats into the PKCS#8 the signer reads.
//!
//! Does not own: when certificates are issued or renewed (`manager`), Istio's CA (`istio`),
//! TLS configs (`tls`).
//!
//! Invariants of a loaded [`BuiltinCa`], checked once at load so that issuance cannot fail for
//! reasons an operator could have fixed at start-up:
//! - `ca-key.pem` is the private key of `ca-cert.pem`;
//! - `ca-cert.pem` is a CA (basicConstraints CA), currently valid, and chains to a certificate
//!   of `root-cert.pem` (directly, or through the intermediates of `cert-chain.pem`);
//! - a certificate it issues validates against `root-cert.pem` with a real path validator
//!   (webpki), which also proves that the issuer name is re-encoded faithfully.

mod builtin;
mod certificate;
mod files;
mod init;
mod key;
#[cfg(test)]
pub(crate) mod tests;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, UnixTime};

use super::{Identity, IdentityError};

pub use builtin::{BuiltinCa, SignError, SignedLeaf};
pub use certificate::IssuedCert;
pub(crate) use files::read_certs;
pub use init::init_dir;

/// File name of the trust root(s) in a plugin-CA directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// File name of the signing CA certificate in a plugin-CA directory.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// File name of the signing CA private key in a plugin-CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the CA chain (signing CA first, root last) in a plugin-CA directory.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

// === CertificateAuthority ===

/// A source of workload certificates: the built-in CA, or Istio's CA (a CSR over gRPC,
/// [`IstioCa`](super::istio::IstioCa)). [`CertManager`](super::CertManager) only talks to this trait.
pub trait CertificateAuthority: Send + Sync + 'static {
    /// Issues a fresh key pair and a leaf certificate for `id`, valid for about `ttl` (a CA
    /// may shorten it, e.g. so it does not outlive the CA itself).
    fn sign(
        &self,
        id: &Identity,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<IssuedCert, IdentityError>> + Send + '_>>;

    /// The trust root(s) this CA's certificates come with now (DER): the built-in CA's
    /// `root-cert.pem`; for Istio's CA, those of its latest response (none before the
    /// first). The data path trusts each certificate's own [`IssuedCert::roots`], not these.
    fn roots_der(&self) -> Vec<CertificateDer<'static>>;
}

// === Path validation ===

/// Why a leaf does not validate up to a trust root ([`verify_leaf`]).
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// One of the roots cannot be used as a trust anchor.
    #[error("trust anchor: {0}")]
    TrustAnchor(webpki::Error),
    /// The leaf is not a usable end-entity certificate.
    #[error("leaf: {0}")]
    Leaf(webpki::Error),
    /// No valid path leads from the leaf to a root for the usage asked.
    #[error("{0}")]
    Path(webpki::Error),
}

/// Validates `leaf` up to one of `roots` through `intermediates` (webpki, at the current time).
pub(crate) fn verify_leaf(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    usage: webpki::KeyUsage,
) -> Result<(), ChainError> {
    let anchors = roots
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ChainError::TrustAnchor)?;
    let leaf = webpki::EndEntityCert::try_from(leaf).map_err(ChainError::Leaf)?;
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        intermediates,
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(ChainError::Path)
}
