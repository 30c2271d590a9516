//! Likely mistakes in policies: the ones the policy examples of widely read Istio security
//! guides make, for `weft check` and the mesh file's load warnings ([`mistakes`]).
//!
//! - `from` and `to` written as two rules of one ALLOW policy: a policy's rules are
//!   alternatives, so each admits on its own (anyone may reach the operation, the source may
//!   do anything) where one rule with both was meant;
//! - a principal written with `spiffe://` (Istio compares principals with the peer's SPIFFE id
//!   without that prefix, as [`super::compile`] does, so it matches no peer), with a trust
//!   domain that is not the mesh's, or that is not a principal at all (a namespace or service
//!   account name, no `/ns/`); a principal in `namespaces:`;
//! - a policy whose selector matches no workload weft captures, or whose namespace has none
//!   (not the root namespace's mesh-wide policies).
//!
//! Unlike the sound warnings of `lint`, these are about intent. The consequence each states
//! holds (the value matches no workload of the mesh, the policy applies to no enrolled
//! workload, the rules admit what is listed), but that it was not meant is a guess. Values
//! with a wildcard are only flagged when no expansion can help (`spiffe://...*`, a `/` in a
//! namespace); `*` and `<td>/ns/<ns>/sa/*` never are.
//!
//! Owns the checks and their messages; reads the mesh, never the compiled policies, so it
//! points at fields as written (`spec.rules[0].from[0].source.principals[1]`, see
//! [`Finding::field`]). Must not touch: evaluation, files.

use std::collections::BTreeMap;

use crate::model::policy::{
    Action, AuthorizationPolicy, ConditionKey, Operation, PolicyScope, Rule, Source, StringMatch,
    WorkloadSelector,
};
use crate::model::{Mesh, Policy, PolicyKind, Workload};

use super::compile::action_name;
use super::scope::Scope;
use super::{list, Finding, LintContext};

/// The likely mistakes in `mesh`'s policies, each pointing at the field it is about.
pub fn mistakes(mesh: &Mesh, ctx: &LintContext) -> Vec<Finding> {
    let pods = Pods::of(mesh);
    let mut out = Vec::new();
    for p in &mesh.policies {
        scope_mistakes(p, &pods, mesh, ctx, &mut out);
        if let Policy::AuthorizationPolicy(ap) = p {
            split_from_to(ap, &mut out);
            identity_mistakes(ap, &pods, mesh, ctx, &mut out);
        }
    }
    out
}

/// The mesh's pods, all and by namespace, indexed once for every policy.
struct Pods<'a> {
    all: Vec<&'a Workload>,
    by_namespace: BTreeMap<&'a str, Vec<&'a Workload>>,
}

