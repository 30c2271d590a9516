//! Fixtures shared by the tests of every `ca` sub-module (and of `istio` and `manager`): a
//! fresh CA, path validation of an issued chain, small file helpers. Also the tests of the
//! [`CertificateAuthority`] trait itself.
//!
//! Test-only; must not hold tests of one sub-module's internals (those live with the code).

use std::fs;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, UnixTime};

use super::{init_dir, BuiltinCa, CertificateAuthority, IssuedCert, DAY};
use crate::identity::Identity;

/// Algorithms the tests' path validation accepts: what our CA and openssl-made CAs use.
const ALGS: &[&dyn rustls::pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
];

pub(crate) fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).unwrap()
}

/// A fresh `ca init` directory and the CA loaded from it.
pub(crate) fn test_ca() -> (tempfile::TempDir, BuiltinCa) {
    let dir = tempfile::tempdir().unwrap();
    init_dir(dir.path(), "cluster.local").unwrap();
    let ca = BuiltinCa::load(dir.path()).unwrap();
    (dir, ca)
}

/// Validates an issued chain to `roots` with webpki for one usage.
pub(crate) fn verify(
    cert: &IssuedCert,
    roots: &[CertificateDer<'static>],
    usage: webpki::KeyUsage,
) -> Result<(), webpki::Error> {
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&cert.chain_der[0]).unwrap();
    leaf.verify_for_usage(
        ALGS,
        &anchors,
        &cert.chain_der[1..],
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map(|_| ())
}

pub(crate) fn load_err(dir: &Path) -> String {
    BuiltinCa::load(dir).unwrap_err().to_string()
}

pub(crate) fn write(path: &Path, content: impl AsRef<[u8]>) {
    fs::write(path, content).unwrap();
}

pub(crate) fn read_pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn builtin_ca_signs_through_the_certificate_authority_trait() {
    let (_dir, ca) = test_ca();
    let ca: Arc<dyn CertificateAuthority> = Arc::new(ca);
    let cert = ca.sign(&id("foo", "bar"), DAY).await.unwrap();
    assert_eq!(cert.identity, id("foo", "bar"));
    verify(&cert, &ca.roots_der(), webpki::KeyUsage::server_auth()).unwrap();
}
