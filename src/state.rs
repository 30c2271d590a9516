//! The state every other part reads: an immutable [`Snapshot`] of the mesh, indexed, and the
//! [`StateStore`] that swaps snapshots atomically and tells who cares that one changed.
//!
//! Readers call [`StateStore::snapshot`] once (an `Arc` load, no lock) and work on that
//! snapshot; writers either publish a whole new mesh ([`StateStore::publish`]: the file
//! source, where a new file is a new mesh) or apply [`Edit`]s to the snapshot in force
//! ([`StateStore::apply`]: the xDS source, one edit per changed resource). A reader never
//! blocks a writer and never sees half an update.
//!
//! Every collection of the mesh and every index is persistent (`imbl`): the next snapshot
//! shares all but the paths an edit touched, so applying a change costs time proportional to
//! the change (and to the services it touches), not to the size of the mesh.
//!
//! Invariants of the indexes (held by [`Snapshot::new`] and every edit alike, so a snapshot
//! reached by edits equals the one built from scratch from the same mesh):
//! - an IP claimed by several owners belongs to the least of them, workloads before
//!   services, then by uid or service key; the others wait in `rivals` and take over when
//!   it leaves. Every claimant is in the mesh;
//! - a service with a selector has as endpoints the uids, in order, of the workloads of its
//!   namespace with an address whose labels match (Kubernetes' semantics; this module is
//!   the one place that rule is applied); a service without one keeps the endpoints its
//!   source gave;
//! - `services_of` is exactly the reverse of the services' endpoints.
//!
//! This module owns no I/O: sources feed it, the proxy and admin read it.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use crate::identity::Identity;
use crate::model::{ArcStr, Enrollment, Mesh, Namespace, Policy, PolicyKind, Service, Workload};

/// What an IP address belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Address<'a> {
    /// A pod address.
    Workload(&'a Arc<Workload>),
    /// A Service VIP.
    Service(&'a Service),
}

/// One change to the mesh, as a source sees it: [`StateStore::apply`] turns a batch of them
/// into the next snapshot.
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    /// Adds or replaces a namespace. Enrollment is decided by the source when it builds a
    /// workload: a source changing a namespace's labels re-upserts the workloads it affects.
    UpsertNamespace(Namespace),
    /// Removes a namespace by name.
    RemoveNamespace(String),
    /// Adds or replaces the workload with this uid.
    UpsertWorkload(Workload),
    /// Removes the workload with this uid.
    RemoveWorkload(String),
    /// Adds or replaces the service under `key` (see [`Mesh::services`] for keys). With a
    /// selector, its endpoints are the store's to resolve and the given ones are ignored.
    UpsertService {
        /// The service's key in [`Mesh::services`].
        key: String,
        /// The service.
        service: Service,
    },
    /// Removes the service under this key.
    RemoveService(String),
    /// Adds a policy, or replaces the one of the same kind, namespace and name in place.
    UpsertPolicy(Policy),
    /// Removes a policy.
    RemovePolicy {
        /// Its kind.
        kind: PolicyKind,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// Replaces every policy.
    SetPolicies(Vec<Policy>),
}

/// Who claims an IP, in precedence order (the derived `Ord`: workloads first).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Owner {
    Workload(ArcStr),
    Service(String),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Workload(uid) => write!(f, "workload {uid}"),
            Owner::Service(key) => write!(f, "service {key}"),
        }
    }
}

/// The owner of an IP, resolved.
#[derive(Clone, Debug, PartialEq)]
enum Slot {
    Workload(Arc<Workload>),
    /// The service's key and the service, boxed: every pod address holds a slot, and few
    /// addresses are VIPs (an entry of the IP index is 40 bytes instead of 56).
    Service(Box<(String, Arc<Service>)>),
}

impl Slot {
    fn is(&self, owner: &Owner) -> bool {
        match (self, owner) {
            (Slot::Workload(w), Owner::Workload(uid)) => w.uid == *uid,
            (Slot::Service(s), Owner::Service(k)) => s.0 == *k,
            _ => false,
        }
    }

    fn owner(&self) -> Owner {
        match self {
            Slot::Workload(w) => Owner::Workload(w.uid.clone()),
            Slot::Service(s) => Owner::Service(s.0.clone()),
        }
    }
}

/// A workload in an index, ordered and compared by uid only (always the version in force:
/// it is replaced whenever the workload changes).
#[derive(Clone, Debug)]
struct ByUid(Arc<Workload>);

impl PartialEq for ByUid {
    fn eq(&self, other: &Self) -> bool {
        self.0.uid == other.0.uid
    }
}

impl Eq for ByUid {}

impl PartialOrd for ByUid {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByUid {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.uid.cmp(&other.0.uid)
    }
}

impl std::borrow::Borrow<str> for ByUid {
    fn borrow(&self) -> &str {
        &self.0.uid
    }
}

