//! Watch events → [`Edit`]s of the state: the one place the Kubernetes source decides what a
//! change means for the mesh. Pure (no I/O): [`Applier::apply`] takes a batch of
//! [`Change`]s, converted from objects by `convert`, and edits a snapshot.
//!
//! Rules:
//! - **Readiness after every initial list.** Until each kind has finished its first list,
//!   edits go to a draft snapshot nobody sees; the first publish holds every kind.
//! - **A relist replaces its kind.** A list's objects are buffered until it ends; then what
//!   the list left out is removed and the rest upserted, in one snapshot. Until then the
//!   state in force stays (a slow or failing relist never empties it).
//! - **Edits, not rebuilds**: one object changes only what it owns. A namespace whose labels
//!   change re-decides the enrollment of its own pods; a pod whose facts did not change is
//!   no edit at all (status churn never bumps the generation).
//! - **Bad objects are skipped and named** (`Pod shop/web-1: status.podIP: ...`); an object
//!   that was good keeps its last good version in force until it is fixed or deleted.
//! - **EndpointSlices** give the endpoints of services without a selector: endpoints with
//!   a Pod `targetRef` by pod, others by the address of a known workload at the time.
//! - **A policy kind whose CRD is not served** counts as listed and empty, with a warning.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::model::{Namespace, Policy, PolicyKind, Service, Workload};
use crate::state::{Edit, Snapshot, StateStore};

/// The kinds the source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1` Namespace.
    Namespace,
    /// `v1` Pod.
    Pod,
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `security.istio.io` AuthorizationPolicy.
    AuthorizationPolicy,
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication,
    /// `security.istio.io` RequestAuthentication.
    RequestAuthentication,
}

impl Kind {
    /// Every kind, in the order their first lists are awaited.
    pub const ALL: [Kind; 7] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::RequestAuthentication,
    ];

    /// The Kubernetes kind name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
        }
    }

    fn policy(self) -> Option<PolicyKind> {
        match self {
            Kind::AuthorizationPolicy => Some(PolicyKind::AuthorizationPolicy),
            Kind::PeerAuthentication => Some(PolicyKind::PeerAuthentication),
            Kind::RequestAuthentication => Some(PolicyKind::RequestAuthentication),
            _ => None,
        }
    }
}

/// What weft keeps of one EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    /// The service it belongs to (`kubernetes.io/service-name`; empty: none).
    pub service: String,
    /// Its ready endpoints.
    pub endpoints: Vec<SliceEndpoint>,
}

/// One endpoint of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SliceEndpoint {
    /// A pod (`targetRef` kind Pod), by workload uid.
    Pod(String),
    /// An address without a pod reference.
    Ip(IpAddr),
}

/// What weft keeps of one object, converted from what the API server sent.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// A namespace (name and labels).
    Namespace(Namespace),
    /// A pod's workload, its enrollment not yet decided against its namespace; `None` for a
    /// pod that has ended.
    Pod(Option<Workload>),
    /// A service (endpoints empty).
    Service(Service),
    /// An EndpointSlice.
    Slice(Slice),
    /// A security policy.
    Policy(Policy),
}

/// One object as a watch delivered it.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// Its kind.
    pub kind: Kind,
    /// Its namespace (empty for a Namespace).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// What weft keeps of it, or why it is skipped (`field: reason`).
    pub item: Result<Item, String>,
}

/// One step of a watch.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A list of this kind starts (the first, or a relist).
    Listing(Kind),
    /// An object of the list in progress.
    Listed(Object),
    /// The list in progress ended: it replaces everything of its kind.
    ListDone(Kind),
    /// An object was added or modified.
    Applied(Object),
    /// An object was deleted.
    Deleted {
        /// Its kind.
        kind: Kind,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The kind's CRD is not served: the warning, and no objects of the kind.
    Missing(Kind, String),
    /// The kind's CRD is served again (after [`Change::Missing`]); a list follows.
    Found(Kind),
}

/// Turns watch changes into edits; see the module doc for the rules.
#[derive(Debug)]
pub struct Applier {
    /// Until the first publish: the snapshot being built.
    draft: Option<Snapshot>,
    /// Kinds whose first list has ended.
    listed: BTreeSet<Kind>,
    /// Lists in progress.
    listing: HashMap<Kind, Vec<Object>>,
    /// `(namespace, name)` → slice.
    slices: BTreeMap<(String, String), Slice>,
    /// Skipped objects by `(kind, namespace, name)`: the warning naming them.
    invalid: BTreeMap<(Kind, String, String), String>,
    /// Kinds whose CRD is not served: the warning.
    missing: BTreeMap<Kind, String>,
}

