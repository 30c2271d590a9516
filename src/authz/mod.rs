//! The policy engine: Istio's AuthorizationPolicy and PeerAuthentication, compiled once per
//! mesh snapshot and evaluated per connection (L4) or per HTTP request (L7, the waypoint).
//!
//! Owns:
//! - compiling AuthorizationPolicies (`compile`) into a form the evaluator walks without
//!   parsing, with what L4 cannot evaluate already resolved fail closed;
//! - the index that says which policies apply to a workload (mesh-wide, namespace, selector),
//!   built eagerly for every workload of the mesh so a decision is a hash lookup plus the rule
//!   tests ([`Authz::check`]);
//! - PeerAuthentication resolution (`peer`): the effective mTLS mode of a workload port;
//! - [`Authz::explain`], which says why, and [`lint`] for `weft check` (with `intent`, the
//!   likely mistakes that the mesh file's load warnings repeat: [`mistakes`]);
//! - L7 evaluation for the in-binary waypoint (`http`: [`Authz::check_http`],
//!   [`Authz::explain_http`]) and the request path normalization it matches on (`path`:
//!   [`normalize_path`]).
//!
//! Must not touch: sockets, files, the state store, logging of decisions. It is pure: the proxy
//! builds an [`Authz`] per snapshot generation ([`AuthzCache`], whose only side effect is
//! logging the compile warnings once), asks it per connection, and enforces
//! (refusing plaintext under STRICT is the proxy's job, from [`Authz::mtls_mode`]).
//!
//! Semantics follow Istio as ztunnel enforces it (`istio/ztunnel` `src/rbac.rs`,
//! `src/state.rs::assert_rbac`, and istiod's conversion in
//! `pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go`):
//! a matching DENY (or CUSTOM, which fails closed here) denies; otherwise, when ALLOW policies
//! apply, one of them must match; otherwise the connection is allowed. AUDIT only reports.
//! Where weft departs from ztunnel it is to fail closed, and the module docs of `compile` say
//! where.

mod compile;
mod explain;
mod http;
#[cfg(test)]
mod http_tests;
mod intent;
mod l7;
mod lint;
mod path;
mod peer;
mod scope;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use serde::Serialize;

use crate::identity::Identity;
use crate::model::{ArcStr, Labels, Mesh, Policy, PolicyKind, Workload};

use compile::{eval_policy, CompiledPolicy, Peer};
use peer::{PeerAuthChoice, PeerAuths};
pub(crate) use scope::Scope;

pub use crate::model::policy::Action;
pub use explain::{Explanation, PolicyExplanation, RuleExplanation};
pub use http::{HttpRequest, RequestAuth, RequestError};
pub use intent::mistakes;
pub use l7::RequestExplanation;
pub use lint::{lint, lint_findings};
pub use path::{normalize_path, PathError};
pub use peer::{MtlsDecision, MtlsLevel, MtlsMode, PeerAuthRef};

/// `[a, b]`: values as explanations and warnings list them.
pub(crate) fn list<T: fmt::Display>(values: &[T]) -> String {
    let mut s = String::from("[");
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{v}");
    }
    s.push(']');
    s
}

/// A condition value that does not parse for its key (the value as written).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid value")]
pub(crate) struct BadValue(pub String);

/// Istio's default root namespace: policies here without a selector apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// What the linter must know about the mesh beyond its objects: the daemon's (or
/// `weft check`'s) root namespace and trust domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LintContext {
    /// The namespace whose selector-less policies apply mesh-wide (Istio's `rootNamespace`).
    pub root_namespace: String,
    /// The trust domain of the mesh's identities (`<td>/ns/<ns>/sa/<sa>`).
    pub trust_domain: String,
}

impl Default for LintContext {
    /// Istio's defaults: `istio-system`, `cluster.local`.
    fn default() -> LintContext {
        LintContext {
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
        }
    }
}

/// The compiled policies of the latest mesh generation asked for, compiled once per
/// generation on first use and shared by the L4 data path and the waypoint. Reading is a
/// lock-free load; a new generation compiles (and logs its warnings) once.
pub struct AuthzCache {
    root_namespace: String,
    latest: arc_swap::ArcSwapOption<(u64, std::sync::Arc<Authz>)>,
}

