//! AuthorizationPolicy → the compiled form the evaluator walks, and the evaluator itself.
//!
//! A compiled rule has ztunnel's shape: a conjunction of clauses (`from`, `to`, one per `when`
//! condition), each clause a disjunction of alternatives (the `from`/`to` entries), each
//! alternative a conjunction of [`Test`]s (the fields that are set). An empty clause list
//! matches every connection; an empty alternative matches every connection.
//!
//! What L4 cannot evaluate is resolved *fail closed* here, once, so the evaluator never sees it:
//! HTTP attributes, `remoteIpBlocks`/`remote.ip` (Istio's ambient control plane treats them as
//! HTTP attributes: at L4 the remote address is not known), `connection.sni`, conditions whose
//! values do not parse for their key, and entries Istio's validation refuses (an empty
//! `source`/`operation`, a condition without values). In an ALLOW rule any of them makes the
//! whole rule never match; in a DENY, CUSTOM or AUDIT rule the part is dropped and the rule is
//! evaluated on what remains (so it matches at least as often as written).
//!
//! Every policy is compiled twice: for L4 (`rules`, [`Authz::check`](super::Authz::check)), as
//! above, and for L7 (`http_rules`, [`Authz::check_http`](super::Authz::check_http)), where the
//! HTTP attributes become tests ([`HttpCheck`], evaluated in `http`) and only what weft's
//! waypoint cannot evaluate either (`connection.sni`, `experimental.*` keys) or Istio refuses is
//! resolved fail closed, the same way.
//!
//! The evaluator is generic over a [`Trace`] so that `check` (which records nothing and
//! short-circuits) and `explain` (which records every test) run the very same code.

use std::cell::OnceCell;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::identity::Identity;
use crate::model::policy::{
    Action, AuthorizationPolicy, Condition, ConditionKey, Operation, Rule, Source, StringMatch,
};

use crate::model::{Labels, PolicyKind};

use super::http::{HttpAttributes, HttpCheck, HttpTest};
use super::scope::Scope;
use super::{list, BadValue, Finding, PolicyRef};

// === compiled types ===

/// What one test looks at, and the values it accepts.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Check {
    /// The peer principal (`<td>/ns/<ns>/sa/<sa>`); plaintext has none.
    Principal(Vec<StringMatch>),
    /// The peer identity's namespace; plaintext has none.
    Namespace(Vec<StringMatch>),
    /// The connection's source address.
    SourceIp(Vec<IpNet>),
    /// The connection's destination address.
    DestinationIp(Vec<IpNet>),
    /// The destination port.
    DestinationPort(Vec<u16>),
    /// An attribute of the HTTP request: only in L7 rules.
    Http(HttpCheck),
}

/// Which proxy a compiled rule is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layer {
    /// A connection: HTTP attributes are unknown.
    L4,
    /// An HTTP request (the waypoint): HTTP attributes are evaluated.
    Http,
}

/// One field of a rule: `values` (any must match) or, when `negated`, `notValues` (none may).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Test {
    pub check: Check,
    pub negated: bool,
    /// Where it was written, e.g. `from[0].source.notPrincipals`.
    pub field: String,
}

impl From<HttpTest> for Test {
    fn from(t: HttpTest) -> Test {
        Test {
            check: Check::Http(t.check),
            negated: t.negated,
            field: t.field,
        }
    }
}

/// A conjunction of tests; empty matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Alternative {
    pub tests: Vec<Test>,
}

/// A disjunction of alternatives.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Clause {
    pub alternatives: Vec<Alternative>,
}

/// A compiled rule.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RuleBody {
    /// An ALLOW rule its layer cannot evaluate: never matches. `why` says what was in the way.
    Never { why: String },
    /// All clauses must match.
    Clauses(Vec<Clause>),
}

/// A compiled AuthorizationPolicy.
#[derive(Clone, Debug)]
pub(crate) struct CompiledPolicy {
    pub reference: PolicyRef,
    pub scope: Scope,
    pub rules: Vec<RuleBody>,
    /// The same rules compiled for L7.
    pub http_rules: Vec<RuleBody>,
    /// Some rule mentions an attribute only an HTTP-aware proxy can evaluate.
    pub uses_l7: bool,
}

