//! The `AuthorizationPolicy` CRD: [`AuthorizationPolicy`] and its spec, rules, sources,
//! operations and `when` conditions ([`ConditionKey`]), plus [`PolicyScope`], the extension
//! for sources that resolve selection themselves (xDS).
//!
//! Owns: the CRD's shape and the parsing of condition keys. Does not own: the match values
//! inside rules (`matching`, `scalar`), selectors (`selection`), evaluation (`authz`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use super::matching::{PathMatch, StringMatch};
use super::scalar::{IpBlock, Parse, PortNumber};
use super::selection::{PolicyTargetReference, WorkloadSelector};

/// An `AuthorizationPolicy`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuthorizationPolicy {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// The spec as written.
    pub spec: AuthorizationPolicySpec,
}

/// `AuthorizationPolicy.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Workloads the policy applies to; absent: every workload in scope.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Single target reference.
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    /// Target references.
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Rules; an ALLOW with no rules matches nothing (so denies all).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// What happens on a match (default ALLOW).
    #[serde(default)]
    pub action: Action,
    /// The external authorizer for `CUSTOM`.
    #[serde(default)]
    pub provider: Option<ExtensionProvider>,
    /// Which workloads the policy applies to when its source resolved that itself (xDS);
    /// [`PolicyScope::Selector`] (the default, and the only value a mesh file can give)
    /// means namespace and `selector` decide, as for the CRD. Not a CRD field: refused in
    /// a mesh file. See [`AuthorizationPolicy::applies_to`].
    #[serde(
        default,
        skip_deserializing,
        skip_serializing_if = "PolicyScope::is_selector"
    )]
    pub scope: PolicyScope,
    /// Evaluated and logged but never enforced (Istio's `istio.io/dry-run` annotation, which
    /// istiod passes on as `dry_run`). Not a CRD field: refused in a mesh file.
    #[serde(
        default,
        skip_deserializing,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub dry_run: bool,
}

/// Which workloads an [`AuthorizationPolicy`] applies to.
///
/// An extension of the CRD shape for sources that resolve selection themselves: istiod sends
/// ztunnel a scope (`GLOBAL`, `NAMESPACE`, `WORKLOAD_SELECTOR`) instead of the selector, and
/// lists on each workload the selector policies that select it (workloads carry no labels
/// in xDS). `authz` is the one place that turns a scope into the workloads it covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyScope {
    /// As for the CRD: a policy of the root namespace without selector applies mesh-wide,
    /// otherwise to its namespace's workloads that `selector` matches (all without one).
    #[default]
    Selector,
    /// Every workload of the mesh (xDS `GLOBAL`).
    Mesh,
    /// Every workload of the policy's namespace (xDS `NAMESPACE`).
    Namespace,
    /// Exactly these workloads, by uid (xDS `WORKLOAD_SELECTOR`).
    Workloads(std::collections::BTreeSet<String>),
}

impl PolicyScope {
    /// True for the CRD behaviour.
    pub fn is_selector(&self) -> bool {
        *self == PolicyScope::Selector
    }
}

/// `spec.provider` of a CUSTOM policy.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionProvider {
    /// The provider's name in mesh config.
    pub name: String,
}

/// `AuthorizationPolicy.spec.action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Allow matching requests.
    #[default]
    Allow,
    /// Deny matching requests.
    Deny,
    /// Log matching requests; never blocks.
    Audit,
    /// Delegate to an external authorizer.
    Custom,
}

/// One rule: all of `from`, `to` and `when` must match (each a list of alternatives).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Source alternatives (any may match); empty: any source.
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    /// Operation alternatives; empty: any operation.
    #[serde(default)]
    pub to: Vec<RuleTo>,
    /// Conditions; all must hold.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// `rules[].from[]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    /// The source description.
    #[serde(default)]
    pub source: Source,
}

/// `rules[].to[]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    /// The operation description.
    #[serde(default)]
    pub operation: Operation,
}