impl Default for Applier {
    fn default() -> Self {
        Applier::new()
    }
}

impl Applier {
    /// Nothing listed yet.
    pub fn new() -> Applier {
        Applier {
            draft: Some(Snapshot::default()),
            listed: BTreeSet::new(),
            listing: HashMap::new(),
            slices: BTreeMap::new(),
            invalid: BTreeMap::new(),
            missing: BTreeMap::new(),
        }
    }

    /// Whether every kind has been listed and the state published.
    pub fn ready(&self) -> bool {
        self.draft.is_none()
    }

    /// Skipped objects of `kind`.
    pub fn invalid_count(&self, kind: Kind) -> usize {
        self.invalid.keys().filter(|(k, _, _)| *k == kind).count()
    }

    /// Applies `changes`, in order: to the draft until every kind is listed (then publishes
    /// it whole), to the state in force after that (one new generation per batch that
    /// changed something).
    pub fn apply(&mut self, changes: Vec<Change>, store: &StateStore) {
        if let Some(mut draft) = self.draft.take() {
            for c in changes {
                self.change(&mut draft, c);
            }
            if Kind::ALL.iter().all(|k| self.listed.contains(k)) {
                let warnings = self.warnings(&draft);
                store.publish_snapshot(draft, warnings);
            } else {
                self.draft = Some(draft);
            }
            return;
        }
        let in_force = store.status().warnings.clone();
        store.update(|snap| {
            let mut changed = false;
            for c in changes {
                changed |= self.change(snap, c);
            }
            let warnings = self.warnings(snap);
            (changed || warnings != in_force).then_some(warnings)
        });
    }

    /// The load's warnings: CRDs not served, skipped objects, addresses claimed twice.
    fn warnings(&self, snap: &Snapshot) -> Vec<String> {
        self.missing
            .values()
            .chain(self.invalid.values())
            .cloned()
            .chain(snap.ip_conflicts())
            .collect()
    }

    /// One change; true when it edited `snap`.
    fn change(&mut self, snap: &mut Snapshot, c: Change) -> bool {
        match c {
            Change::Listing(kind) => {
                self.listing.insert(kind, Vec::new());
                false
            }
            Change::Listed(obj) => match self.listing.get_mut(&obj.kind) {
                Some(buf) => {
                    buf.push(obj);
                    false
                }
                None => self.upsert(snap, obj),
            },
            Change::ListDone(kind) => {
                let objects = self.listing.remove(&kind).unwrap_or_default();
                self.listed.insert(kind);
                self.replace(snap, kind, objects)
            }
            Change::Applied(obj) => {
                if let Some(buf) = self.listing.get_mut(&obj.kind) {
                    // Not expected (a watch applies only after its list), but keep order.
                    buf.push(obj);
                    return false;
                }
                self.upsert(snap, obj)
            }
            Change::Deleted {
                kind,
                namespace,
                name,
            } => {
                if let Some(buf) = self.listing.get_mut(&kind) {
                    buf.retain(|o| !(o.namespace == namespace && o.name == name));
                    return false;
                }
                self.remove(snap, kind, &namespace, &name)
            }
            Change::Missing(kind, warning) => {
                self.missing.insert(kind, warning);
                self.listing.remove(&kind);
                self.listed.insert(kind);
                self.replace(snap, kind, Vec::new())
            }
            Change::Found(kind) => {
                self.missing.remove(&kind);
                false
            }
        }
    }

    /// A list ended: `objects` are now all there is of `kind`.
    fn replace(&mut self, snap: &mut Snapshot, kind: Kind, objects: Vec<Object>) -> bool {
        let present: BTreeSet<(&str, &str)> = objects
            .iter()
            .map(|o| (o.namespace.as_str(), o.name.as_str()))
            .collect();
        let gone: Vec<(String, String)> = self
            .keys_of(snap, kind)
            .into_iter()
            .filter(|(ns, name)| !present.contains(&(ns.as_str(), name.as_str())))
            .collect();
        self.invalid.retain(|(k, ns, name), _| {
            *k != kind || present.contains(&(ns.as_str(), name.as_str()))
        });
        let mut changed = false;
        for (ns, name) in gone {
            changed |= self.remove(snap, kind, &ns, &name);
        }
        for obj in objects {
            changed |= self.upsert(snap, obj);
        }
        changed
    }