impl CompiledPolicy {
    /// The rules compiled for `layer`.
    pub fn rules_at(&self, layer: Layer) -> &[RuleBody] {
        match layer {
            Layer::L4 => &self.rules,
            Layer::Http => &self.http_rules,
        }
    }

    /// True when this policy applies to a workload with this uid, namespace and labels.
    pub fn applies_to(&self, uid: &str, namespace: &str, labels: &Labels) -> bool {
        self.scope
            .applies_to(&self.reference.namespace, uid, namespace, labels)
    }

    /// A human description of the scope.
    pub fn describe_scope(&self) -> String {
        self.scope.describe(&self.reference.namespace)
    }
}

// === compilation ===

/// Compiles one policy; `None` when it does not apply at L4 (targetRef). Warnings name the
/// policy and are pushed once per policy.
pub(crate) fn compile(
    p: &AuthorizationPolicy,
    root_namespace: &str,
    findings: &mut Vec<Finding>,
) -> Option<CompiledPolicy> {
    let mut warn = |message: String| {
        findings.push(Finding::about(
            PolicyKind::AuthorizationPolicy,
            &p.namespace,
            &p.name,
            message,
        ))
    };
    let spec = &p.spec;
    let targeted = spec.target_ref.is_some() || !spec.target_refs.is_empty();
    let selected = Scope::of(
        PolicyKind::AuthorizationPolicy,
        &p.namespace,
        spec.selector.as_ref(),
        targeted,
        root_namespace,
    );
    let selected = match selected {
        Ok(s) => s,
        Err(why) => {
            warn(format!("ignored at L4: {}", why.reason()));
            return None;
        }
    };
    // A dry-run policy (istiod passes Istio's `istio.io/dry-run` annotation on) is evaluated
    // and reported like AUDIT, never enforced.
    let action = if spec.dry_run {
        warn(format!(
            "dry-run: evaluated and logged as AUDIT, not enforced (action {:?})",
            spec.action
        ));
        Action::Audit
    } else {
        spec.action
    };
    let reference = PolicyRef {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        action,
    };
    let scope = match &spec.scope {
        crate::model::policy::PolicyScope::Mesh => Scope::Mesh,
        crate::model::policy::PolicyScope::Namespace => Scope::Namespace,
        crate::model::policy::PolicyScope::Workloads(uids) => Scope::Uids(uids.clone()),
        crate::model::policy::PolicyScope::Selector => selected,
    };
    if action == Action::Custom {
        let provider = spec
            .provider
            .as_ref()
            .map(|p| format!(" (provider {:?})", p.name))
            .unwrap_or_default();
        warn(format!(
            "CUSTOM action{provider}: weft has no external authorizer, so it fails \
             closed: connections its rules match are denied"
        ));
    }
    if spec.rules.is_empty() && matches!(action, Action::Deny | Action::Custom) {
        warn(format!(
            "a {} policy without rules matches nothing and has no effect (Istio's \
             validation refuses it)",
            action_name(action)
        ));
    }

    let mut l7: Vec<String> = Vec::new();
    let mut unenforceable: Vec<String> = Vec::new();
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut found = RuleProblems::default();
            let body = compile_rule(r, action, Layer::L4, &mut found);
            if !found.l7.is_empty() {
                l7.push(format!("rule {i}: {}", found.l7.join(", ")));
            }
            for u in found.unenforceable {
                unenforceable.push(format!("rule {i}: {u}"));
            }
            body
        })
        .collect::<Vec<_>>();
    let uses_l7 = !l7.is_empty();
    let consequence = if action == Action::Allow {
        "an ALLOW rule using them never matches at L4 (more restrictive than written)"
    } else {
        "the rule is enforced on its L4 part only (matches more than written)"
    };
    if uses_l7 {
        warn(format!(
            "uses attributes only a waypoint (L7) can evaluate ({}); traffic to the workloads it \
             applies to goes through weft's waypoint, which evaluates them per request (at L4 \
             alone {consequence})",
            l7.join("; ")
        ));
    }
    if !unenforceable.is_empty() {
        warn(format!(
            "{}; fail closed: {consequence}",
            unenforceable.join("; ")
        ));
    }
    // L7: report only what the L4 pass did not already.
    let mut l7_problems: Vec<String> = Vec::new();
    let http_rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut found = RuleProblems::default();
            let body = compile_rule(r, action, Layer::Http, &mut found);
            for u in found.unenforceable {
                let u = format!("rule {i}: {u}");
                if !unenforceable.contains(&u) {
                    l7_problems.push(u);
                }
            }
            body
        })
        .collect::<Vec<_>>();
    if !l7_problems.is_empty() {
        let consequence = if action == Action::Allow {
            "an ALLOW rule using them never matches"
        } else {
            "the rule is enforced without them (matches more than written)"
        };
        warn(format!(
            "at L7 (waypoint): {}; fail closed: {consequence}",
            l7_problems.join("; ")
        ));
    }
    Some(CompiledPolicy {
        reference,
        scope,
        rules,
        http_rules,
        uses_l7,
    })
}

