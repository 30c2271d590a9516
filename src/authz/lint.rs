//! Warnings about risky policy for `weft check`: everything [`Authz::warnings`] reports, plus
//! mTLS modes that accept plaintext, ALLOW rules that admit everything (or every mesh peer),
//! DENY rules that can never match, and ALLOW policies a DENY shadows entirely; then the
//! likely mistakes of `intent` ([`super::mistakes`]).
//!
//! Every warning of this module is sound: it is only given when the stated consequence holds
//! for every connection. Cases that would need reasoning about the workloads or a solver are
//! left out rather than guessed. The likely mistakes of `intent` are about what the author
//! meant instead: the consequence each states holds too (a value that matches no peer of the
//! mesh, a policy that applies to no workload weft captures, rules that admit more apart than
//! together), but that it was not intended is a guess, made only for the mistakes the
//! widely read policy examples show.

use std::collections::BTreeMap;

use crate::model::{Mesh, PolicyKind};

use super::compile::{Alternative, Check, Clause, CompiledPolicy, RuleBody, Test};
use super::scope::Scope;
use super::{Action, Authz, Finding, LintContext, MtlsMode};

/// Risky-policy warnings for a mesh, as text (`<Kind> <ns>/<name>: <message>`).
pub fn lint(mesh: &Mesh, ctx: &LintContext) -> Vec<String> {
    lint_findings(mesh, ctx)
        .iter()
        .map(Finding::to_string)
        .collect()
}

/// Risky-policy warnings for a mesh, each with the policy it is about: the compile warnings,
/// this module's sound warnings, then the likely mistakes ([`super::mistakes`]).
pub fn lint_findings(mesh: &Mesh, ctx: &LintContext) -> Vec<Finding> {
    let root_namespace = ctx.root_namespace.as_str();
    let authz = Authz::new(mesh, root_namespace);
    let mut out = authz.findings().to_vec();

    if !authz.peer_auths.has_mesh_mode() {
        out.push(Finding {
            policy: None,
            field: None,
            message: format!(
                "no mesh-wide PeerAuthentication (namespace {root_namespace}, no selector) sets \
                 an mTLS mode: the default, PERMISSIVE, accepts plaintext wherever no namespace \
                 or workload policy says otherwise"
            ),
        });
    }
    for s in authz.peer_auths.modes() {
        let what = match s.mode {
            MtlsMode::Strict => continue,
            MtlsMode::Permissive => "PERMISSIVE: plaintext connections are accepted",
            MtlsMode::Disable => {
                "DISABLE: plaintext connections are accepted (mTLS over HBONE still is too)"
            }
        };
        let port = s.port.map(|p| format!("port {p}: ")).unwrap_or_default();
        out.push(Finding::about(
            PolicyKind::PeerAuthentication,
            &s.policy.namespace,
            &s.policy.name,
            format!("{port}mTLS mode {what} ({})", s.scope),
        ));
    }

    for p in &authz.policies {
        let about = |message: String| {
            Finding::about(
                PolicyKind::AuthorizationPolicy,
                &p.reference.namespace,
                &p.reference.name,
                message,
            )
        };
        for (i, rule) in p.rules.iter().enumerate() {
            let RuleBody::Clauses(clauses) = rule else {
                continue;
            };
            match p.reference.action {
                Action::Allow => match breadth(clauses) {
                    Breadth::Everything => out.push(about(format!(
                        "rule {i} matches every connection: the policy allows everything in \
                         its scope ({})",
                        p.describe_scope()
                    ))),
                    Breadth::AnyPeer => out.push(about(format!(
                        "rule {i} allows any mTLS peer (principals or namespaces \"*\"): every \
                         workload of the mesh may connect ({})",
                        p.describe_scope()
                    ))),
                    Breadth::Specific => {}
                },
                Action::Deny | Action::Custom => {
                    if let Some(why) = never_matches(clauses) {
                        out.push(about(format!(
                            "rule {i} can never match ({why}), so it denies nothing"
                        )));
                    }
                }
                Action::Audit => {}
            }
        }
    }

    for a in authz
        .policies
        .iter()
        .filter(|a| a.reference.action == Action::Allow)
    {
        // An ALLOW that cannot match anything is reported by `compile` already.
        if !a.rules.iter().any(|r| matches!(r, RuleBody::Clauses(_))) {
            continue;
        }
        let shadow = authz.policies.iter().find_map(|d| {
            if !matches!(d.reference.action, Action::Deny | Action::Custom) || !contains(d, a) {
                return None;
            }
            d.rules.iter().enumerate().find_map(|(i, r)| match r {
                RuleBody::Clauses(c) if breadth(c) == Breadth::Everything => Some((d, i)),
                _ => None,
            })
        });
        if let Some((d, i)) = shadow {
            out.push(Finding::about(
                PolicyKind::AuthorizationPolicy,
                &a.reference.namespace,
                &a.reference.name,
                format!(
                    "fully shadowed by {} {}/{}: its rule {i} matches every connection \
                     wherever this policy applies, so this policy never allows anything",
                    super::compile::action_name(d.reference.action),
                    d.reference.namespace,
                    d.reference.name
                ),
            ));
        }
    }
    out.extend(super::intent::mistakes(mesh, ctx));
    out
}