/// The indexes of a snapshot; see the module doc for their invariants.
#[derive(Clone, Debug, Default, PartialEq)]
struct Index {
    /// Pod addresses (not host-network pods') and service VIPs.
    by_ip: imbl::HashMap<IpAddr, Slot>,
    /// Every claimant of each IP claimed more than once (rare: sources reject or warn).
    rivals: imbl::HashMap<IpAddr, imbl::OrdSet<Owner>>,
    /// `(<namespace>/<name>, key)` of every service: answers [`Snapshot::service`].
    by_name: imbl::OrdSet<(String, String)>,
    /// Workload uid → the keys of the services it backs, sorted (reverse of endpoints).
    services_of: imbl::HashMap<String, Vec<String>>,
    /// Namespace → its workloads, by uid (selector services resolve within one namespace).
    /// The entries share the mesh's workloads rather than copying their uids.
    ns_workloads: imbl::HashMap<ArcStr, imbl::OrdSet<ByUid>>,
    /// Namespace → its services' keys.
    ns_services: imbl::HashMap<String, imbl::OrdSet<String>>,
}

/// One immutable, indexed view of the mesh. Cheap to clone (structurally shared).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Monotonic: 0 means "nothing loaded yet", each publish or apply adds one.
    pub generation: u64,
    /// The mesh as its source gave it (selector services' endpoints resolved).
    pub mesh: Mesh,
    index: Index,
}

impl Snapshot {
    /// Indexes a mesh, resolving the endpoints of services with a selector. IP conflicts
    /// are the source's job to reject or report; here the least owner wins (module doc).
    pub fn new(generation: u64, mesh: Mesh) -> Snapshot {
        let mut snap = Snapshot {
            generation,
            mesh: Mesh {
                namespaces: mesh.namespaces,
                policies: mesh.policies,
                ..Mesh::default()
            },
            index: Index::default(),
        };
        // Workloads first: services resolve their endpoints against them. The mesh's map is
        // taken as it is (shared, not rebuilt: a second map of every workload, freed at the
        // end, was as large as the indexes) and each workload indexed as newly added.
        snap.mesh.workloads = mesh.workloads;
        for (uid, w) in snap.mesh.workloads.clone().iter() {
            debug_assert_eq!(*uid, w.uid, "the mesh's workloads are keyed by uid");
            snap.workload_changed(uid, None, Some(w));
        }
        for (key, s) in mesh.services {
            snap.upsert_service(key, s);
        }
        snap
    }