/// `ALLOW`, `DENY`, ... as Istio writes them.
pub(crate) fn action_name(a: Action) -> &'static str {
    match a {
        Action::Allow => "ALLOW",
        Action::Deny => "DENY",
        Action::Audit => "AUDIT",
        Action::Custom => "CUSTOM",
    }
}

#[derive(Default)]
struct RuleProblems {
    /// L7 attribute names, in the order met, without duplicates.
    l7: Vec<String>,
    /// Parts Istio refuses or weft cannot parse.
    unenforceable: Vec<String>,
}

impl RuleProblems {
    fn l7(&mut self, what: impl Into<String>) {
        let what = what.into();
        if !self.l7.contains(&what) {
            self.l7.push(what);
        }
    }
}

fn compile_rule(rule: &Rule, action: Action, layer: Layer, found: &mut RuleProblems) -> RuleBody {
    let mut clauses = Vec::new();
    if !rule.from.is_empty() {
        let alternatives = rule
            .from
            .iter()
            .enumerate()
            .map(|(j, f)| compile_source(&f.source, &format!("from[{j}].source"), layer, found))
            .collect();
        clauses.push(Clause { alternatives });
    }
    if !rule.to.is_empty() {
        let alternatives = rule
            .to
            .iter()
            .enumerate()
            .map(|(j, t)| {
                compile_operation(&t.operation, &format!("to[{j}].operation"), layer, found)
            })
            .collect();
        clauses.push(Clause { alternatives });
    }
    for (k, c) in rule.when.iter().enumerate() {
        if let Some(alt) = compile_condition(c, &format!("when[{k}]"), layer, found) {
            clauses.push(Clause {
                alternatives: vec![alt],
            });
        }
    }
    if action == Action::Allow && (!found.l7.is_empty() || !found.unenforceable.is_empty()) {
        let mut why = String::new();
        if !found.l7.is_empty() {
            let _ = write!(why, "uses L7 attributes ({})", found.l7.join(", "));
        }
        if !found.unenforceable.is_empty() {
            if !why.is_empty() {
                why.push_str("; ");
            }
            why.push_str(&found.unenforceable.join("; "));
        }
        return RuleBody::Never { why };
    }
    RuleBody::Clauses(clauses)
}

fn push_strings<M: Clone>(
    tests: &mut Vec<Test>,
    values: &[M],
    negated: bool,
    field: String,
    make: impl Fn(Vec<M>) -> Check,
) {
    if !values.is_empty() {
        tests.push(Test {
            check: make(values.to_vec()),
            negated,
            field,
        });
    }
}