// === breadth of ALLOW rules ===

/// How much a rule admits, coarsest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Breadth {
    Specific,
    /// Every mTLS peer, whatever else.
    AnyPeer,
    /// Every connection.
    Everything,
}

fn all_addresses(nets: &[ipnet::IpNet]) -> bool {
    let v4 = nets
        .iter()
        .any(|n| matches!(n, ipnet::IpNet::V4(_)) && n.prefix_len() == 0);
    let v6 = nets
        .iter()
        .any(|n| matches!(n, ipnet::IpNet::V6(_)) && n.prefix_len() == 0);
    v4 && v6
}

fn test_breadth(t: &Test) -> Breadth {
    if t.negated {
        return Breadth::Specific;
    }
    match &t.check {
        Check::SourceIp(n) | Check::DestinationIp(n) if all_addresses(n) => Breadth::Everything,
        Check::Principal(v) | Check::Namespace(v)
            if v.contains(&crate::model::policy::StringMatch::Any) =>
        {
            Breadth::AnyPeer
        }
        _ => Breadth::Specific,
    }
}

fn alternative_breadth(a: &Alternative) -> Breadth {
    a.tests
        .iter()
        .map(test_breadth)
        .min()
        .unwrap_or(Breadth::Everything)
}

fn breadth(clauses: &[Clause]) -> Breadth {
    clauses
        .iter()
        .map(|c| {
            c.alternatives
                .iter()
                .map(alternative_breadth)
                .max()
                .unwrap_or(Breadth::Specific)
        })
        .min()
        .unwrap_or(Breadth::Everything)
}

// === DENY rules that cannot match ===

/// Beyond this many combinations of alternatives the rule is not analysed (no warning).
const MAX_COMBINATIONS: usize = 256;

/// `Some(reason)` when no connection can satisfy the rule: every way of picking one
/// alternative per clause holds a contradiction.
fn never_matches(clauses: &[Clause]) -> Option<String> {
    let combinations = clauses
        .iter()
        .try_fold(1usize, |n, c| n.checked_mul(c.alternatives.len()))?;
    if combinations == 0 || combinations > MAX_COMBINATIONS {
        return None;
    }
    let mut pick = vec![0usize; clauses.len()];
    let mut first = None;
    loop {
        let tests: Vec<&Test> = clauses
            .iter()
            .zip(&pick)
            .flat_map(|(c, &i)| &c.alternatives[i].tests)
            .collect();
        let why = contradiction(&tests)?;
        first.get_or_insert(why);
        // Next combination (odometer).
        let mut k = 0;
        loop {
            if k == pick.len() {
                return first;
            }
            pick[k] += 1;
            if pick[k] < clauses[k].alternatives.len() {
                break;
            }
            pick[k] = 0;
            k += 1;
        }
    }
}

fn same_attribute(a: &Check, b: &Check) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// A reason no connection satisfies all `tests`, if there is one this analysis can prove.
fn contradiction(tests: &[&Test]) -> Option<String> {
    let positives: Vec<&Test> = tests.iter().copied().filter(|t| !t.negated).collect();
    let negatives: Vec<&Test> = tests.iter().copied().filter(|t| t.negated).collect();
    for (i, p) in positives.iter().enumerate() {
        let negs: Vec<&Test> = negatives
            .iter()
            .copied()
            .filter(|n| same_attribute(&n.check, &p.check))
            .collect();
        if !negs.is_empty() && covered(&p.check, &negs) {
            let names: Vec<&str> = negs.iter().map(|n| n.field.as_str()).collect();
            return Some(format!(
                "every value of {} is excluded by {}",
                p.field,
                names.join(" and ")
            ));
        }
        for q in &positives[i + 1..] {
            if same_attribute(&p.check, &q.check) && disjoint(&p.check, &q.check) {
                return Some(format!("{} and {} share no value", p.field, q.field));
            }
        }
    }
    principal_namespace_contradiction(&positives, &negatives)
}

/// A principal `<td>/ns/<ns>/sa/<sa>` written exactly names its namespace; a namespace
/// condition that excludes all of them contradicts it.
fn principal_namespace_contradiction(positives: &[&Test], negatives: &[&Test]) -> Option<String> {
    use crate::model::policy::StringMatch;
    for p in positives {
        let Check::Principal(values) = &p.check else {
            continue;
        };
        let namespaces: Option<Vec<&str>> = values
            .iter()
            .map(|v| match v {
                StringMatch::Exact(s) => {
                    let mut parts = s.split('/');
                    match (parts.next(), parts.next(), parts.next(), parts.next()) {
                        (Some(_), Some("ns"), Some(ns), Some("sa")) => Some(ns),
                        _ => None,
                    }
                }
                _ => None,
            })
            .collect();
        let Some(namespaces) = namespaces else {
            continue;
        };
        for q in positives {
            if let Check::Namespace(allowed) = &q.check {
                if namespaces
                    .iter()
                    .all(|ns| !allowed.iter().any(|m| m.matches(ns)))
                {
                    return Some(format!(
                        "the namespaces of {} are not in {}",
                        p.field, q.field
                    ));
                }
            }
        }
        let excluded: Vec<&Test> = negatives
            .iter()
            .copied()
            .filter(|n| matches!(n.check, Check::Namespace(_)))
            .collect();
        if !excluded.is_empty()
            && namespaces.iter().all(|ns| {
                excluded.iter().any(|n| match &n.check {
                    Check::Namespace(v) => v.iter().any(|m| m.matches(ns)),
                    _ => false,
                })
            })
        {
            return Some(format!(
                "the namespaces of {} are all excluded by {}",
                p.field, excluded[0].field
            ));
        }
    }
    None
}