/// `rules[].from[].source`: each set field must match; within a field any value may.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer identities (`<td>/ns/<ns>/sa/<sa>`), from mTLS.
    #[serde(default)]
    pub principals: Vec<StringMatch>,
    /// Negated principals.
    #[serde(default)]
    pub not_principals: Vec<StringMatch>,
    /// JWT principals (`<iss>/<sub>`): L7.
    #[serde(default)]
    pub request_principals: Vec<StringMatch>,
    /// Negated JWT principals: L7.
    #[serde(default)]
    pub not_request_principals: Vec<StringMatch>,
    /// Peer namespaces, from mTLS.
    #[serde(default)]
    pub namespaces: Vec<StringMatch>,
    /// Negated namespaces.
    #[serde(default)]
    pub not_namespaces: Vec<StringMatch>,
    /// Source IPs/CIDRs of the connection.
    #[serde(default)]
    pub ip_blocks: Vec<IpBlock>,
    /// Negated source IPs.
    #[serde(default)]
    pub not_ip_blocks: Vec<IpBlock>,
    /// Original client IPs (X-Forwarded-For); at L4 the connection's source.
    #[serde(default)]
    pub remote_ip_blocks: Vec<IpBlock>,
    /// Negated remote IPs.
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<IpBlock>,
}

/// `rules[].to[].operation`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// HTTP hosts: L7.
    #[serde(default)]
    pub hosts: Vec<StringMatch>,
    /// Negated hosts: L7.
    #[serde(default)]
    pub not_hosts: Vec<StringMatch>,
    /// Destination ports.
    #[serde(default)]
    pub ports: Vec<PortNumber>,
    /// Negated ports.
    #[serde(default)]
    pub not_ports: Vec<PortNumber>,
    /// HTTP methods: L7.
    #[serde(default)]
    pub methods: Vec<StringMatch>,
    /// Negated methods: L7.
    #[serde(default)]
    pub not_methods: Vec<StringMatch>,
    /// HTTP paths (matched against the normalized path without its query): L7.
    #[serde(default)]
    pub paths: Vec<PathMatch>,
    /// Negated paths: L7.
    #[serde(default)]
    pub not_paths: Vec<PathMatch>,
}

/// `rules[].when[]`: a key with values (any may match) and notValues (none may match).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// The attribute.
    pub key: ConditionKey,
    /// Accepted values.
    #[serde(default)]
    pub values: Vec<StringMatch>,
    /// Refused values.
    #[serde(default)]
    pub not_values: Vec<StringMatch>,
}

/// The attributes a `when` condition may test, as Istio defines them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "String")]
pub enum ConditionKey {
    /// `source.ip`.
    SourceIp,
    /// `remote.ip`.
    RemoteIp,
    /// `source.namespace`.
    SourceNamespace,
    /// `source.principal`.
    SourcePrincipal,
    /// `destination.ip`.
    DestinationIp,
    /// `destination.port`.
    DestinationPort,
    /// `connection.sni`.
    ConnectionSni,
    /// `request.headers[<name>]`: L7.
    RequestHeader(String),
    /// `request.auth.principal`: L7.
    RequestAuthPrincipal,
    /// `request.auth.audiences`: L7.
    RequestAuthAudiences,
    /// `request.auth.presenter`: L7.
    RequestAuthPresenter,
    /// `request.auth.claims[a][b]...`: L7.
    RequestAuthClaims(Vec<String>),
    /// `experimental.envoy.filters.*`: L7, Envoy-specific.
    Experimental(String),
}

impl ConditionKey {
    /// True when the attribute is only known to an HTTP-aware proxy.
    pub fn is_l7(&self) -> bool {
        matches!(
            self,
            ConditionKey::RequestHeader(_)
                | ConditionKey::RequestAuthPrincipal
                | ConditionKey::RequestAuthAudiences
                | ConditionKey::RequestAuthPresenter
                | ConditionKey::RequestAuthClaims(_)
                | ConditionKey::Experimental(_)
        )
    }
}