impl AuthzCache {
    /// An empty cache for a mesh whose root namespace is `root_namespace`.
    pub fn new(root_namespace: &str) -> AuthzCache {
        AuthzCache {
            root_namespace: root_namespace.to_string(),
            latest: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// The root namespace the policies are compiled for.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The compiled policies of `mesh` at `generation`.
    pub fn get(&self, generation: u64, mesh: &Mesh) -> std::sync::Arc<Authz> {
        if let Some(c) = self.latest.load().as_ref() {
            if c.0 == generation {
                return c.1.clone();
            }
        }
        let authz = std::sync::Arc::new(Authz::new(mesh, &self.root_namespace));
        for w in authz.warnings() {
            tracing::warn!(target: "weft::authz", "{w}");
        }
        self.latest
            .store(Some(std::sync::Arc::new((generation, authz.clone()))));
        authz
    }
}

/// One inbound connection, as the destination side sees it.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    /// The client's address (at L4 also Istio's "remote" address).
    pub src_ip: IpAddr,
    /// The peer's verified identity; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    /// The destination workload (its namespace and labels select the policies).
    pub dst: &'a Workload,
    /// The destination address.
    pub dst_ip: IpAddr,
    /// The destination (target) port.
    pub dst_port: u16,
}

/// A policy named in a decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its action.
    pub action: Action,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}",
            compile::action_name(self.action),
            self.namespace,
            self.name
        )
    }
}

/// Why a connection was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum DenyReason {
    /// A DENY policy matched.
    Denied,
    /// A CUSTOM policy matched; weft has no external authorizer and fails closed.
    CustomUnsupported,
    /// ALLOW policies apply to the workload and none matched.
    NotAllowed,
    /// The HTTP request cannot be evaluated safely (its path cannot be normalized, its method
    /// is not upper case): the proxy answers 400.
    BadRequest,
}

/// The authorization decision for a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum Decision {
    /// Let it through.
    Allow {
        /// The ALLOW policy that matched; `None` when no ALLOW policy applies (default allow).
        by: Option<PolicyRef>,
    },
    /// Refuse it.
    Deny {
        /// The DENY/CUSTOM policy that matched; `None` for the default deny once ALLOW
        /// policies apply and none matched.
        by: Option<PolicyRef>,
        /// Why.
        reason: DenyReason,
    },
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The policy that decided, if one did.
    pub fn policy(&self) -> Option<&PolicyRef> {
        match self {
            Decision::Allow { by } | Decision::Deny { by, .. } => by.as_ref(),
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow { by: Some(p) } => write!(f, "allowed by {p}"),
            Decision::Allow { by: None } => {
                f.write_str("allowed: no ALLOW policy applies (default allow)")
            }
            Decision::Deny {
                by: Some(p),
                reason: DenyReason::CustomUnsupported,
            } => write!(f, "denied by {p} (no external authorizer: fail closed)"),
            Decision::Deny { by: Some(p), .. } => write!(f, "denied by {p}"),
            Decision::Deny {
                by: None,
                reason: DenyReason::BadRequest,
            } => f.write_str("denied: the request cannot be evaluated safely (answer 400)"),
            Decision::Deny { by: None, .. } => {
                f.write_str("denied: ALLOW policies apply and none matched (default deny)")
            }
        }
    }
}

/// A decision and the AUDIT policies that matched (whatever the decision).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Allow or deny.
    pub decision: Decision,
    /// AUDIT policies whose rules matched: the connection should be logged for them.
    pub audits: Vec<PolicyRef>,
}

/// One warning and the policy it is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    /// The policy (kind, namespace, name); `None` for a mesh-wide observation.
    pub policy: Option<(PolicyKind, String, String)>,
    /// The field of the policy the finding points at, as a path below the object
    /// (`spec.rules[1]`, `spec.rules[0].from[0].source.principals[2]`); `None`: the policy
    /// as a whole. For locating it in a file; not part of the message.
    pub field: Option<String>,
    /// What is wrong and what it means.
    pub message: String,
}

impl Finding {
    /// A finding about one policy.
    pub fn about(kind: PolicyKind, namespace: &str, name: &str, message: String) -> Finding {
        Finding {
            policy: Some((kind, namespace.to_string(), name.to_string())),
            field: None,
            message,
        }
    }