impl<'a> Pods<'a> {
    fn of(mesh: &'a Mesh) -> Pods<'a> {
        let all: Vec<&Workload> = mesh.workloads.values().map(|w| &**w).collect();
        let mut by_namespace: BTreeMap<&str, Vec<&Workload>> = BTreeMap::new();
        for w in &all {
            by_namespace
                .entry(w.namespace.as_str())
                .or_default()
                .push(w);
        }
        Pods { all, by_namespace }
    }

    fn in_namespace(&self, namespace: &str) -> &[&'a Workload] {
        self.by_namespace
            .get(namespace)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

// === from and to in separate rules ===

/// An ALLOW with a rule of only `from` and another of only `to`: each admits on its own.
fn split_from_to(ap: &AuthorizationPolicy, out: &mut Vec<Finding>) {
    if ap.spec.action != Action::Allow || ap.spec.dry_run {
        return;
    }
    let rules = &ap.spec.rules;
    let only = |has: fn(&Rule) -> bool, lacks: fn(&Rule) -> bool| -> Vec<usize> {
        (0..rules.len())
            .filter(|&i| has(&rules[i]) && !lacks(&rules[i]))
            .collect()
    };
    let has_from = |r: &Rule| !r.from.is_empty();
    let has_to = |r: &Rule| !r.to.is_empty();
    let (from_only, to_only) = (only(has_from, has_to), only(has_to, has_from));
    let (Some(&f), Some(&t)) = (from_only.first(), to_only.first()) else {
        return;
    };
    let names = |ix: &[usize]| {
        ix.iter()
            .map(|i| format!("rules[{i}]"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let when = |r: &Rule| {
        if r.when.is_empty() {
            ""
        } else {
            " (when its conditions hold)"
        }
    };
    let mut alone = Vec::new();
    for &i in &from_only {
        alone.push(format!(
            "rules[{i}] alone admits {} to any operation{}",
            describe_sources(&rules[i]),
            when(&rules[i])
        ));
    }
    for &i in &to_only {
        alone.push(format!(
            "rules[{i}] alone admits any source, plaintext included, to {}{}",
            describe_operations(&rules[i]),
            when(&rules[i])
        ));
    }
    out.push(
        Finding::about(
            PolicyKind::AuthorizationPolicy,
            &ap.namespace,
            &ap.name,
            format!(
                "{} {} only `from` and {} only `to`, but a policy's rules are alternatives \
                 (Istio ORs them): {}; to admit only that source to that operation, write \
                 `from` and `to` in one rule",
                names(&from_only),
                if from_only.len() == 1 { "has" } else { "have" },
                names(&to_only),
                alone.join("; ")
            ),
        )
        .at(format!("spec.rules[{}]", f.min(t))),
    );
}

/// `principals [a], namespaces [b] or ipBlocks [c]`: the `from` entries of a rule.
fn describe_sources(r: &Rule) -> String {
    let entries: Vec<String> = r.from.iter().map(|f| describe_source(&f.source)).collect();
    entries.join(" or ")
}

fn describe_source(s: &Source) -> String {
    let nets = |v: &[crate::model::policy::IpBlock]| v.iter().map(|b| b.0).collect::<Vec<_>>();
    let mut fields = Vec::new();
    let mut add = |name: &str, values: String, set: bool| {
        if set {
            fields.push(format!("{name} {values}"));
        }
    };
    add("principals", list(&s.principals), !s.principals.is_empty());
    add(
        "notPrincipals",
        list(&s.not_principals),
        !s.not_principals.is_empty(),
    );
    add(
        "requestPrincipals",
        list(&s.request_principals),
        !s.request_principals.is_empty(),
    );
    add(
        "notRequestPrincipals",
        list(&s.not_request_principals),
        !s.not_request_principals.is_empty(),
    );
    add("namespaces", list(&s.namespaces), !s.namespaces.is_empty());
    add(
        "notNamespaces",
        list(&s.not_namespaces),
        !s.not_namespaces.is_empty(),
    );
    add(
        "ipBlocks",
        list(&nets(&s.ip_blocks)),
        !s.ip_blocks.is_empty(),
    );
    add(
        "notIpBlocks",
        list(&nets(&s.not_ip_blocks)),
        !s.not_ip_blocks.is_empty(),
    );
    add(
        "remoteIpBlocks",
        list(&nets(&s.remote_ip_blocks)),
        !s.remote_ip_blocks.is_empty(),
    );
    add(
        "notRemoteIpBlocks",
        list(&nets(&s.not_remote_ip_blocks)),
        !s.not_remote_ip_blocks.is_empty(),
    );
    if fields.is_empty() {
        "an empty source".to_string()
    } else {
        fields.join(", ")
    }
}

/// `methods [POST], paths [/api/payments]`: the `to` entries of a rule.
fn describe_operations(r: &Rule) -> String {
    let entries: Vec<String> =
        r.to.iter()
            .map(|t| describe_operation(&t.operation))
            .collect();
    entries.join(" or ")
}

fn describe_operation(o: &Operation) -> String {
    let ports = |v: &[crate::model::policy::PortNumber]| v.iter().map(|p| p.0).collect::<Vec<_>>();
    let mut fields = Vec::new();
    let mut add = |name: &str, values: String, set: bool| {
        if set {
            fields.push(format!("{name} {values}"));
        }
    };
    add("hosts", list(&o.hosts), !o.hosts.is_empty());
    add("notHosts", list(&o.not_hosts), !o.not_hosts.is_empty());
    add("ports", list(&ports(&o.ports)), !o.ports.is_empty());
    add(
        "notPorts",
        list(&ports(&o.not_ports)),
        !o.not_ports.is_empty(),
    );
    add("methods", list(&o.methods), !o.methods.is_empty());
    add(
        "notMethods",
        list(&o.not_methods),
        !o.not_methods.is_empty(),
    );
    add("paths", list(&o.paths), !o.paths.is_empty());
    add("notPaths", list(&o.not_paths), !o.not_paths.is_empty());
    if fields.is_empty() {
        "an empty operation".to_string()
    } else {
        fields.join(", ")
    }
}

// === principals and namespaces ===

/// Which list a value sits in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attribute {
    Principal,
    Namespace,
}

/// Every `principals`/`namespaces` value of the policy (also `not...`, and `when` conditions
/// on `source.principal`/`source.namespace`) that matches no peer of the mesh.
fn identity_mistakes(
    ap: &AuthorizationPolicy,
    pods: &Pods<'_>,
    mesh: &Mesh,
    ctx: &LintContext,
    out: &mut Vec<Finding>,
) {
    // Where the value was written, its list, whether it is negated, the values.
    let mut lists: Vec<(String, Attribute, bool, &[StringMatch])> = Vec::new();
    for (i, rule) in ap.spec.rules.iter().enumerate() {
        for (j, from) in rule.from.iter().enumerate() {
            let at = |f: &str| format!("spec.rules[{i}].from[{j}].source.{f}");
            let s = &from.source;
            lists.push((at("principals"), Attribute::Principal, false, &s.principals));
            lists.push((
                at("notPrincipals"),
                Attribute::Principal,
                true,
                &s.not_principals,
            ));
            lists.push((at("namespaces"), Attribute::Namespace, false, &s.namespaces));
            lists.push((
                at("notNamespaces"),
                Attribute::Namespace,
                true,
                &s.not_namespaces,
            ));
        }
        for (k, c) in rule.when.iter().enumerate() {
            let attribute = match c.key {
                ConditionKey::SourcePrincipal => Attribute::Principal,
                ConditionKey::SourceNamespace => Attribute::Namespace,
                _ => continue,
            };
            let at = format!("spec.rules[{i}].when[{k}]");
            lists.push((format!("{at}.values"), attribute, false, &c.values));
            lists.push((format!("{at}.notValues"), attribute, true, &c.not_values));
        }
    }
    let action = ap.spec.action;
    for (at, attribute, negated, values) in lists {
        for (n, m) in values.iter().enumerate() {
            let problem = match attribute {
                Attribute::Principal => principal_mistake(m, pods, mesh, ctx),
                Attribute::Namespace => namespace_mistake(m),
            };
            if let Some(problem) = problem {
                out.push(
                    Finding::about(
                        PolicyKind::AuthorizationPolicy,
                        &ap.namespace,
                        &ap.name,
                        format!(
                            "{}[{n}] {problem}; {}",
                            at.strip_prefix("spec.").unwrap_or(&at),
                            consequence(action, negated)
                        ),
                    )
                    .at(format!("{at}[{n}]")),
                );
            }
        }
    }
}

/// What a value that matches no peer does to the policy.
fn consequence(action: Action, negated: bool) -> String {
    let name = action_name(action);
    match (action, negated) {
        (Action::Allow, false) => format!(
            "in this {name} it admits no one (the peers it was meant for are denied unless \
             another rule admits them)"
        ),
        (Action::Allow, true) => format!(
            "in this {name} it excludes no one (the peers it was meant to exclude are admitted)"
        ),
        (Action::Deny | Action::Custom, false) => {
            format!("in this {name} it denies no one (the peers it was meant to deny get through)")
        }
        (Action::Deny | Action::Custom, true) => format!(
            "in this {name} it exempts no one (the peers it was meant to exempt are denied)"
        ),
        (Action::Audit, false) => format!("in this {name} it audits no one"),
        (Action::Audit, true) => format!("in this {name} it exempts no one from the audit"),
    }
}

/// `(trust domain, namespace, service account)` of a principal `<td>/ns/<ns>/sa/<sa>`.
fn principal_parts(s: &str) -> Option<(&str, &str, &str)> {
    let mut parts = s.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None)
            if !td.is_empty() && !ns.is_empty() && !sa.is_empty() =>
        {
            Some((td, ns, sa))
        }
        _ => None,
    }
}

/// The value as written, quoted.
fn quoted(m: &StringMatch) -> String {
    format!("{:?}", m.to_string())
}

/// Why a `principals` value matches no workload of the mesh, with the value meant.
fn principal_mistake(
    m: &StringMatch,
    pods: &Pods<'_>,
    mesh: &Mesh,
    ctx: &LintContext,
) -> Option<String> {
    let td = &ctx.trust_domain;
    let q = quoted(m);
    match m {
        StringMatch::Any | StringMatch::Suffix(_) => None,
        StringMatch::Exact(s) | StringMatch::Prefix(s) if s.starts_with("spiffe://") => {
            let bare = &s["spiffe://".len()..];
            let fixed = match m {
                StringMatch::Prefix(_) => StringMatch::Prefix(bare.to_string()),
                _ => StringMatch::Exact(bare.to_string()),
            };
            Some(format!(
                "{q} starts with spiffe://, but Istio (and weft) compare principals with \
                 the peer's SPIFFE id stripped of it, so it matches no peer: write {:?}",
                fixed.to_string()
            ))
        }
        StringMatch::Exact(s) => {
            if let Some((their_td, ns, sa)) = principal_parts(s) {
                return (their_td != td).then(|| {
                    other_trust_domain(m, their_td, ctx, |td| format!("{td}/ns/{ns}/sa/{sa}"))
                });
            }
            if !s.contains('/') {
                let is_namespace = mesh.namespaces.contains_key(s.as_str())
                    || pods.by_namespace.contains_key(s.as_str());
                return Some(if is_namespace {
                    format!(
                        "{q} is a namespace of the mesh, not a principal \
                         (<trust-domain>/ns/<namespace>/sa/<service-account>), so it matches no \
                         peer: write namespaces: [{s}], or principals: [\"{td}/ns/{s}/sa/*\"]"
                    )
                } else {
                    format!(
                        "{q} is not a principal (<trust-domain>/ns/<namespace>/sa/<service-account>), \
                         so it matches no peer: a namespace goes in namespaces:, a service \
                         account as \"{td}/ns/<namespace>/sa/{s}\""
                    )
                });
            }
            if let Some((ns, sa)) = s
                .strip_prefix("ns/")
                .and_then(|rest| rest.split_once("/sa/"))
                .filter(|(ns, sa)| !ns.contains('/') && !sa.contains('/'))
            {
                return Some(format!(
                    "{q} lacks the trust domain, so it matches no peer: write \"{td}/ns/{ns}/sa/{sa}\""
                ));
            }
            Some(format!(
                "{q} is not of the form <trust-domain>/ns/<namespace>/sa/<service-account>, \
                 so it matches no peer"
            ))
        }
        StringMatch::Prefix(p) => {
            // Only a prefix that names a trust domain whole (`<td>/...`) can be judged.
            let (their_td, rest) = p.split_once('/')?;
            let names_td = rest.is_empty() || rest.starts_with("ns/") || rest == "ns";
            (names_td && !their_td.is_empty() && their_td != td && their_td != "ns")
                .then(|| other_trust_domain(m, their_td, ctx, |td| format!("{td}/{rest}*")))
        }
    }
}

fn other_trust_domain(
    m: &StringMatch,
    their_td: &str,
    ctx: &LintContext,
    fixed: impl Fn(&str) -> String,
) -> String {
    let td = &ctx.trust_domain;
    let q = quoted(m);
    // Sidecars (istiod's Envoy config) read `cluster.local` as the local trust domain; istiod's
    // translation for ztunnel applies no such alias, nor does weft.
    let alias = if their_td == super::DEFAULT_TRUST_DOMAIN {
        " (ztunnel and weft take cluster.local literally; only sidecars read it as the local \
         trust domain)"
    } else {
        ""
    };
    format!(
        "{q} is in trust domain {their_td}, not the mesh's ({td}){alias}, so it matches no \
         workload of the mesh: write {:?}",
        fixed(td)
    )
}

/// Why a `namespaces` value matches no peer: a namespace name has no `/`.
fn namespace_mistake(m: &StringMatch) -> Option<String> {
    let s = match m {
        StringMatch::Any => return None,
        StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Suffix(s) => s,
    };
    if !s.contains('/') {
        return None;
    }
    let q = quoted(m);
    let bare = s.strip_prefix("spiffe://").unwrap_or(s);
    Some(match (m, principal_parts(bare)) {
        (StringMatch::Exact(_), Some((td, ns, sa))) => format!(
            "{q} is a principal, not a namespace, so it matches no peer: write \
             principals: [\"{td}/ns/{ns}/sa/{sa}\"], or namespaces: [{ns}]"
        ),
        _ => format!(
            "{q} holds a '/', which no namespace name does, so it matches no peer (principals \
             go in principals:)"
        ),
    })
}

// === policies that apply to no enrolled workload ===

/// A policy whose namespace, or whose selector, leaves it no workload weft captures.
fn scope_mistakes(
    p: &Policy,
    pods: &Pods<'_>,
    mesh: &Mesh,
    ctx: &LintContext,
    out: &mut Vec<Finding>,
) {
    let (selector, targeted): (Option<&WorkloadSelector>, bool) = match p {
        Policy::AuthorizationPolicy(ap) => {
            // A scope istiod resolved (xDS) names its workloads itself.
            if ap.spec.scope != PolicyScope::Selector {
                return;
            }
            (
                ap.spec.selector.as_ref(),
                ap.spec.target_ref.is_some() || !ap.spec.target_refs.is_empty(),
            )
        }
        Policy::PeerAuthentication(pa) => (pa.spec.selector.as_ref(), false),
        Policy::RequestAuthentication(ra) => (
            ra.spec.selector.as_ref(),
            ra.spec.target_ref.is_some() || !ra.spec.target_refs.is_empty(),
        ),
    };
    let kind = p.kind();
    let (namespace, name) = p.key();
    // Targeted or ignored policies are reported by the compiler.
    let Ok(scope) = Scope::of(kind, namespace, selector, targeted, &ctx.root_namespace) else {
        return;
    };
    let about = |message: String, field: &str| {
        Finding::about(kind, namespace, name, message).at(field.to_string())
    };
    let selector_text = |labels: &BTreeMap<String, String>| {
        labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    match &scope {
        Scope::Mesh | Scope::Uids(_) => {}
        Scope::Namespace | Scope::Workloads(_) => {
            let in_ns = pods.in_namespace(namespace);
            if !in_ns.iter().any(|w| w.enrollment.is_enrolled()) {
                out.push(about(
                    format!(
                        "{}: the policy applies to no workload weft captures",
                        unenrolled_namespace(namespace, in_ns, mesh)
                    ),
                    "metadata.namespace",
                ));
                return;
            }
            if let Scope::Workloads(labels) = &scope {
                if let Some(why) = unselected(in_ns, labels) {
                    out.push(about(
                        format!(
                            "selector {} matches {why} of namespace {namespace}: the policy \
                             applies to no workload weft captures",
                            selector_text(labels)
                        ),
                        "spec.selector.matchLabels",
                    ));
                }
            }
        }
        Scope::MeshWorkloads(labels) => {
            if let Some(why) = unselected(&pods.all, labels) {
                out.push(about(
                    format!(
                        "selector {} (root namespace: every namespace) matches {why} of the \
                         mesh: the policy applies to no workload weft captures",
                        selector_text(labels)
                    ),
                    "spec.selector.matchLabels",
                ));
            }
        }
    }
}

/// Why `namespace`, whose pods are `pods`, has no enrolled workload.
fn unenrolled_namespace(namespace: &str, pods: &[&Workload], mesh: &Mesh) -> String {
    if pods.is_empty() {
        return format!("namespace {namespace} has no pods in the mesh");
    }
    let labelled = mesh.namespaces.get(namespace).is_some_and(|n| {
        n.labels
            .get(crate::model::DATAPLANE_MODE_LABEL)
            .is_some_and(|v| v == "ambient")
    });
    if labelled {
        format!(
            "none of the {} pods of namespace {namespace} is enrolled (each opts out or uses \
             the host network)",
            pods.len()
        )
    } else {
        format!(
            "namespace {namespace} is not enrolled (no label {}=ambient) and none of its {} \
             pods enrolls itself",
            crate::model::DATAPLANE_MODE_LABEL,
            pods.len()
        )
    }
}

/// `None` when `labels` select an enrolled workload among `pods`; else what they select.
fn unselected(pods: &[&Workload], labels: &BTreeMap<String, String>) -> Option<&'static str> {
    let selected: Vec<&&Workload> = pods
        .iter()
        .filter(|w| crate::model::selector_matches(labels, &w.labels))
        .collect();
    if selected.iter().any(|w| w.enrollment.is_enrolled()) {
        None
    } else if selected.is_empty() {
        Some("no pod")
    } else {
        Some("only pods weft does not capture (opted out, host network or not enrolled)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::parse_mesh;

    const NAMESPACES: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
        apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n---\n\
        apiVersion: v1\nkind: Namespace\nmetadata: {name: empty, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop, labels: {app: web}}\nspec: {serviceAccountName: web}\nstatus: {podIP: 10.0.0.1}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: debug-0, namespace: shop, labels: {app: debug, istio.io/dataplane-mode: none}}\nstatus: {podIP: 10.0.0.2}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: old-0, namespace: legacy, labels: {app: old}}\nstatus: {podIP: 10.0.0.3}\n";

    /// The mistakes found in one AuthorizationPolicy of `namespace` with this spec (flow YAML),
    /// in a mesh of the enrolled namespace `shop` (pods `app=web`, and `app=debug` opted
    /// out), the unenrolled `legacy` (pod `app=old`) and the enrolled but empty `empty`.
    fn found_in(namespace: &str, spec: &str) -> Vec<Finding> {
        found(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: {namespace}}}\nspec: {spec}\n"
        ))
    }

