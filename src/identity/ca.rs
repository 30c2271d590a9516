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
//! Owns: creating such a directory ([`init_dir`]), validating and loading one
//! ([`BuiltinCa::load`]), and issuing SPIFFE leaf certificates ([`IssuedCert`]).
//! Does not own: when certificates are issued or renewed (`manager`), TLS configs (`tls`).
//!
//! Invariants of a loaded [`BuiltinCa`], checked once at load so that issuance cannot fail for
//! reasons an operator could have fixed at start-up:
//! - `ca-key.pem` is the private key of `ca-cert.pem`;
//! - `ca-cert.pem` is a CA (basicConstraints CA), currently valid, and chains to a certificate
//!   of `root-cert.pem` (directly, or through the intermediates of `cert-chain.pem`);
//! - a certificate it issues validates against `root-cert.pem` with a real path validator
//!   (webpki), which also proves that the issuer name is re-encoded faithfully.

use std::fmt;
use std::fs;
use std::future::Future;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;

use super::{Identity, IdentityError};

/// File name of the trust root(s) in a plugin-CA directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// File name of the signing CA certificate in a plugin-CA directory.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// File name of the signing CA private key in a plugin-CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the CA chain (signing CA first, root last) in a plugin-CA directory.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Lifetime of the root created by [`init_dir`].
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Lifetime of the intermediate created by [`init_dir`].
const INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// CA certificates are back-dated so nodes whose clocks lag the one that ran `ca init` accept
/// them at once.
const CA_BACKDATE: Duration = Duration::from_secs(60 * 60);
/// Leaf certificates are back-dated by this much to tolerate clock skew between peers.
const LEAF_BACKDATE: Duration = Duration::from_secs(60);

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

    /// The trust root(s) peers' chains must lead to (DER).
    fn roots_der(&self) -> Vec<CertificateDer<'static>>;
}

// === IssuedCert ===

/// A workload certificate with its private key, as a CA issued it. Immutable once issued;
/// [`CertManager`](super::CertManager) hands it out as `Arc<IssuedCert>`.
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
    key_pkcs8: PrivatePkcs8KeyDer<'static>,
}

