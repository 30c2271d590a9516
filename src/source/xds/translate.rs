//! xDS resources → the mesh [`model`](crate::model): Istio's workload API
//! (`istio.workload.Address`: a `Workload` or a `Service`) and ztunnel's L4 authorization
//! (`istio.security.Authorization`).
//!
//! Two steps, so a bad resource can be refused on its own: [`address`] and
//! [`authorization`] check and translate one resource (an error here NACKs the response that
//! carried it); [`Assembly`] keeps the accepted resources and turns each change into the
//! [`Edit`]s of the mesh, re-deriving only what spans the changed resources (service
//! endpoints and their target ports, the workloads a selector policy applies to);
//! [`assemble`] is the same from scratch. Neither fails, but they report oddities as
//! warnings (IPs claimed twice are the snapshot's to report).
//!
//! Owns no I/O and no protocol state: `source::xds` does that. Separate from `k8s`, which
//! translates Kubernetes YAML.
//!
//! How ztunnel's Authorization becomes the CRD-shaped [`AuthorizationPolicy`] (exactly, no
//! widening): ztunnel's semantics are rule = AND of clauses, clause = OR of matches, match =
//! AND of fields (a list matches by any value, a `not_` list by none). The CRD's rule is
//! `from` (OR of sources) AND `to` (OR of operations) AND every `when`. A clause whose
//! matches all fit a `Source` becomes `from`, one whose matches are all ports becomes `to`,
//! and a single match can always be written as `when` conditions (`source.principal`,
//! `source.namespace`, `source.ip`, `destination.ip`, `destination.port`). Any other clause
//! is distributed: the rule is split into one rule per match of that clause (rules OR), which
//! is equivalent. `service_accounts` become principal suffixes `/ns/<ns>/sa/<sa>` (exact,
//! since SPIFFE path segments hold no `/`). The scope and dry-run flag use the model's
//! [`PolicyScope`] and `dry_run` extensions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::model::policy::{
    Action, AuthorizationPolicySpec, Condition, ConditionKey, IpBlock, Operation, PolicyScope,
    PortNumber, Rule, RuleFrom, RuleTo, Source, StringMatch,
};
use crate::model::{
    AuthorizationPolicy, Enrollment, Mesh, Policy, PolicyKind, Service, ServicePort, TargetPort,
    Workload,
};
use crate::proto::istio::security as xsec;
use crate::proto::istio::workload as xw;
use crate::state::Edit;

/// Most CRD rules one xDS rule may expand into (distribution multiplies them).
const MAX_RULES_PER_RULE: usize = 256;

/// A workload as accepted, with what [`assemble`] needs besides the model.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadEntry {
    /// The model workload (labels and named ports empty: xDS carries none).
    pub workload: Workload,
    /// Trust domain istiod gave (empty: the mesh default).
    pub trust_domain: String,
    /// Whether the workload may receive traffic as a service endpoint.
    pub healthy: bool,
    /// Services it backs (`<namespace>/<hostname>`) with per-workload `(service port, target
    /// port)` overrides (target 0: none).
    pub services: BTreeMap<String, Vec<(u16, u16)>>,
    /// Selector policies (`<namespace>/<name>`) that select it.
    pub policies: Vec<String>,
}

/// A service as accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceEntry {
    /// The model service, endpoints not yet resolved.
    pub service: Service,
    /// `<namespace>/<hostname>`: what workloads name it by.
    pub key: String,
    /// `(service port, default target port)`; target 0 means per endpoint only.
    pub ports: Vec<(u16, u16)>,
}

/// One accepted `istio.workload.Address`.
#[derive(Clone, Debug, PartialEq)]
pub enum AddressEntry {
    /// A workload.
    Workload(WorkloadEntry),
    /// A service.
    Service(ServiceEntry),
}

/// Checks and translates one `Address`.
pub fn address(a: xw::Address) -> Result<AddressEntry, String> {
    match a.r#type {
        Some(xw::address::Type::Workload(w)) => workload(w).map(AddressEntry::Workload),
        Some(xw::address::Type::Service(s)) => service(s).map(AddressEntry::Service),
        None => Err("Address holds neither a workload nor a service".into()),
    }
}

fn ip_from_bytes(b: &[u8], what: &str) -> Result<IpAddr, String> {
    match b.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(b).map_err(|_| what.to_string())?,
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(b).map_err(|_| what.to_string())?,
        )),
        n => Err(format!(
            "{what}: {n} bytes is neither an IPv4 (4) nor an IPv6 (16) address"
        )),
    }
}

fn port(v: u32, what: &str, zero_ok: bool) -> Result<u16, String> {
    match u16::try_from(v) {
        Ok(0) if !zero_ok => Err(format!("{what}: port 0 is not allowed")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{what}: {v} is not a port (1-65535)")),
    }
}

fn ports(list: &[xw::Port], what: &str) -> Result<Vec<(u16, u16)>, String> {
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            Ok((
                port(p.service_port, &format!("{what}[{i}].service_port"), false)?,
                port(p.target_port, &format!("{what}[{i}].target_port"), true)?,
            ))
        })
        .collect()
}

