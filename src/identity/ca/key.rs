//! The CA private key's accepted formats: PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) and
//! PKCS#1 (`RSA PRIVATE KEY`), all turned into the PKCS#8 that the signer (*ring*) reads.
//!
//! Owns: that conversion ([`to_pkcs8`]): a SEC1 or PKCS#1 key must decode as such, and is then
//! wrapped as is. Does not own: reading the key file (`files`), or
//! checking that the key is the CA certificate's (`builtin`, after conversion).

use std::path::Path;

use pkcs8::der::{Decode, Encode};
use pkcs8::spki::SubjectPublicKeyInfoRef;
use pkcs8::PrivateKeyInfo;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::files::invalid;
use super::IdentityError;

/// The CA key of `key_path` as PKCS#8. A SEC1 or PKCS#1 key is wrapped with the algorithm of
/// `cert_spki`, the DER SubjectPublicKeyInfo of the certificate the key belongs to.
pub(super) fn to_pkcs8(
    key: PrivateKeyDer<'static>,
    cert_spki: &[u8],
    key_path: &Path,
) -> Result<PrivatePkcs8KeyDer<'static>, IdentityError> {
    match key {
        PrivateKeyDer::Pkcs8(k) => Ok(k),
        PrivateKeyDer::Sec1(k) => {
            let key_der = k.secret_sec1_der();
            sec1::EcPrivateKey::from_der(key_der)
                .ok()
                .and_then(|_| wrap_in_pkcs8(key_der, cert_spki))
                .ok_or_else(|| invalid(key_path, "malformed EC PRIVATE KEY"))
        }
        PrivateKeyDer::Pkcs1(k) => {
            let key_der = k.secret_pkcs1_der();
            pkcs1::RsaPrivateKey::from_der(key_der)
                .ok()
                .and_then(|_| wrap_in_pkcs8(key_der, cert_spki))
                .ok_or_else(|| invalid(key_path, "malformed RSA PRIVATE KEY"))
        }
        _ => Err(invalid(key_path, "unsupported private key format")),
    }
}

/// Wraps a SEC1 (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`) key, as is, in a PKCS#8
/// PrivateKeyInfo, which is all *ring* reads. The algorithm identifier (including the curve)
/// is taken from the public key of the certificate the key belongs to; if the key is not
/// that certificate's, the result fails to load or fails the key-match check.
fn wrap_in_pkcs8(legacy_key: &[u8], cert_spki: &[u8]) -> Option<PrivatePkcs8KeyDer<'static>> {
    let spki = SubjectPublicKeyInfoRef::from_der(cert_spki).ok()?;
    let info = PrivateKeyInfo::new(spki.algorithm, legacy_key);
    info.to_der().ok().map(PrivatePkcs8KeyDer::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::certificate::pem_encode;
    use crate::identity::ca::files::read_key;
    use crate::identity::ca::tests::{id, load_err, test_ca, verify, write};
    use crate::identity::ca::{
        BuiltinCa, CertificateAuthority, CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, DAY,
        ROOT_CERT_FILE,
    };
    use std::fs;
    use std::process::Command;

    /// Rewrites a `ca init` directory's PKCS#8 key as SEC1 (`EC PRIVATE KEY`), the form
    /// `openssl ecparam -genkey` and many Istio plugin-CA guides produce.
    fn convert_key_to_sec1(dir: &Path) {
        let path = dir.join(CA_KEY_FILE);
        let PrivateKeyDer::Pkcs8(pkcs8) = read_key(&path).unwrap() else {
            panic!("init_dir writes PKCS#8");
        };
        // PrivateKeyInfo ::= SEQUENCE { version, algorithm, privateKey OCTET STRING (SEC1) }
        let info = PrivateKeyInfo::from_der(pkcs8.secret_pkcs8_der()).unwrap();
        sec1::EcPrivateKey::from_der(info.private_key).unwrap();
        write(&path, pem_encode("EC PRIVATE KEY", info.private_key));
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
    fn a_key_that_does_not_decode_as_its_label_says_is_refused_naming_the_key_file() {
        for (label, reason) in [
            ("EC PRIVATE KEY", "malformed EC PRIVATE KEY"),
            ("RSA PRIVATE KEY", "malformed RSA PRIVATE KEY"),
        ] {
            let (dir, _ca) = test_ca();
            write(
                &dir.path().join(CA_KEY_FILE),
                pem_encode(label, &[0x30, 0x00]),
            );
            let err = load_err(dir.path());
            assert!(err.contains(CA_KEY_FILE), "{err}");
            assert!(err.contains(reason), "{err}");
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