/// Splits `[a][b][c]` into `["a","b","c"]`; `None` unless the whole input has that shape.
fn bracketed_segments(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        let seg = &inner[..end];
        if seg.is_empty() {
            return None;
        }
        out.push(seg.to_string());
        rest = &inner[end + 1..];
    }
    (!out.is_empty()).then_some(out)
}

impl FromStr for ConditionKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "source.ip" => ConditionKey::SourceIp,
            "remote.ip" => ConditionKey::RemoteIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            "connection.sni" => ConditionKey::ConnectionSni,
            "request.auth.principal" => ConditionKey::RequestAuthPrincipal,
            "request.auth.audiences" => ConditionKey::RequestAuthAudiences,
            "request.auth.presenter" => ConditionKey::RequestAuthPresenter,
            _ => {
                if let Some(rest) = s.strip_prefix("request.headers") {
                    match bracketed_segments(rest).as_deref() {
                        Some([name]) => ConditionKey::RequestHeader(name.clone()),
                        _ => {
                            return Err(format!(
                                "invalid condition key {s:?}: expected request.headers[<name>]"
                            ))
                        }
                    }
                } else if let Some(rest) = s.strip_prefix("request.auth.claims") {
                    match bracketed_segments(rest) {
                        Some(path) => ConditionKey::RequestAuthClaims(path),
                        None => {
                            return Err(format!(
                                "invalid condition key {s:?}: expected request.auth.claims[<name>]"
                            ))
                        }
                    }
                } else if s.starts_with("experimental.envoy.filters.") {
                    ConditionKey::Experimental(s.to_string())
                } else {
                    return Err(format!(
                        "unknown condition key {s:?}: expected one of source.ip, remote.ip, source.namespace, \
                         source.principal, destination.ip, destination.port, connection.sni, \
                         request.headers[<name>], request.auth.principal, request.auth.audiences, \
                         request.auth.presenter, request.auth.claims[<name>]"
                    ));
                }
            }
        })
    }
}

impl fmt::Display for ConditionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConditionKey::SourceIp => f.write_str("source.ip"),
            ConditionKey::RemoteIp => f.write_str("remote.ip"),
            ConditionKey::SourceNamespace => f.write_str("source.namespace"),
            ConditionKey::SourcePrincipal => f.write_str("source.principal"),
            ConditionKey::DestinationIp => f.write_str("destination.ip"),
            ConditionKey::DestinationPort => f.write_str("destination.port"),
            ConditionKey::ConnectionSni => f.write_str("connection.sni"),
            ConditionKey::RequestHeader(h) => write!(f, "request.headers[{h}]"),
            ConditionKey::RequestAuthPrincipal => f.write_str("request.auth.principal"),
            ConditionKey::RequestAuthAudiences => f.write_str("request.auth.audiences"),
            ConditionKey::RequestAuthPresenter => f.write_str("request.auth.presenter"),
            ConditionKey::RequestAuthClaims(path) => {
                f.write_str("request.auth.claims")?;
                path.iter().try_for_each(|p| write!(f, "[{p}]"))
            }
            ConditionKey::Experimental(s) => f.write_str(s),
        }
    }
}

impl From<ConditionKey> for String {
    fn from(k: ConditionKey) -> String {
        k.to_string()
    }
}

impl<'de> Deserialize<'de> for ConditionKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Parse::<ConditionKey>::new("a condition key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_keys_parse_and_print_back() {
        for k in [
            "source.ip",
            "destination.port",
            "request.headers[x-user]",
            "request.auth.claims[groups]",
            "request.auth.claims[a][b]",
        ] {
            assert_eq!(k.parse::<ConditionKey>().unwrap().to_string(), k);
        }
        assert!("source.ipx".parse::<ConditionKey>().is_err());
        assert!("request.headers[]".parse::<ConditionKey>().is_err());
        assert!("request.auth.claims".parse::<ConditionKey>().is_err());
        assert!("request.auth.claims[a]"
            .parse::<ConditionKey>()
            .unwrap()
            .is_l7());
    }
}