impl IssuedCert {
    /// Assembles a certificate from parts another backend of this module obtained; the
    /// caller upholds the type's invariants (checked chain, one URI SAN, matching key).
    pub(super) fn from_parts(
        identity: Identity,
        key: &KeyPair,
        chain_der: Vec<CertificateDer<'static>>,
        serial_hex: String,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> IssuedCert {
        IssuedCert {
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
            .finish_non_exhaustive()
    }
}

// === init_dir ===

/// Creates a new CA in `dir` (created if missing) in Istio's plugin-CA layout: an ECDSA P-256
/// root valid 10 years and an intermediate valid 1 year signed by it, both with subject
/// `O=<trust domain>`. Only the intermediate's key is kept (`ca-key.pem`, mode 0600); the
/// root's key is discarded, as Istio's layout has no place for it.
///
/// Refuses to overwrite: if any of the four files exists, nothing is written. If writing
/// fails half-way, the files written so far are removed.
pub fn init_dir(dir: &Path, trust_domain: &str) -> Result<(), IdentityError> {
    super::validate_trust_domain(trust_domain)?;
    fs::create_dir_all(dir).map_err(|source| IdentityError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let [root_path, ca_cert_path, ca_key_path, chain_path] =
        [ROOT_CERT_FILE, CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE].map(|f| dir.join(f));
    for path in [&root_path, &ca_cert_path, &ca_key_path, &chain_path] {
        match fs::symlink_metadata(path) {
            Ok(_) => return Err(IdentityError::CaFileExists { path: path.clone() }),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => {
                return Err(IdentityError::Read {
                    path: path.clone(),
                    source,
                })
            }
        }
    }

    let generate = |what| move |source| IdentityError::Generate { what, source };
    let now = whole_seconds(SystemTime::now());
    let not_before = now.checked_sub(CA_BACKDATE).unwrap_or(now);

    let root_key = KeyPair::generate().map_err(generate("root CA key"))?;
    let root_params = ca_params(
        trust_domain,
        "weft root CA",
        BasicConstraints::Unconstrained,
        not_before,
        now + ROOT_VALIDITY,
    );
    let root_cert = root_params
        .self_signed(&root_key)
        .map_err(generate("root CA certificate"))?;
    let root_issuer = Issuer::new(root_params, root_key);

    let ca_key = KeyPair::generate().map_err(generate("intermediate CA key"))?;
    // Path length 0: the intermediate signs workload leaves only.
    let mut ca_params = ca_params(
        trust_domain,
        "weft intermediate CA",
        BasicConstraints::Constrained(0),
        not_before,
        now + INTERMEDIATE_VALIDITY,
    );
    ca_params.use_authority_key_identifier_extension = true;
    let ca_cert = ca_params
        .signed_by(&ca_key, &root_issuer)
        .map_err(generate("intermediate CA certificate"))?;

    let files = [
        (ca_key_path, ca_key.serialize_pem(), 0o600),
        (ca_cert_path, ca_cert.pem(), 0o644),
        (
            chain_path,
            format!("{}{}", ca_cert.pem(), root_cert.pem()),
            0o644,
        ),
        (root_path, root_cert.pem(), 0o644),
    ];
    let mut written: Vec<&Path> = Vec::new();
    for (path, content, mode) in &files {
        if let Err(e) = write_new_file(path, content.as_bytes(), *mode) {
            for path in written {
                // Best effort: we created these files a moment ago; the error we return
                // matters more than a failure to clean up.
                let _ = fs::remove_file(path);
            }
            return Err(e);
        }
        written.push(path);
    }
    tracing::info!(dir = %dir.display(), trust_domain, "created CA");
    Ok(())
}

fn ca_params(
    trust_domain: &str,
    common_name: &str,
    constraints: BasicConstraints,
    not_before: SystemTime,
    not_after: SystemTime,
) -> CertificateParams {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, common_name);
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    params.not_before = OffsetDateTime::from(not_before);
    params.not_after = OffsetDateTime::from(not_after);
    params
}

/// Creates `path` (which must not exist) with `mode` and writes `content` to it.
fn write_new_file(path: &Path, content: &[u8], mode: u32) -> Result<(), IdentityError> {
    let write_err = |source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == ErrorKind::AlreadyExists {
                IdentityError::CaFileExists {
                    path: path.to_path_buf(),
                }
            } else {
                write_err(source)
            }
        })?;
    file.write_all(content).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

// === impl BuiltinCa ===

/// The built-in CA: signs workload leaves with the key of `ca-cert.pem`. See the module doc
/// for the files and the invariants checked when loading them.
pub struct BuiltinCa {
    issuer: Issuer<'static, KeyPair>,
    /// What follows the leaf in every issued chain: `ca-cert.pem`, then `cert-chain.pem`
    /// without its leading copy of `ca-cert.pem`.
    chain_der: Vec<CertificateDer<'static>>,
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
        let pkcs8 = match key {
            PrivateKeyDer::Pkcs8(k) => k,
            PrivateKeyDer::Sec1(k) => wrap_in_pkcs8(k.secret_sec1_der(), ca.public_key().raw)
                .ok_or_else(|| invalid(&ca_key_path, "malformed EC PRIVATE KEY"))?,
            PrivateKeyDer::Pkcs1(k) => wrap_in_pkcs8(k.secret_pkcs1_der(), ca.public_key().raw)
                .ok_or_else(|| invalid(&ca_key_path, "malformed RSA PRIVATE KEY"))?,
            _ => return Err(invalid(&ca_key_path, "unsupported private key format")),
        };
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
        let fail = |reason: String| IdentityError::Issue {
            identity: id.clone(),
            reason,
        };
        // Cannot fail: an Identity's URI is ASCII (see `Identity::new`).
        let uri = rcgen::string::Ia5String::try_from(id.to_string())
            .map_err(|e| fail(format!("URI SAN: {e}")))?;
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
            serial_hex: hex(&leaf.serial),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            key_pkcs8: PrivatePkcs8KeyDer::from(leaf.key.serialize_der()),
        };
        tracing::debug!(identity = %id, serial = %cert.serial_hex, "issued certificate");
        Ok(cert)
    }

    /// The trust root(s) of `root-cert.pem`, one PEM string per certificate.
    pub fn roots_pem(&self) -> &[String] {
        &self.roots_pem
    }

    fn sign_leaf(&self, sans: Vec<SanType>, ttl: Duration) -> Result<Leaf, String> {
        let now = whole_seconds(SystemTime::now());
        if now >= self.ca_not_after {
            return Err("the CA certificate has expired".to_string());
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

        let key = KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
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
            .signed_by(&key, &self.issuer)
            .map_err(|e| format!("signing: {e}"))?;
        Ok(Leaf {
            pem: cert.pem(),
            der: cert.der().clone(),
            key,
            serial,
            not_before,
            not_after,
        })
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

// === Reading files ===

fn invalid(path: &Path, reason: impl Into<String>) -> IdentityError {
    IdentityError::InvalidFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn no_certificate(path: &Path) -> IdentityError {
    invalid(path, "contains no PEM CERTIFICATE block")
}

fn read_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every certificate of a PEM file, each checked to parse as X.509. Never empty.
pub(super) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let bytes = read_file(path)?;
    let mut certs = Vec::new();
    for item in rustls_pemfile::read_all(&mut bytes.as_slice()) {
        match item {
            Ok(rustls_pemfile::Item::X509Certificate(der)) => {
                if let Err(e) = x509_parser::parse_x509_certificate(&der) {
                    return Err(invalid(
                        path,
                        format!("certificate #{} is not valid X.509: {e}", certs.len() + 1),
                    ));
                }
                certs.push(der);
            }
            Ok(_) => {}
            Err(e) => return Err(invalid(path, format!("is not valid PEM: {e}"))),
        }
    }
    if certs.is_empty() {
        return Err(no_certificate(path));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let bytes = read_file(path)?;
    for item in rustls_pemfile::read_all(&mut bytes.as_slice()) {
        match item {
            Ok(rustls_pemfile::Item::Pkcs8Key(k)) => return Ok(k.into()),
            Ok(rustls_pemfile::Item::Sec1Key(k)) => return Ok(k.into()),
            Ok(rustls_pemfile::Item::Pkcs1Key(k)) => return Ok(k.into()),
            Ok(_) => {}
            Err(e) => return Err(invalid(path, format!("is not valid PEM: {e}"))),
        }
    }
    Err(invalid(
        path,
        "contains no PEM private key (PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY)",
    ))
}

fn parse_cert<'a>(
    path: &Path,
    der: &'a CertificateDer<'_>,
) -> Result<X509Certificate<'a>, IdentityError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| invalid(path, format!("is not a valid X.509 certificate: {e}")))
}

/// Wraps a SEC1 (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`) key in a PKCS#8
/// PrivateKeyInfo, which is all *ring* reads. The algorithm identifier (including the curve)
/// is taken from the public key of the certificate the key belongs to; if the key is not
/// that certificate's, the result fails to load or fails the key-match check.
fn wrap_in_pkcs8(legacy_key: &[u8], cert_spki: &[u8]) -> Option<PrivatePkcs8KeyDer<'static>> {
    const SEQUENCE: u8 = 0x30;
    const OCTET_STRING: u8 = 0x04;
    let spki = der::read_tlv(cert_spki).filter(|t| t.tag == SEQUENCE && t.rest.is_empty())?;
    let algorithm_identifier = der::read_tlv(spki.contents).filter(|t| t.tag == SEQUENCE)?;
    // PrivateKeyInfo ::= SEQUENCE { version INTEGER (0), algorithm, privateKey OCTET STRING }
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(algorithm_identifier.whole);
    der::write_tlv(OCTET_STRING, legacy_key, &mut body);
    let mut out = Vec::new();
    der::write_tlv(SEQUENCE, &body, &mut out);
    Some(PrivatePkcs8KeyDer::from(out))
}

