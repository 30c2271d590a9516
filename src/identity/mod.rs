//! Workload identity: SPIFFE ids, the certificates that prove them, and where those come from.
//!
//! Owns:
//! - [`Identity`], the parsed form of `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`;
//!   once one exists it is valid (parse, don't validate).
//! - [`ca`]: certificate authority backends behind [`ca::CertificateAuthority`]: the
//!   built-in CA that reads Istio's plugin-CA files ([`ca::BuiltinCa`]), and
//!   [`istio`]: Istio's CA over gRPC ([`istio::IstioCa`]). `ca` is split by concern:
//!   `ca::certificate` ([`IssuedCert`] and its encodings), `ca::init` (`weft ca init`,
//!   [`ca::init_dir`]), `ca::builtin` (loading and checking a plugin-CA directory, issuing),
//!   `ca::files` (reading its PEM files) and `ca::key` (the CA key's accepted formats).
//! - [`manager`]: [`manager::CertManager`], which keeps one leaf certificate per wanted identity
//!   and renews it before it expires.
//!
//! Errors: [`IdentityError`] for everything this module's public functions do, with the file
//! or identity concerned; an issuance failure carries an [`IssueError`] naming the backend's
//! own error ([`ca::SignError`], [`istio::IstioCaError`]).
//!
//! Does not own: deciding *which* identities are wanted (whoever knows the local enrolled pods
//! feeds a `watch` channel), nor building TLS configs or verifying peers (`tls`).

pub mod ca;
pub mod istio;
pub mod manager;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use ca::{BuiltinCa, CertificateAuthority, IssuedCert};
pub use istio::IstioCa;
pub use manager::CertManager;

/// Everything that can go wrong in this module, each with the file or identity it concerns.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A string is not a valid SPIFFE id, or its parts are not valid.
    #[error("invalid identity {input:?}: {reason}")]
    InvalidIdentity {
        /// What was given.
        input: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A trust domain is not a valid SPIFFE trust domain name.
    #[error("invalid trust domain {input:?}: {reason}")]
    InvalidTrustDomain {
        /// What was given.
        input: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// `ca init` would overwrite an existing CA file.
    #[error("{}: already exists; refusing to overwrite an existing CA", path.display())]
    CaFileExists {
        /// The file that is in the way.
        path: PathBuf,
    },
    /// A file or directory could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file or directory could not be created or written.
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file's content is not what it must be (not PEM, not a certificate, not a CA, not
    /// signed by the root, a key that does not match, ...).
    #[error("{}: {reason}", path.display())]
    InvalidFile {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Generating a CA certificate or key failed (`ca init`).
    #[error("generating the {what}: {source}")]
    Generate {
        /// Which certificate or key.
        what: &'static str,
        /// The underlying error.
        source: rcgen::Error,
    },
    /// A certificate authority could not issue a certificate for an identity.
    #[error("issuing a certificate for {identity}: {reason}")]
    Issue {
        /// The identity the certificate was for.
        identity: Identity,
        /// Why it failed.
        reason: IssueError,
    },
}

/// Why a certificate authority did not issue a certificate, by backend.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The built-in CA could not sign the leaf.
    #[error(transparent)]
    Builtin(#[from] ca::SignError),
    /// Istio's CA could not be asked, refused, or returned an unusable chain.
    #[error(transparent)]
    Istio(#[from] istio::IstioCaError),
    /// The CA did not answer in time ([`CertManager`] gives each issuance a deadline).
    #[error("the CA did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

// === impl Identity ===

/// A workload identity: the SPIFFE id `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
///
/// Invariant: every `Identity` is valid, so its URI is always a well-formed SPIFFE id that can
/// be put in a certificate's URI SAN as is. Ordering is by trust domain, then namespace, then
/// service account. Cheap to clone (the parts are shared): every connection record carries
/// two of them.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    parts: std::sync::Arc<IdentityParts>,
}

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct IdentityParts {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("trust_domain", &self.parts.trust_domain)
            .field("namespace", &self.parts.namespace)
            .field("service_account", &self.parts.service_account)
            .finish()
    }
}

const SCHEME: &str = "spiffe://";

impl Identity {
    /// Builds an identity from its parts.
    ///
    /// The trust domain must be a SPIFFE trust domain name (lowercase letters, digits, `.`,
    /// `-`, `_`; dot-separated non-empty labels). Namespace and service account must be
    /// non-empty SPIFFE path segments: letters, digits, `.`, `-`, `_`, and neither `.` nor
    /// `..`. Every Kubernetes namespace and ServiceAccount name qualifies.
    pub fn new(
        trust_domain: impl AsRef<str>,
        namespace: impl AsRef<str>,
        service_account: impl AsRef<str>,
    ) -> Result<Identity, IdentityError> {
        let id = IdentityParts {
            trust_domain: trust_domain.as_ref().to_string(),
            namespace: namespace.as_ref().to_string(),
            service_account: service_account.as_ref().to_string(),
        };
        let invalid = |reason| IdentityError::InvalidIdentity {
            input: format!(
                "{SCHEME}{}/ns/{}/sa/{}",
                id.trust_domain, id.namespace, id.service_account
            ),
            reason,
        };
        if let Some(reason) = trust_domain_problem(&id.trust_domain) {
            return Err(invalid(reason));
        }
        if let Some(reason) = segment_problem(&id.namespace) {
            return Err(invalid(match reason {
                SegmentProblem::Empty => "namespace is empty",
                SegmentProblem::Dots => "namespace must not be \".\" or \"..\"",
                SegmentProblem::Char => {
                    "namespace may only contain letters, digits, '.', '-' and '_'"
                }
            }));
        }
        if let Some(reason) = segment_problem(&id.service_account) {
            return Err(invalid(match reason {
                SegmentProblem::Empty => "service account is empty",
                SegmentProblem::Dots => "service account must not be \".\" or \"..\"",
                SegmentProblem::Char => {
                    "service account may only contain letters, digits, '.', '-' and '_'"
                }
            }));
        }
        Ok(Identity {
            parts: std::sync::Arc::new(id),
        })
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.parts.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.parts.namespace
    }

    /// The Kubernetes ServiceAccount name.
    pub fn service_account(&self) -> &str {
        &self.parts.service_account
    }
}

/// Checks a trust domain name, for callers that hold one without an identity (`ca init`,
/// config validation).
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    match trust_domain_problem(trust_domain) {
        None => Ok(()),
        Some(reason) => Err(IdentityError::InvalidTrustDomain {
            input: trust_domain.to_string(),
            reason,
        }),
    }
}

/// What is wrong with a trust domain name, if anything. SPIFFE allows lowercase letters,
/// digits, `.`, `-` and `_`; we also refuse empty labels so the name reads as a DNS name.
fn trust_domain_problem(td: &str) -> Option<&'static str> {
    if td.is_empty() {
        return Some("trust domain is empty");
    }
    if td.len() > 255 {
        return Some("trust domain is longer than 255 characters");
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Some("trust domain may only contain lowercase letters, digits, '.', '-' and '_'");
    }
    if td.split('.').any(str::is_empty) {
        return Some("trust domain has an empty label (leading, trailing or double '.')");
    }
    None
}

