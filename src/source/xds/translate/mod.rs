//! xDS resources → the mesh [`model`](crate::model): Istio's workload API
//! (`istio.workload.Address`: a `Workload` or a `Service`) and ztunnel's L4 authorization
//! (`istio.security.Authorization`).
//!
//! Two steps, so a bad resource can be refused on its own: [`address()`] and
//! [`authorization()`] check and translate one resource (an error here NACKs the response
//! that carried it); [`Assembly`] keeps the accepted resources and turns each change into
//! the [`Edit`](crate::state::Edit)s of the mesh, re-deriving only what spans the changed
//! resources (service endpoints and their target ports, the workloads a selector policy
//! applies to); [`assemble`] is the same from scratch. Neither fails, but they report oddities as
//! warnings (IPs claimed twice are the snapshot's to report).
//!
//! Split by concern: [`address`](mod@address) (workloads and services),
//! [`authorization`](mod@authorization) (L4 policies) and [`assembly`] (the accepted
//! resources joined into the mesh, incrementally or from scratch). This module holds what
//! the first two share: reading an IP address and a port from the wire ([`FieldError`]).
//!
//! Owns no I/O and no protocol state: `source::xds` does that. Separate from
//! `source::file`, which translates Kubernetes YAML. How ztunnel's Authorization maps onto
//! the CRD-shaped policy is told in [`authorization`](mod@authorization).

use std::net::IpAddr;

pub mod address;
pub mod assembly;
pub mod authorization;

pub use address::{address, AddressEntry, AddressError, ServiceEntry, WorkloadEntry};
pub use assembly::{assemble, Assembly};
pub use authorization::{authorization, AuthorizationError, MatchError, RuleError};

/// A field of a resource that does not hold what it must; `what` names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// Bytes that are neither an IPv4 nor an IPv6 address.
    #[error("{what}: {len} bytes is neither an IPv4 (4) nor an IPv6 (16) address")]
    IpLength {
        /// The field.
        what: String,
        /// How many bytes it holds.
        len: usize,
    },
    /// Port 0 where a port is required.
    #[error("{what}: port 0 is not allowed")]
    PortZero {
        /// The field.
        what: String,
    },
    /// A required field (a message, a oneof) that is not set.
    #[error("{what} is required")]
    Missing {
        /// The field.
        what: String,
    },
    /// A required string that is empty.
    #[error("{what} must not be empty")]
    EmptyString {
        /// The field.
        what: String,
    },
    /// A number too large for a port.
    #[error("{what}: {value} is not a port (1-65535)")]
    NotAPort {
        /// The field.
        what: String,
        /// The number.
        value: u32,
    },
}

/// The IP address in `b` (4 or 16 bytes); `what` names the field in the error.
fn ip_from_bytes(b: &[u8], what: &str) -> Result<IpAddr, FieldError> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return Ok(IpAddr::from(v4));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(b) {
        return Ok(IpAddr::from(v6));
    }
    Err(FieldError::IpLength {
        what: what.to_string(),
        len: b.len(),
    })
}

/// The port `v` (0 only if `zero_ok`); `what` names the field in the error.
fn port(v: u32, what: &str, zero_ok: bool) -> Result<u16, FieldError> {
    match u16::try_from(v) {
        Ok(0) if !zero_ok => Err(FieldError::PortZero {
            what: what.to_string(),
        }),
        Ok(p) => Ok(p),
        Err(_) => Err(FieldError::NotAPort {
            what: what.to_string(),
            value: v,
        }),
    }
}

/// What the tests of the translation share: resources as istiod would send them.
#[cfg(test)]
pub(super) mod fixtures {
    use std::collections::BTreeMap;

    use crate::proto::istio::security as xsec;
    use crate::proto::istio::workload as xw;
    use xsec::string_match::MatchType;

    pub(crate) fn sm(v: MatchType) -> xsec::StringMatch {
        xsec::StringMatch {
            match_type: Some(v),
        }
    }

    pub(crate) fn exact(s: &str) -> xsec::StringMatch {
        sm(MatchType::Exact(s.into()))
    }

    pub(crate) fn policy(rules: Vec<xsec::Rule>) -> xsec::Authorization {
        xsec::Authorization {
            name: "p".into(),
            namespace: "ns1".into(),
            scope: xsec::Scope::Namespace as i32,
            action: xsec::Action::Allow as i32,
            rules,
            dry_run: false,
        }
    }

    pub(crate) fn clause(matches: Vec<xsec::Match>) -> xsec::Clause {
        xsec::Clause { matches }
    }

    pub(crate) fn wl(uid: &str, ip: [u8; 4], services: &[(&str, u32, u32)]) -> xw::Address {
        let mut map: BTreeMap<String, xw::PortList> = BTreeMap::new();
        for (k, sp, tp) in services {
            map.entry(k.to_string()).or_default().ports.push(xw::Port {
                service_port: *sp,
                target_port: *tp,
            });
        }
        xw::Address {
            r#type: Some(xw::address::Type::Workload(xw::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "ns1".into(),
                addresses: vec![ip.to_vec()],
                tunnel_protocol: xw::TunnelProtocol::Hbone as i32,
                node: "n1".into(),
                services: map.into_iter().collect(),
                authorization_policies: vec!["ns1/sel".into()],
                ..Default::default()
            })),
        }
    }
}
