//! Istio's security policies (`security.istio.io` v1 and v1beta1, which share one schema):
//! `AuthorizationPolicy`, `PeerAuthentication` and `RequestAuthentication`.
//!
//! The spec types deserialize straight from the mesh file, so a wrong type, an unknown field,
//! a malformed CIDR or port is reported by the YAML parser with its line. Unknown fields are
//! refused rather than ignored: a typo such as `principal:` in an ALLOW rule would otherwise
//! silently widen the policy.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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

/// A `matchLabels` workload selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must carry to be selected.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// A Gateway-API style reference a policy attaches to (`targetRef`/`targetRefs`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    /// API group of the target.
    #[serde(default)]
    pub group: String,
    /// Kind of the target (`Service`, `Gateway`, ...).
    pub kind: String,
    /// Name of the target.
    pub name: String,
    /// Namespace of the target (defaults to the policy's).
    #[serde(default)]
    pub namespace: Option<String>,
}

// === AuthorizationPolicy ===

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

// === Match values ===

/// An Istio string match: exact, prefix (`abc*`), suffix (`*abc`) or presence (`*`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StringMatch {
    /// Equal to the value.
    Exact(String),
    /// Starts with the value (written `value*`).
    Prefix(String),
    /// Ends with the value (written `*value`).
    Suffix(String),
    /// Any non-empty value (written `*`).
    Any,
}

impl StringMatch {
    /// Tests a value against the pattern.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Any => !value.is_empty(),
        }
    }
}

impl FromStr for StringMatch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "*" {
            return Ok(StringMatch::Any);
        }
        let m = if let Some(p) = s.strip_suffix('*') {
            StringMatch::Prefix(p.to_string())
        } else if let Some(x) = s.strip_prefix('*') {
            StringMatch::Suffix(x.to_string())
        } else {
            StringMatch::Exact(s.to_string())
        };
        let inner = match &m {
            StringMatch::Exact(v) | StringMatch::Prefix(v) | StringMatch::Suffix(v) => v,
            StringMatch::Any => "",
        };
        if inner.contains('*') {
            return Err(format!(
                "invalid match {s:?}: '*' is only allowed at the start or the end"
            ));
        }
        if s.is_empty() {
            return Err("empty match value".to_string());
        }
        Ok(m)
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(s) => f.write_str(s),
            StringMatch::Prefix(s) => write!(f, "{s}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Any => f.write_str("*"),
        }
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Parse::<StringMatch>::new("a match string"))
    }
}

impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A `paths`/`notPaths` entry: an Istio string match, or a path template when it contains
/// the `{*}` or `{**}` operator (as Istio decides).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PathMatch {
    /// Exact, prefix (`/api/*`), suffix (`*.png`) or presence (`*`).
    String(StringMatch),
    /// A path template such as `/api/{*}/items/{**}`.
    Template(PathTemplate),
}

impl PathMatch {
    /// Tests a (normalized, query-less) path.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::String(m) => m.matches(path),
            PathMatch::Template(t) => t.matches(path),
        }
    }
}

impl FromStr for PathMatch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains("{*}") || s.contains("{**}") {
            s.parse().map(PathMatch::Template)
        } else {
            s.parse().map(PathMatch::String)
        }
    }
}

impl fmt::Display for PathMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathMatch::String(m) => m.fmt(f),
            PathMatch::Template(t) => f.write_str(&t.text),
        }
    }
}

impl<'de> Deserialize<'de> for PathMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Parse::<PathMatch>::new("a path match"))
    }
}

impl Serialize for PathMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An Istio path template, which istiod hands to Envoy's URI template matcher
/// (`envoy.path.match.uri_template`): `/` then `/`-separated segments, each
///
/// - `{*}`: one segment, one or more path characters and no `/` (Envoy's `[pchar]+`);
/// - `{**}`: zero or more path characters *including* `/` (Envoy's `[pchar/]*`); it must be
///   the last operator (literal segments may follow);
/// - a literal of path characters, matched exactly.
///
/// Path characters are RFC 3986 `pchar` less `*` and `=` (Envoy's `kLiteral`):
/// `A-Z a-z 0-9 - . _ ~ % ! $ & ' ( ) + , ; : @`. Istio's validation refuses `*`, `{`, `}` outside
/// an operator and any other character in a segment that holds an operator (`/a/{*}.txt`).
/// A trailing `/` is a literal: `/foo/{**}/` needs the path to end in `/`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PathTemplate {
    text: String,
    /// `/`-joined pieces, adjacent literals merged (the separators are literals).
    pieces: Vec<TemplatePiece>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum TemplatePiece {
    Literal(String),
    /// `{*}`.
    Segment,
    /// `{**}`.
    Segments,
}