    /// `(namespace, name)` of every object of `kind` in force.
    fn keys_of(&self, snap: &Snapshot, kind: Kind) -> Vec<(String, String)> {
        let mesh = &snap.mesh;
        match kind {
            Kind::Namespace => mesh
                .namespaces
                .keys()
                .map(|n| (String::new(), n.clone()))
                .collect(),
            Kind::Pod => mesh
                .workloads
                .values()
                .map(|w| (w.namespace.to_string(), w.name.to_string()))
                .collect(),
            Kind::Service => mesh
                .services
                .values()
                .map(|s| (s.namespace.clone(), s.name.clone()))
                .collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::AuthorizationPolicy | Kind::PeerAuthentication | Kind::RequestAuthentication => {
                let pk = kind.policy();
                mesh.policies
                    .iter()
                    .filter(|p| Some(p.kind()) == pk)
                    .map(|p| {
                        let (ns, name) = p.key();
                        (ns.to_string(), name.to_string())
                    })
                    .collect()
            }
        }
    }

    fn upsert(&mut self, snap: &mut Snapshot, obj: Object) -> bool {
        let key = (obj.kind, obj.namespace, obj.name);
        let item = match obj.item {
            Ok(item) => item,
            Err(reason) => {
                let (kind, ns, name) = &key;
                let named = if ns.is_empty() {
                    format!("{} {name}: {reason}", kind.name())
                } else {
                    format!("{} {ns}/{name}: {reason}", kind.name())
                };
                tracing::warn!(object = %named, "skipping an invalid object; its last good version, if any, stays in force");
                self.invalid.insert(key, named);
                return false;
            }
        };
        self.invalid.remove(&key);
        let (_, ns, name) = key;
        match item {
            Item::Namespace(n) => self.upsert_namespace(snap, n),
            Item::Pod(Some(w)) => upsert_workload(snap, w),
            Item::Pod(None) => remove_workload(snap, &Workload::pod_uid(&ns, &name)),
            Item::Service(s) => self.upsert_service(snap, s),
            Item::Slice(slice) => {
                let old = self.slices.insert((ns.clone(), name), slice.clone());
                let mut changed = false;
                if let Some(old) = old.filter(|o| o.service != slice.service) {
                    changed |= self.refresh_endpoints(snap, &ns, &old.service);
                }
                changed | self.refresh_endpoints(snap, &ns, &slice.service)
            }
            Item::Policy(p) => {
                let (pns, pname) = p.key();
                let same = snap
                    .mesh
                    .policies
                    .iter()
                    .any(|q| q.kind() == p.kind() && q.key() == (pns, pname) && *q == p);
                if same {
                    return false;
                }
                snap.edit(Edit::UpsertPolicy(p));
                true
            }
        }
    }

    fn remove(&mut self, snap: &mut Snapshot, kind: Kind, ns: &str, name: &str) -> bool {
        self.invalid
            .remove(&(kind, ns.to_string(), name.to_string()));
        match kind {
            Kind::Namespace => {
                if snap.mesh.namespaces.contains_key(name) {
                    snap.edit(Edit::RemoveNamespace(name.to_string()));
                    reenroll(snap, name);
                    true
                } else {
                    false
                }
            }
            Kind::Pod => remove_workload(snap, &Workload::pod_uid(ns, name)),
            Kind::Service => {
                let key = format!("{ns}/{name}");
                if snap.mesh.services.contains_key(&key) {
                    snap.edit(Edit::RemoveService(key));
                    true
                } else {
                    false
                }
            }
            Kind::EndpointSlice => match self.slices.remove(&(ns.to_string(), name.to_string())) {
                Some(old) => self.refresh_endpoints(snap, ns, &old.service),
                None => false,
            },
            Kind::AuthorizationPolicy | Kind::PeerAuthentication | Kind::RequestAuthentication => {
                let Some(pk) = kind.policy() else {
                    return false;
                };
                let present = snap
                    .mesh
                    .policies
                    .iter()
                    .any(|p| p.kind() == pk && p.key() == (ns, name));
                if present {
                    snap.edit(Edit::RemovePolicy {
                        kind: pk,
                        namespace: ns.to_string(),
                        name: name.to_string(),
                    });
                }
                present
            }
        }
    }