fn workload(w: xw::Workload) -> Result<WorkloadEntry, String> {
    if w.uid.is_empty() {
        return Err("workload: uid is required".into());
    }
    let ctx = |e: String| format!("workload {}: {e}", w.uid);
    if w.namespace.is_empty() {
        return Err(ctx(
            "namespace is required (it is part of the identity)".into()
        ));
    }
    let mut ips = Vec::with_capacity(w.addresses.len());
    for (i, a) in w.addresses.iter().enumerate() {
        let ip = ip_from_bytes(a, &format!("addresses[{i}]")).map_err(ctx)?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        services.insert(
            key.clone(),
            ports(&list.ports, &format!("services[{key}].ports")).map_err(ctx)?,
        );
    }
    let host_network = w.network_mode == xw::NetworkMode::HostNetwork as i32;
    let hbone = w.tunnel_protocol == xw::TunnelProtocol::Hbone as i32;
    let enrollment = match (host_network, hbone) {
        (true, _) => Enrollment::HostNetwork,
        (false, true) => Enrollment::Enrolled,
        (false, false) => Enrollment::NotEnrolled,
    };
    let name = if w.name.is_empty() {
        w.uid.clone()
    } else {
        w.name.clone()
    };
    let workload_name = if w.workload_name.is_empty() {
        name.clone()
    } else {
        w.workload_name.clone()
    };
    let (default_name, default_revision) = Workload::canonical(&BTreeMap::new(), &workload_name);
    let or = |v: &str, d: String| if v.is_empty() { d } else { v.to_string() };
    Ok(WorkloadEntry {
        workload: Workload {
            uid: w.uid.clone(),
            name,
            namespace: w.namespace.clone(),
            service_account: or(&w.service_account, "default".into()),
            node: w.node.clone(),
            ips,
            labels: BTreeMap::new(),
            named_ports: BTreeMap::new(),
            enrollment,
            canonical_name: or(&w.canonical_name, default_name),
            canonical_revision: or(&w.canonical_revision, default_revision),
            workload_name,
        },
        trust_domain: w.trust_domain,
        healthy: w.status != xw::WorkloadStatus::Unhealthy as i32,
        services,
        policies: w.authorization_policies,
    })
}

fn service(s: xw::Service) -> Result<ServiceEntry, String> {
    if s.name.is_empty() || s.namespace.is_empty() || s.hostname.is_empty() {
        return Err(format!(
            "service {}/{}: name, namespace and hostname are required",
            s.namespace, s.hostname
        ));
    }
    let key = format!("{}/{}", s.namespace, s.hostname);
    let ctx = |e: String| format!("service {key}: {e}");
    let mut vips = Vec::new();
    for (i, a) in s.addresses.iter().enumerate() {
        let ip = ip_from_bytes(&a.address, &format!("addresses[{i}].address")).map_err(ctx)?;
        if !vips.contains(&ip) {
            vips.push(ip);
        }
    }
    let ports = ports(&s.ports, "ports").map_err(ctx)?;
    Ok(ServiceEntry {
        service: Service {
            name: s.name,
            namespace: s.namespace,
            vips,
            ports: Vec::new(),
            selector: BTreeMap::new(),
            endpoints: Vec::new(),
            labels: Default::default(),
        },
        key,
        ports,
    })
}

// === Authorization ===

/// Checks and translates one `Authorization`. The scope of a `WORKLOAD_SELECTOR` policy is
/// left empty here; [`assemble`] fills in the workloads that name it.
pub fn authorization(a: xsec::Authorization) -> Result<AuthorizationPolicy, String> {
    if a.name.is_empty() || a.namespace.is_empty() {
        return Err(format!(
            "authorization {}/{}: name and namespace are required",
            a.namespace, a.name
        ));
    }
    let ctx = |e: String| format!("authorization {}/{}: {e}", a.namespace, a.name);
    let scope = match xsec::Scope::try_from(a.scope) {
        Ok(xsec::Scope::Global) => PolicyScope::Mesh,
        Ok(xsec::Scope::Namespace) => PolicyScope::Namespace,
        Ok(xsec::Scope::WorkloadSelector) => PolicyScope::Workloads(BTreeSet::new()),
        Err(_) => return Err(ctx(format!("unknown scope {}", a.scope))),
    };
    let action = match xsec::Action::try_from(a.action) {
        Ok(xsec::Action::Allow) => Action::Allow,
        Ok(xsec::Action::Deny) => Action::Deny,
        Err(_) => return Err(ctx(format!("unknown action {}", a.action))),
    };
    let mut rules = Vec::new();
    for (i, rule) in a.rules.iter().enumerate() {
        rules.extend(translate_rule(rule).map_err(|e| ctx(format!("rules[{i}]: {e}")))?);
    }
    Ok(AuthorizationPolicy {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        spec: AuthorizationPolicySpec {
            rules,
            action,
            scope,
            dry_run: a.dry_run,
            ..AuthorizationPolicySpec::default()
        },
    })
}

/// One match, parsed: each field a positive and a negative list.
#[derive(Default)]
struct MatchParts {
    namespaces: (Vec<StringMatch>, Vec<StringMatch>),
    principals: (Vec<StringMatch>, Vec<StringMatch>),
    /// `service_accounts` as principal suffixes.
    accounts: (Vec<StringMatch>, Vec<StringMatch>),
    source_ips: (Vec<IpNet>, Vec<IpNet>),
    destination_ips: (Vec<IpNet>, Vec<IpNet>),
    ports: (Vec<PortNumber>, Vec<PortNumber>),
}

fn both_empty<T>(p: &(Vec<T>, Vec<T>)) -> bool {
    p.0.is_empty() && p.1.is_empty()
}