    /// What owns `ip`: a pod or a Service VIP.
    pub fn address(&self, ip: IpAddr) -> Option<Address<'_>> {
        Some(match self.index.by_ip.get(&ip)? {
            Slot::Workload(w) => Address::Workload(w),
            Slot::Service(s) => Address::Service(&s.1),
        })
    }

    /// The workload with this uid.
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.mesh.workloads.get(uid)
    }

    /// The workload owning a pod IP (not a Service VIP).
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        match self.address(ip)? {
            Address::Workload(w) => Some(w),
            Address::Service(_) => None,
        }
    }

    /// The service `<namespace>/<name>` (the least key when several share the name).
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        let name = format!("{namespace}/{name}");
        let (found, key) = self
            .index
            .by_name
            .range((name.clone(), String::new())..)
            .next()?;
        if *found != name {
            return None;
        }
        self.mesh.services.get(key).map(|s| &**s)
    }

    /// The service of `namespace` whose hostname is `hostname`: the xDS source keys services
    /// by `<namespace>/<hostname>`, the file source's hostnames are
    /// [`Service::hostname`]. (How a waypoint named by hostname is found.)
    pub fn service_by_hostname(&self, namespace: &str, hostname: &str) -> Option<&Service> {
        if let Some(s) = self.mesh.services.get(&format!("{namespace}/{hostname}")) {
            return Some(s);
        }
        self.index
            .ns_services
            .get(namespace)?
            .iter()
            .filter_map(|key| self.mesh.services.get(key))
            .find(|s| s.hostname() == hostname)
            .map(|s| &**s)
    }

    /// The services a workload backs.
    pub fn services_of<'a>(&'a self, uid: &str) -> impl Iterator<Item = &'a Service> + 'a {
        self.index
            .services_of
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|key| self.mesh.services.get(key).map(|s| &**s))
    }

    /// The endpoints (workloads) behind a service, in the service's order.
    pub fn endpoints<'a>(
        &'a self,
        svc: &'a Service,
    ) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        svc.endpoints.iter().filter_map(|uid| self.workload(uid))
    }

    /// Enrolled workloads scheduled on `node`.
    pub fn local_enrolled<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.mesh
            .workloads
            .values()
            .filter(move |w| w.node == node && w.enrollment.is_enrolled())
            .map(|w| &**w)
    }

    /// The identities weft must hold certificates for on `node`: one per ServiceAccount with
    /// at least one local enrolled pod.
    pub fn local_identities(&self, node: &str, trust_domain: &str) -> BTreeSet<Identity> {
        self.local_enrolled(node)
            .filter_map(|w| {
                match Identity::new(trust_domain, w.namespace.as_str(), w.service_account.as_str()) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        tracing::warn!(workload = %w.uid, error = %e, "workload has no valid identity");
                        None
                    }
                }
            })
            .collect()
    }

    /// IPs claimed more than once, each as a warning naming the claimants and the one that
    /// keeps it.
    pub fn ip_conflicts(&self) -> impl Iterator<Item = String> + '_ {
        self.index.rivals.iter().map(|(ip, owners)| {
            let names: Vec<String> = owners.iter().map(Owner::to_string).collect();
            format!(
                "IP {ip} is claimed by {}; {} keeps it",
                names.join(", "),
                names.first().map(String::as_str).unwrap_or_default()
            )
        })
    }

    // === Edits ===

    /// Applies one edit to this snapshot (mesh and indexes), keeping every invariant. A
    /// source that must read what its earlier edits did (the Kubernetes watch) edits a
    /// snapshot of its own ([`StateStore::update`], or one it publishes whole with
    /// [`StateStore::publish_snapshot`]); the generation is the store's to set.
    pub fn edit(&mut self, edit: Edit) {
        match edit {
            Edit::UpsertNamespace(ns) => {
                self.mesh.namespaces.insert(ns.name.clone(), ns);
            }
            Edit::RemoveNamespace(name) => {
                self.mesh.namespaces.remove(&name);
            }
            Edit::UpsertWorkload(w) => self.upsert_workload(Arc::new(w)),
            Edit::RemoveWorkload(uid) => {
                if let Some(old) = self.mesh.workloads.remove(uid.as_str()) {
                    self.workload_changed(&uid, Some(&old), None);
                }
            }
            Edit::UpsertService { key, service } => self.upsert_service(key, Arc::new(service)),
            Edit::RemoveService(key) => {
                if let Some(old) = self.mesh.services.remove(&key) {
                    self.service_changed(&key, Some(&old), None);
                }
            }
            Edit::UpsertPolicy(p) => {
                let same = |q: &Policy| q.kind() == p.kind() && q.key() == p.key();
                match self.mesh.policies.iter().position(same) {
                    Some(i) => {
                        self.mesh.policies.set(i, p);
                    }
                    None => self.mesh.policies.push_back(p),
                }
            }
            Edit::RemovePolicy {
                kind,
                namespace,
                name,
            } => self
                .mesh
                .policies
                .retain(|p| !(p.kind() == kind && p.key() == (&namespace, &name))),
            Edit::SetPolicies(policies) => self.mesh.policies = policies.into_iter().collect(),
        }
    }

    fn upsert_workload(&mut self, w: Arc<Workload>) {
        let uid = w.uid.clone();
        let old = self.mesh.workloads.insert(uid.clone(), w.clone());
        self.workload_changed(&uid, old.as_ref(), Some(&w));
    }

    /// Brings the indexes and the selector services in line with a workload that was `old`
    /// and is now `new` (already in the mesh, or already gone).
    fn workload_changed(
        &mut self,
        uid: &str,
        old: Option<&Arc<Workload>>,
        new: Option<&Arc<Workload>>,
    ) {
        let namespace = |w: Option<&Arc<Workload>>| w.map(|w| w.namespace.clone());
        let (old_ns, new_ns) = (namespace(old), namespace(new));
        if old_ns != new_ns {
            if let Some(ns) = &old_ns {
                remove_from(&mut self.index.ns_workloads, ns, uid);
            }
        }
        if let (Some(ns), Some(w)) = (&new_ns, new) {
            // Equal by uid: this replaces the old version.
            self.index
                .ns_workloads
                .entry(ns.clone())
                .or_default()
                .insert(ByUid(w.clone()));
        }
        let old_ips = claimed_ips(old);
        let new_ips = claimed_ips(new);
        // The workload's own uid, shared rather than copied (`old` or `new` is always there).
        let owner = Owner::Workload(
            new.or(old)
                .map_or_else(|| ArcStr::from(uid), |w| w.uid.clone()),
        );
        for ip in old_ips.iter().filter(|ip| !new_ips.contains(ip)) {
            self.release(*ip, &owner);
        }
        for ip in &new_ips {
            self.claim(*ip, &owner);
        }
        // The selector services of the namespaces concerned whose selector matches the old
        // or the new workload: only their endpoints can change.
        let mut keys: Vec<String> = Vec::new();
        for ns in [&old_ns, &new_ns].into_iter().flatten() {
            if let Some(set) = self.index.ns_services.get(ns.as_str()) {
                keys.extend(set.iter().cloned());
            }
        }
        keys.sort();
        keys.dedup();
        for key in keys {
            let Some(svc) = self.mesh.services.get(&key) else {
                continue;
            };
            if svc.selector.is_empty() {
                continue;
            }
            let backs = |w: Option<&Arc<Workload>>| w.is_some_and(|w| is_endpoint(svc, w));
            let (was, is) = (backs(old), backs(new));
            if !was && !is {
                continue;
            }
            let mut endpoints = svc.endpoints.clone();
            endpoints.retain(|e| e != uid);
            if is {
                let at = endpoints.partition_point(|e| e.as_str() < uid);
                endpoints.insert(at, uid.to_string());
            }
            if endpoints != svc.endpoints {
                let mut svc = Service::clone(svc);
                svc.endpoints = endpoints;
                self.put_service(key, Arc::new(svc));
            }
        }
    }

    /// Puts a service under `key`, resolving its endpoints when it has a selector.
    fn upsert_service(&mut self, key: String, mut s: Arc<Service>) {
        if !s.selector.is_empty() {
            let kept = self
                .mesh
                .services
                .get(&key)
                .filter(|old| old.namespace == s.namespace && old.selector == s.selector)
                .map(|old| old.endpoints.clone());
            let endpoints = kept.unwrap_or_else(|| {
                self.index
                    .ns_workloads
                    .get(s.namespace.as_str())
                    .into_iter()
                    .flatten()
                    .filter(|w| is_endpoint(&s, &w.0))
                    .map(|w| w.0.uid.to_string())
                    .collect()
            });
            if endpoints != s.endpoints {
                Arc::make_mut(&mut s).endpoints = endpoints;
            }
        }
        self.put_service(key, s);
    }

    /// Puts a service, endpoints as they are, under `key`.
    fn put_service(&mut self, key: String, s: Arc<Service>) {
        let old = self.mesh.services.insert(key.clone(), s.clone());
        self.service_changed(&key, old.as_ref(), Some(&s));
    }

    /// Brings the indexes in line with a service that was `old` and is now `new` (already
    /// in the mesh, or already gone).
    fn service_changed(
        &mut self,
        key: &str,
        old: Option<&Arc<Service>>,
        new: Option<&Arc<Service>>,
    ) {
        let ix = &mut self.index;
        if let Some(old) = old {
            if new.is_none_or(|new| new.namespace != old.namespace) {
                remove_from(&mut ix.ns_services, &old.namespace, key);
            }
            ix.by_name.remove(&(old.key(), key.to_string()));
        }
        if let Some(new) = new {
            ix.ns_services
                .entry(new.namespace.clone())
                .or_default()
                .insert(key.to_string());
            ix.by_name.insert((new.key(), key.to_string()));
        }
        let vips = |s: Option<&Arc<Service>>| s.map(|s| s.vips.clone()).unwrap_or_default();
        let (old_vips, new_vips) = (vips(old), vips(new));
        let owner = Owner::Service(key.to_string());
        for ip in old_vips.iter().filter(|ip| !new_vips.contains(ip)) {
            self.release(*ip, &owner);
        }
        for ip in &new_vips {
            self.claim(*ip, &owner);
        }
        let (old_eps, new_eps) = (
            old.map(|s| s.endpoints.as_slice()).unwrap_or_default(),
            new.map(|s| s.endpoints.as_slice()).unwrap_or_default(),
        );
        if old_eps == new_eps {
            return;
        }
        let old_set: HashSet<&String> = old_eps.iter().collect();
        let new_set: HashSet<&String> = new_eps.iter().collect();
        let services_of = &mut self.index.services_of;
        for uid in old_set.difference(&new_set) {
            if let Some(keys) = services_of.get_mut(*uid) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    services_of.remove(*uid);
                }
            }
        }
        for uid in new_set.difference(&old_set) {
            let keys = services_of.entry((*uid).clone()).or_default();
            if let Err(at) = keys.binary_search_by(|k| k.as_str().cmp(key)) {
                keys.insert(at, key.to_string());
            }
        }
    }

    /// The owner as it is in the mesh now.
    fn resolve(&self, owner: &Owner) -> Option<Slot> {
        match owner {
            Owner::Workload(uid) => self
                .mesh
                .workloads
                .get(uid.as_str())
                .cloned()
                .map(Slot::Workload),
            Owner::Service(key) => self
                .mesh
                .services
                .get(key)
                .cloned()
                .map(|s| Slot::Service(Box::new((key.clone(), s)))),
        }
    }

    /// Records that `owner` (in the mesh, possibly changed) claims `ip`.
    fn claim(&mut self, ip: IpAddr, owner: &Owner) {
        let winner = if let Some(rivals) = self.index.rivals.get_mut(&ip) {
            rivals.insert(owner.clone());
            rivals.get_min().cloned()
        } else {
            match self.index.by_ip.get(&ip) {
                Some(current) if !current.is(owner) => {
                    let current = current.owner();
                    let winner = (&current).min(owner).clone();
                    self.index
                        .rivals
                        .insert(ip, imbl::OrdSet::from(vec![current, owner.clone()]));
                    Some(winner)
                }
                _ => Some(owner.clone()),
            }
        };
        self.point(ip, winner);
    }

    /// Records that `owner` no longer claims `ip`.
    fn release(&mut self, ip: IpAddr, owner: &Owner) {
        let winner = if let Some(rivals) = self.index.rivals.get_mut(&ip) {
            rivals.remove(owner);
            let winner = rivals.get_min().cloned();
            if rivals.len() < 2 {
                self.index.rivals.remove(&ip);
            }
            winner
        } else if self.index.by_ip.get(&ip).is_some_and(|s| s.is(owner)) {
            None
        } else {
            return;
        };
        self.point(ip, winner);
    }

    fn point(&mut self, ip: IpAddr, winner: Option<Owner>) {
        match winner.and_then(|o| self.resolve(&o)) {
            Some(slot) => {
                self.index.by_ip.insert(ip, slot);
            }
            None => {
                self.index.by_ip.remove(&ip);
            }
        }
    }
}