    fn upsert_namespace(&mut self, snap: &mut Snapshot, n: Namespace) -> bool {
        if snap.mesh.namespaces.get(&n.name) == Some(&n) {
            return false;
        }
        let name = n.name.clone();
        snap.edit(Edit::UpsertNamespace(n));
        reenroll(snap, &name);
        true
    }

    fn upsert_service(&mut self, snap: &mut Snapshot, mut s: Service) -> bool {
        let key = s.key();
        if s.selector.is_empty() {
            s.endpoints = self.slice_endpoints(snap, &s.namespace, &s.name);
        }
        if let Some(old) = snap.mesh.services.get(&key) {
            // With a selector, the endpoints are the state's to resolve: compare the rest.
            let same = if s.selector.is_empty() {
                **old == s
            } else {
                Service {
                    endpoints: old.endpoints.clone(),
                    ..s.clone()
                } == **old
            };
            if same {
                return false;
            }
        }
        snap.edit(Edit::UpsertService { key, service: s });
        true
    }

    /// The endpoints the slices of service `ns/name` give, sorted.
    fn slice_endpoints(&self, snap: &Snapshot, ns: &str, name: &str) -> Vec<String> {
        let mut uids: BTreeSet<String> = BTreeSet::new();
        let from = (ns.to_string(), String::new());
        for ((sns, _), slice) in self.slices.range(from..) {
            if sns != ns {
                break;
            }
            if slice.service != name {
                continue;
            }
            for e in &slice.endpoints {
                match e {
                    SliceEndpoint::Pod(uid) => {
                        uids.insert(uid.clone());
                    }
                    SliceEndpoint::Ip(ip) => {
                        if let Some(w) = snap.workload_by_ip(*ip) {
                            uids.insert(w.uid.to_string());
                        }
                    }
                }
            }
        }
        uids.into_iter().collect()
    }

    /// Re-derives the endpoints of service `ns/name` from the slices, when it has no
    /// selector.
    fn refresh_endpoints(&self, snap: &mut Snapshot, ns: &str, name: &str) -> bool {
        if name.is_empty() {
            return false;
        }
        let key = format!("{ns}/{name}");
        let Some(old) = snap.mesh.services.get(&key).cloned() else {
            return false;
        };
        if !old.selector.is_empty() {
            return false;
        }
        let endpoints = self.slice_endpoints(snap, ns, name);
        if endpoints == old.endpoints {
            return false;
        }
        snap.edit(Edit::UpsertService {
            key,
            service: Service {
                endpoints,
                ..Service::clone(&old)
            },
        });
        true
    }
}

/// The workload with its enrollment decided against its namespace as it is in `snap`.
fn enrolled(snap: &Snapshot, mut w: Workload) -> Workload {
    w.enroll_in(&snap.mesh.namespaces);
    w
}

fn upsert_workload(snap: &mut Snapshot, w: Workload) -> bool {
    let w = enrolled(snap, w);
    if snap.workload(&w.uid).is_some_and(|old| **old == w) {
        return false;
    }
    snap.edit(Edit::UpsertWorkload(w));
    true
}

fn remove_workload(snap: &mut Snapshot, uid: &str) -> bool {
    if snap.workload(uid).is_none() {
        return false;
    }
    snap.edit(Edit::RemoveWorkload(uid.to_string()));
    true
}

