//! `weft ca init`: creating a new CA directory in Istio's plugin-CA layout ([`init_dir`]).
//!
//! Owns: the shape of the CA it creates (an ECDSA P-256 root and intermediate, their
//! subjects, lifetimes and extensions), refusing to overwrite an existing CA, and the file
//! modes. Does not own: loading or checking a directory (`builtin`), the file names
//! (`super`).

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

use super::certificate::{random_serial, whole_seconds};
use super::{IdentityError, CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE};

/// Lifetime of the root created by [`init_dir`].
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Lifetime of the intermediate created by [`init_dir`].
const INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// CA certificates are back-dated so nodes whose clocks lag the one that ran `ca init` accept
/// them at once.
const CA_BACKDATE: Duration = Duration::from_secs(60 * 60);

/// Creates a new CA in `dir` (created if missing) in Istio's plugin-CA layout: an ECDSA P-256
/// root valid 10 years and an intermediate valid 1 year signed by it, both with subject
/// `O=<trust domain>`. Only the intermediate's key is kept (`ca-key.pem`, mode 0600); the
/// root's key is discarded, as Istio's layout has no place for it.
///
/// Refuses to overwrite: if any of the four files exists, nothing is written. If writing
/// fails half-way, the files written so far are removed.
pub fn init_dir(dir: &Path, trust_domain: &str) -> Result<(), IdentityError> {
    crate::identity::validate_trust_domain(trust_domain)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::tests::{test_ca, write};
    use crate::identity::ca::{BuiltinCa, CertificateAuthority};

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
}
