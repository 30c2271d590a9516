//! The accepted resources joined into the mesh: [`Assembly`] keeps the address and
//! authorization entries and turns each change into the [`Edit`]s of the mesh, re-deriving
//! only what spans the changed resources (service endpoints and their target ports, the
//! workloads a selector policy applies to); [`assemble`] is the same from scratch. Neither
//! fails, but they report oddities as warnings (IPs claimed twice are the snapshot's to
//! report).
//!
//! Owns the cross-resource indexes. Does not check or translate a single resource (that is
//! `address` and `authorization`), and holds no I/O or protocol state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::address::{AddressEntry, ServiceEntry, WorkloadEntry};
use crate::model::policy::PolicyScope;
use crate::model::{
    AuthorizationPolicy, Mesh, Policy, PolicyKind, Service, ServicePort, TargetPort, Workload,
};
use crate::state::Edit;

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
                    edits.push(Edit::RemoveWorkload(w.workload.uid.to_string()));
                }
            }
        }
        for (name, entry) in upserts {
            if let Some(old) = self.addresses.remove(&name) {
                self.unlink(&name, &old, &mut dirty);
                if let (AddressEntry::Workload(o), AddressEntry::Workload(n)) = (&old, &entry) {
                    if o.workload.uid != n.workload.uid {
                        edits.push(Edit::RemoveWorkload(o.workload.uid.to_string()));
                    }
                } else if let AddressEntry::Workload(o) = &old {
                    edits.push(Edit::RemoveWorkload(o.workload.uid.to_string()));
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
                        set.remove(w.workload.uid.as_str());
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
                        .insert(w.workload.uid.to_string());
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
        svc.endpoints = endpoints
            .iter()
            .map(|w| w.workload.uid.to_string())
            .collect();
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
    use std::net::IpAddr;

    use super::super::address::address;
    use super::super::authorization::authorization;
    use super::super::fixtures::{policy, wl};
    use super::*;
    use crate::model::Enrollment;
    use crate::proto::istio::workload as xw;
    use proptest::collection::vec;
    use proptest::prelude::*;

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
                waypoint: None,
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
        let port_of = |uid: &str| {
            mesh.workloads[uid]
                .named_ports
                .get("ns1/web.ns1.svc:80")
                .copied()
                .unwrap_or(0)
        };
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

    /// One change of a random sequence: a response's addresses, or one selector policy.
    #[derive(Clone, Debug)]
    enum Change {
        /// Upserts and removals of one address response.
        Addresses(Vec<AddressOp>),
        /// `ns1/sel<i>` upserted (dry-run or not) or removed.
        Policy { i: u8, remove: bool, dry_run: bool },
    }

    /// One address of a response.
    #[derive(Clone, Debug)]
    enum AddressOp {
        /// Removes `w<r>` (r < 7) or service `s<r-7>`.
        Remove(u8),
        /// Upserts workload `w<r>` at 10.0.0.`ip`, in services `s<svc>` with a target port
        /// (0, 8080 or 9090 by index), bound to `ns1/sel<sel>`.
        Workload {
            r: u8,
            ip: u8,
            services: Vec<(u8, usize)>,
            sel: u8,
            unhealthy: bool,
        },
        /// Upserts service `s<i>` at 10.96.0.`vip`, target port 0 or 8080 by index.
        Service { i: u8, vip: u8, target: usize },
    }

    fn address_op() -> impl Strategy<Value = AddressOp> {
        prop_oneof![
            2 => (0..10u8).prop_map(AddressOp::Remove),
            6 => (
                0..7u8,
                0..9u8,
                vec((0..3u8, 0..3usize), 0..3),
                0..2u8,
                proptest::bool::weighted(0.2),
            )
                .prop_map(|(r, ip, services, sel, unhealthy)| AddressOp::Workload {
                    r,
                    ip,
                    services,
                    sel,
                    unhealthy,
                }),
            2 => (0..3u8, 0..3u8, 0..2usize)
                .prop_map(|(i, vip, target)| AddressOp::Service { i, vip, target }),
        ]
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            8 => vec(address_op(), 1..4).prop_map(Change::Addresses),
            2 => (0..3u8, proptest::bool::weighted(0.3), any::<bool>())
                .prop_map(|(i, remove, dry_run)| Change::Policy { i, remove, dry_run }),
        ]
    }

    fn service_name(i: u8) -> String {
        format!("ns1/s{i}.ns1.svc")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Random responses applied as edits to a store give, after each one, the mesh
        /// assembled from scratch from every resource held (a failure shrinks to the shortest
        /// sequence that shows it).
        #[test]
        fn incremental_edits_give_the_mesh_assembled_from_scratch(
            changes in vec(change(), 1..150)
        ) {
            use crate::state::StateStore;
            let mut assembly = Assembly::new("cluster.local");
            let store = StateStore::new("test");
            store.publish(Mesh::default(), vec![]);
            let mut addrs: BTreeMap<String, AddressEntry> = BTreeMap::new();
            let mut pols: BTreeMap<String, AuthorizationPolicy> = BTreeMap::new();
            for change in changes {
                let edits = match change {
                    Change::Addresses(ops) => {
                        let mut upserts = Vec::new();
                        let mut removed = Vec::new();
                        for op in ops {
                            match op {
                                AddressOp::Remove(r) => {
                                    let name = if r < 7 {
                                        format!("w{r}")
                                    } else {
                                        service_name(r - 7)
                                    };
                                    if !upserts.iter().any(|(n, _)| *n == name) {
                                        removed.push(name);
                                    }
                                }
                                AddressOp::Workload { r, ip, services, sel, unhealthy } => {
                                    let svcs: Vec<(String, u32, u32)> = services
                                        .iter()
                                        .map(|&(s, t)| (service_name(s), 80, [0, 8080, 9090][t]))
                                        .collect();
                                    let svcs: Vec<(&str, u32, u32)> =
                                        svcs.iter().map(|(k, p, t)| (k.as_str(), *p, *t)).collect();
                                    let mut a = wl(&format!("w{r}"), [10, 0, 0, ip], &svcs);
                                    if let Some(xw::address::Type::Workload(w)) = &mut a.r#type {
                                        w.authorization_policies = vec![format!("ns1/sel{sel}")];
                                        if unhealthy {
                                            w.status = xw::WorkloadStatus::Unhealthy as i32;
                                        }
                                    }
                                    let name = format!("w{r}");
                                    removed.retain(|n| *n != name);
                                    upserts.push((name, address(a).unwrap()));
                                }
                                AddressOp::Service { i, vip, target } => {
                                    let svc = xw::Address {
                                        r#type: Some(xw::address::Type::Service(xw::Service {
                                            name: "web".into(),
                                            namespace: "ns1".into(),
                                            hostname: format!("s{i}.ns1.svc"),
                                            addresses: vec![xw::NetworkAddress {
                                                network: String::new(),
                                                address: vec![10, 96, 0, vip],
                                            }],
                                            ports: vec![xw::Port {
                                                service_port: 80,
                                                target_port: [0, 8080][target],
                                            }],
                                            waypoint: None,
                                        })),
                                    };
                                    let name = service_name(i);
                                    removed.retain(|n| *n != name);
                                    upserts.push((name, address(svc).unwrap()));
                                }
                            }
                        }
                        for n in &removed {
                            addrs.remove(n);
                        }
                        addrs.extend(upserts.iter().cloned());
                        assembly.update_addresses(upserts, &removed)
                    }
                    Change::Policy { i, remove, dry_run } => {
                        let name = format!("ns1/sel{i}");
                        if remove {
                            pols.remove(&name);
                            assembly.update_policies(Vec::new(), &[name])
                        } else {
                            let mut p = authorization(policy(vec![])).unwrap();
                            p.name = format!("sel{i}");
                            p.spec.scope = PolicyScope::Workloads(BTreeSet::new());
                            p.spec.dry_run = dry_run;
                            pols.insert(name.clone(), p.clone());
                            assembly.update_policies(vec![(name, p)], &[])
                        }
                    }
                };
                store.apply(edits);
                let snap = store.snapshot();
                let (mesh, _) = assemble(&addrs, &pols, "cluster.local");
                prop_assert_eq!(&snap.mesh.workloads, &mesh.workloads);
                prop_assert_eq!(&snap.mesh.services, &mesh.services);
                let sorted = |p: &imbl::Vector<Policy>| {
                    let mut v: Vec<Policy> = p.iter().cloned().collect();
                    v.sort_by(|a, b| a.key().cmp(&b.key()));
                    v
                };
                prop_assert_eq!(sorted(&snap.mesh.policies), sorted(&mesh.policies));
            }
        }
    }
}