/// Just enough DER to re-wrap a private key: definite lengths, low tag numbers.
mod der {
    /// One tag-length-value element, split off the front of some input.
    pub(super) struct Tlv<'a> {
        pub(super) tag: u8,
        /// The whole element: tag, length and contents.
        pub(super) whole: &'a [u8],
        pub(super) contents: &'a [u8],
        /// The input after this element.
        pub(super) rest: &'a [u8],
    }

    /// Splits one TLV off `input`; `None` if it is malformed or uses forms we do not need.
    pub(super) fn read_tlv(input: &[u8]) -> Option<Tlv<'_>> {
        let (&tag, after_tag) = input.split_first()?;
        if tag & 0x1f == 0x1f {
            return None;
        }
        let (&first, mut rest) = after_tag.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let (len_bytes, after) = rest.split_at(n);
            rest = after;
            len_bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
        };
        if rest.len() < len {
            return None;
        }
        let header = input.len() - rest.len();
        Some(Tlv {
            tag,
            whole: &input[..header + len],
            contents: &rest[..len],
            rest: &rest[len..],
        })
    }

    /// Appends one TLV to `out`.
    pub(super) fn write_tlv(tag: u8, contents: &[u8], out: &mut Vec<u8>) {
        out.push(tag);
        let len = contents.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|&&b| b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
        out.extend_from_slice(contents);
    }
}