/// Re-decides the enrollment of namespace `ns`'s pods after its labels changed.
fn reenroll(snap: &mut Snapshot, ns: &str) {
    let prefix = Workload::pod_uid(ns, "");
    let changed: Vec<Workload> = snap
        .mesh
        .workloads
        .range(prefix.clone()..)
        .take_while(|(uid, _)| uid.starts_with(prefix.as_str()))
        .filter(|(_, w)| w.namespace == ns)
        .filter_map(|(_, w)| {
            let again = enrolled(snap, Workload::clone(w));
            (again.enrollment != w.enrollment).then_some(again)
        })
        .collect();
    for w in changed {
        snap.edit(Edit::UpsertWorkload(w));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::AuthorizationPolicySpec;
    use crate::model::Enrollment;
    use crate::model::{AuthorizationPolicy, ServicePort, TargetPort};

    fn ns(name: &str, ambient: bool) -> Object {
        let mut labels = BTreeMap::new();
        if ambient {
            labels.insert(DATAPLANE.to_string(), "ambient".to_string());
        }
        Object {
            kind: Kind::Namespace,
            namespace: String::new(),
            name: name.into(),
            item: Ok(Item::Namespace(Namespace {
                name: name.into(),
                labels,
            })),
        }
    }

    const DATAPLANE: &str = crate::model::DATAPLANE_MODE_LABEL;

    fn pod(ns: &str, name: &str, ip: &str) -> Object {
        Object {
            kind: Kind::Pod,
            namespace: ns.into(),
            name: name.into(),
            item: Ok(Item::Pod(Some(Workload {
                uid: Workload::pod_uid(ns, name),
                name: name.into(),
                namespace: ns.into(),
                service_account: "sa".into(),
                node: "n1".into(),
                ips: [ip.parse().unwrap()].into(),
                labels: [("app".into(), name.into())].into_iter().collect(),
                named_ports: Default::default(),
                enrollment: Enrollment::NotEnrolled,
                workload_name: name.into(),
                canonical_name: name.into(),
                canonical_revision: "latest".into(),
                waypoint: None,
            }))),
        }
    }

    fn svc(ns: &str, name: &str, vip: &str, selector: &[(&str, &str)]) -> Object {
        Object {
            kind: Kind::Service,
            namespace: ns.into(),
            name: name.into(),
            item: Ok(Item::Service(Service {
                name: name.into(),
                namespace: ns.into(),
                vips: vec![vip.parse().unwrap()],
                ports: vec![ServicePort {
                    name: String::new(),
                    port: 80,
                    target_port: TargetPort::Number(8080),
                }],
                selector: selector
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                endpoints: Vec::new(),
                labels: BTreeMap::new(),
                waypoint: None,
            })),
        }
    }

    fn policy(ns: &str, name: &str) -> Object {
        Object {
            kind: Kind::AuthorizationPolicy,
            namespace: ns.into(),
            name: name.into(),
            item: Ok(Item::Policy(Policy::AuthorizationPolicy(
                AuthorizationPolicy {
                    name: name.into(),
                    namespace: ns.into(),
                    spec: AuthorizationPolicySpec::default(),
                },
            ))),
        }
    }

    /// Every kind listed: `objects` in their kinds' lists, the rest empty.
    fn list_all(objects: Vec<Object>) -> Vec<Change> {
        let mut out = Vec::new();
        for kind in Kind::ALL {
            out.push(Change::Listing(kind));
            for o in objects.iter().filter(|o| o.kind == kind) {
                out.push(Change::Listed(o.clone()));
            }
            out.push(Change::ListDone(kind));
        }
        out
    }

    fn enrollment(store: &StateStore, ns: &str, name: &str) -> Option<Enrollment> {
        store
            .snapshot()
            .workload(&Workload::pod_uid(ns, name))
            .map(|w| w.enrollment)
    }

    #[test]
    fn nothing_is_published_until_every_kind_is_listed() {
        let store = StateStore::new("k");
        let mut a = Applier::new();
        let mut changes = list_all(vec![ns("shop", true), pod("shop", "a", "10.0.0.1")]);
        let last = changes.pop().unwrap();
        a.apply(changes, &store);
        assert!(!store.loaded(), "published before the last list ended");
        assert!(!a.ready());
        a.apply(vec![last], &store);
        assert!(store.loaded());
        assert_eq!(store.snapshot().generation, 1);
        assert_eq!(enrollment(&store, "shop", "a"), Some(Enrollment::Enrolled));
    }

    #[test]
    fn a_pod_listed_before_its_namespace_is_enrolled_once_the_namespace_comes() {
        let store = StateStore::new("k");
        let mut a = Applier::new();
        // Pods listed first, namespace list after: the order watches may end in.
        let mut changes = vec![
            Change::Listing(Kind::Pod),
            Change::Listed(pod("shop", "a", "10.0.0.1")),
            Change::ListDone(Kind::Pod),
        ];
        changes.extend(
            list_all(vec![ns("shop", true)])
                .into_iter()
                .filter(|c| !matches!(c, Change::Listing(Kind::Pod) | Change::ListDone(Kind::Pod))),
        );
        a.apply(changes, &store);
        assert_eq!(enrollment(&store, "shop", "a"), Some(Enrollment::Enrolled));
    }

    #[test]
    fn labelling_and_unlabelling_a_namespace_re_decides_its_pods_only() {
        let store = StateStore::new("k");
        let mut a = Applier::new();
        a.apply(
            list_all(vec![
                ns("shop", false),
                ns("other", false),
                pod("shop", "a", "10.0.0.1"),
                pod("other", "b", "10.0.0.2"),
            ]),
            &store,
        );
        assert_eq!(
            enrollment(&store, "shop", "a"),
            Some(Enrollment::NotEnrolled)
        );
        a.apply(vec![Change::Applied(ns("shop", true))], &store);
        assert_eq!(enrollment(&store, "shop", "a"), Some(Enrollment::Enrolled));
        assert_eq!(
            enrollment(&store, "other", "b"),
            Some(Enrollment::NotEnrolled)
        );
        a.apply(vec![Change::Applied(ns("shop", false))], &store);
        assert_eq!(
            enrollment(&store, "shop", "a"),
            Some(Enrollment::NotEnrolled)
        );
        // Deleting the namespace leaves its pods unenrolled (they go with their own deletes).
        a.apply(vec![Change::Applied(ns("shop", true))], &store);
        a.apply(
            vec![Change::Deleted {
                kind: Kind::Namespace,
                namespace: String::new(),
                name: "shop".into(),
            }],
            &store,
        );
        assert_eq!(
            enrollment(&store, "shop", "a"),
            Some(Enrollment::NotEnrolled)
        );
    }

    #[test]
    fn an_unchanged_object_is_no_new_generation() {
        let store = StateStore::new("k");
        let mut a = Applier::new();
        a.apply(
            list_all(vec![ns("shop", true), pod("shop", "a", "10.0.0.1")]),
            &store,
        );
        let g = store.snapshot().generation;
        a.apply(vec![Change::Applied(pod("shop", "a", "10.0.0.1"))], &store);
        a.apply(vec![Change::Applied(ns("shop", true))], &store);
        assert_eq!(store.snapshot().generation, g);
        a.apply(vec![Change::Applied(pod("shop", "a", "10.0.0.9"))], &store);
        assert_eq!(store.snapshot().generation, g + 1);
    }

    #[test]
    fn a_relist_removes_what_it_left_out_and_keeps_the_state_until_it_ends() {
        let store = StateStore::new("k");
        let mut a = Applier::new();
        a.apply(
            list_all(vec![
                ns("shop", true),
                pod("shop", "a", "10.0.0.1"),
                pod("shop", "b", "10.0.0.2"),
                policy("shop", "p1"),
                policy("shop", "p2"),
            ]),
            &store,
        );
        // A relist in progress changes nothing yet.
        a.apply(
            vec![
                Change::Listing(Kind::Pod),
                Change::Listed(pod("shop", "b", "10.0.0.2")),
                Change::Listing(Kind::AuthorizationPolicy),
                Change::Listed(policy("shop", "p2")),
            ],
            &store,
        );
        let snap = store.snapshot();
        assert!(snap.workload(&Workload::pod_uid("shop", "a")).is_some());
        assert_eq!(snap.mesh.policies.len(), 2);
        a.apply(
            vec![
                Change::ListDone(Kind::Pod),
                Change::ListDone(Kind::AuthorizationPolicy),
            ],
            &store,
        );
        let snap = store.snapshot();
        assert!(snap.workload(&Workload::pod_uid("shop", "a")).is_none());
        assert!(snap.workload(&Workload::pod_uid("shop", "b")).is_some());
        let names: Vec<_> = snap
            .mesh
            .policies
            .iter()
            .map(|p| p.key().1.to_string())
            .collect();
        assert_eq!(names, ["p2"]);
    }

    #[test]
    fn a_bad_object_is_named_and_a_good_one_keeps_its_last_good_version() {
        let store = StateStore::new("k");
        let mut a = Applier::new();
        let bad = |ns: &str, name: &str| Object {
            kind: Kind::Pod,
            namespace: ns.into(),
            name: name.into(),
            item: Err("status.podIP: invalid IP address \"x\"".into()),
        };
        a.apply(
            list_all(vec![
                ns("shop", true),
                pod("shop", "a", "10.0.0.1"),
                bad("shop", "new"),
            ]),
            &store,
        );
        let st = store.status();
        assert_eq!(
            st.warnings,
            ["Pod shop/new: status.podIP: invalid IP address \"x\""]
        );
        assert!(store
            .snapshot()
            .workload(&Workload::pod_uid("shop", "new"))
            .is_none());
        assert_eq!(a.invalid_count(Kind::Pod), 1);
        // A good pod turned bad stays as it was.
        a.apply(vec![Change::Applied(bad("shop", "a"))], &store);
        let snap = store.snapshot();
        let w = snap.workload(&Workload::pod_uid("shop", "a")).unwrap();
        assert_eq!(*w.ips, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(store.status().warnings.len(), 2);
        // Fixed or deleted: the warning goes.
        a.apply(vec![Change::Applied(pod("shop", "a", "10.0.0.3"))], &store);
        a.apply(
            vec![Change::Deleted {
                kind: Kind::Pod,
                namespace: "shop".into(),
                name: "new".into(),
            }],
            &store,
        );
        assert!(
            store.status().warnings.is_empty(),
            "{:?}",
            store.status().warnings
        );
        assert_eq!(a.invalid_count(Kind::Pod), 0);
    }

    #[test]
    fn slices_give_endpoints_to_services_without_a_selector_only() {
        let store = StateStore::new("k");
        let mut a = Applier::new();
        let slice = |name: &str, service: &str, eps: Vec<SliceEndpoint>| Object {
            kind: Kind::EndpointSlice,
            namespace: "shop".into(),
            name: name.into(),
            item: Ok(Item::Slice(Slice {
                service: service.into(),
                endpoints: eps,
            })),
        };
        a.apply(
            list_all(vec![
                ns("shop", true),
                pod("shop", "a", "10.0.0.1"),
                pod("shop", "b", "10.0.0.2"),
                svc("shop", "manual", "10.96.0.1", &[]),
                svc("shop", "auto", "10.96.0.2", &[("app", "a")]),
                slice(
                    "manual-1",
                    "manual",
                    vec![SliceEndpoint::Pod(
                        Workload::pod_uid("shop", "a").to_string(),
                    )],
                ),
                slice(
                    "auto-1",
                    "auto",
                    vec![SliceEndpoint::Ip("10.0.0.2".parse().unwrap())],
                ),
            ]),
            &store,
        );
        let eps = |name: &str| {
            store
                .snapshot()
                .service("shop", name)
                .unwrap()
                .endpoints
                .clone()
        };
        assert_eq!(eps("manual"), [Workload::pod_uid("shop", "a")]);
        assert_eq!(
            eps("auto"),
            [Workload::pod_uid("shop", "a")],
            "the selector decides"
        );
        a.apply(
            vec![Change::Applied(slice(
                "manual-2",
                "manual",
                vec![SliceEndpoint::Ip("10.0.0.2".parse().unwrap())],
            ))],
            &store,
        );
        assert_eq!(
            eps("manual"),
            [
                Workload::pod_uid("shop", "a"),
                Workload::pod_uid("shop", "b")
            ]
        );
        a.apply(
            vec![Change::Deleted {
                kind: Kind::EndpointSlice,
                namespace: "shop".into(),
                name: "manual-1".into(),
            }],
            &store,
        );
        assert_eq!(eps("manual"), [Workload::pod_uid("shop", "b")]);
    }

    #[test]
    fn a_kind_whose_crd_is_missing_is_empty_with_a_warning() {
        let store = StateStore::new("k");
        let mut a = Applier::new();
        let mut changes: Vec<Change> = list_all(vec![ns("shop", true)])
            .into_iter()
            .filter(|c| {
                !matches!(
                    c,
                    Change::Listing(Kind::RequestAuthentication)
                        | Change::ListDone(Kind::RequestAuthentication)
                )
            })
            .collect();
        changes.push(Change::Missing(
            Kind::RequestAuthentication,
            "RequestAuthentication is not served".into(),
        ));
        a.apply(changes, &store);
        assert!(store.loaded(), "a missing CRD must not hold readiness back");
        assert_eq!(
            store.status().warnings,
            ["RequestAuthentication is not served"]
        );
        a.apply(
            vec![
                Change::Found(Kind::RequestAuthentication),
                Change::Listing(Kind::RequestAuthentication),
                Change::ListDone(Kind::RequestAuthentication),
            ],
            &store,
        );
        assert!(store.status().warnings.is_empty());
    }
}
