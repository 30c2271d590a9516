//! [`IssuedCert`], the workload certificate every backend hands out, and the encodings of its
//! fields: random serial numbers, whole-second validity times, PEM.
//!
//! Owns: the type's invariants (see its doc) and how its text forms are written.
//! Does not own: issuing (`builtin`, `super::super::istio`), reading files (`files`).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use rcgen::KeyPair;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Identity;

/// A workload certificate with its private key, as a CA issued it. Immutable once issued;
/// [`CertManager`](crate::identity::CertManager) hands it out as `Arc<IssuedCert>`.
///
/// Invariants: `chain_der` and `chain_pem` hold the same certificates, leaf first, then the
/// issuing CA and the rest of the CA chain (Istio's "leaf + cert-chain.pem"); the leaf carries
/// exactly one SAN, the URI of `identity`; the private key belongs to the leaf.
pub struct IssuedCert {
    /// The identity the leaf certifies.
    pub identity: Identity,
    /// The private key, PKCS#8 PEM (`PRIVATE KEY`).
    pub key_pem: String,
    /// The chain as PEM, one certificate per entry, leaf first.
    pub chain_pem: Vec<String>,
    /// The chain as DER, leaf first; what rustls wants.
    pub chain_der: Vec<CertificateDer<'static>>,
    /// The leaf's serial number, lower-case hex without separators.
    pub serial_hex: String,
    /// Start of the leaf's validity (back-dated a little for clock skew).
    pub not_before: SystemTime,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
    /// The trust roots that came with this certificate (DER): while it is in use, peers'
    /// chains must lead to one of these. The built-in CA's `root-cert.pem`; for Istio's CA,
    /// the last entry of the response that brought it, so a root rotated at the CA reaches
    /// the data path with the next certificate, without a restart.
    pub roots: Vec<CertificateDer<'static>>,
    pub(super) key_pkcs8: PrivatePkcs8KeyDer<'static>,
}

impl IssuedCert {
    /// Assembles a certificate from parts another backend of this module obtained; the
    /// caller upholds the type's invariants (checked chain, one URI SAN, matching key).
    pub(crate) fn from_parts(
        identity: Identity,
        key: &KeyPair,
        chain_der: Vec<CertificateDer<'static>>,
        serial_hex: String,
        not_before: SystemTime,
        not_after: SystemTime,
        roots: Vec<CertificateDer<'static>>,
    ) -> IssuedCert {
        IssuedCert {
            roots,
            identity,
            key_pem: key.serialize_pem(),
            chain_pem: chain_der.iter().map(|c| pem_encode_cert(c)).collect(),
            chain_der,
            serial_hex,
            not_before,
            not_after,
            key_pkcs8: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }

    /// The private key as DER, in the form rustls takes.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_pkcs8.clone_key())
    }
}

impl Clone for IssuedCert {
    fn clone(&self) -> Self {
        IssuedCert {
            identity: self.identity.clone(),
            key_pem: self.key_pem.clone(),
            chain_pem: self.chain_pem.clone(),
            chain_der: self.chain_der.clone(),
            serial_hex: self.serial_hex.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
            roots: self.roots.clone(),
            key_pkcs8: self.key_pkcs8.clone_key(),
        }
    }
}

impl fmt::Debug for IssuedCert {
    /// Everything but the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("identity", &self.identity)
            .field("serial_hex", &self.serial_hex)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain_der.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

// === Serial numbers ===

/// 16 random bytes, a positive DER INTEGER with no leading zero byte (so always 16 bytes
/// long), 126 bits of entropy.
pub(super) fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    rand::rng().fill_bytes(&mut serial);
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

// === Validity times ===

/// X.509 times have whole seconds; truncating first keeps `IssuedCert`'s times equal to the
/// certificate's.
pub(super) fn whole_seconds(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

pub(super) fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

// === PEM ===

pub(super) fn pem_encode_cert(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

/// PEM with 64-column lines and `\n` endings, as rcgen and openssl write it.
pub(super) fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::tests::{id, read_pem_certs, test_ca};
    use crate::identity::ca::DAY;

    #[test]
    fn serials_are_random_positive_and_reported_in_hex() {
        let (_dir, ca) = test_ca();
        let a = ca.issue(&id("foo", "bar"), DAY).unwrap();
        let b = ca.issue(&id("foo", "bar"), DAY).unwrap();
        assert_ne!(a.serial_hex, b.serial_hex);
        assert_eq!(a.serial_hex.len(), 32);
        let (_, leaf) = x509_parser::parse_x509_certificate(&a.chain_der[0]).unwrap();
        assert_eq!(hex::encode(leaf.raw_serial()), a.serial_hex);
        assert!(leaf.raw_serial()[0] < 0x80);
    }

    #[test]
    fn issued_key_belongs_to_the_leaf() {
        let (_dir, ca) = test_ca();
        let cert = ca.issue(&id("foo", "bar"), DAY).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain_der[0]).unwrap();
        let PrivateKeyDer::Pkcs8(der) = cert.key_der() else {
            panic!("key is not PKCS#8");
        };
        let key = KeyPair::try_from(&der).unwrap();
        assert_eq!(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            key.public_key_raw(),
            leaf.public_key().subject_public_key.data.as_ref()
        );
        assert!(cert.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let from_pem = KeyPair::from_pem(&cert.key_pem).unwrap();
        assert_eq!(from_pem.public_key_raw(), key.public_key_raw());
        // A clone carries the same key; Debug does not print it.
        let clone = cert.clone();
        assert_eq!(clone.key_der().secret_der(), cert.key_der().secret_der());
        assert!(!format!("{cert:?}").contains("PRIVATE"));
    }

    #[test]
    fn pem_encoding_matches_rcgen() {
        let (_dir, ca) = test_ca();
        let cert = ca.issue(&id("foo", "bar"), DAY).unwrap();
        assert_eq!(pem_encode_cert(&cert.chain_der[0]), cert.chain_pem[0]);
        for len in 0..8 {
            let der: Vec<u8> = (0..len).collect();
            let pem = pem_encode("X", &der);
            let item = rustls_pemfile::read_one(&mut pem.as_bytes());
            // Unknown labels are skipped by rustls-pemfile; check the base64 via a CERTIFICATE.
            assert!(matches!(item, Ok(None)), "{len}");
            let pem = pem_encode("CERTIFICATE", &der);
            if len > 0 {
                assert_eq!(read_pem_certs(&pem)[0].as_ref(), &der[..]);
            }
        }
    }
}