    fn found(docs: &str) -> Vec<Finding> {
        let text = format!("{NAMESPACES}{docs}");
        let parsed = parse_mesh("m.yaml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        mistakes(&parsed.mesh, &LintContext::default())
    }

    fn messages(f: &[Finding]) -> Vec<String> {
        f.iter().map(|f| f.message.clone()).collect()
    }

    // --- from and to split ---

    #[test]
    fn from_and_to_in_separate_allow_rules_are_flagged_naming_both() {
        let f = found_in(
            "shop",
            "{rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/order-service]}}]}, {to: [{operation: {methods: [POST], paths: [/api/payments]}}]}]}",
        );
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(f[0].field.as_deref(), Some("spec.rules[0]"));
        let m = &f[0].message;
        for needle in [
            "rules[0] has only `from` and rules[1] only `to`",
            "rules[0] alone admits principals [cluster.local/ns/default/sa/order-service] to any operation",
            "rules[1] alone admits any source, plaintext included, to methods [POST], paths [/api/payments]",
            "write `from` and `to` in one rule",
        ] {
            assert!(m.contains(needle), "{needle:?} not in {m}");
        }
    }

    #[test]
    fn from_and_to_in_one_rule_or_outside_an_allow_are_not_flagged() {
        let one_rule = "{rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}], to: [{operation: {ports: [\"8080\"]}}]}]}";
        assert!(found_in("shop", one_rule).is_empty());
        // Two rules of `from` only, or `to` only: alternatives on purpose.
        let two_from = "{rules: [{from: [{source: {namespaces: [shop]}}]}, {from: [{source: {namespaces: [legacy]}}]}]}";
        assert!(found_in("shop", two_from).is_empty());
        // A DENY split this way denies more, never less.
        let deny = "{action: DENY, rules: [{from: [{source: {namespaces: [legacy]}}]}, {to: [{operation: {ports: [\"22\"]}}]}]}";
        assert!(found_in("shop", deny).is_empty());
        // A rule with both next to one with only `to`.
        let mixed = "{rules: [{from: [{source: {namespaces: [shop]}}], to: [{operation: {ports: [\"80\"]}}]}, {to: [{operation: {ports: [\"8080\"]}}]}]}";
        assert!(found_in("shop", mixed).is_empty());
    }

    // --- principals ---

    #[test]
    fn spiffe_principals_are_flagged_with_the_corrected_value_and_the_consequence() {
        let f = found_in(
            "shop",
            "{rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web, \"spiffe://cluster.local/ns/shop/sa/api\"]}}]}]}",
        );
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(
            f[0].field.as_deref(),
            Some("spec.rules[0].from[0].source.principals[1]")
        );
        assert_eq!(
            f[0].message,
            "rules[0].from[0].source.principals[1] \"spiffe://cluster.local/ns/shop/sa/api\" starts with spiffe://, but Istio (and weft) compare principals with the peer's SPIFFE id stripped of it, so it matches no peer: write \"cluster.local/ns/shop/sa/api\"; in this ALLOW it admits no one (the peers it was meant for are denied unless another rule admits them)"
        );
        // In a DENY it lets them through; a prefix keeps its wildcard; notPrincipals and `when`
        // are read too.
        let f = found_in(
            "shop",
            "{action: DENY, rules: [{from: [{source: {notPrincipals: [\"spiffe://cluster.local/ns/shop/*\"]}}], when: [{key: source.principal, values: [\"spiffe://cluster.local/ns/legacy/sa/old\"]}]}]}",
        );
        let m = messages(&f);
        assert_eq!(m.len(), 2, "{m:#?}");
        assert!(m[0].contains("write \"cluster.local/ns/shop/*\"; in this DENY it exempts no one (the peers it was meant to exempt are denied)"), "{m:#?}");
        assert!(m[1].starts_with("rules[0].when[0].values[0]"), "{m:#?}");
        assert!(
            m[1].contains(
                "in this DENY it denies no one (the peers it was meant to deny get through)"
            ),
            "{m:#?}"
        );
    }

    #[test]
    fn principals_of_another_trust_domain_are_flagged_but_wildcards_are_not() {
        let f = found_in(
            "shop",
            "{rules: [{from: [{source: {principals: [example.org/ns/shop/sa/web, \"example.org/ns/legacy/*\"]}}]}]}",
        );
        let m = messages(&f);
        assert_eq!(m.len(), 2, "{m:#?}");
        assert!(m[0].contains("\"example.org/ns/shop/sa/web\" is in trust domain example.org, not the mesh's (cluster.local), so it matches no workload of the mesh: write \"cluster.local/ns/shop/sa/web\""), "{m:#?}");
        assert!(
            m[1].contains("write \"cluster.local/ns/legacy/*\""),
            "{m:#?}"
        );
        for ok in [
            "\"*\"",
            "\"cluster.local/ns/shop/sa/*\"",
            "\"cluster.local/*\"",
            "\"*/ns/shop/sa/web\"",
            "\"*/sa/web\"",
            "\"cluster.local/ns/shop/sa/web\"",
            "\"clus*\"",
        ] {
            let spec = format!("{{rules: [{{from: [{{source: {{principals: [{ok}]}}}}]}}]}}");
            assert!(found_in("shop", &spec).is_empty(), "{ok} flagged");
        }
        // The mesh's trust domain is the context's.
        let text = format!("{NAMESPACES}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {{rules: [{{from: [{{source: {{principals: [example.org/ns/shop/sa/web]}}}}]}}]}}\n");
        let mesh = parse_mesh("m.yaml", &text).unwrap().mesh;
        let ctx = LintContext {
            trust_domain: "example.org".into(),
            ..LintContext::default()
        };
        assert!(mistakes(&mesh, &ctx).is_empty());
        // cluster.local is taken literally, and the message says so.
        let f = mistakes(
            &parse_mesh("m.yaml", &text.replace("example.org/", "cluster.local/"))
                .unwrap()
                .mesh,
            &ctx,
        );
        assert_eq!(f.len(), 1, "{f:#?}");
        assert!(f[0]
            .message
            .contains("ztunnel and weft take cluster.local literally"));
    }

    #[test]
    fn a_namespace_given_as_principal_is_flagged_and_the_reverse_too() {
        let f = found_in(
            "shop",
            "{rules: [{from: [{source: {principals: [shop, default, ns/shop/sa/web, cluster.local/ns/shop]}}]}]}",
        );
        let m = messages(&f);
        assert_eq!(m.len(), 4, "{m:#?}");
        assert!(
            m[0].contains("\"shop\" is a namespace of the mesh, not a principal"),
            "{m:#?}"
        );
        assert!(
            m[0].contains(
                "write namespaces: [shop], or principals: [\"cluster.local/ns/shop/sa/*\"]"
            ),
            "{m:#?}"
        );
        assert!(m[1].contains("\"default\" is not a principal"), "{m:#?}");
        assert!(m[2].contains("lacks the trust domain, so it matches no peer: write \"cluster.local/ns/shop/sa/web\""), "{m:#?}");
        assert!(m[3].contains("is not of the form"), "{m:#?}");

        let f = found_in(
            "shop",
            "{rules: [{from: [{source: {namespaces: [cluster.local/ns/legacy/sa/old, shop, \"*\", \"leg*\"], notNamespaces: [\"spiffe://cluster.local/ns/x/sa/y\"]}}], when: [{key: source.namespace, values: [\"ns/*\"]}]}]}",
        );
        let m = messages(&f);
        assert_eq!(m.len(), 3, "{m:#?}");
        assert!(m[0].starts_with("rules[0].from[0].source.namespaces[0] \"cluster.local/ns/legacy/sa/old\" is a principal, not a namespace"), "{m:#?}");
        assert!(
            m[0].contains(
                "write principals: [\"cluster.local/ns/legacy/sa/old\"], or namespaces: [legacy]"
            ),
            "{m:#?}"
        );
        assert!(
            m[1].contains("notNamespaces[0]") && m[1].contains("it excludes no one"),
            "{m:#?}"
        );
        assert!(m[2].contains("holds a '/'"), "{m:#?}");
    }

    // --- scope ---

    #[test]
    fn a_selector_matching_no_enrolled_workload_is_flagged() {
        let f = found_in(
            "shop",
            "{selector: {matchLabels: {app: wbe}}, action: DENY, rules: [{}]}",
        );
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(f[0].field.as_deref(), Some("spec.selector.matchLabels"));
        assert_eq!(f[0].message, "selector app=wbe matches no pod of namespace shop: the policy applies to no workload weft captures");
        let f = found_in(
            "shop",
            "{selector: {matchLabels: {app: debug}}, action: DENY, rules: [{}]}",
        );
        assert!(
            f[0].message
                .contains("matches only pods weft does not capture"),
            "{f:#?}"
        );
        // Root namespace: every namespace's pods count.
        assert!(found_in(
            "istio-system",
            "{selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]}"
        )
        .is_empty());
        let f = found_in(
            "istio-system",
            "{selector: {matchLabels: {app: old}}, action: DENY, rules: [{}]}",
        );
        assert!(
            f[0].message.contains(
                "(root namespace: every namespace) matches only pods weft does not capture"
            ),
            "{f:#?}"
        );
        // A matching selector, or none.
        assert!(found_in(
            "shop",
            "{selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]}"
        )
        .is_empty());
        assert!(found_in("shop", "{action: DENY, rules: [{}]}").is_empty());
    }

    #[test]
    fn a_policy_in_a_namespace_without_enrolled_workloads_is_flagged_except_mesh_wide() {
        let f = found_in("legacy", "{action: DENY, rules: [{}]}");
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(f[0].field.as_deref(), Some("metadata.namespace"));
        assert_eq!(f[0].message, "namespace legacy is not enrolled (no label istio.io/dataplane-mode=ambient) and none of its 1 pods enrolls itself: the policy applies to no workload weft captures");
        // One warning even with a selector.
        let f = found_in(
            "empty",
            "{selector: {matchLabels: {app: x}}, action: DENY, rules: [{}]}",
        );
        assert_eq!(messages(&f), ["namespace empty has no pods in the mesh: the policy applies to no workload weft captures"]);
        let f = found_in("nowhere", "{action: DENY, rules: [{}]}");
        assert!(
            f[0].message.starts_with("namespace nowhere has no pods"),
            "{f:#?}"
        );
        // PeerAuthentication too; never the root namespace's mesh-wide policies.
        let f = found("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: legacy}\nspec: {mtls: {mode: STRICT}}\n");
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(
            f[0].policy.as_ref().map(|p| p.0),
            Some(PolicyKind::PeerAuthentication)
        );
        assert!(found("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n").is_empty());
        assert!(found_in("istio-system", "{action: DENY, rules: [{}]}").is_empty());
        assert!(found_in("shop", "{action: DENY, rules: [{}]}").is_empty());
    }

    #[test]
    fn control_plane_scoped_policies_are_left_alone() {
        let mut mesh = parse_mesh("m.yaml", NAMESPACES).unwrap().mesh;
        let mut ap = AuthorizationPolicy {
            name: "p".into(),
            namespace: "legacy".into(),
            spec: Default::default(),
        };
        ap.spec.scope = PolicyScope::Namespace;
        mesh.policies.push_back(Policy::AuthorizationPolicy(ap));
        assert!(mistakes(&mesh, &LintContext::default()).is_empty());
    }
}