enum SegmentProblem {
    Empty,
    Dots,
    Char,
}

fn segment_problem(segment: &str) -> Option<SegmentProblem> {
    if segment.is_empty() {
        Some(SegmentProblem::Empty)
    } else if segment == "." || segment == ".." {
        Some(SegmentProblem::Dots)
    } else if !segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        Some(SegmentProblem::Char)
    } else {
        None
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.parts.trust_domain, self.parts.namespace, self.parts.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    /// Parses exactly `spiffe://<td>/ns/<ns>/sa/<sa>`; anything else (other paths, query,
    /// fragment, port, user info, upper-case scheme) is refused.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| IdentityError::InvalidIdentity {
            input: s.to_string(),
            reason,
        };
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("must start with \"spiffe://\""))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("missing path /ns/<namespace>/sa/<service account>"))?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Identity::new(td, ns, sa)
                .map_err(|e| match e {
                    IdentityError::InvalidIdentity { reason, .. } => invalid(reason),
                    other => other,
                }),
            _ => Err(invalid(
                "path must be exactly /ns/<namespace>/sa/<service account>",
            )),
        }
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_displays_as_its_spiffe_uri_and_parses_back() {
        let id = Identity::new("cluster.local", "foo", "bar").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/foo/sa/bar");
        let parsed: Identity = id.to_string().parse().unwrap();
        assert_eq!(parsed, id);
        assert_eq!(parsed.trust_domain(), "cluster.local");
        assert_eq!(parsed.namespace(), "foo");
        assert_eq!(parsed.service_account(), "bar");
    }

    #[test]
    fn identity_parse_refuses_anything_but_the_exact_spiffe_form() {
        for bad in [
            "",
            "cluster.local/ns/foo/sa/bar",
            "SPIFFE://cluster.local/ns/foo/sa/bar",
            "https://cluster.local/ns/foo/sa/bar",
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/ns/foo",
            "spiffe://cluster.local/ns/foo/sa",
            "spiffe://cluster.local/ns/foo/sa/",
            "spiffe://cluster.local/ns//sa/bar",
            "spiffe://cluster.local/ns/foo/sa/bar/",
            "spiffe://cluster.local/ns/foo/sa/bar/extra",
            "spiffe://cluster.local/sa/bar/ns/foo",
            "spiffe://cluster.local/ns/foo/sa/bar?x=1",
            "spiffe://cluster.local/ns/foo/sa/bar#frag",
            "spiffe://cluster.local:443/ns/foo/sa/bar",
            "spiffe://user@cluster.local/ns/foo/sa/bar",
            "spiffe://Cluster.Local/ns/foo/sa/bar",
            "spiffe://cluster..local/ns/foo/sa/bar",
            "spiffe://.cluster.local/ns/foo/sa/bar",
            "spiffe://cluster.local/ns/../sa/bar",
            "spiffe://cluster.local/ns/foo/sa/b%61r",
            "spiffe:///ns/foo/sa/bar",
        ] {
            let err = bad.parse::<Identity>().expect_err(bad);
            assert!(
                matches!(err, IdentityError::InvalidIdentity { ref input, .. } if input == bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn identity_new_refuses_empty_parts_and_slashes() {
        assert!(Identity::new("", "foo", "bar").is_err());
        assert!(Identity::new("cluster.local", "", "bar").is_err());
        assert!(Identity::new("cluster.local", "foo", "").is_err());
        assert!(Identity::new("cluster.local", "foo/x", "bar").is_err());
        assert!(Identity::new("cluster.local", "foo", "bar/x").is_err());
        assert!(Identity::new("cluster.local/x", "foo", "bar").is_err());
        assert!(Identity::new("example.org", "kube-system", "default.sa_1").is_ok());
    }

    #[test]
    fn identity_serializes_as_the_uri_string() {
        let id = Identity::new("cluster.local", "foo", "bar").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/foo/sa/bar\"");
        let back: Identity = serde_json::from_str(&json).unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<Identity>("\"spiffe://x/ns/a\"").is_err());
    }

    #[test]
    fn trust_domain_validation_reports_the_reason() {
        assert!(validate_trust_domain("cluster.local").is_ok());
        let err = validate_trust_domain("Cluster.local").unwrap_err();
        assert!(err.to_string().contains("lowercase"), "{err}");
    }
}
