//! Istio's security policies (`security.istio.io` v1 and v1beta1, which share one schema):
//! `AuthorizationPolicy`, `PeerAuthentication` and `RequestAuthentication`.
//!
//! The spec types deserialize straight from the mesh file, so a wrong type, an unknown field,
//! a malformed CIDR or port is reported by the YAML parser with its line. Unknown fields are
//! refused rather than ignored: a typo such as `principal:` in an ALLOW rule would otherwise
//! silently widen the policy.
//!
//! One file per CRD (`authorization_policy`, `peer_authentication`, `request_authentication`);
//! the values they share live apart: `selection` (workload selectors, target references),
//! `matching` (string and path patterns), `scalar` (IP blocks, ports, and the visitor every
//! parsed scalar goes through). This module owns [`Policy`], the one-of-three that the
//! mesh holds, and re-exports every type, so users name them `model::policy::X`. It must not
//! grow behaviour beyond parsing: evaluation is `authz`'s.

mod authorization_policy;
mod matching;
mod peer_authentication;
mod request_authentication;
mod scalar;
mod selection;

use serde::Serialize;

pub use authorization_policy::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, Condition, ConditionKey,
    ExtensionProvider, Operation, PolicyScope, Rule, RuleFrom, RuleTo, Source,
};
pub use matching::{PathMatch, PathTemplate, StringMatch};
pub use peer_authentication::{MtlsMode, MutualTls, PeerAuthentication, PeerAuthenticationSpec};
pub use request_authentication::{
    ClaimToHeader, JwtHeader, JwtRule, RequestAuthentication, RequestAuthenticationSpec,
};
pub use scalar::{IpBlock, PortNumber};
pub use selection::{PolicyTargetReference, WorkloadSelector};

/// Which of the three policy kinds a [`Policy`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PolicyKind {
    /// `AuthorizationPolicy`.
    AuthorizationPolicy,
    /// `PeerAuthentication`.
    PeerAuthentication,
    /// `RequestAuthentication`.
    RequestAuthentication,
}

/// One security policy object with its name and namespace.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Policy {
    /// An `AuthorizationPolicy`.
    AuthorizationPolicy(AuthorizationPolicy),
    /// A `PeerAuthentication`.
    PeerAuthentication(PeerAuthentication),
    /// A `RequestAuthentication`.
    RequestAuthentication(RequestAuthentication),
}

impl Policy {
    /// The policy's kind.
    pub fn kind(&self) -> PolicyKind {
        match self {
            Policy::AuthorizationPolicy(_) => PolicyKind::AuthorizationPolicy,
            Policy::PeerAuthentication(_) => PolicyKind::PeerAuthentication,
            Policy::RequestAuthentication(_) => PolicyKind::RequestAuthentication,
        }
    }

    /// `(namespace, name)`.
    pub fn key(&self) -> (&str, &str) {
        match self {
            Policy::AuthorizationPolicy(p) => (&p.namespace, &p.name),
            Policy::PeerAuthentication(p) => (&p.namespace, &p.name),
            Policy::RequestAuthentication(p) => (&p.namespace, &p.name),
        }
    }
}