impl MatchParts {
    fn parse(m: &xsec::Match) -> Result<MatchParts, String> {
        let strings = |l: &[xsec::StringMatch], what: &str| {
            l.iter()
                .enumerate()
                .map(|(i, s)| string_match(s).ok_or_else(|| format!("{what}[{i}]: no match type")))
                .collect::<Result<Vec<_>, _>>()
        };
        let accounts = |l: &[xsec::ServiceAccountMatch], what: &str| {
            l.iter()
                .enumerate()
                .map(|(i, sa)| {
                    if sa.namespace.is_empty() || sa.service_account.is_empty() {
                        Err(format!(
                            "{what}[{i}]: namespace and serviceAccount are required"
                        ))
                    } else {
                        Ok(StringMatch::Suffix(format!(
                            "/ns/{}/sa/{}",
                            sa.namespace, sa.service_account
                        )))
                    }
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let cidrs = |l: &[xsec::Address], what: &str| {
            l.iter()
                .enumerate()
                .map(|(i, a)| {
                    let ip = ip_from_bytes(&a.address, &format!("{what}[{i}]"))?;
                    let len = u8::try_from(a.length).unwrap_or(u8::MAX);
                    IpNet::new(ip, len).map(|n| n.trunc()).map_err(|_| {
                        format!("{what}[{i}]: /{} is not a prefix length for {ip}", a.length)
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let port_list = |l: &[u32], what: &str| {
            l.iter()
                .enumerate()
                .map(|(i, p)| port(*p, &format!("{what}[{i}]"), false).map(PortNumber))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(MatchParts {
            namespaces: (
                strings(&m.namespaces, "namespaces")?,
                strings(&m.not_namespaces, "not_namespaces")?,
            ),
            principals: (
                strings(&m.principals, "principals")?,
                strings(&m.not_principals, "not_principals")?,
            ),
            accounts: (
                accounts(&m.service_accounts, "service_accounts")?,
                accounts(&m.not_service_accounts, "not_service_accounts")?,
            ),
            source_ips: (
                cidrs(&m.source_ips, "source_ips")?,
                cidrs(&m.not_source_ips, "not_source_ips")?,
            ),
            destination_ips: (
                cidrs(&m.destination_ips, "destination_ips")?,
                cidrs(&m.not_destination_ips, "not_destination_ips")?,
            ),
            ports: (
                port_list(&m.destination_ports, "destination_ports")?,
                port_list(&m.not_destination_ports, "not_destination_ports")?,
            ),
        })
    }

    /// ztunnel skips a match with no field set: it never matches.
    fn is_empty(&self) -> bool {
        both_empty(&self.namespaces)
            && both_empty(&self.principals)
            && both_empty(&self.accounts)
            && both_empty(&self.source_ips)
            && both_empty(&self.destination_ips)
            && both_empty(&self.ports)
    }

    /// The match as one CRD `Source`, if it only tests the source and its principal tests
    /// fit one list (negative lists always merge: "none of A and none of B" is "none of
    /// A ∪ B"; positive ones only if one side is empty).
    fn as_source(&self) -> Option<Source> {
        if !both_empty(&self.destination_ips) || !both_empty(&self.ports) {
            return None;
        }
        if !self.principals.0.is_empty() && !self.accounts.0.is_empty() {
            return None;
        }
        let mut principals = self.principals.0.clone();
        principals.extend(self.accounts.0.iter().cloned());
        let mut not_principals = self.principals.1.clone();
        not_principals.extend(self.accounts.1.iter().cloned());
        Some(Source {
            principals,
            not_principals,
            namespaces: self.namespaces.0.clone(),
            not_namespaces: self.namespaces.1.clone(),
            ip_blocks: self.source_ips.0.iter().map(|n| IpBlock(*n)).collect(),
            not_ip_blocks: self.source_ips.1.iter().map(|n| IpBlock(*n)).collect(),
            ..Source::default()
        })
    }

    /// The match as one CRD `Operation`, if it only tests destination ports.
    fn as_operation(&self) -> Option<Operation> {
        let only_ports = both_empty(&self.namespaces)
            && both_empty(&self.principals)
            && both_empty(&self.accounts)
            && both_empty(&self.source_ips)
            && both_empty(&self.destination_ips);
        only_ports.then(|| Operation {
            ports: self.ports.0.clone(),
            not_ports: self.ports.1.clone(),
            ..Operation::default()
        })
    }

    /// The match as `when` conditions (all must hold), one per field tested.
    fn as_conditions(&self) -> Vec<Condition> {
        fn cond<T: ToString>(
            key: ConditionKey,
            (pos, neg): &(Vec<T>, Vec<T>),
            out: &mut Vec<Condition>,
        ) {
            if pos.is_empty() && neg.is_empty() {
                return;
            }
            let exact = |l: &Vec<T>| {
                l.iter()
                    .map(|v| StringMatch::Exact(v.to_string()))
                    .collect()
            };
            out.push(Condition {
                key,
                values: exact(pos),
                not_values: exact(neg),
            });
        }
        fn matches(
            key: ConditionKey,
            (pos, neg): &(Vec<StringMatch>, Vec<StringMatch>),
            out: &mut Vec<Condition>,
        ) {
            if !pos.is_empty() || !neg.is_empty() {
                out.push(Condition {
                    key,
                    values: pos.clone(),
                    not_values: neg.clone(),
                });
            }
        }
        let mut out = Vec::new();
        matches(ConditionKey::SourceNamespace, &self.namespaces, &mut out);
        matches(ConditionKey::SourcePrincipal, &self.principals, &mut out);
        matches(ConditionKey::SourcePrincipal, &self.accounts, &mut out);
        cond(ConditionKey::SourceIp, &self.source_ips, &mut out);
        cond(ConditionKey::DestinationIp, &self.destination_ips, &mut out);
        let ports = (
            self.ports.0.iter().map(|p| p.0).collect::<Vec<_>>(),
            self.ports.1.iter().map(|p| p.0).collect::<Vec<_>>(),
        );
        cond(ConditionKey::DestinationPort, &ports, &mut out);
        out
    }
}

fn string_match(s: &xsec::StringMatch) -> Option<StringMatch> {
    use xsec::string_match::MatchType;
    Some(match s.match_type.as_ref()? {
        MatchType::Exact(v) => StringMatch::Exact(v.clone()),
        MatchType::Prefix(v) => StringMatch::Prefix(v.clone()),
        MatchType::Suffix(v) => StringMatch::Suffix(v.clone()),
        MatchType::Presence(_) => StringMatch::Any,
    })
}

/// One xDS rule as equivalent CRD rules (OR-ed); empty when it can never match.
fn translate_rule(rule: &xsec::Rule) -> Result<Vec<Rule>, String> {
    // All partial rules share which of from/to are taken: distribution only adds `when`.
    let mut partial = vec![Rule::default()];
    for (ci, clause) in rule.clauses.iter().enumerate() {
        if clause.matches.is_empty() {
            // A clause without matches always matches.
            continue;
        }
        let mut parts = Vec::new();
        for (mi, m) in clause.matches.iter().enumerate() {
            let p = MatchParts::parse(m).map_err(|e| format!("clauses[{ci}].matches[{mi}].{e}"))?;
            if !p.is_empty() {
                parts.push(p);
            }
        }
        if parts.is_empty() {
            // Only empty matches: the clause, so the rule, never matches.
            return Ok(Vec::new());
        }
        let from_free = partial[0].from.is_empty();
        let to_free = partial[0].to.is_empty();
        let sources: Option<Vec<Source>> = parts.iter().map(MatchParts::as_source).collect();
        let operations: Option<Vec<Operation>> =
            parts.iter().map(MatchParts::as_operation).collect();
        match (sources, operations) {
            (Some(sources), _) if from_free => {
                for r in &mut partial {
                    r.from = sources
                        .iter()
                        .map(|s| RuleFrom { source: s.clone() })
                        .collect();
                }
            }
            (_, Some(ops)) if to_free => {
                for r in &mut partial {
                    r.to = ops
                        .iter()
                        .map(|o| RuleTo {
                            operation: o.clone(),
                        })
                        .collect();
                }
            }
            _ if parts.len() == 1 => {
                let conds = parts[0].as_conditions();
                for r in &mut partial {
                    r.when.extend(conds.iter().cloned());
                }
            }
            _ => {
                if partial.len() * parts.len() > MAX_RULES_PER_RULE {
                    return Err(format!(
                        "expands into more than {MAX_RULES_PER_RULE} rules; refusing it"
                    ));
                }
                let mut next = Vec::with_capacity(partial.len() * parts.len());
                for r in &partial {
                    for p in &parts {
                        let mut r = r.clone();
                        r.when.extend(p.as_conditions());
                        next.push(r);
                    }
                }
                partial = next;
            }
        }
    }
    Ok(partial)
}

// === Assembly ===

/// The accepted resources and what spans them, kept so that a change to a few resources
/// becomes the few [`Edit`]s that bring the mesh in step, not a re-assembly of everything.
///
/// What spans resources, and so what a change re-derives:
/// - a service's endpoints and target ports come from the workloads naming it: a workload
///   change re-derives the services it named before and names now;
/// - a workload's named ports come from the services it backs (per-endpoint target ports):
///   it is re-derived when it changes, and every workload naming a service is when that
///   service's derived ports change;
/// - a selector policy's scope is the workloads naming it: it is re-derived when one of
///   them starts or stops naming it.
#[derive(Debug, Default)]
pub struct Assembly {
    trust_domain: String,
    /// Address resources by resource name.
    addresses: BTreeMap<String, AddressEntry>,
    /// Authorization resources by resource name.
    policies: BTreeMap<String, AuthorizationPolicy>,
    /// Service key → resource names of the workloads naming it (its endpoint order).
    backing: HashMap<String, BTreeSet<String>>,
    /// Service key → resource name of the service.
    service_names: HashMap<String, String>,
    /// Service key → its ports as last derived (to tell when endpoints' ports change).
    derived_ports: HashMap<String, Vec<ServicePort>>,
    /// Policy key `<namespace>/<name>` → uids of the workloads naming it.
    selecting: HashMap<String, BTreeSet<String>>,
    /// Policy key → resource name of the policy.
    policy_names: HashMap<String, String>,
    /// Per-workload warnings, by resource name.
    warned: BTreeMap<String, String>,
}

/// What a batch of changes touches, to be re-derived.
#[derive(Default)]
struct Dirty {
    workloads: BTreeSet<String>,
    services: BTreeSet<String>,
    policies: BTreeSet<String>,
}

impl Assembly {
    /// An empty assembly for a mesh of `trust_domain`.
    pub fn new(trust_domain: &str) -> Assembly {
        Assembly {
            trust_domain: trust_domain.to_string(),
            ..Assembly::default()
        }
    }

    /// Applies a batch of address changes (removals first); returns the edits that take
    /// the mesh of the resources before to the mesh of the resources after.
    pub fn update_addresses(
        &mut self,
        upserts: Vec<(String, AddressEntry)>,
        removed: &[String],
    ) -> Vec<Edit> {
        let mut dirty = Dirty::default();
        let mut edits = Vec::new();
        for name in removed {
            if let Some(old) = self.addresses.remove(name) {
                self.unlink(name, &old, &mut dirty);
                if let AddressEntry::Workload(w) = &old {
                    edits.push(Edit::RemoveWorkload(w.workload.uid.clone()));
                }
            }
        }
        for (name, entry) in upserts {
            if let Some(old) = self.addresses.remove(&name) {
                self.unlink(&name, &old, &mut dirty);
                if let (AddressEntry::Workload(o), AddressEntry::Workload(n)) = (&old, &entry) {
                    if o.workload.uid != n.workload.uid {
                        edits.push(Edit::RemoveWorkload(o.workload.uid.clone()));
                    }
                } else if let AddressEntry::Workload(o) = &old {
                    edits.push(Edit::RemoveWorkload(o.workload.uid.clone()));
                }
            }
            self.link(&name, &entry, &mut dirty);
            self.addresses.insert(name, entry);
        }
        self.derive(dirty, edits)
    }

    /// Applies a batch of authorization changes (removals first); returns the edits.
    pub fn update_policies(
        &mut self,
        upserts: Vec<(String, AuthorizationPolicy)>,
        removed: &[String],
    ) -> Vec<Edit> {
        let mut dirty = Dirty::default();
        let mut edits = Vec::new();
        for name in removed {
            if let Some(old) = self.policies.remove(name) {
                let key = format!("{}/{}", old.namespace, old.name);
                if self.policy_names.get(&key) == Some(name) {
                    self.policy_names.remove(&key);
                }
                edits.push(Edit::RemovePolicy {
                    kind: PolicyKind::AuthorizationPolicy,
                    namespace: old.namespace,
                    name: old.name,
                });
            }
        }
        for (name, p) in upserts {
            let key = format!("{}/{}", p.namespace, p.name);
            if let Some(old) = self.policies.insert(name.clone(), p) {
                let old_key = format!("{}/{}", old.namespace, old.name);
                if old_key != key {
                    self.policy_names.remove(&old_key);
                    edits.push(Edit::RemovePolicy {
                        kind: PolicyKind::AuthorizationPolicy,
                        namespace: old.namespace,
                        name: old.name,
                    });
                }
            }
            self.policy_names.insert(key.clone(), name);
            dirty.policies.insert(key);
        }
        self.derive(dirty, edits)
    }

    /// The whole mesh of the resources held, with the warnings that do not need an index
    /// (per-workload ones and policies named but not sent).
    pub fn mesh(&self) -> (Mesh, Vec<String>) {
        let mut dirty = Dirty::default();
        for (name, entry) in &self.addresses {
            match entry {
                AddressEntry::Workload(w) => {
                    dirty.workloads.insert(name.clone());
                    dirty.policies.extend(w.policies.iter().cloned());
                }
                AddressEntry::Service(s) => {
                    dirty.services.insert(s.key.clone());
                }
            }
        }
        dirty.policies.extend(self.policy_names.keys().cloned());
        let mut mesh = Mesh::default();
        // Policies in resource-name order, as a first sync delivers them.
        let mut policies: Vec<(&String, Policy)> = Vec::new();
        for edit in self.derive_from(&dirty) {
            match edit {
                Edit::UpsertWorkload(w) => mesh.insert_workload(w),
                Edit::UpsertService { key, service } => {
                    mesh.services.insert(key, Arc::new(service));
                }
                Edit::UpsertPolicy(p) => {
                    let (ns, n) = p.key();
                    if let Some(name) = self.policy_names.get(&format!("{ns}/{n}")) {
                        policies.push((name, p));
                    }
                }
                _ => {}
            }
        }
        policies.sort_by(|a, b| a.0.cmp(b.0));
        mesh.policies = policies.into_iter().map(|(_, p)| p).collect();
        (mesh, self.warnings())
    }

    /// Per-workload warnings and policies named but not sent, sorted.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings: Vec<String> = self.warned.values().cloned().collect();
        for (policy, uids) in &self.selecting {
            if !self.policy_names.contains_key(policy) {
                warnings.push(format!(
                    "{} workload(s) name policy {policy}, which istiod has not sent (yet)",
                    uids.len()
                ));
            }
        }
        warnings.sort();
        warnings
    }

    /// Forgets what `entry` (under `name`) contributed to the cross-resource indexes.
    fn unlink(&mut self, name: &str, entry: &AddressEntry, dirty: &mut Dirty) {
        match entry {
            AddressEntry::Workload(w) => {
                self.warned.remove(name);
                for key in w.services.keys() {
                    if let Some(set) = self.backing.get_mut(key) {
                        set.remove(name);
                        if set.is_empty() {
                            self.backing.remove(key);
                        }
                    }
                    dirty.services.insert(key.clone());
                }
                for p in &w.policies {
                    if let Some(set) = self.selecting.get_mut(p) {
                        set.remove(&w.workload.uid);
                        if set.is_empty() {
                            self.selecting.remove(p);
                        }
                    }
                    dirty.policies.insert(p.clone());
                }
                dirty.workloads.remove(name);
            }
            AddressEntry::Service(s) => {
                if self.service_names.get(&s.key).is_some_and(|n| n == name) {
                    self.service_names.remove(&s.key);
                }
                dirty.services.insert(s.key.clone());
            }
        }
    }

    /// Records what `entry` (under `name`) contributes to the cross-resource indexes.
    fn link(&mut self, name: &str, entry: &AddressEntry, dirty: &mut Dirty) {
        match entry {
            AddressEntry::Workload(w) => {
                let td = &self.trust_domain;
                if !w.trust_domain.is_empty() && w.trust_domain != *td {
                    self.warned.insert(
                        name.to_string(),
                        format!(
                            "workload {}: trust domain {:?} is not the mesh's {td:?}; its certificate is issued for the mesh's",
                            w.workload.uid, w.trust_domain
                        ),
                    );
                }
                for key in w.services.keys() {
                    self.backing
                        .entry(key.clone())
                        .or_default()
                        .insert(name.to_string());
                    dirty.services.insert(key.clone());
                }
                for p in &w.policies {
                    self.selecting
                        .entry(p.clone())
                        .or_default()
                        .insert(w.workload.uid.clone());
                    dirty.policies.insert(p.clone());
                }
                dirty.workloads.insert(name.to_string());
            }
            AddressEntry::Service(s) => {
                self.service_names.insert(s.key.clone(), name.to_string());
                dirty.services.insert(s.key.clone());
                // Its default target ports are its endpoints' too, even when its derived
                // ports stay the same.
                if let Some(names) = self.backing.get(&s.key) {
                    dirty.workloads.extend(names.iter().cloned());
                }
            }
        }
    }

    /// Re-derives what is dirty, after `edits` (removals) already decided.
    fn derive(&mut self, mut dirty: Dirty, mut edits: Vec<Edit>) -> Vec<Edit> {
        // Services first: a change of their derived ports makes their workloads dirty.
        for key in &dirty.services {
            let derived = self.service(key).map(|(svc, _)| svc);
            let ports = derived.as_ref().map(|s| s.ports.clone());
            let existed = self.derived_ports.contains_key(key);
            if ports != self.derived_ports.get(key).cloned() {
                if let Some(names) = self.backing.get(key) {
                    dirty.workloads.extend(names.iter().cloned());
                }
                match ports {
                    Some(p) => self.derived_ports.insert(key.clone(), p),
                    None => self.derived_ports.remove(key),
                };
            }
            match derived {
                Some(service) => edits.push(Edit::UpsertService {
                    key: key.clone(),
                    service,
                }),
                None if existed => edits.push(Edit::RemoveService(key.clone())),
                None => {}
            }
        }
        dirty.services.clear();
        edits.extend(self.derive_from(&dirty));
        edits
    }

    /// Upserts for the dirty services, workloads and policies, as they derive now.
    fn derive_from(&self, dirty: &Dirty) -> Vec<Edit> {
        let mut edits = Vec::new();
        for key in &dirty.services {
            if let Some((service, _)) = self.service(key) {
                edits.push(Edit::UpsertService {
                    key: key.clone(),
                    service,
                });
            }
        }
        for name in &dirty.workloads {
            if let Some(AddressEntry::Workload(w)) = self.addresses.get(name) {
                edits.push(Edit::UpsertWorkload(self.workload(w)));
            }
        }
        for key in &dirty.policies {
            let Some(p) = self
                .policy_names
                .get(key)
                .and_then(|n| self.policies.get(n))
            else {
                continue;
            };
            let mut p = p.clone();
            if let PolicyScope::Workloads(uids) = &mut p.spec.scope {
                *uids = self.selecting.get(key).cloned().unwrap_or_default();
            }
            edits.push(Edit::UpsertPolicy(Policy::AuthorizationPolicy(p)));
        }
        edits
    }

    /// The service under `key` with its endpoints and ports resolved, and its entry.
    fn service(&self, key: &str) -> Option<(Service, &ServiceEntry)> {
        let Some(AddressEntry::Service(s)) = self.addresses.get(self.service_names.get(key)?)
        else {
            return None;
        };
        let endpoints: Vec<&WorkloadEntry> = self
            .backing
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| match self.addresses.get(name) {
                Some(AddressEntry::Workload(w)) if is_endpoint(w) => Some(w),
                _ => None,
            })
            .collect();
        let mut svc = s.service.clone();
        svc.endpoints = endpoints.iter().map(|w| w.workload.uid.clone()).collect();
        for &(port, default_target) in &s.ports {
            let uniform = default_target != 0
                && endpoints
                    .iter()
                    .all(|w| target_of(s, w, port, default_target) == Some(default_target));
            let target_port = if uniform {
                TargetPort::Number(default_target)
            } else {
                // Resolved per endpoint, like a named Kubernetes targetPort; the name is
                // unique to this service port.
                TargetPort::Named(format!("{}:{port}", s.key))
            };
            svc.ports.push(ServicePort {
                name: String::new(),
                port,
                target_port,
            });
        }
        Some((svc, s))
    }

    /// The model workload: the entry's, with the named ports of the services it backs.
    fn workload(&self, w: &WorkloadEntry) -> Workload {
        let mut workload = w.workload.clone();
        if !is_endpoint(w) {
            return workload;
        }
        for key in w.services.keys() {
            let Some(ports) = self.derived_ports.get(key) else {
                continue;
            };
            let Some(AddressEntry::Service(s)) = self
                .service_names
                .get(key)
                .and_then(|n| self.addresses.get(n))
            else {
                continue;
            };
            for (&(port, default_target), derived) in s.ports.iter().zip(ports) {
                if let TargetPort::Named(name) = &derived.target_port {
                    if let Some(t) = target_of(s, w, port, default_target) {
                        workload.named_ports.insert(name.clone(), t);
                    }
                }
            }
        }
        workload
    }
}

/// Whether a workload naming a service is one of its endpoints.
fn is_endpoint(w: &WorkloadEntry) -> bool {
    w.healthy && !w.workload.ips.is_empty()
}

/// Where `port` of service `s` lands on `w`: its own target wins over the service's (as in
/// ztunnel).
fn target_of(s: &ServiceEntry, w: &WorkloadEntry, port: u16, default_target: u16) -> Option<u16> {
    w.services
        .get(&s.key)
        .and_then(|l| l.iter().find(|(sp, t)| *sp == port && *t != 0))
        .map(|(_, t)| *t)
        .or((default_target != 0).then_some(default_target))
}

/// Joins accepted resources into a mesh from scratch. `addresses` and `policies` are keyed
/// by resource name; `trust_domain` is the mesh's. IP conflicts are reported by the
/// snapshot ([`crate::state::Snapshot::ip_conflicts`]), not here.
pub fn assemble(
    addresses: &BTreeMap<String, AddressEntry>,
    policies: &BTreeMap<String, AuthorizationPolicy>,
    trust_domain: &str,
) -> (Mesh, Vec<String>) {
    let mut a = Assembly::new(trust_domain);
    a.update_addresses(
        addresses
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        &[],
    );
    a.update_policies(
        policies
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        &[],
    );
    a.mesh()
}

#[cfg(test)]
mod tests {
    use super::*;
    use xsec::string_match::MatchType;

    fn sm(v: MatchType) -> xsec::StringMatch {
        xsec::StringMatch {
            match_type: Some(v),
        }
    }

    fn exact(s: &str) -> xsec::StringMatch {
        sm(MatchType::Exact(s.into()))
    }

    fn policy(rules: Vec<xsec::Rule>) -> xsec::Authorization {
        xsec::Authorization {
            name: "p".into(),
            namespace: "ns1".into(),
            scope: xsec::Scope::Namespace as i32,
            action: xsec::Action::Allow as i32,
            rules,
            dry_run: false,
        }
    }

    fn clause(matches: Vec<xsec::Match>) -> xsec::Clause {
        xsec::Clause { matches }
    }

    #[test]
    fn istiod_shaped_rules_map_to_from_to_and_when() {
        // from: [ns1 | sa a in ns2], to: [port 80], when: destination.ip 10.0.0.0/8.
        let rule = xsec::Rule {
            clauses: vec![
                clause(vec![
                    xsec::Match {
                        namespaces: vec![exact("ns1")],
                        ..Default::default()
                    },
                    xsec::Match {
                        service_accounts: vec![xsec::ServiceAccountMatch {
                            namespace: "ns2".into(),
                            service_account: "a".into(),
                        }],
                        not_principals: vec![sm(MatchType::Prefix("evil".into()))],
                        ..Default::default()
                    },
                ]),
                clause(vec![xsec::Match {
                    destination_ports: vec![80],
                    ..Default::default()
                }]),
                clause(vec![xsec::Match {
                    destination_ips: vec![xsec::Address {
                        address: vec![10, 1, 2, 3],
                        length: 8,
                    }],
                    ..Default::default()
                }]),
            ],
        };
        let p = authorization(policy(vec![rule])).unwrap();
        assert_eq!(p.spec.scope, PolicyScope::Namespace);
        assert_eq!(p.spec.rules.len(), 1);
        let r = &p.spec.rules[0];
        assert_eq!(r.from.len(), 2);
        assert_eq!(
            r.from[0].source.namespaces,
            vec![StringMatch::Exact("ns1".into())]
        );
        assert_eq!(
            r.from[1].source.principals,
            vec![StringMatch::Suffix("/ns/ns2/sa/a".into())]
        );
        assert_eq!(
            r.from[1].source.not_principals,
            vec![StringMatch::Prefix("evil".into())]
        );
        assert_eq!(r.to[0].operation.ports, vec![PortNumber(80)]);
        assert_eq!(r.when.len(), 1);
        assert_eq!(r.when[0].key, ConditionKey::DestinationIp);
        assert_eq!(
            r.when[0].values,
            vec![StringMatch::Exact("10.0.0.0/8".into())]
        );
    }

    #[test]
    fn a_clause_that_fits_nowhere_is_distributed_into_rules() {
        // (principal x AND port 1) OR (namespace y): neither a Source nor an Operation.
        let rule = xsec::Rule {
            clauses: vec![clause(vec![
                xsec::Match {
                    principals: vec![exact("td/ns/a/sa/x")],
                    destination_ports: vec![1],
                    ..Default::default()
                },
                xsec::Match {
                    namespaces: vec![exact("y")],
                    ..Default::default()
                },
            ])],
        };
        // Rule with two such clauses would give 4 rules; one gives 2 when-only rules.
        let p = authorization(policy(vec![rule])).unwrap();
        assert_eq!(p.spec.rules.len(), 2);
        assert!(p
            .spec
            .rules
            .iter()
            .all(|r| r.from.is_empty() && r.to.is_empty()));
        let keys: Vec<Vec<String>> = p
            .spec
            .rules
            .iter()
            .map(|r| r.when.iter().map(|c| c.key.to_string()).collect())
            .collect();
        assert_eq!(
            keys,
            vec![
                vec![
                    "source.principal".to_string(),
                    "destination.port".to_string()
                ],
                vec!["source.namespace".to_string()]
            ]
        );
    }

    #[test]
    fn empty_matches_never_match_and_empty_clauses_always_do() {
        let never = xsec::Rule {
            clauses: vec![clause(vec![xsec::Match::default()])],
        };
        let always = xsec::Rule {
            clauses: vec![clause(vec![])],
        };
        let p = authorization(policy(vec![never, always])).unwrap();
        assert_eq!(p.spec.rules, vec![Rule::default()]);
    }

    #[test]
    fn malformed_authorizations_are_refused_with_their_place() {
        let bad_sm = policy(vec![xsec::Rule {
            clauses: vec![clause(vec![xsec::Match {
                principals: vec![xsec::StringMatch { match_type: None }],
                ..Default::default()
            }])],
        }]);
        let e = authorization(bad_sm).unwrap_err();
        assert!(
            e.contains("ns1/p: rules[0]: clauses[0].matches[0].principals[0]"),
            "{e}"
        );
        let bad_ip = policy(vec![xsec::Rule {
            clauses: vec![clause(vec![xsec::Match {
                source_ips: vec![xsec::Address {
                    address: vec![1, 2, 3],
                    length: 8,
                }],
                ..Default::default()
            }])],
        }]);
        assert!(authorization(bad_ip).unwrap_err().contains("3 bytes"));
        let mut bad_scope = policy(vec![]);
        bad_scope.scope = 9;
        assert!(authorization(bad_scope)
            .unwrap_err()
            .contains("unknown scope 9"));
    }

    fn wl(uid: &str, ip: [u8; 4], services: &[(&str, u32, u32)]) -> xw::Address {
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

    #[test]
    fn services_get_endpoints_and_per_endpoint_target_ports() {
        let mut addrs = BTreeMap::new();
        addrs.insert(
            "a".to_string(),
            address(wl("a", [10, 0, 0, 1], &[("ns1/web.ns1.svc", 80, 0)])).unwrap(),
        );
        addrs.insert(
            "b".to_string(),
            address(wl("b", [10, 0, 0, 2], &[("ns1/web.ns1.svc", 80, 9090)])).unwrap(),
        );
        let svc = xw::Address {
            r#type: Some(xw::address::Type::Service(xw::Service {
                name: "web".into(),
                namespace: "ns1".into(),
                hostname: "web.ns1.svc".into(),
                addresses: vec![xw::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 1],
                }],
                ports: vec![
                    xw::Port {
                        service_port: 80,
                        target_port: 8080,
                    },
                    xw::Port {
                        service_port: 443,
                        target_port: 8443,
                    },
                ],
            })),
        };
        addrs.insert("ns1/web.ns1.svc".to_string(), address(svc).unwrap());
        let mut sel = authorization(policy(vec![])).unwrap();
        sel.name = "sel".into();
        sel.spec.scope = PolicyScope::Workloads(BTreeSet::new());
        let policies = BTreeMap::from([("ns1/sel".to_string(), sel)]);
        let (mesh, warnings) = assemble(&addrs, &policies, "cluster.local");
        assert!(warnings.is_empty(), "{warnings:?}");
        let s = &mesh.services["ns1/web.ns1.svc"];
        assert_eq!(s.vips, vec!["10.96.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.endpoints, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(
            s.ports[0].target_port,
            TargetPort::Named("ns1/web.ns1.svc:80".into())
        );
        assert_eq!(s.ports[1].target_port, TargetPort::Number(8443));
        let port_of = |uid: &str| mesh.workloads[uid].named_ports["ns1/web.ns1.svc:80"];
        assert_eq!((port_of("a"), port_of("b")), (8080, 9090));
        let Policy::AuthorizationPolicy(p) = &mesh.policies[0] else {
            panic!()
        };
        assert_eq!(
            p.spec.scope,
            PolicyScope::Workloads(BTreeSet::from(["a".to_string(), "b".to_string()]))
        );
        assert!(mesh
            .workloads
            .values()
            .all(|w| w.enrollment == Enrollment::Enrolled));
    }

    #[test]
    fn malformed_addresses_are_refused() {
        assert!(address(xw::Address { r#type: None }).is_err());
        let mut bad = wl("a", [10, 0, 0, 1], &[]);
        if let Some(xw::address::Type::Workload(w)) = &mut bad.r#type {
            w.addresses = vec![vec![1, 2, 3, 4, 5]];
        }
        assert!(address(bad).unwrap_err().contains("5 bytes"));
        let bad_port = wl("a", [10, 0, 0, 1], &[("ns1/x", 70000, 1)]);
        assert!(address(bad_port)
            .unwrap_err()
            .contains("70000 is not a port"));
    }

    #[test]
    fn incremental_edits_give_the_mesh_assembled_from_scratch() {
        use crate::state::StateStore;
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        for seed in 0..6 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut assembly = Assembly::new("cluster.local");
            let store = StateStore::new("test");
            store.publish(Mesh::default(), vec![]);
            let mut addrs: BTreeMap<String, AddressEntry> = BTreeMap::new();
            let mut pols: BTreeMap<String, AuthorizationPolicy> = BTreeMap::new();
            for _ in 0..300 {
                let edits = if rng.random_bool(0.8) {
                    let mut upserts = Vec::new();
                    let mut removed = Vec::new();
                    for _ in 0..rng.random_range(1..4) {
                        let r = rng.random_range(0..10);
                        if rng.random_bool(0.2) {
                            let name = if r < 7 {
                                format!("w{r}")
                            } else {
                                format!("ns1/s{}.ns1.svc", r - 7)
                            };
                            if !upserts.iter().any(|(n, _)| *n == name) {
                                removed.push(name);
                            }
                        } else if r < 7 {
                            let svcs: Vec<(String, u32, u32)> = (0..rng.random_range(0..3))
                                .map(|_| {
                                    (
                                        format!("ns1/s{}.ns1.svc", rng.random_range(0..3)),
                                        80,
                                        [0, 8080, 9090][rng.random_range(0..3)],
                                    )
                                })
                                .collect();
                            let svcs: Vec<(&str, u32, u32)> =
                                svcs.iter().map(|(k, p, t)| (k.as_str(), *p, *t)).collect();
                            let mut a =
                                wl(&format!("w{r}"), [10, 0, 0, rng.random_range(0..9)], &svcs);
                            if let Some(xw::address::Type::Workload(w)) = &mut a.r#type {
                                w.authorization_policies =
                                    vec![format!("ns1/sel{}", rng.random_range(0..2))];
                                if rng.random_bool(0.2) {
                                    w.status = xw::WorkloadStatus::Unhealthy as i32;
                                }
                            }
                            let name = format!("w{r}");
                            removed.retain(|n| *n != name);
                            upserts.push((name, address(a).unwrap()));
                        } else {
                            let i = r - 7;
                            let svc = xw::Address {
                                r#type: Some(xw::address::Type::Service(xw::Service {
                                    name: "web".into(),
                                    namespace: "ns1".into(),
                                    hostname: format!("s{i}.ns1.svc"),
                                    addresses: vec![xw::NetworkAddress {
                                        network: String::new(),
                                        address: vec![10, 96, 0, rng.random_range(0..3)],
                                    }],
                                    ports: vec![xw::Port {
                                        service_port: 80,
                                        target_port: [0, 8080][rng.random_range(0..2)],
                                    }],
                                })),
                            };
                            let name = format!("ns1/s{i}.ns1.svc");
                            removed.retain(|n| *n != name);
                            upserts.push((name, address(svc).unwrap()));
                        }
                    }
                    for n in &removed {
                        addrs.remove(n);
                    }
                    addrs.extend(upserts.iter().cloned());
                    assembly.update_addresses(upserts, &removed)
                } else {
                    let i = rng.random_range(0..3);
                    let name = format!("ns1/sel{i}");
                    if rng.random_bool(0.3) {
                        pols.remove(&name);
                        assembly.update_policies(Vec::new(), &[name])
                    } else {
                        let mut p = authorization(policy(vec![])).unwrap();
                        p.name = format!("sel{i}");
                        p.spec.scope = PolicyScope::Workloads(BTreeSet::new());
                        p.spec.dry_run = rng.random_bool(0.5);
                        pols.insert(name.clone(), p.clone());
                        assembly.update_policies(vec![(name, p)], &[])
                    }
                };
                store.apply(edits);
                let snap = store.snapshot();
                let (mesh, _) = assemble(&addrs, &pols, "cluster.local");
                assert_eq!(snap.mesh.workloads, mesh.workloads, "seed {seed}");
                assert_eq!(snap.mesh.services, mesh.services, "seed {seed}");
                let sorted = |p: &imbl::Vector<Policy>| {
                    let mut v: Vec<Policy> = p.iter().cloned().collect();
                    v.sort_by(|a, b| a.key().cmp(&b.key()));
                    v
                };
                assert_eq!(
                    sorted(&snap.mesh.policies),
                    sorted(&mesh.policies),
                    "seed {seed}"
                );
            }
        }
    }
}
