//! [`BuiltinCa`]: the built-in CA, which validates a plugin-CA directory once at load and then
//! signs SPIFFE leaf certificates locally with the key of `ca-cert.pem`.
//!
//! Owns: the load-time checks of the invariants listed in the parent module's doc (key
//! matches, CA flags and validity, chaining to a root, a self-test leaf that validates), and
//! the shape of the leaves it issues (empty subject, one critical URI SAN, client and server
//! auth, back-dated a minute, never outliving the CA). Does not own: reading the files
//! (`files`), the key formats (`key`), creating a directory (`init`), renewal (`manager`).

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use std::future::Future;
use std::pin::Pin;
use time::OffsetDateTime;

use super::certificate::{pem_encode_cert, random_serial, unix_seconds, whole_seconds};
use super::files::{invalid, no_certificate, parse_cert, read_certs, read_key};
use super::key::to_pkcs8;
use super::{
    verify_leaf, CertificateAuthority, Identity, IdentityError, IssuedCert, CA_CERT_FILE,
    CA_KEY_FILE, CERT_CHAIN_FILE, DAY, ROOT_CERT_FILE,
};

/// Leaf certificates are back-dated by this much to tolerate clock skew between peers.
const LEAF_BACKDATE: Duration = Duration::from_secs(60);

/// Why the built-in CA could not sign a leaf.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// `ca-cert.pem` is past its end of validity.
    #[error("the CA certificate has expired")]
    CaExpired,
    /// The identity's URI could not be put in the URI SAN.
    #[error("URI SAN: {0}")]
    UriSan(rcgen::Error),
    /// Generating the leaf's key pair failed.
    #[error("generating a key: {0}")]
    GenerateKey(rcgen::Error),
    /// Signing the leaf failed.
    #[error("signing: {0}")]
    Sign(rcgen::Error),
    /// The CSR is not PEM, does not parse, or its signature does not verify.
    #[error("the CSR is unusable: {0}")]
    Csr(rcgen::Error),
    /// A name for a serving certificate is not a valid IA5 string.
    #[error("server name {name:?}: {source}")]
    DnsName {
        /// The name given.
        name: String,
        /// rcgen's reason.
        source: rcgen::Error,
    },
}

/// A leaf signed for a key held elsewhere ([`BuiltinCa::sign_csr`]): the requester has the key.
#[derive(Debug, Clone)]
pub struct SignedLeaf {
    /// The leaf, PEM.
    pub pem: String,
    /// The leaf, DER.
    pub der: CertificateDer<'static>,
    /// Lower-case hex of its serial number.
    pub serial_hex: String,
    /// Its end of validity.
    pub not_after: SystemTime,
}

/// The built-in CA: signs workload leaves with the key of `ca-cert.pem`. See the module doc
/// for the files and the invariants checked when loading them.
pub struct BuiltinCa {
    issuer: Issuer<'static, KeyPair>,
    /// What follows the leaf in every issued chain: `ca-cert.pem`, then `cert-chain.pem`
    /// without its leading copy of `ca-cert.pem`.
    pub(super) chain_der: Vec<CertificateDer<'static>>,
    chain_pem: Vec<String>,
    roots_der: Vec<CertificateDer<'static>>,
    roots_pem: Vec<String>,
    /// No leaf outlives the CA certificate that signed it.
    ca_not_after: SystemTime,
}

impl fmt::Debug for BuiltinCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuiltinCa")
            .field("chain_len", &self.chain_der.len())
            .field("roots", &self.roots_der.len())
            .field("ca_not_after", &self.ca_not_after)
            .finish_non_exhaustive()
    }
}

