//! The state every other part reads: an immutable [`Snapshot`] of the mesh, indexed, and the
//! [`StateStore`] that swaps snapshots atomically and tells who cares that one changed.
//!
//! Readers call [`StateStore::snapshot`] once (an `Arc` load, no lock) and work on that
//! snapshot; writers build a complete new snapshot and publish it with
//! [`StateStore::publish`]. A reader never blocks a writer and never sees half an update.
//! This module owns no I/O: sources feed it, the proxy and admin read it.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use crate::identity::Identity;
use crate::model::{Mesh, Service, Workload};

/// What an IP address belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Address<'a> {
    /// A pod address.
    Workload(&'a Workload),
    /// A Service VIP.
    Service(&'a Service),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Workload(usize),
    Service(usize),
}

/// One immutable, indexed view of the mesh.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Monotonic: 0 means "nothing loaded yet", each publish adds one.
    pub generation: u64,
    /// The mesh as its source gave it.
    pub mesh: Mesh,
    by_ip: HashMap<IpAddr, Slot>,
    by_uid: HashMap<String, usize>,
    by_service: HashMap<String, usize>,
    /// Workload uid → the services it backs (reverse of `Service::endpoints`).
    services_of: HashMap<String, Vec<usize>>,
}

impl Snapshot {
    /// Indexes a mesh. IP conflicts are the source's job to reject; here the first owner wins.
    pub fn new(generation: u64, mesh: Mesh) -> Snapshot {
        let mut by_ip = HashMap::with_capacity(mesh.workloads.len() + mesh.services.len());
        let mut by_uid = HashMap::with_capacity(mesh.workloads.len());
        let mut by_service = HashMap::with_capacity(mesh.services.len());
        for (i, w) in mesh.workloads.iter().enumerate() {
            by_uid.insert(w.uid.clone(), i);
            if w.enrollment != crate::model::Enrollment::HostNetwork {
                for ip in &w.ips {
                    by_ip.entry(*ip).or_insert(Slot::Workload(i));
                }
            }
        }
        let mut services_of: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, s) in mesh.services.iter().enumerate() {
            for uid in &s.endpoints {
                services_of.entry(uid.clone()).or_default().push(i);
            }
            by_service.insert(s.key(), i);
            for ip in &s.vips {
                by_ip.entry(*ip).or_insert(Slot::Service(i));
            }
        }
        Snapshot {
            generation,
            mesh,
            by_ip,
            by_uid,
            by_service,
            services_of,
        }
    }

    /// What owns `ip`: a pod or a Service VIP.
    pub fn address(&self, ip: IpAddr) -> Option<Address<'_>> {
        Some(match *self.by_ip.get(&ip)? {
            Slot::Workload(i) => Address::Workload(&self.mesh.workloads[i]),
            Slot::Service(i) => Address::Service(&self.mesh.services[i]),
        })
    }

    /// The workload with this uid.
    pub fn workload(&self, uid: &str) -> Option<&Workload> {
        self.by_uid.get(uid).map(|&i| &self.mesh.workloads[i])
    }

    /// The workload owning a pod IP (not a Service VIP).
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        match self.address(ip)? {
            Address::Workload(w) => Some(w),
            Address::Service(_) => None,
        }
    }

    /// The service `<namespace>/<name>`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.by_service
            .get(&format!("{namespace}/{name}"))
            .map(|&i| &self.mesh.services[i])
    }

    /// The services a workload backs.
    pub fn services_of<'a>(&'a self, uid: &str) -> impl Iterator<Item = &'a Service> + 'a {
        self.services_of
            .get(uid)
            .into_iter()
            .flatten()
            .map(|&i| &self.mesh.services[i])
    }

    /// The endpoints (workloads) behind a service, in source order.
    pub fn endpoints<'a>(&'a self, svc: &'a Service) -> impl Iterator<Item = &'a Workload> + 'a {
        svc.endpoints.iter().filter_map(|uid| self.workload(uid))
    }

    /// Enrolled workloads scheduled on `node`.
    pub fn local_enrolled<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.mesh
            .workloads
            .iter()
            .filter(move |w| w.node == node && w.enrollment.is_enrolled())
    }

    /// The identities weft must hold certificates for on `node`: one per ServiceAccount with
    /// at least one local enrolled pod.
    pub fn local_identities(&self, node: &str, trust_domain: &str) -> BTreeSet<Identity> {
        self.local_enrolled(node)
            .filter_map(|w| {
                match Identity::new(trust_domain, &w.namespace, &w.service_account) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        tracing::warn!(workload = %w.uid, error = %e, "workload has no valid identity");
                        None
                    }
                }
            })
            .collect()
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
    current: ArcSwap<Snapshot>,
    status: ArcSwap<LoadStatus>,
    changed: watch::Sender<u64>,
}

impl StateStore {
    /// An empty store (generation 0: not loaded).
    pub fn new(source: impl Into<String>) -> Arc<StateStore> {
        let (changed, _) = watch::channel(0);
        Arc::new(StateStore {
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
        let generation = self.current.load().generation + 1;
        self.current
            .store(Arc::new(Snapshot::new(generation, mesh)));
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
    use crate::model::{Enrollment, TargetPort};
    use std::collections::BTreeMap;

    fn pod(name: &str, ip: &str, node: &str, sa: &str, enrollment: Enrollment) -> Workload {
        Workload {
            uid: Workload::pod_uid("ns1", name),
            name: name.into(),
            namespace: "ns1".into(),
            service_account: sa.into(),
            node: node.into(),
            ips: vec![ip.parse().unwrap()],
            labels: BTreeMap::from([("app".to_string(), name.to_string())]),
            named_ports: BTreeMap::new(),
            enrollment,
            workload_name: name.into(),
            canonical_name: name.into(),
            canonical_revision: "latest".into(),
        }
    }

    fn mesh() -> Mesh {
        let mut m = Mesh {
            workloads: vec![
                pod("a", "10.0.0.1", "n1", "sa-a", Enrollment::Enrolled),
                pod("b", "10.0.0.2", "n1", "sa-b", Enrollment::OptedOut),
                pod("c", "10.0.0.3", "n2", "sa-c", Enrollment::Enrolled),
                pod("d", "10.0.0.4", "n1", "sa-a", Enrollment::Enrolled),
            ],
            ..Mesh::default()
        };
        m.services = vec![Service {
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
        }];
        crate::k8s::resolve_endpoints(&mut m);
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
}