/// Envoy's `kLiteral`: the characters a template literal (and a glob) may hold.
fn is_template_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@".contains(&b)
}

impl PathTemplate {
    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Tests a (normalized, query-less) path against the whole template.
    pub fn matches(&self, path: &str) -> bool {
        fn go(pieces: &[TemplatePiece], s: &[u8]) -> bool {
            let Some((first, rest)) = pieces.split_first() else {
                return s.is_empty();
            };
            match first {
                TemplatePiece::Literal(l) => s.starts_with(l.as_bytes()) && go(rest, &s[l.len()..]),
                TemplatePiece::Segment => {
                    let run = s.iter().take_while(|&&b| is_template_char(b)).count();
                    (1..=run).rev().any(|k| go(rest, &s[k..]))
                }
                TemplatePiece::Segments => {
                    let run = s
                        .iter()
                        .take_while(|&&b| b == b'/' || is_template_char(b))
                        .count();
                    (0..=run).rev().any(|k| go(rest, &s[k..]))
                }
            }
        }
        go(&self.pieces, path.as_bytes())
    }
}

impl FromStr for PathTemplate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| Err(format!("invalid path template {s:?}: {why}"));
        let Some(rest) = s.strip_prefix('/') else {
            return bad("it must start with '/'");
        };
        let mut pieces = Vec::new();
        let mut literal = String::from("/");
        let mut seen_segments = false;
        let segments: Vec<&str> = rest.split('/').collect();
        for (i, seg) in segments.iter().enumerate() {
            if i > 0 {
                literal.push('/');
            }
            let op =
                match *seg {
                    "{*}" => Some(TemplatePiece::Segment),
                    "{**}" => Some(TemplatePiece::Segments),
                    "" if i + 1 == segments.len() => None,
                    "" => return bad("empty segment"),
                    lit if lit.bytes().all(is_template_char) => {
                        literal.push_str(lit);
                        None
                    }
                    _ => return bad(
                        "a segment is either {*}, {**} or a literal without '*', '{', '}', '=', \
                         '/' or characters outside RFC 3986 pchar",
                    ),
                };
            if let Some(op) = op {
                if seen_segments {
                    return bad("{**} must be the last operator");
                }
                seen_segments = op == TemplatePiece::Segments;
                if !literal.is_empty() {
                    pieces.push(TemplatePiece::Literal(std::mem::take(&mut literal)));
                }
                pieces.push(op);
            }
        }
        if !literal.is_empty() {
            pieces.push(TemplatePiece::Literal(literal));
        }
        Ok(PathTemplate {
            text: s.to_string(),
            pieces,
        })
    }
}

/// Deserializes a scalar through `FromStr`, failing inside the scalar's own deserialization
/// so the YAML parser marks the scalar itself (line and index) in the error. Numbers are
/// accepted as their decimal text (`- 8080` as well as `- "8080"`).
struct Parse<T> {
    expecting: &'static str,
    _t: std::marker::PhantomData<T>,
}

impl<T> Parse<T> {
    fn new(expecting: &'static str) -> Self {
        Parse {
            expecting,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: FromStr<Err = String>> serde::de::Visitor<'_> for Parse<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
}

/// An IP address or CIDR from `ipBlocks` and friends; a bare address is a /32 or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpBlock(pub IpNet);

impl FromStr for IpBlock {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(IpBlock(net));
        }
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(IpBlock(IpNet::from(ip)));
        }
        Err(format!("invalid IP address or CIDR {s:?}"))
    }
}

impl<'de> Deserialize<'de> for IpBlock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Parse::<IpBlock>::new("an IP address or CIDR"))
    }
}

impl Serialize for IpBlock {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A TCP port from `ports`/`notPorts` (Istio writes them as strings; numbers are accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortNumber(pub u16);

impl FromStr for PortNumber {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<u16>() {
            Ok(p) if p != 0 => Ok(PortNumber(p)),
            _ => Err(format!(
                "invalid port {s:?}: expected a number from 1 to 65535"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Parse::<PortNumber>::new("a port number"))
    }
}

// === PeerAuthentication ===

/// A `PeerAuthentication`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerAuthentication {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// The spec as written.
    pub spec: PeerAuthenticationSpec,
}

/// `PeerAuthentication.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Workloads in scope; absent: the whole namespace (or mesh in the root namespace).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// The mode for all ports.
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Per target port overrides (workload-selector policies only).
    #[serde(default, deserialize_with = "port_map")]
    pub port_level_mtls: BTreeMap<u16, MutualTls>,
}

/// `{ mode: ... }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MutualTls {
    /// The mTLS mode.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// PeerAuthentication modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent scope.
    #[default]
    Unset,
    /// Plaintext only (weft still accepts HBONE).
    Disable,
    /// Both mTLS and plaintext.
    Permissive,
    /// mTLS only.
    Strict,
}