impl BuiltinCa {
    /// Reads and checks a plugin-CA directory (one made by [`init_dir`], or Istio's).
    ///
    /// Fails, naming the file, if a file is missing or unreadable, is not PEM or does not
    /// parse, if the key does not match `ca-cert.pem`, if `ca-cert.pem` is not a CA or is not
    /// currently valid, or if it does not chain to `root-cert.pem`. Reads files synchronously:
    /// call it at start-up or from `spawn_blocking`.
    pub fn load(dir: &Path) -> Result<BuiltinCa, IdentityError> {
        let root_path = dir.join(ROOT_CERT_FILE);
        let ca_cert_path = dir.join(CA_CERT_FILE);
        let ca_key_path = dir.join(CA_KEY_FILE);
        let chain_path = dir.join(CERT_CHAIN_FILE);

        let roots = read_certs(&root_path)?;
        let ca_certs = read_certs(&ca_cert_path)?;
        let chain = read_certs(&chain_path)?;
        let key = read_key(&ca_key_path)?;

        let ca_der = ca_certs
            .first()
            .ok_or_else(|| no_certificate(&ca_cert_path))?;
        if ca_certs.len() > 1 {
            tracing::warn!(
                file = %ca_cert_path.display(),
                count = ca_certs.len(),
                "more than one certificate; using the first as the CA certificate"
            );
        }
        let ca = parse_cert(&ca_cert_path, ca_der)?;

        // The CA certificate must be a CA, allowed to sign certificates, and valid now.
        match ca.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => {
                return Err(invalid(
                    &ca_cert_path,
                    "is not a CA certificate (basicConstraints CA is false or absent)",
                ))
            }
            Err(e) => {
                return Err(invalid(
                    &ca_cert_path,
                    format!("has a malformed basicConstraints extension: {e}"),
                ))
            }
        }
        if let Ok(Some(ku)) = ca.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(invalid(
                    &ca_cert_path,
                    "is not allowed to sign certificates (key usage lacks keyCertSign)",
                ));
            }
        }
        let now = unix_seconds(SystemTime::now());
        let validity = ca.validity();
        if now < validity.not_before.timestamp() {
            return Err(invalid(
                &ca_cert_path,
                format!("is not valid before {}", validity.not_before),
            ));
        }
        if now > validity.not_after.timestamp() {
            return Err(invalid(
                &ca_cert_path,
                format!("expired at {}", validity.not_after),
            ));
        }
        let ca_not_after = UNIX_EPOCH
            + Duration::from_secs(u64::try_from(validity.not_after.timestamp()).unwrap_or(0));

        // The key must be the CA certificate's.
        let pkcs8 = to_pkcs8(key, ca.public_key().raw, &ca_key_path)?;
        let key_pair = KeyPair::try_from(&pkcs8).map_err(|e| {
            invalid(
                &ca_key_path,
                format!(
                    "is not a usable private key for ca-cert.pem \
                     (supported: ECDSA P-256/P-384, RSA 2048+, Ed25519): {e}"
                ),
            )
        })?;
        if key_pair.public_key_raw() != ca.public_key().subject_public_key.data.as_ref() {
            return Err(invalid(
                &ca_key_path,
                format!(
                    "does not match the public key of {}",
                    ca_cert_path.display()
                ),
            ));
        }

        // The CA certificate must chain to a root. A direct signature is checked here for a
        // precise message; longer chains (more intermediates in cert-chain.pem) are left to
        // the path validation of the self-test below. (`verify_signature` exists because
        // rcgen's `ring` feature turns on x509-parser's `verify`; see Cargo.toml.)
        let mut anchors_ok = true;
        let mut signed_by_root = false;
        for root_der in &roots {
            let root = parse_cert(&root_path, root_der)?;
            signed_by_root |= ca.verify_signature(Some(root.public_key())).is_ok();
            anchors_ok &= webpki::anchor_from_trusted_cert(root_der).is_ok();
        }
        if !anchors_ok {
            return Err(invalid(
                &root_path,
                "holds a certificate that cannot be used as a trust anchor",
            ));
        }
        let tail: Vec<CertificateDer<'static>> = match chain.split_first() {
            Some((first, rest)) if first == ca_der => rest.to_vec(),
            _ => chain.clone(),
        };
        let more_intermediates = tail.iter().any(|c| !roots.contains(c));
        if !signed_by_root && !more_intermediates {
            return Err(invalid(
                &ca_cert_path,
                format!("is not signed by {}", root_path.display()),
            ));
        }

        // rcgen panics on an empty relative distinguished name; refuse it here instead.
        if ca.subject().iter().any(|rdn| rdn.iter().next().is_none()) {
            return Err(invalid(&ca_cert_path, "subject has an empty RDN"));
        }
        let issuer = Issuer::from_ca_cert_der(ca_der, key_pair).map_err(|e| {
            invalid(
                &ca_cert_path,
                format!("cannot be used to issue certificates: {e}"),
            )
        })?;

        let mut chain_der = vec![ca_der.clone()];
        chain_der.extend(tail);
        let builtin = BuiltinCa {
            issuer,
            chain_pem: chain_der.iter().map(|c| pem_encode_cert(c)).collect(),
            chain_der,
            roots_pem: roots.iter().map(|c| pem_encode_cert(c)).collect(),
            roots_der: roots,
            ca_not_after,
        };

        // Self-test: a leaf issued now must validate against the roots.
        let probe = builtin
            .sign_leaf(Vec::new(), Duration::from_secs(60))
            .map_err(|e| {
                invalid(
                    &ca_cert_path,
                    format!("cannot issue a test certificate: {e}"),
                )
            })?;
        verify_leaf(
            &probe.der,
            &builtin.chain_der,
            &builtin.roots_der,
            webpki::KeyUsage::server_auth(),
        )
        .map_err(|e| {
            invalid(
                &ca_cert_path,
                format!(
                    "a test certificate issued with it does not validate against {} \
                     (through {}): {e}",
                    root_path.display(),
                    chain_path.display()
                ),
            )
        })?;

        tracing::info!(
            dir = %dir.display(),
            ca_subject = %ca.subject(),
            ca_not_after = %validity.not_after,
            roots = builtin.roots_der.len(),
            "loaded built-in CA"
        );
        if ca_not_after < SystemTime::now() + 30 * DAY {
            tracing::warn!(
                file = %ca_cert_path.display(),
                ca_not_after = %validity.not_after,
                "CA certificate expires within 30 days; workload certificates will be cut short"
            );
        }
        Ok(builtin)
    }

    /// Issues a leaf for `id` valid from one minute ago (clock skew) until `ttl` from now, or
    /// until the CA certificate expires if that is sooner. The key pair (ECDSA P-256) is
    /// generated here and never leaves the process except inside the returned value.
    pub fn issue(&self, id: &Identity, ttl: Duration) -> Result<IssuedCert, IdentityError> {
        let fail = |e: SignError| IdentityError::Issue {
            identity: id.clone(),
            reason: e.into(),
        };
        // Cannot fail: an Identity's URI is ASCII (see `Identity::new`).
        let uri = rcgen::string::Ia5String::try_from(id.to_string())
            .map_err(|e| fail(SignError::UriSan(e)))?;
        let leaf = self.sign_leaf(vec![SanType::URI(uri)], ttl).map_err(fail)?;

        let mut chain_der = Vec::with_capacity(1 + self.chain_der.len());
        chain_der.push(leaf.der);
        chain_der.extend(self.chain_der.iter().cloned());
        let mut chain_pem = Vec::with_capacity(chain_der.len());
        chain_pem.push(leaf.pem);
        chain_pem.extend(self.chain_pem.iter().cloned());
        let cert = IssuedCert {
            identity: id.clone(),
            key_pem: leaf.key.serialize_pem(),
            chain_pem,
            chain_der,
            serial_hex: hex::encode(leaf.serial),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            roots: self.roots_der.clone(),
            key_pkcs8: PrivatePkcs8KeyDer::from(leaf.key.serialize_der()),
        };
        tracing::debug!(identity = %id, serial = %cert.serial_hex, "issued certificate");
        Ok(cert)
    }

    /// Signs a leaf for `id` certifying the public key of `csr_pem` (a PEM CSR whose signature
    /// must verify), with the same shape and lifetime rules as [`issue`](Self::issue). What
    /// the CSR asks for besides its key (subject, SANs) is ignored, as istiod ignores it: the
    /// identity is the one the caller was authorized for.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &Identity,
        ttl: Duration,
    ) -> Result<SignedLeaf, SignError> {
        let csr =
            rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(SignError::Csr)?;
        // Cannot fail: an Identity's URI is ASCII (see `Identity::new`).
        let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(SignError::UriSan)?;
        let (cert, serial, _, not_after) =
            self.sign_key(&csr.public_key, vec![SanType::URI(uri)], ttl)?;
        Ok(SignedLeaf {
            pem: cert.pem(),
            der: cert.der().clone(),
            serial_hex: hex::encode(serial),
            not_after,
        })
    }

    /// Issues a serving certificate for `names`, DNS names or IP addresses (e.g. the names
    /// `weft ca serve` is dialled by), with a fresh key: the chain (leaf, then `ca-cert.pem`
    /// and the rest of `cert-chain.pem`), its PKCS#8 key and its end of validity.
    #[allow(clippy::type_complexity)]
    pub fn issue_server(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            PrivatePkcs8KeyDer<'static>,
            SystemTime,
        ),
        SignError,
    > {
        let sans = names
            .iter()
            .map(|name| {
                if let Ok(ip) = name.parse::<std::net::IpAddr>() {
                    return Ok(SanType::IpAddress(ip));
                }
                rcgen::string::Ia5String::try_from(name.as_str())
                    .map(SanType::DnsName)
                    .map_err(|source| SignError::DnsName {
                        name: name.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let leaf = self.sign_leaf(sans, ttl)?;
        let mut chain = vec![leaf.der];
        chain.extend(self.chain_der.iter().cloned());
        Ok((
            chain,
            PrivatePkcs8KeyDer::from(leaf.key.serialize_der()),
            leaf.not_after,
        ))
    }

    /// The trust root(s) of `root-cert.pem`, one PEM string per certificate.
    pub fn roots_pem(&self) -> &[String] {
        &self.roots_pem
    }

    /// What follows the leaf in every issued chain, one PEM string per certificate:
    /// `ca-cert.pem`, then `cert-chain.pem` without its leading copy of `ca-cert.pem`.
    pub fn chain_pem(&self) -> &[String] {
        &self.chain_pem
    }

    fn sign_leaf(&self, sans: Vec<SanType>, ttl: Duration) -> Result<Leaf, SignError> {
        let key = KeyPair::generate().map_err(SignError::GenerateKey)?;
        let (cert, serial, not_before, not_after) = self.sign_key(&key, sans, ttl)?;
        Ok(Leaf {
            pem: cert.pem(),
            der: cert.der().clone(),
            key,
            serial,
            not_before,
            not_after,
        })
    }

    /// Signs a leaf certifying `public_key` for `sans`; returns it with its serial and validity.
    fn sign_key(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        sans: Vec<SanType>,
        ttl: Duration,
    ) -> Result<(rcgen::Certificate, [u8; 16], SystemTime, SystemTime), SignError> {
        let now = whole_seconds(SystemTime::now());
        if now >= self.ca_not_after {
            return Err(SignError::CaExpired);
        }
        let not_before = now.checked_sub(LEAF_BACKDATE).unwrap_or(now);
        let mut not_after = now.checked_add(ttl).unwrap_or(self.ca_not_after);
        if not_after > self.ca_not_after {
            tracing::warn!(
                ?ttl,
                "the CA certificate expires before the requested lifetime; shortening it"
            );
            not_after = self.ca_not_after;
        }
        let serial = random_serial();

        let mut params = CertificateParams::default();
        // Like Istio's workload certificates: empty subject, identity only in the (then
        // critical) SAN.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(SignError::Sign)?;
        Ok((cert, serial, not_before, not_after))
    }
}

impl CertificateAuthority for BuiltinCa {
    fn sign(
        &self,
        id: &Identity,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<IssuedCert, IdentityError>> + Send + '_>> {
        // Issued inline rather than on `spawn_blocking`: generating a P-256 key and signing one
        // certificate takes well under a millisecond, far less than a blocking-pool hand-off is
        // worth, and it happens once per identity per half-TTL.
        let result = self.issue(id, ttl);
        Box::pin(std::future::ready(result))
    }

    fn roots_der(&self) -> Vec<CertificateDer<'static>> {
        self.roots_der.clone()
    }
}

/// A freshly signed leaf, before it is wrapped with its chain.
struct Leaf {
    der: CertificateDer<'static>,
    pem: String,
    key: KeyPair,
    serial: [u8; 16],
    not_before: SystemTime,
    not_after: SystemTime,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::tests::{id, load_err, read_pem_certs, test_ca, verify, write};
    use std::fs;
    use x509_parser::extensions::GeneralName;

    #[test]
    fn issued_leaf_verifies_against_the_root_for_client_and_server_auth() {
        let (_dir, ca) = test_ca();
        let cert = ca.issue(&id("foo", "bar"), DAY).unwrap();
        let roots = ca.roots_der();
        verify(&cert, &roots, webpki::KeyUsage::server_auth()).unwrap();
        verify(&cert, &roots, webpki::KeyUsage::client_auth()).unwrap();
    }

    #[test]
    fn a_csr_is_signed_for_its_key_and_the_identity_given_not_the_one_it_asks_for() {
        let (_dir, ca) = test_ca();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/evil/sa/root".try_into().unwrap(),
        )];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let leaf = ca.sign_csr(&csr, &id("shop", "cart"), DAY).unwrap();
        assert_eq!(
            crate::tls::identity_of(&leaf.der).unwrap(),
            id("shop", "cart")
        );
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf.der).unwrap();
        assert_eq!(
            parsed.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let anchors: Vec<_> = ca
            .roots_der()
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
            .collect();
        webpki::EndEntityCert::try_from(&leaf.der)
            .unwrap()
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &ca.chain_der,
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .unwrap();
    }

    #[test]
    fn what_is_not_a_csr_is_refused() {
        let (_dir, ca) = test_ca();
        let e = ca
            .sign_csr("hello", &id("shop", "cart"), DAY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("the CSR is unusable"), "{e}");
    }

    #[test]
    fn a_serving_certificate_names_its_dns_names_and_ip_addresses() {
        let (_dir, ca) = test_ca();
        let names = vec![
            "weft-ca.istio-system.svc".to_string(),
            "10.0.0.1".to_string(),
        ];
        let (chain, _key, _) = ca.issue_server(&names, DAY).unwrap();
        assert_eq!(chain[1..], ca.chain_der[..]);
        let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        let found: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(ip) => format!("{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            found,
            vec![
                "weft-ca.istio-system.svc".to_string(),
                "[10, 0, 0, 1]".into()
            ]
        );
    }

    #[test]
    fn issued_leaf_does_not_verify_against_another_root() {
        let (_dir, ca) = test_ca();
        let (_other_dir, other) = test_ca();
        let cert = ca.issue(&id("foo", "bar"), DAY).unwrap();
        assert!(verify(&cert, &other.roots_der(), webpki::KeyUsage::server_auth()).is_err());
    }

    #[test]
    fn issued_leaf_carries_exactly_one_san_the_spiffe_uri() {
        let (_dir, ca) = test_ca();
        let cert = ca.issue(&id("foo", "bar"), DAY).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain_der[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/foo/sa/bar")]
        );
        // Empty subject, so the SAN must be critical (RFC 5280 §4.2.1.6).
        assert!(san.critical);
        assert_eq!(leaf.subject().iter().count(), 0);
        assert!(!leaf.is_ca());
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
    }

    #[test]
    fn issued_leaf_honours_the_ttl_and_is_backdated_a_minute() {
        let (_dir, ca) = test_ca();
        let before = whole_seconds(SystemTime::now());
        let ttl = Duration::from_secs(3600);
        let cert = ca.issue(&id("foo", "bar"), ttl).unwrap();
        let after = SystemTime::now();
        assert_eq!(
            cert.not_after.duration_since(cert.not_before).unwrap(),
            ttl + LEAF_BACKDATE
        );
        assert!(cert.not_after >= before + ttl && cert.not_after <= after + ttl);
        let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain_der[0]).unwrap();
        assert_eq!(
            leaf.validity().not_after.timestamp(),
            unix_seconds(cert.not_after)
        );
        assert_eq!(
            leaf.validity().not_before.timestamp(),
            unix_seconds(cert.not_before)
        );
    }

    #[test]
    fn leaves_never_outlive_the_ca_certificate() {
        let (_dir, ca) = test_ca();
        let cert = ca
            .issue(&id("foo", "bar"), Duration::from_secs(5 * 365 * 24 * 3600))
            .unwrap();
        assert_eq!(cert.not_after, ca.ca_not_after);
    }

    #[test]
    fn chain_is_leaf_then_cert_chain_pem_and_roots_are_kept_apart() {
        let (dir, ca) = test_ca();
        let cert = ca.issue(&id("foo", "bar"), DAY).unwrap();
        let chain_file = read_certs(&dir.path().join(CERT_CHAIN_FILE)).unwrap();
        let ca_file = read_certs(&dir.path().join(CA_CERT_FILE)).unwrap();
        let root_file = read_certs(&dir.path().join(ROOT_CERT_FILE)).unwrap();
        assert_eq!(chain_file.len(), 2);
        assert_eq!(chain_file[0], ca_file[0]);
        assert_eq!(chain_file[1], root_file[0]);
        assert_eq!(&cert.chain_der[1..], &chain_file[..]);
        assert_eq!(ca.roots_der(), root_file);
        // PEM and DER tell the same story.
        assert_eq!(cert.chain_pem.len(), cert.chain_der.len());
        for (pem, der) in cert.chain_pem.iter().zip(&cert.chain_der) {
            let parsed = read_pem_certs(pem);
            assert_eq!(parsed, vec![der.clone()]);
        }
        assert_eq!(ca.roots_pem().len(), 1);
        assert_eq!(read_pem_certs(&ca.roots_pem()[0]), root_file);
    }

    #[test]
    fn load_fails_when_the_key_does_not_match_ca_cert() {
        let (dir, _ca) = test_ca();
        let (other, _) = test_ca();
        fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
        let err = load_err(dir.path());
        assert!(err.contains(CA_KEY_FILE), "{err}");
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn load_fails_when_ca_cert_is_not_a_ca() {
        let (dir, ca) = test_ca();
        // A leaf with its own key: the key matches, but the certificate may not sign.
        let leaf = ca.issue(&id("foo", "bar"), DAY).unwrap();
        write(&dir.path().join(CA_CERT_FILE), &leaf.chain_pem[0]);
        write(&dir.path().join(CA_KEY_FILE), &leaf.key_pem);
        let err = load_err(dir.path());
        assert!(err.contains(CA_CERT_FILE), "{err}");
        assert!(err.contains("not a CA"), "{err}");
    }

    #[test]
    fn load_fails_when_ca_cert_is_not_signed_by_the_root() {
        let (dir, _ca) = test_ca();
        let (other, _) = test_ca();
        fs::copy(
            other.path().join(ROOT_CERT_FILE),
            dir.path().join(ROOT_CERT_FILE),
        )
        .unwrap();
        let err = load_err(dir.path());
        assert!(err.contains(CA_CERT_FILE), "{err}");
        assert!(err.contains(ROOT_CERT_FILE), "{err}");

        // Same with a cert-chain.pem that holds only the CA certificate (direct check).
        fs::copy(
            dir.path().join(CA_CERT_FILE),
            dir.path().join(CERT_CHAIN_FILE),
        )
        .unwrap();
        let err = load_err(dir.path());
        assert!(err.contains(CA_CERT_FILE), "{err}");
        assert!(err.contains("is not signed by"), "{err}");
    }

    #[test]
    fn a_root_cert_pem_with_several_roots_is_accepted() {
        let (dir, _ca) = test_ca();
        let (other, _) = test_ca();
        let mine = fs::read_to_string(dir.path().join(ROOT_CERT_FILE)).unwrap();
        let theirs = fs::read_to_string(other.path().join(ROOT_CERT_FILE)).unwrap();
        write(&dir.path().join(ROOT_CERT_FILE), theirs + &mine);
        let ca = BuiltinCa::load(dir.path()).unwrap();
        assert_eq!(ca.roots_der().len(), 2);
        let cert = ca.issue(&id("foo", "bar"), DAY).unwrap();
        verify(&cert, &ca.roots_der(), webpki::KeyUsage::client_auth()).unwrap();
    }
}