/// The IPs a workload claims in the index: host-network pods share the node's.
fn claimed_ips(w: Option<&Arc<Workload>>) -> Vec<IpAddr> {
    match w {
        Some(w) if w.enrollment != Enrollment::HostNetwork => w.ips.to_vec(),
        _ => Vec::new(),
    }
}

/// Whether `w` is a selector endpoint of `svc` (Kubernetes' rule).
fn is_endpoint(svc: &Service, w: &Workload) -> bool {
    w.namespace == svc.namespace
        && !w.ips.is_empty()
        && crate::model::selector_matches(&svc.selector, &w.labels)
}

/// Removes `item` from the set under `ns`, and the set when it empties.
fn remove_from<K, T>(map: &mut imbl::HashMap<K, imbl::OrdSet<T>>, ns: &str, item: &str)
where
    K: std::hash::Hash + Eq + Clone + std::borrow::Borrow<str>,
    T: Ord + Clone + std::borrow::Borrow<str>,
{
    if let Some(set) = map.get_mut(ns) {
        set.remove(item);
        if set.is_empty() {
            map.remove(ns);
        }
    }
}

/// The outcome of the latest attempt to load the mesh.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadStatus {
    /// Where the mesh comes from (a file path).
    pub source: String,
    /// Generation in force (0: none loaded).
    pub generation: u64,
    /// Whether the most recent attempt succeeded.
    pub last_attempt_ok: bool,
    /// The error of the most recent attempt, when it failed.
    pub last_error: Option<String>,
    /// Warnings of the load in force.
    pub warnings: Vec<String>,
    /// When the snapshot in force was published (seconds since the epoch).
    pub last_success_unix: Option<u64>,
    /// Successful loads since start.
    pub loads_ok: u64,
    /// Rejected loads since start.
    pub loads_failed: u64,
}