fn compile_source(s: &Source, at: &str, layer: Layer, found: &mut RuleProblems) -> Alternative {
    let mut tests = Vec::new();
    push_strings(
        &mut tests,
        &s.principals,
        false,
        format!("{at}.principals"),
        Check::Principal,
    );
    push_strings(
        &mut tests,
        &s.not_principals,
        true,
        format!("{at}.notPrincipals"),
        Check::Principal,
    );
    push_strings(
        &mut tests,
        &s.namespaces,
        false,
        format!("{at}.namespaces"),
        Check::Namespace,
    );
    push_strings(
        &mut tests,
        &s.not_namespaces,
        true,
        format!("{at}.notNamespaces"),
        Check::Namespace,
    );
    for (blocks, negated, name) in [
        (&s.ip_blocks, false, "ipBlocks"),
        (&s.not_ip_blocks, true, "notIpBlocks"),
    ] {
        if !blocks.is_empty() {
            tests.push(Test {
                check: Check::SourceIp(blocks.iter().map(|b| b.0).collect()),
                negated,
                field: format!("{at}.{name}"),
            });
        }
    }
    let l7 = [
        (!s.request_principals.is_empty(), "requestPrincipals"),
        (!s.not_request_principals.is_empty(), "notRequestPrincipals"),
        (!s.remote_ip_blocks.is_empty(), "remoteIpBlocks"),
        (!s.not_remote_ip_blocks.is_empty(), "notRemoteIpBlocks"),
    ];
    match layer {
        Layer::L4 => {
            for (set, name) in l7 {
                if set {
                    found.l7(name);
                }
            }
        }
        Layer::Http => {
            let mut http = Vec::new();
            super::http::compile_source(s, at, &mut http);
            tests.extend(http.into_iter().map(Test::from));
        }
    }
    if tests.is_empty() && !l7.iter().any(|(set, _)| *set) {
        found
            .unenforceable
            .push(format!("{at} is empty (Istio refuses an empty source)"));
    }
    Alternative { tests }
}

fn compile_operation(
    o: &Operation,
    at: &str,
    layer: Layer,
    found: &mut RuleProblems,
) -> Alternative {
    let mut tests = Vec::new();
    for (ports, negated, name) in [(&o.ports, false, "ports"), (&o.not_ports, true, "notPorts")] {
        if !ports.is_empty() {
            tests.push(Test {
                check: Check::DestinationPort(ports.iter().map(|p| p.0).collect()),
                negated,
                field: format!("{at}.{name}"),
            });
        }
    }
    let l7 = [
        (!o.hosts.is_empty(), "hosts"),
        (!o.not_hosts.is_empty(), "notHosts"),
        (!o.methods.is_empty(), "methods"),
        (!o.not_methods.is_empty(), "notMethods"),
        (!o.paths.is_empty(), "paths"),
        (!o.not_paths.is_empty(), "notPaths"),
    ];
    match layer {
        Layer::L4 => {
            for (set, name) in l7 {
                if set {
                    found.l7(name);
                }
            }
        }
        Layer::Http => {
            let mut http = Vec::new();
            super::http::compile_operation(o, at, &mut http);
            tests.extend(http.into_iter().map(Test::from));
        }
    }
    if tests.is_empty() && !l7.iter().any(|(set, _)| *set) {
        found
            .unenforceable
            .push(format!("{at} is empty (Istio refuses an empty operation)"));
    }
    Alternative { tests }
}

/// True for condition keys ztunnel evaluates (istiod's `l4WhenAttributes`).
pub(crate) fn is_l4_key(k: &ConditionKey) -> bool {
    matches!(
        k,
        ConditionKey::SourceIp
            | ConditionKey::SourceNamespace
            | ConditionKey::SourcePrincipal
            | ConditionKey::DestinationIp
            | ConditionKey::DestinationPort
    )
}

/// One condition as an alternative of one or two tests; `None` when dropped (L7 at L4, or
/// unenforceable, already recorded in `found`).
fn compile_condition(
    c: &Condition,
    at: &str,
    layer: Layer,
    found: &mut RuleProblems,
) -> Option<Alternative> {
    match layer {
        Layer::L4 if !is_l4_key(&c.key) => {
            found.l7(c.key.to_string());
            return None;
        }
        Layer::L4 => {}
        Layer::Http => {
            if let Err(why) = super::http::supported_key(&c.key) {
                found.unenforceable.push(format!("{at}({}) {why}", c.key));
                return None;
            }
        }
    }
    let field = |neg: bool| {
        format!(
            "{at}({}).{}",
            c.key,
            if neg { "notValues" } else { "values" }
        )
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        found
            .unenforceable
            .push(format!("{at}({}) has neither values nor notValues", c.key));
        return None;
    }
    let mut tests = Vec::new();
    for (values, negated) in [(&c.values, false), (&c.not_values, true)] {
        if values.is_empty() {
            continue;
        }
        match parse_values(&c.key, values) {
            Ok(check) => tests.push(Test {
                check,
                negated,
                field: field(negated),
            }),
            Err(bad) => {
                found
                    .unenforceable
                    .push(format!("{}: {bad}", field(negated)));
                return None;
            }
        }
    }
    Some(Alternative { tests })
}

