//! Reading the PEM files of a plugin-CA directory (and Istio's `rootCertFile`): certificates
//! checked to parse as X.509, the first private key, every failure naming its file.
//!
//! Owns: what counts as a readable certificate or key file and the wording of
//! [`IdentityError::InvalidFile`] for such files. Does not own: what the certificates must
//! be to each other (`builtin`), the key formats' conversion (`key`), writing (`init`).

use std::fs;
use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;

use super::IdentityError;

/// The error for a file whose content is wrong, with why.
pub(super) fn invalid(path: &Path, reason: impl Into<String>) -> IdentityError {
    IdentityError::InvalidFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

pub(super) fn no_certificate(path: &Path) -> IdentityError {
    invalid(path, "contains no PEM CERTIFICATE block")
}

fn read_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every certificate of a PEM file, each checked to parse as X.509. Never empty.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
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
pub(super) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
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

/// Parses one certificate of `path` (already read), naming the file if it does not parse.
pub(super) fn parse_cert<'a>(
    path: &Path,
    der: &'a CertificateDer<'_>,
) -> Result<X509Certificate<'a>, IdentityError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| invalid(path, format!("is not a valid X.509 certificate: {e}")))
}

#[cfg(test)]
mod tests {
    use crate::identity::ca::tests::{load_err, test_ca, write};
    use crate::identity::ca::{
        BuiltinCa, CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE,
    };
    use crate::identity::IdentityError;
    use std::fs;

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
}