/// Holds the current snapshot and the load status; cheap to share (`Arc`).
pub struct StateStore {
    /// Held by writers (never by readers) so two writers cannot build on the same snapshot.
    write: Mutex<()>,
    current: ArcSwap<Snapshot>,
    status: ArcSwap<LoadStatus>,
    changed: watch::Sender<u64>,
}

impl StateStore {
    /// An empty store (generation 0: not loaded).
    pub fn new(source: impl Into<String>) -> Arc<StateStore> {
        let (changed, _) = watch::channel(0);
        Arc::new(StateStore {
            write: Mutex::new(()),
            current: ArcSwap::from_pointee(Snapshot::default()),
            status: ArcSwap::from_pointee(LoadStatus {
                source: source.into(),
                ..LoadStatus::default()
            }),
            changed,
        })
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The latest load status.
    pub fn status(&self) -> Arc<LoadStatus> {
        self.status.load_full()
    }

    /// Whether a mesh has been loaded.
    pub fn loaded(&self) -> bool {
        self.current.load().generation > 0
    }

    /// Publishes a new mesh as the next generation; returns that generation.
    pub fn publish(&self, mesh: Mesh, warnings: Vec<String>) -> u64 {
        // Indexing the whole mesh happens before the writer's lock is taken.
        self.publish_snapshot(Snapshot::new(0, mesh), warnings)
    }

    /// Applies `edits`, in order, to the snapshot in force and publishes the result as the
    /// next generation (the load's warnings stay); returns that generation. Costs time
    /// proportional to the edits, not to the mesh.
    pub fn apply(&self, edits: impl IntoIterator<Item = Edit>) -> u64 {
        let warnings = self.status.load().warnings.clone();
        self.apply_with_warnings(edits, |_| warnings)
    }

    /// [`StateStore::apply`], with the load's warnings made from the new snapshot (before
    /// it is swapped in).
    pub fn apply_with_warnings(
        &self,
        edits: impl IntoIterator<Item = Edit>,
        warnings: impl FnOnce(&Snapshot) -> Vec<String>,
    ) -> u64 {
        self.update(|next| {
            for edit in edits {
                next.edit(edit);
            }
            Some(warnings(next))
        })
    }

    /// Lets `f` edit the next snapshot ([`Snapshot::edit`]), reading it as it goes, then
    /// publishes it with the warnings `f` returns, or nothing when `f` returns `None` (no
    /// change); returns the generation in force. Costs time proportional to the edits, as
    /// [`StateStore::apply`].
    pub fn update(&self, f: impl FnOnce(&mut Snapshot) -> Option<Vec<String>>) -> u64 {
        let _writer = self.writer();
        let current = self.current.load_full();
        let mut next = Snapshot::clone(&current);
        match f(&mut next) {
            Some(warnings) => {
                next.generation = current.generation + 1;
                self.commit(next, warnings)
            }
            None => current.generation,
        }
    }

    /// Publishes `snap` (built by [`Snapshot::edit`]s) whole as the next generation; returns
    /// that generation.
    pub fn publish_snapshot(&self, mut snap: Snapshot, warnings: Vec<String>) -> u64 {
        let _writer = self.writer();
        snap.generation = self.current.load().generation + 1;
        self.commit(snap, warnings)
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, ()> {
        // A writer that panicked left no half-built state behind (snapshots are swapped
        // whole), so a poisoned lock is still good.
        crate::sync::lock(&self.write)
    }

    /// Swaps `snap` in and records the successful load.
    fn commit(&self, snap: Snapshot, warnings: Vec<String>) -> u64 {
        let generation = snap.generation;
        self.current.store(Arc::new(snap));
        let prev = self.status.load();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .ok();
        self.status.store(Arc::new(LoadStatus {
            source: prev.source.clone(),
            generation,
            last_attempt_ok: true,
            last_error: None,
            warnings,
            last_success_unix: now,
            loads_ok: prev.loads_ok + 1,
            loads_failed: prev.loads_failed,
        }));
        self.changed.send_replace(generation);
        generation
    }

    /// Records a rejected load; the snapshot in force stays.
    pub fn reject(&self, error: String) {
        // Status is read, changed and written: one writer at a time, as in a publish.
        let _w = self.writer();
        let prev = self.status.load();
        self.status.store(Arc::new(LoadStatus {
            last_attempt_ok: false,
            last_error: Some(error),
            loads_failed: prev.loads_failed + 1,
            ..LoadStatus::clone(&prev)
        }));
        // Generation unchanged, but status watchers (admin) may want to know.
        self.changed.send_modify(|_| {});
    }

    /// Notified on every publish and reject; the value is the generation in force.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_in_the_ip_index_takes_40_bytes() {
        // One per pod address: a service's slot is boxed to keep it so.
        assert_eq!(std::mem::size_of::<(IpAddr, Slot)>(), 40);
    }
    use crate::model::{Enrollment, TargetPort};
    use std::collections::BTreeMap;

    fn pod(name: &str, ip: &str, node: &str, sa: &str, enrollment: Enrollment) -> Workload {
        Workload {
            uid: Workload::pod_uid("ns1", name),
            name: name.into(),
            namespace: "ns1".into(),
            service_account: sa.into(),
            node: node.into(),
            ips: [ip.parse().unwrap()].into(),
            labels: [("app".into(), name.into())].into_iter().collect(),
            named_ports: Default::default(),
            enrollment,
            workload_name: name.into(),
            canonical_name: name.into(),
            canonical_revision: "latest".into(),
            waypoint: None,
        }
    }

    fn mesh() -> Mesh {
        let mut m = Mesh::default();
        for w in [
            pod("a", "10.0.0.1", "n1", "sa-a", Enrollment::Enrolled),
            pod("b", "10.0.0.2", "n1", "sa-b", Enrollment::OptedOut),
            pod("c", "10.0.0.3", "n2", "sa-c", Enrollment::Enrolled),
            pod("d", "10.0.0.4", "n1", "sa-a", Enrollment::Enrolled),
        ] {
            m.insert_workload(w);
        }
        m.insert_service(Service {
            name: "a".into(),
            namespace: "ns1".into(),
            vips: vec!["10.96.0.1".parse().unwrap()],
            ports: vec![crate::model::ServicePort {
                name: "http".into(),
                port: 80,
                target_port: TargetPort::Number(8080),
            }],
            selector: BTreeMap::from([("app".to_string(), "a".to_string())]),
            endpoints: vec![],
            labels: BTreeMap::new(),
            waypoint: None,
        });
        m
    }

    #[test]
    fn indexes_answer_by_ip_uid_and_service() {
        let s = Snapshot::new(1, mesh());
        assert!(
            matches!(s.address("10.0.0.3".parse().unwrap()), Some(Address::Workload(w)) if w.name == "c")
        );
        assert!(
            matches!(s.address("10.96.0.1".parse().unwrap()), Some(Address::Service(v)) if v.name == "a")
        );
        assert!(s.address("10.0.0.9".parse().unwrap()).is_none());
        assert_eq!(s.workload("Kubernetes//Pod/ns1/b").unwrap().name, "b");
        let svc = s.service("ns1", "a").unwrap();
        let eps: Vec<_> = s.endpoints(svc).map(|w| w.name.as_str()).collect();
        assert_eq!(eps, ["a"]);
    }

    #[test]
    fn local_identities_are_the_service_accounts_of_local_enrolled_pods() {
        let s = Snapshot::new(1, mesh());
        let ids: Vec<String> = s
            .local_identities("n1", "cluster.local")
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ids, ["spiffe://cluster.local/ns/ns1/sa/sa-a"]);
    }

