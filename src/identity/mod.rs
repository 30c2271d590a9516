//! TEMPORARY compile shim; replaced by the identity branch.
#![allow(missing_docs, dead_code)]
pub mod ca;
pub mod manager;
use std::fmt;
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IdentityError(pub String);
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    td: String,
    ns: String,
    sa: String,
}
impl Identity {
    pub fn new(td: &str, ns: &str, sa: &str) -> Result<Identity, IdentityError> {
        if td.is_empty() || ns.is_empty() || sa.is_empty() || td.contains('/') {
            return Err(IdentityError("bad".into()));
        }
        Ok(Identity {
            td: td.into(),
            ns: ns.into(),
            sa: sa.into(),
        })
    }
}
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.td, self.ns, self.sa)
    }
}
impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