    /// The same finding, pointing at `field` of its policy.
    pub fn at(self, field: impl Into<String>) -> Finding {
        Finding {
            field: Some(field.into()),
            ..self
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.policy {
            Some((kind, ns, name)) => write!(f, "{kind:?} {ns}/{name}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The policies that apply to one workload, as indexes into [`Authz::policies`], each list in
/// evaluation order.
#[derive(Clone, Debug, Default)]
struct Applicable {
    /// DENY and CUSTOM.
    deny: Vec<u32>,
    audit: Vec<u32>,
    allow: Vec<u32>,
    /// Some applicable policy uses L7 attributes.
    l7: bool,
    peer: PeerAuthChoice,
}

/// Up to this many workloads, [`Authz::new`] indexes the policies of every workload (about
/// 1 ms per thousand); above, each lookup computes them (a walk over the mesh-wide and the
/// namespace's policies), so that compiling a large mesh after each change stays cheap.
const EAGER_INDEX_LIMIT: usize = 10_000;

#[derive(Debug)]
struct Entry {
    namespace: ArcStr,
    labels: Labels,
    applicable: Applicable,
}

/// Compiled policies for one mesh snapshot. Build it once per snapshot ([`Authz::new`]) and
/// share it; every method takes `&self` and allocates only for the answer.
#[derive(Debug)]
pub struct Authz {
    root_namespace: String,
    /// Sorted by (mesh-wide first, then namespace, then selector; namespace; name): the
    /// evaluation order, so the deciding policy is deterministic.
    policies: Vec<CompiledPolicy>,
    /// Mesh-wide and root-namespace-selector policies.
    mesh: Vec<u32>,
    /// Namespace-wide and selector policies by namespace.
    by_namespace: HashMap<String, Vec<u32>>,
    peer_auths: PeerAuths,
    /// Every workload of the mesh, by uid.
    by_uid: HashMap<ArcStr, Entry>,
    findings: Vec<Finding>,
    /// `findings` as text.
    warnings: Vec<String>,
}

impl Authz {
    /// Compiles the mesh's policies and, for a mesh of up to `EAGER_INDEX_LIMIT` workloads,
    /// indexes them for every workload. `root_namespace` is
    /// the namespace whose selector-less policies apply mesh-wide (Istio's `rootNamespace`).
    pub fn new(mesh: &Mesh, root_namespace: &str) -> Authz {
        let mut findings = Vec::new();
        let mut policies = Vec::new();
        let mut peer_auths = Vec::new();
        for p in &mesh.policies {
            match p {
                Policy::AuthorizationPolicy(ap) => {
                    if let Some(c) = compile::compile(ap, root_namespace, &mut findings) {
                        policies.push(c);
                    }
                }
                Policy::PeerAuthentication(pa) => peer_auths.push(pa),
                Policy::RequestAuthentication(_) => {}
            }
        }
        policies.sort_by(|a, b| {
            (a.scope.rank(), &a.reference.namespace, &a.reference.name).cmp(&(
                b.scope.rank(),
                &b.reference.namespace,
                &b.reference.name,
            ))
        });
        let mut index_mesh = Vec::new();
        let mut by_namespace: HashMap<String, Vec<u32>> = HashMap::new();
        for (i, p) in policies.iter().enumerate() {
            // Invariant: a mesh holds far fewer than 2^32 policies.
            let i = i as u32;
            match p.scope {
                Scope::Mesh | Scope::MeshWorkloads(_) | Scope::Uids(_) => index_mesh.push(i),
                Scope::Namespace | Scope::Workloads(_) => by_namespace
                    .entry(p.reference.namespace.clone())
                    .or_default()
                    .push(i),
            }
        }
        let peer_auths = PeerAuths::new(&peer_auths, root_namespace, &mut findings);
        let mut authz = Authz {
            root_namespace: root_namespace.to_string(),
            policies,
            mesh: index_mesh,
            by_namespace,
            peer_auths,
            by_uid: HashMap::with_capacity(mesh.workloads.len()),
            findings,
            warnings: Vec::new(),
        };
        let mut conflicts = BTreeSet::new();
        let eager = mesh.workloads.len() <= EAGER_INDEX_LIMIT;
        for w in mesh.workloads.values() {
            let mut conflict = |a: &PeerAuthRef, b: &PeerAuthRef| {
                conflicts.insert((a.clone(), b.clone()));
            };
            if eager {
                let applicable = authz.applicable(&w.uid, &w.namespace, &w.labels, &mut conflict);
                authz.by_uid.insert(
                    w.uid.clone(),
                    Entry {
                        namespace: w.namespace.clone(),
                        labels: w.labels.clone(),
                        applicable,
                    },
                );
            } else if authz.peer_auths.may_conflict(&w.namespace) {
                // Conflicts are reported for the whole mesh, index or not.
                authz
                    .peer_auths
                    .choose(&w.namespace, &w.labels, &mut conflict);
            }
        }
        authz
            .findings
            .extend(conflicts.into_iter().map(|(kept, other)| {
                Finding::about(
                    PolicyKind::PeerAuthentication,
                    &other.namespace,
                    &other.name,
                    format!(
                        "ignored for the workloads {}/{} also selects; Istio keeps the oldest, \
                         weft (without creation times) keeps the first by name",
                        kept.namespace, kept.name
                    ),
                )
            }));
        authz.warnings = authz.findings.iter().map(Finding::to_string).collect();
        authz
    }

    /// The root namespace this was built for.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Warnings found while compiling, one per problem, each naming its policy: policies or
    /// parts L4 cannot enforce and how they were resolved, policies Istio would ignore,
    /// conflicts. Stable for a given mesh.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// [`Authz::warnings`] with the policy each is about, for callers that locate it.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    fn applicable(
        &self,
        uid: &str,
        namespace: &str,
        labels: &Labels,
        conflict: &mut dyn FnMut(&PeerAuthRef, &PeerAuthRef),
    ) -> Applicable {
        let mut out = Applicable {
            peer: self.peer_auths.choose(namespace, labels, conflict),
            ..Applicable::default()
        };
        // Both lists are in evaluation order and `mesh` sorts before any namespace's.
        let candidates = self
            .mesh
            .iter()
            .chain(self.by_namespace.get(namespace).into_iter().flatten());
        for &i in candidates {
            let p = &self.policies[i as usize];
            if !p.applies_to(uid, namespace, labels) {
                continue;
            }
            out.l7 |= p.uses_l7;
            match p.reference.action {
                Action::Deny | Action::Custom => out.deny.push(i),
                Action::Audit => out.audit.push(i),
                Action::Allow => out.allow.push(i),
            }
        }
        out
    }

    /// The applicable policies for a workload: from the index when it is the workload the
    /// index was built with, computed otherwise (a workload from another snapshot).
    fn lookup(&self, w: &Workload) -> Cow<'_, Applicable> {
        match self.by_uid.get(w.uid.as_str()) {
            Some(e) if e.namespace == w.namespace && e.labels == w.labels => {
                Cow::Borrowed(&e.applicable)
            }
            _ => Cow::Owned(self.applicable(&w.uid, &w.namespace, &w.labels, &mut |_, _| {})),
        }
    }

    /// Decides a connection by the AuthorizationPolicies that apply to its destination.
    pub fn check(&self, conn: &Connection<'_>) -> Verdict {
        let peer = Peer::new(conn.src_identity, conn.src_ip, conn.dst_ip, conn.dst_port);
        self.verdict(conn.dst, &peer)
    }

    /// The verdict for `peer` (at L4, or at L7 when it carries a request) reaching `dst`.
    fn verdict(&self, dst: &Workload, peer: &Peer<'_>) -> Verdict {
        let app = self.lookup(dst);
        let audits = app
            .audit
            .iter()
            .map(|&i| &self.policies[i as usize])
            .filter(|p| eval_policy(p, peer))
            .map(|p| p.reference.clone())
            .collect();
        let decision = self.decide(&app, |p| eval_policy(p, peer));
        Verdict { decision, audits }
    }

    /// Istio's order, given whether each policy matches: DENY/CUSTOM, then ALLOW, then default.
    fn decide(
        &self,
        app: &Applicable,
        mut matches: impl FnMut(&CompiledPolicy) -> bool,
    ) -> Decision {
        for &i in &app.deny {
            let p = &self.policies[i as usize];
            if matches(p) {
                return Decision::Deny {
                    by: Some(p.reference.clone()),
                    reason: if p.reference.action == Action::Custom {
                        DenyReason::CustomUnsupported
                    } else {
                        DenyReason::Denied
                    },
                };
            }
        }
        if app.allow.is_empty() {
            return Decision::Allow { by: None };
        }
        for &i in &app.allow {
            let p = &self.policies[i as usize];
            if matches(p) {
                return Decision::Allow {
                    by: Some(p.reference.clone()),
                };
            }
        }
        Decision::Deny {
            by: None,
            reason: DenyReason::NotAllowed,
        }
    }

    /// True when some AuthorizationPolicy applying to `w` uses attributes only an HTTP-aware
    /// proxy (a waypoint) can evaluate.
    pub fn needs_l7(&self, w: &Workload) -> bool {
        self.lookup(w).l7
    }

    /// The effective mTLS mode for `w`'s target `port`.
    pub fn mtls_mode(&self, w: &Workload, port: u16) -> MtlsMode {
        self.mtls(w, port).mode
    }

    /// The effective mTLS mode for `w`'s target `port` and the PeerAuthentication that set it.
    pub fn mtls(&self, w: &Workload, port: u16) -> MtlsDecision {
        self.peer_auths.resolve(self.lookup(w).peer, port)
    }
}