    #[test]
    fn a_rejected_load_keeps_the_snapshot_in_force() {
        let store = StateStore::new("test");
        let mut rx = store.subscribe();
        assert!(!store.loaded());
        assert_eq!(store.publish(mesh(), vec![]), 1);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        let before = store.snapshot();
        store.reject("boom".into());
        assert!(rx.has_changed().unwrap());
        let after = store.snapshot();
        assert!(Arc::ptr_eq(&before, &after));
        let st = store.status();
        assert_eq!(st.generation, 1);
        assert!(!st.last_attempt_ok);
        assert_eq!(st.last_error.as_deref(), Some("boom"));
        assert_eq!((st.loads_ok, st.loads_failed), (1, 1));
    }

    // === The incremental path against the snapshot built from scratch ===

    use crate::model::{selector_matches, AuthorizationPolicy};
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;
    use std::collections::BTreeMap as Map;

    const NAMESPACES: [&str; 3] = ["ns0", "ns1", "ns2"];
    const APPS: [&str; 3] = ["a", "b", "c"];

    /// An address from a small pool, so that pods and services collide now and then.
    fn pool_ip() -> impl Strategy<Value = IpAddr> {
        (0..40u8).prop_map(|last| IpAddr::from([10, 0, 0, last]))
    }

    fn namespace() -> impl Strategy<Value = &'static str> {
        select(&NAMESPACES[..])
    }

    fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
        (
            proptest::option::weighted(0.8, select(&APPS[..])),
            proptest::option::weighted(0.5, 1..3u8),
        )
            .prop_map(|(app, version)| {
                let mut l = BTreeMap::new();
                if let Some(app) = app {
                    l.insert("app".into(), app.into());
                }
                if let Some(v) = version {
                    l.insert("version".into(), format!("v{v}"));
                }
                l
            })
    }

    fn workload() -> impl Strategy<Value = Workload> {
        (
            0..30u8,
            namespace(),
            vec(pool_ip(), 0..3),
            0..10u8,
            0..2u8,
            labels(),
        )
            .prop_map(|(i, namespace, ips, enrolled, node, labels)| {
                let name = format!("p{i}");
                let enrollment = match enrolled {
                    0 => Enrollment::HostNetwork,
                    1 => Enrollment::NotEnrolled,
                    _ => Enrollment::Enrolled,
                };
                Workload {
                    // The namespace is not part of the uid here, so a workload can move
                    // between them.
                    uid: arcstr::format!("uid/{name}"),
                    name: name.as_str().into(),
                    namespace: namespace.into(),
                    service_account: "sa".into(),
                    node: arcstr::format!("n{node}"),
                    ips: ips.into(),
                    labels: labels
                        .into_iter()
                        .map(|(k, v)| (k.into(), v.into()))
                        .collect(),
                    named_ports: Default::default(),
                    enrollment,
                    workload_name: name.as_str().into(),
                    canonical_name: name.into(),
                    canonical_revision: "latest".into(),
                    waypoint: None,
                }
            })
    }

    fn service() -> impl Strategy<Value = (String, Service)> {
        let vip = prop_oneof![
            3 => pool_ip(),
            7 => (0..8u8).prop_map(|last| IpAddr::from([10, 96, 0, last])),
        ];
        (
            0..10u8,
            namespace(),
            proptest::option::weighted(0.7, labels()),
            vec(vip, 0..2),
            // Given endpoints: kept without a selector, replaced with one.
            vec((0..30u8).prop_map(|i| format!("uid/p{i}")), 0..3),
            0..2u8,
        )
            .prop_map(|(i, namespace, selector, vips, endpoints, host)| {
                // Two keys may carry the same name (xDS: one ServiceEntry, several hostnames).
                let key = format!("{namespace}/svc{i}.host{host}");
                let service = Service {
                    name: format!("svc{i}"),
                    namespace: namespace.into(),
                    vips,
                    ports: Vec::new(),
                    selector: selector
                        .map(|l| l.into_iter().take(1).collect())
                        .unwrap_or_default(),
                    endpoints,
                    labels: BTreeMap::new(),
                    waypoint: None,
                };
                (key, service)
            })
    }

    fn policy() -> impl Strategy<Value = AuthorizationPolicy> {
        (0..4u8, namespace(), any::<bool>()).prop_map(|(i, namespace, dry_run)| {
            AuthorizationPolicy {
                name: format!("p{i}"),
                namespace: namespace.into(),
                spec: crate::model::policy::AuthorizationPolicySpec {
                    dry_run,
                    ..Default::default()
                },
            }
        })
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            40 => workload().prop_map(Edit::UpsertWorkload),
            15 => (0..30u8).prop_map(|i| Edit::RemoveWorkload(format!("uid/p{i}"))),
            20 => service().prop_map(|(key, service)| Edit::UpsertService { key, service }),
            8 => service().prop_map(|(key, _)| Edit::RemoveService(key)),
            6 => policy().prop_map(|p| Edit::UpsertPolicy(Policy::AuthorizationPolicy(p))),
            4 => policy().prop_map(|p| Edit::RemovePolicy {
                kind: PolicyKind::AuthorizationPolicy,
                namespace: p.namespace,
                name: p.name,
            }),
            2 => vec(policy().prop_map(Policy::AuthorizationPolicy), 0..3)
                .prop_map(Edit::SetPolicies),
            3 => (namespace(), labels())
                .prop_map(|(name, labels)| Edit::UpsertNamespace(Namespace {
                    name: name.into(),
                    labels,
                })),
            2 => namespace().prop_map(|name| Edit::RemoveNamespace(name.into())),
        ]
    }

    /// The mesh the edits describe, kept the plain way.
    #[derive(Default)]
    struct Model {
        namespaces: Map<String, Namespace>,
        workloads: Map<String, Workload>,
        services: Map<String, Service>,
        policies: Vec<Policy>,
    }

    impl Model {
        fn apply(&mut self, edit: &Edit) {
            match edit.clone() {
                Edit::UpsertNamespace(ns) => {
                    self.namespaces.insert(ns.name.clone(), ns);
                }
                Edit::RemoveNamespace(name) => {
                    self.namespaces.remove(&name);
                }
                Edit::UpsertWorkload(w) => {
                    self.workloads.insert(w.uid.to_string(), w);
                }
                Edit::RemoveWorkload(uid) => {
                    self.workloads.remove(&uid);
                }
                Edit::UpsertService { key, service } => {
                    self.services.insert(key, service);
                }
                Edit::RemoveService(key) => {
                    self.services.remove(&key);
                }
                Edit::UpsertPolicy(p) => {
                    match self
                        .policies
                        .iter_mut()
                        .find(|q| q.kind() == p.kind() && q.key() == p.key())
                    {
                        Some(q) => *q = p,
                        None => self.policies.push(p),
                    }
                }
                Edit::RemovePolicy {
                    kind,
                    namespace,
                    name,
                } => self
                    .policies
                    .retain(|p| !(p.kind() == kind && p.key() == (&namespace, &name))),
                Edit::SetPolicies(p) => self.policies = p,
            }
        }

        fn mesh(&self) -> Mesh {
            Mesh {
                namespaces: self.namespaces.clone().into_iter().collect(),
                workloads: self
                    .workloads
                    .iter()
                    .map(|(k, w)| (k.clone(), Arc::new(w.clone())))
                    .collect(),
                services: self
                    .services
                    .iter()
                    .map(|(k, s)| (k.clone(), Arc::new(s.clone())))
                    .collect(),
                policies: self.policies.iter().cloned().collect(),
            }
        }

        /// The rules of the module doc, checked by brute force.
        fn check(&self, snap: &Snapshot) {
            for (key, svc) in &self.services {
                let got = &snap.mesh.services[key].endpoints;
                if svc.selector.is_empty() {
                    assert_eq!(*got, svc.endpoints, "{key}: given endpoints kept");
                } else {
                    let want: Vec<String> = self
                        .workloads
                        .values()
                        .filter(|w| {
                            w.namespace == svc.namespace
                                && !w.ips.is_empty()
                                && selector_matches(&svc.selector, &w.labels)
                        })
                        .map(|w| w.uid.to_string())
                        .collect();
                    assert_eq!(*got, want, "{key}: endpoints from the selector");
                }
            }
            for last in 0..40u8 {
                let ip = IpAddr::from([10, 0, 0, last]);
                let workload = self
                    .workloads
                    .values()
                    .find(|w| w.enrollment != Enrollment::HostNetwork && w.ips.contains(&ip));
                let service = self.services.iter().find(|(_, s)| s.vips.contains(&ip));
                match (snap.address(ip), workload, service) {
                    (None, None, None) => {}
                    (Some(Address::Workload(got)), Some(w), _) => assert_eq!(&**got, w, "{ip}"),
                    (Some(Address::Service(got)), None, Some((key, _))) => {
                        assert_eq!(got, &*snap.mesh.services[key], "{ip}")
                    }
                    (got, w, s) => panic!("{ip}: {got:?} for {w:?} / {s:?}"),
                }
            }
            for uid in self.workloads.keys() {
                let got: Vec<&Service> = snap.services_of(uid).collect();
                let want: Vec<&Service> = snap
                    .mesh
                    .services
                    .values()
                    .filter(|s| s.endpoints.contains(uid))
                    .map(|s| &**s)
                    .collect();
                assert_eq!(got, want, "services of {uid}");
            }
            for (key, svc) in &self.services {
                let first = self
                    .services
                    .iter()
                    .find(|(_, s)| s.key() == svc.key())
                    .map(|(k, _)| k);
                assert_eq!(
                    snap.service(&svc.namespace, &svc.name),
                    first.map(|k| &*snap.mesh.services[k]),
                    "{key}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Batches of random edits, each applied to the store and to a plain model; after
        /// every batch the store's snapshot equals the one built from scratch from the model's
        /// mesh, indexes included (a failure shrinks to the shortest sequence that shows it).
        #[test]
        fn any_sequence_of_edits_gives_the_snapshot_built_from_scratch(
            batches in vec(vec(edit(), 1..4), 1..120)
        ) {
            let store = StateStore::new("test");
            store.publish(Mesh::default(), vec![]);
            let mut model = Model::default();
            for batch in batches {
                for e in &batch {
                    model.apply(e);
                }
                let generation = store.apply(batch);
                let snap = store.snapshot();
                let scratch = Snapshot::new(generation, model.mesh());
                prop_assert_eq!(&snap.mesh, &scratch.mesh);
                prop_assert!(*snap == scratch, "indexes differ");
                // The namespace index compares by uid: check it holds the versions in force.
                for (ns, set) in snap.index.ns_workloads.iter() {
                    for w in set {
                        let current = &snap.mesh.workloads[&w.0.uid];
                        prop_assert!(Arc::ptr_eq(&w.0, current), "stale {}/{}", ns, w.0.uid);
                    }
                }
                model.check(&snap);
            }
        }
    }

    #[test]
    fn an_applied_change_leaves_earlier_snapshots_as_they_were() {
        let store = StateStore::new("test");
        store.publish(mesh(), vec![]);
        let before = store.snapshot();
        let mut b = Workload::clone(&before.mesh.workloads["Kubernetes//Pod/ns1/b"]);
        b.labels.insert("app".into(), "a".into());
        assert_eq!(store.apply([Edit::UpsertWorkload(b)]), 2);
        let after = store.snapshot();
        let eps =
            |s: &Snapshot| -> Vec<String> { s.service("ns1", "a").unwrap().endpoints.clone() };
        assert_eq!(eps(&before), ["Kubernetes//Pod/ns1/a"]);
        assert_eq!(
            eps(&after),
            ["Kubernetes//Pod/ns1/a", "Kubernetes//Pod/ns1/b"]
        );
        assert_eq!(after.services_of("Kubernetes//Pod/ns1/b").count(), 1);
        assert_eq!(before.services_of("Kubernetes//Pod/ns1/b").count(), 0);
        store.apply([Edit::RemoveWorkload("Kubernetes//Pod/ns1/a".into())]);
        let last = store.snapshot();
        assert_eq!(eps(&last), ["Kubernetes//Pod/ns1/b"]);
        assert!(last.address("10.0.0.1".parse().unwrap()).is_none());
        assert!(before.address("10.0.0.1".parse().unwrap()).is_some());
    }
}