fn port_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u16, MutualTls>, D::Error> {
    let raw = BTreeMap::<PortKey, MutualTls>::deserialize(d)?;
    Ok(raw.into_iter().map(|(k, v)| (k.0, v)).collect())
}

/// A map key that is a port, written as a number or a string.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct PortKey(u16);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PortNumber::deserialize(d).map(|p| PortKey(p.0))
    }
}

// === RequestAuthentication ===

/// A `RequestAuthentication`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestAuthentication {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// The spec as written.
    pub spec: RequestAuthenticationSpec,
}

/// `RequestAuthentication.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    /// Workloads in scope.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Single target reference.
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    /// Target references.
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Accepted token issuers.
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

/// One accepted JWT issuer.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// `iss` to accept.
    pub issuer: String,
    /// Accepted `aud` values (empty: any).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where to fetch the JWKS.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Inline JWKS (JSON text).
    #[serde(default)]
    pub jwks: Option<String>,
    /// Headers to read the token from.
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters to read the token from.
    #[serde(default)]
    pub from_params: Vec<String>,
    /// Cookies to read the token from.
    #[serde(default)]
    pub from_cookies: Vec<String>,
    /// Header to write the verified payload to.
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the forwarded request.
    #[serde(default)]
    pub forward_original_token: bool,
    /// Claims copied to headers.
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// JWKS fetch timeout (a duration string such as `5s`).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `fromHeaders[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    /// Header name.
    pub name: String,
    /// Prefix before the token (e.g. `Bearer `).
    #[serde(default)]
    pub prefix: Option<String>,
}

/// `outputClaimToHeaders[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    /// Header to set.
    pub header: String,
    /// Claim to copy.
    pub claim: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_matches_follow_istio_wildcards() {
        let m = |p: &str| p.parse::<StringMatch>().unwrap();
        assert!(m("abc").matches("abc") && !m("abc").matches("abcd"));
        assert!(m("abc*").matches("abcd") && !m("abc*").matches("xabc"));
        assert!(m("*abc").matches("xabc") && !m("*abc").matches("abcx"));
        assert!(m("*").matches("x") && !m("*").matches(""));
        assert!("a*b".parse::<StringMatch>().is_err());
        assert!("".parse::<StringMatch>().is_err());
    }

    #[test]
    fn path_templates_follow_envoy_uri_templates() {
        let t = |p: &str| p.parse::<PathMatch>().unwrap();
        assert!(matches!(
            t("/api/*"),
            PathMatch::String(StringMatch::Prefix(_))
        ));
        assert!(matches!(t("/foo/{*}"), PathMatch::Template(_)));
        // The examples of Istio's `Operation.paths` documentation.
        assert!(t("/foo/{*}").matches("/foo/bar"));
        assert!(!t("/foo/{*}").matches("/foo/bar/baz"));
        assert!(t("/foo/{**}/").matches("/foo/bar/"));
        assert!(t("/foo/{**}/").matches("/foo//"));
        assert!(!t("/foo/{**}/").matches("/foo/bar"));
        assert!(t("/foo/{*}/bar/{**}").matches("/foo/buzz/bar/"));
        assert!(t("/foo/{*}/bar/{**}").matches("/foo/buzz/bar/baz"));
        // `{*}` needs one or more path characters; `=` is not one (Envoy's `kLiteral`).
        assert!(!t("/foo/{*}").matches("/foo/"));
        assert!(!t("/foo/{*}").matches("/foo/a=b"));
        assert!(t("/foo/{*}").matches("/foo/a%2Fb"));
        assert!(t("/{**}").matches("/"));
        assert!(t("/a/{**}/z").matches("/a/b/c/z"));
        assert_eq!(t("/a/{*}/b").to_string(), "/a/{*}/b");
        for bad in [
            "/*/baz/{*}",
            "/**/baz/{*}",
            "/{**}/foo/{*}",
            "/foo/{*}.txt",
            "foo/{*}",
            "/a//{*}",
        ] {
            assert!(bad.parse::<PathMatch>().is_err(), "{bad}");
        }
    }

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

    #[test]
    fn ip_blocks_accept_addresses_and_cidrs_only() {
        assert_eq!(
            "10.0.0.1".parse::<IpBlock>().unwrap().0.to_string(),
            "10.0.0.1/32"
        );
        assert!("10.0.0.0/8".parse::<IpBlock>().is_ok());
        assert!("fd00::/8".parse::<IpBlock>().is_ok());
        assert!("10.0.0.0/33".parse::<IpBlock>().is_err());
        assert!("banana".parse::<IpBlock>().is_err());
    }
}