// === Small helpers of this module ===

/// Validates `leaf` up to one of `roots` through `intermediates` (webpki, at the current time).
pub(super) fn verify_leaf(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    usage: webpki::KeyUsage,
) -> Result<(), String> {
    let anchors = roots
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("trust anchor: {e}"))?;
    let leaf = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("leaf: {e}"))?;
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
    .map_err(|e| e.to_string())
}

/// 16 random bytes, a positive DER INTEGER with no leading zero byte (so always 16 bytes
/// long), 126 bits of entropy.
fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    rand::rng().fill_bytes(&mut serial);
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// X.509 times have whole seconds; truncating first keeps `IssuedCert`'s times equal to the
/// certificate's.
fn whole_seconds(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn pem_encode_cert(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

/// PEM with 64-column lines and `\n` endings, as rcgen and openssl write it.
fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    // `chunks` never yields an empty chunk, so `chunk[0]` exists.
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| ALPHABET[((n >> shift) & 63) as usize];
        b64.push(sextet(18));
        b64.push(sextet(12));
        b64.push(if chunk.len() > 1 { sextet(6) } else { b'=' });
        b64.push(if chunk.len() > 2 { sextet(0) } else { b'=' });
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.extend(line.iter().map(|&c| char::from(c)));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;
    use x509_parser::extensions::GeneralName;

    /// Algorithms the tests' path validation accepts: what our CA and openssl-made CAs use.
    const ALGS: &[&dyn rustls::pki_types::SignatureVerificationAlgorithm] = &[
        webpki::ring::ECDSA_P256_SHA256,
        webpki::ring::ECDSA_P384_SHA384,
        webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    ];

    fn id(ns: &str, sa: &str) -> Identity {
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
    fn verify(
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

    fn load_err(dir: &Path) -> String {
        BuiltinCa::load(dir).unwrap_err().to_string()
    }

    fn write(path: &Path, content: impl AsRef<[u8]>) {
        fs::write(path, content).unwrap();
    }

    #[test]
    fn issued_leaf_verifies_against_the_root_for_client_and_server_auth() {
        let (_dir, ca) = test_ca();
        let cert = ca.issue(&id("foo", "bar"), DAY).unwrap();
        let roots = ca.roots_der();
        verify(&cert, &roots, webpki::KeyUsage::server_auth()).unwrap();
        verify(&cert, &roots, webpki::KeyUsage::client_auth()).unwrap();
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
    fn serials_are_random_positive_and_reported_in_hex() {
        let (_dir, ca) = test_ca();
        let a = ca.issue(&id("foo", "bar"), DAY).unwrap();
        let b = ca.issue(&id("foo", "bar"), DAY).unwrap();
        assert_ne!(a.serial_hex, b.serial_hex);
        assert_eq!(a.serial_hex.len(), 32);
        let (_, leaf) = x509_parser::parse_x509_certificate(&a.chain_der[0]).unwrap();
        assert_eq!(hex(leaf.raw_serial()), a.serial_hex);
        assert!(leaf.raw_serial()[0] < 0x80);
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

    fn read_pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
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

    #[tokio::test]
    async fn builtin_ca_signs_through_the_certificate_authority_trait() {
        let (_dir, ca) = test_ca();
        let ca: Arc<dyn CertificateAuthority> = Arc::new(ca);
        let cert = ca.sign(&id("foo", "bar"), DAY).await.unwrap();
        assert_eq!(cert.identity, id("foo", "bar"));
        verify(&cert, &ca.roots_der(), webpki::KeyUsage::server_auth()).unwrap();
    }

    use std::sync::Arc;

    #[test]
    fn init_dir_creates_the_directory_and_keeps_the_key_private() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("a/b/ca");
        init_dir(&dir, "example.org").unwrap();
        let mode = |f: &str| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        let ca = BuiltinCa::load(&dir).unwrap();
        let roots = ca.roots_der();
        let (_, root) = x509_parser::parse_x509_certificate(&roots[0]).unwrap();
        assert!(root.is_ca());
        let subject = root.subject().to_string();
        assert!(subject.contains("O=example.org"), "{subject}");
        assert!(subject.contains("CN=weft root CA"), "{subject}");
        let validity =
            root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
        assert_eq!(
            validity,
            i64::try_from((ROOT_VALIDITY + CA_BACKDATE).as_secs()).unwrap()
        );
        let (_, inter) = x509_parser::parse_x509_certificate(&ca.chain_der[0]).unwrap();
        assert!(inter.is_ca());
        assert!(inter.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert!(inter.key_usage().unwrap().unwrap().value.crl_sign());
        let validity =
            inter.validity().not_after.timestamp() - inter.validity().not_before.timestamp();
        assert_eq!(
            validity,
            i64::try_from((INTERMEDIATE_VALIDITY + CA_BACKDATE).as_secs()).unwrap()
        );
    }

    #[test]
    fn init_dir_refuses_to_overwrite_an_existing_ca() {
        let (dir, _ca) = test_ca();
        let before = fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
        let err = init_dir(dir.path(), "cluster.local").unwrap_err();
        assert!(matches!(err, IdentityError::CaFileExists { .. }), "{err}");
        assert!(err.to_string().contains(ROOT_CERT_FILE), "{err}");
        assert_eq!(fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), before);

        // One stray file is enough to refuse, and nothing else gets written.
        let other = tempfile::tempdir().unwrap();
        write(&other.path().join(CA_KEY_FILE), "mine");
        let err = init_dir(other.path(), "cluster.local").unwrap_err();
        assert!(err.to_string().contains(CA_KEY_FILE), "{err}");
        assert_eq!(fs::read_dir(other.path()).unwrap().count(), 1);
    }

    #[test]
    fn init_dir_refuses_an_invalid_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        assert!(init_dir(dir.path(), "Not/Valid").is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn load_fails_naming_a_missing_file() {
        for file in [ROOT_CERT_FILE, CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE] {
            let (dir, _ca) = test_ca();
            fs::remove_file(dir.path().join(file)).unwrap();
            let err = BuiltinCa::load(dir.path()).unwrap_err();
            assert!(matches!(err, IdentityError::Read { .. }), "{err}");
            assert!(err.to_string().contains(file), "{file}: {err}");
        }
    }

    #[test]
    fn load_fails_naming_a_file_that_is_not_pem() {
        for file in [ROOT_CERT_FILE, CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE] {
            for garbage in [
                &b"this is not a certificate\n"[..],
                b"\xff\xfe\x00garbage",
                b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                b"",
            ] {
                let (dir, _ca) = test_ca();
                write(&dir.path().join(file), garbage);
                let err = load_err(dir.path());
                assert!(err.contains(file), "{file} {garbage:?}: {err}");
            }
        }
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

    /// Rewrites a `ca init` directory's PKCS#8 key as SEC1 (`EC PRIVATE KEY`), the form
    /// `openssl ecparam -genkey` and many Istio plugin-CA guides produce.
    fn convert_key_to_sec1(dir: &Path) {
        let path = dir.join(CA_KEY_FILE);
        let PrivateKeyDer::Pkcs8(pkcs8) = read_key(&path).unwrap() else {
            panic!("init_dir writes PKCS#8");
        };
        // PrivateKeyInfo ::= SEQUENCE { version, algorithm, privateKey OCTET STRING (SEC1) }
        let info = der::read_tlv(pkcs8.secret_pkcs8_der()).unwrap();
        let version = der::read_tlv(info.contents).unwrap();
        let algorithm = der::read_tlv(version.rest).unwrap();
        let private_key = der::read_tlv(algorithm.rest).unwrap();
        assert_eq!(private_key.tag, 0x04);
        write(&path, pem_encode("EC PRIVATE KEY", private_key.contents));
    }

    #[test]
    fn a_plugin_dir_with_a_sec1_ec_private_key_loads() {
        let (dir, _ca) = test_ca();
        convert_key_to_sec1(dir.path());
        assert!(matches!(
            read_key(&dir.path().join(CA_KEY_FILE)).unwrap(),
            PrivateKeyDer::Sec1(_)
        ));
        let ca = BuiltinCa::load(dir.path()).unwrap();
        let cert = ca.issue(&id("foo", "bar"), DAY).unwrap();
        verify(&cert, &ca.roots_der(), webpki::KeyUsage::server_auth()).unwrap();

        // A SEC1 key that is not ca-cert.pem's is still refused, naming the key file.
        let (other, _) = test_ca();
        convert_key_to_sec1(other.path());
        fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
        let err = load_err(dir.path());
        assert!(err.contains(CA_KEY_FILE), "{err}");
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

    // --- Plugin-CA directories made by openssl, as Istio's guides do. Skipped (with a note) if
    // the openssl CLI is not installed.

    fn openssl(dir: &Path, args: &[&str]) -> bool {
        match Command::new("openssl").current_dir(dir).args(args).output() {
            Ok(out) if out.status.success() => true,
            Ok(out) => panic!(
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(_) => false,
        }
    }

    /// Makes an Istio-style plugin-CA dir: an RSA root and an intermediate whose key is made by
    /// `key_args` (written to ca-key.pem), with cert-chain.pem = intermediate + root.
    /// Returns `None` if openssl is missing.
    fn openssl_plugin_dir(key_args: &[&str]) -> Option<tempfile::TempDir> {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            &d.join("ext.cnf"),
            "[root]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier=hash\n\
             [inter]\nbasicConstraints=critical,CA:TRUE,pathlen:0\n\
             keyUsage=critical,digitalSignature,keyCertSign,cRLSign\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
        );
        let steps: &[&[&str]] = &[
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "root-key.pem",
                "-out",
                ROOT_CERT_FILE,
                "-days",
                "3650",
                "-subj",
                "/O=Istio/CN=Root CA",
                "-extensions",
                "root",
                "-config",
                "ext.cnf",
            ],
            key_args,
            &[
                "req",
                "-new",
                "-key",
                CA_KEY_FILE,
                "-out",
                "ca.csr",
                "-subj",
                "/C=US/O=Istio/OU=Mesh/CN=Intermediate CA",
            ],
            &[
                "x509",
                "-req",
                "-in",
                "ca.csr",
                "-CA",
                ROOT_CERT_FILE,
                "-CAkey",
                "root-key.pem",
                "-CAcreateserial",
                "-out",
                CA_CERT_FILE,
                "-days",
                "730",
                "-extfile",
                "ext.cnf",
                "-extensions",
                "inter",
            ],
        ];
        for step in steps {
            if !openssl(d, step) {
                eprintln!("openssl CLI not found; skipping");
                return None;
            }
        }
        let chain = fs::read_to_string(d.join(CA_CERT_FILE)).unwrap()
            + &fs::read_to_string(d.join(ROOT_CERT_FILE)).unwrap();
        write(&d.join(CERT_CHAIN_FILE), chain);
        Some(dir)
    }

    fn assert_loads_and_issues(dir: &Path) {
        let ca = BuiltinCa::load(dir).unwrap();
        let cert = ca.issue(&id("foo", "bar"), DAY).unwrap();
        verify(&cert, &ca.roots_der(), webpki::KeyUsage::server_auth()).unwrap();
        verify(&cert, &ca.roots_der(), webpki::KeyUsage::client_auth()).unwrap();
    }

    #[test]
    fn an_openssl_plugin_dir_with_a_p384_sec1_key_loads() {
        let Some(dir) = openssl_plugin_dir(&[
            "ecparam",
            "-name",
            "secp384r1",
            "-genkey",
            "-noout",
            "-out",
            CA_KEY_FILE,
        ]) else {
            return;
        };
        let key = fs::read_to_string(dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(key.starts_with("-----BEGIN EC PRIVATE KEY-----"), "{key}");
        assert_loads_and_issues(dir.path());
    }

    #[test]
    fn an_openssl_plugin_dir_with_a_pkcs8_p256_key_loads() {
        let Some(dir) = openssl_plugin_dir(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            CA_KEY_FILE,
        ]) else {
            return;
        };
        assert_loads_and_issues(dir.path());
    }

    #[test]
    fn an_openssl_plugin_dir_with_a_pkcs1_rsa_key_loads() {
        let Some(dir) =
            openssl_plugin_dir(&["genrsa", "-traditional", "-out", CA_KEY_FILE, "2048"])
        else {
            return;
        };
        let key = fs::read_to_string(dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(key.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "{key}");
        assert_loads_and_issues(dir.path());
    }
}