/// Parses a condition's values for its key; the first value that does not parse on error.
/// HTTP keys are handed to `http` (callers only pass those for L7 rules).
fn parse_values(key: &ConditionKey, values: &[StringMatch]) -> Result<Check, BadValue> {
    let exact = |m: &StringMatch| match m {
        StringMatch::Exact(s) => Ok(s.clone()),
        other => Err(BadValue(other.to_string())),
    };
    Ok(match key {
        ConditionKey::SourcePrincipal => Check::Principal(values.to_vec()),
        ConditionKey::SourceNamespace => Check::Namespace(values.to_vec()),
        ConditionKey::SourceIp | ConditionKey::DestinationIp => {
            let nets = parse_nets(values)?;
            if *key == ConditionKey::SourceIp {
                Check::SourceIp(nets)
            } else {
                Check::DestinationIp(nets)
            }
        }
        ConditionKey::DestinationPort => Check::DestinationPort(
            values
                .iter()
                .map(|m| {
                    let s = exact(m)?;
                    match s.parse::<u16>() {
                        Ok(p) if p != 0 => Ok(p),
                        _ => Err(BadValue(s)),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        ConditionKey::RemoteIp => Check::Http(HttpCheck::RemoteIp(parse_nets(values)?)),
        other => Check::Http(super::http::parse_values(other, values)?),
    })
}

/// Condition values that must be addresses or CIDRs.
fn parse_nets(values: &[StringMatch]) -> Result<Vec<IpNet>, BadValue> {
    values
        .iter()
        .map(|m| match m {
            StringMatch::Exact(s) => s
                .parse::<crate::model::policy::IpBlock>()
                .map(|b| b.0)
                .map_err(|_| BadValue(s.clone())),
            other => Err(BadValue(other.to_string())),
        })
        .collect()
}

// === evaluation ===

/// The connection attributes a rule can test, with the principal built only when asked for.
pub(crate) struct Peer<'a> {
    identity: Option<&'a Identity>,
    principal: OnceCell<String>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// The request, for L7 rules; `None` at L4.
    pub http: Option<&'a HttpAttributes<'a>>,
}

impl<'a> Peer<'a> {
    pub fn new(identity: Option<&'a Identity>, src_ip: IpAddr, dst_ip: IpAddr, port: u16) -> Self {
        Peer {
            identity,
            principal: OnceCell::new(),
            // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; policies write them as
            // IPv4.
            src_ip: src_ip.to_canonical(),
            dst_ip: dst_ip.to_canonical(),
            dst_port: port,
            http: None,
        }
    }

    /// The same peer making `request`: rules are evaluated at L7.
    pub fn with_http(self, request: &'a HttpAttributes<'a>) -> Self {
        Peer {
            http: Some(request),
            ..self
        }
    }

    /// Which rules apply: L7 once a request is known.
    pub fn layer(&self) -> Layer {
        if self.http.is_some() {
            Layer::Http
        } else {
            Layer::L4
        }
    }

    /// `<td>/ns/<ns>/sa/<sa>`: the SPIFFE id without `spiffe://`, as Istio writes principals.
    pub fn principal(&self) -> Option<&str> {
        let id = self.identity?;
        Some(self.principal.get_or_init(|| {
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain(),
                id.namespace(),
                id.service_account()
            )
        }))
    }

    /// The peer identity's namespace.
    pub fn namespace(&self) -> Option<&str> {
        self.identity.map(Identity::namespace)
    }
}

/// What the evaluator reports as it goes. `check` uses [`Silent`]; `explain` records.
pub(crate) trait Trace {
    /// Evaluate every rule, clause and alternative instead of stopping at the first answer.
    const EXHAUSTIVE: bool;
    /// One test's outcome, described lazily.
    fn test(&mut self, describe: impl FnOnce() -> String);
}

/// Records nothing.
pub(crate) struct Silent;

impl Trace for Silent {
    const EXHAUSTIVE: bool = false;
    #[inline(always)]
    fn test(&mut self, _: impl FnOnce() -> String) {}
}

/// Records every test's description.
#[derive(Default)]
pub(crate) struct Record(pub Vec<String>);

impl Trace for Record {
    const EXHAUSTIVE: bool = true;
    fn test(&mut self, describe: impl FnOnce() -> String) {
        self.0.push(describe());
    }
}

fn eval_test<T: Trace>(test: &Test, peer: &Peer<'_>, t: &mut T) -> bool {
    // Does the attribute match any listed value; `None`: the attribute is absent, which
    // matches no value (a plaintext peer has no principal and no namespace).
    let hit = match &test.check {
        Check::Principal(v) => peer.principal().map(|p| v.iter().any(|m| m.matches(p))),
        Check::Namespace(v) => peer.namespace().map(|n| v.iter().any(|m| m.matches(n))),
        Check::SourceIp(v) => Some(v.iter().any(|n| n.contains(&peer.src_ip))),
        Check::DestinationIp(v) => Some(v.iter().any(|n| n.contains(&peer.dst_ip))),
        Check::DestinationPort(v) => Some(v.contains(&peer.dst_port)),
        // L4 rules hold no HTTP test; were one evaluated without a request, the attribute
        // is absent.
        Check::Http(h) => peer.http.and_then(|r| h.hit(r, peer.src_ip)),
    };
    let ok = match hit {
        Some(h) => h != test.negated,
        None => test.negated,
    };
    t.test(|| describe_test(test, peer, hit, ok));
    ok
}

fn describe_test(test: &Test, peer: &Peer<'_>, hit: Option<bool>, ok: bool) -> String {
    let mut absent = "plaintext connection has no peer identity";
    let (value, values) = match &test.check {
        Check::Principal(v) => (peer.principal().unwrap_or_default().to_string(), list(v)),
        Check::Namespace(v) => (peer.namespace().unwrap_or_default().to_string(), list(v)),
        Check::SourceIp(v) => (peer.src_ip.to_string(), list(v)),
        Check::DestinationIp(v) => (peer.dst_ip.to_string(), list(v)),
        Check::DestinationPort(v) => (peer.dst_port.to_string(), list(v)),
        Check::Http(h) => {
            let d = h.describe(peer.http, peer.src_ip);
            absent = d.absent;
            (d.value, d.values)
        }
    };
    let verdict = if ok { "ok" } else { "no match" };
    match hit {
        None => format!("{}: {verdict}: {absent} (values {values})", test.field),
        Some(true) => format!("{}: {verdict}: {value} in {values}", test.field),
        Some(false) => format!("{}: {verdict}: {value} not in {values}", test.field),
    }
}

fn eval_alternative<T: Trace>(alt: &Alternative, peer: &Peer<'_>, t: &mut T) -> bool {
    let mut ok = true;
    for test in &alt.tests {
        ok &= eval_test(test, peer, t);
        if !ok && !T::EXHAUSTIVE {
            return false;
        }
    }
    ok
}

fn eval_clause<T: Trace>(clause: &Clause, peer: &Peer<'_>, t: &mut T) -> bool {
    let mut ok = false;
    for alt in &clause.alternatives {
        ok |= eval_alternative(alt, peer, t);
        if ok && !T::EXHAUSTIVE {
            return true;
        }
    }
    ok
}

/// Does the rule match the connection.
pub(crate) fn eval_rule<T: Trace>(rule: &RuleBody, peer: &Peer<'_>, t: &mut T) -> bool {
    match rule {
        RuleBody::Never { why } => {
            let layer = match peer.layer() {
                Layer::L4 => "L4",
                Layer::Http => "L7",
            };
            t.test(|| format!("never matches at {layer}: {why}"));
            false
        }
        RuleBody::Clauses(clauses) => {
            if clauses.is_empty() {
                t.test(|| "empty rule: matches every connection".to_string());
            }
            let mut ok = true;
            for c in clauses {
                ok &= eval_clause(c, peer, t);
                if !ok && !T::EXHAUSTIVE {
                    return false;
                }
            }
            ok
        }
    }
}

/// Does any rule of the policy match (a policy without rules matches nothing), at the peer's
/// layer.
pub(crate) fn eval_policy(p: &CompiledPolicy, peer: &Peer<'_>) -> bool {
    p.rules_at(peer.layer())
        .iter()
        .any(|r| eval_rule(r, peer, &mut Silent))
}