/// Every value `p` accepts is refused by one of `negs` (same attribute).
fn covered(p: &Check, negs: &[&Test]) -> bool {
    use crate::model::policy::StringMatch;
    fn string_covers(n: &StringMatch, p: &StringMatch) -> bool {
        match (n, p) {
            (StringMatch::Any, _) => true,
            (StringMatch::Exact(a), StringMatch::Exact(b)) => a == b,
            (StringMatch::Prefix(a), StringMatch::Exact(b) | StringMatch::Prefix(b)) => {
                b.starts_with(a.as_str())
            }
            (StringMatch::Suffix(a), StringMatch::Exact(b) | StringMatch::Suffix(b)) => {
                b.ends_with(a.as_str())
            }
            _ => false,
        }
    }
    let any_neg = |f: &dyn Fn(&Check) -> bool| negs.iter().any(|n| f(&n.check));
    match p {
        Check::Principal(vs) | Check::Namespace(vs) => vs.iter().all(|v| {
            any_neg(&|n| match n {
                Check::Principal(ns) | Check::Namespace(ns) => {
                    ns.iter().any(|m| string_covers(m, v))
                }
                _ => false,
            })
        }),
        Check::SourceIp(vs) | Check::DestinationIp(vs) => vs.iter().all(|v| {
            any_neg(&|n| match n {
                Check::SourceIp(ns) | Check::DestinationIp(ns) => ns.iter().any(|m| m.contains(v)),
                _ => false,
            })
        }),
        Check::DestinationPort(vs) => vs.iter().all(|v| {
            any_neg(&|n| match n {
                Check::DestinationPort(ns) => ns.contains(v),
                _ => false,
            })
        }), // L4 rules, which lint reads, hold no HTTP test.
        Check::Http(_) => false,
    }
}

/// `a` and `b` (same attribute) accept no common value.
fn disjoint(a: &Check, b: &Check) -> bool {
    use crate::model::policy::StringMatch;
    fn strings(x: &StringMatch, y: &StringMatch) -> bool {
        use StringMatch::*;
        match (x, y) {
            (Any, _) | (_, Any) => false,
            (Exact(a), Exact(b)) => a != b,
            (Exact(a), Prefix(p)) | (Prefix(p), Exact(a)) => !a.starts_with(p.as_str()),
            (Exact(a), Suffix(s)) | (Suffix(s), Exact(a)) => !a.ends_with(s.as_str()),
            (Prefix(a), Prefix(b)) => !a.starts_with(b.as_str()) && !b.starts_with(a.as_str()),
            (Suffix(a), Suffix(b)) => !a.ends_with(b.as_str()) && !b.ends_with(a.as_str()),
            (Prefix(_), Suffix(_)) | (Suffix(_), Prefix(_)) => false,
        }
    }
    let nets = |x: &ipnet::IpNet, y: &ipnet::IpNet| !x.contains(y) && !y.contains(x);
    match (a, b) {
        (Check::Principal(x), Check::Principal(y)) | (Check::Namespace(x), Check::Namespace(y)) => {
            x.iter().all(|u| y.iter().all(|v| strings(u, v)))
        }
        (Check::SourceIp(x), Check::SourceIp(y))
        | (Check::DestinationIp(x), Check::DestinationIp(y)) => {
            x.iter().all(|u| y.iter().all(|v| nets(u, v)))
        }
        (Check::DestinationPort(x), Check::DestinationPort(y)) => x.iter().all(|u| !y.contains(u)),
        _ => false,
    }
}

// === shadowing ===

/// Every workload `a` applies to, `d` applies to as well.
fn contains(d: &CompiledPolicy, a: &CompiledPolicy) -> bool {
    let subset = |small: &BTreeMap<String, String>, big: &BTreeMap<String, String>| {
        small.iter().all(|(k, v)| big.get(k) == Some(v))
    };
    let same_ns = d.reference.namespace == a.reference.namespace;
    match (&d.scope, &a.scope) {
        (Scope::Mesh, _) => true,
        (Scope::Namespace, Scope::Namespace | Scope::Workloads(_)) => same_ns,
        (Scope::Workloads(ld), Scope::Workloads(la)) => same_ns && subset(ld, la),
        (Scope::MeshWorkloads(ld), Scope::Workloads(la) | Scope::MeshWorkloads(la)) => {
            subset(ld, la)
        }
        _ => false,
    }
}
