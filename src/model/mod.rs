//! The mesh as weft sees it: workloads, services and security policies.
//!
//! Pure data with no I/O. Sources (`source::file` for the mesh file, `source::xds` for istiod) translate their input
//! into these types; [`crate::state`] indexes them. Policy types keep Istio's shape
//! (`security.istio.io` v1/v1beta1) but every value is already parsed and validated, so later
//! stages (authz) never see a malformed CIDR, port or match pattern.
//!
//! [`policy`] holds those policy types, one file per CRD (`policy::authorization_policy`,
//! `policy::peer_authentication`, `policy::request_authentication`) and the values they share
//! apart (`policy::selection`, `policy::matching`, `policy::scalar`); every type is
//! re-exported as `model::policy::X`.

pub mod policy;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

pub use arcstr::ArcStr;

use serde::Serialize;

pub use policy::{
    AuthorizationPolicy, PeerAuthentication, Policy, PolicyKind, RequestAuthentication,
};

/// The label that enrolls a namespace (value `ambient`) or opts a pod out (value `none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// A pod's labels: a sorted vector, sized to what it holds. Every workload has one, so its
/// size counts per workload: a `BTreeMap`'s first node holds room for 11 entries (about
/// 540 bytes) even for one label. Keys and values are [`intern`]ed by the sources: pods of
/// one workload carry the same labels.
pub type Labels = litemap::LiteMap<ArcStr, ArcStr>;

/// A pod's named container ports, sorted by name, sized like [`Labels`].
pub type NamedPorts = litemap::LiteMap<String, u16>;

/// The one copy of `s` that workloads share: their namespace, node, service account,
/// workload and canonical names and revision repeat across many workloads, and each was a
/// string of its own in every one. An [`ArcStr`] is one pointer; interned, the text is held
/// once while any workload refers to it.
///
/// The set is the process's. It drops the strings no one else holds whenever it has doubled
/// since the last such sweep, so it never holds more than twice what is in use (and at least
/// [`INTERN_SWEEP_MIN`] entries between sweeps).
pub fn intern(s: &str) -> ArcStr {
    // A panic while holding the lock leaves the set as it was (insert and retain only).
    let mut interned = INTERNED.lock().unwrap_or_else(PoisonError::into_inner);
    let Interned { set, sweep_at } = &mut *interned;
    let set = set.get_or_insert_with(HashSet::new);
    if let Some(found) = set.get(s) {
        return found.clone();
    }
    let new = ArcStr::from(s);
    set.insert(new.clone());
    if set.len() >= *sweep_at {
        set.retain(|s| ArcStr::strong_count(s) != Some(1));
        *sweep_at = (set.len() * 2).max(INTERN_SWEEP_MIN);
    }
    new
}

/// The fewest entries [`intern`]'s set holds before it sweeps.
pub const INTERN_SWEEP_MIN: usize = 1024;

/// [`intern`]'s set (created on first use: a `HashSet` cannot be built in a `static`).
static INTERNED: Mutex<Interned> = Mutex::new(Interned {
    set: None,
    sweep_at: INTERN_SWEEP_MIN,
});

struct Interned {
    set: Option<HashSet<ArcStr>>,
    sweep_at: usize,
}

/// Whether weft captures a workload's traffic, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Enrollment {
    /// The namespace is labelled `istio.io/dataplane-mode: ambient` and the pod did not opt out.
    Enrolled,
    /// The namespace is enrolled but the pod says `istio.io/dataplane-mode: none`.
    OptedOut,
    /// The namespace is not enrolled.
    NotEnrolled,
    /// The pod uses the node's network namespace; weft never captures such pods.
    HostNetwork,
}

impl Enrollment {
    /// Decides enrollment from the namespace's and the pod's labels, as Istio ambient does.
    pub fn decide(
        namespace_labels: &BTreeMap<String, String>,
        pod_labels: &Labels,
        host_network: bool,
    ) -> Enrollment {
        if host_network {
            return Enrollment::HostNetwork;
        }
        let ns_ambient = namespace_labels
            .get(DATAPLANE_MODE_LABEL)
            .is_some_and(|v| v == "ambient");
        let pod_mode = pod_labels.get(DATAPLANE_MODE_LABEL).map(ArcStr::as_str);
        match (ns_ambient, pod_mode) {
            (_, Some("none")) if ns_ambient => Enrollment::OptedOut,
            (true, _) => Enrollment::Enrolled,
            // A pod may enroll itself even where its namespace does not (Istio honours the pod
            // label `ambient` as well).
            (false, Some("ambient")) => Enrollment::Enrolled,
            (false, _) => Enrollment::NotEnrolled,
        }
    }

    /// True when weft captures this workload's traffic.
    pub fn is_enrolled(self) -> bool {
        self == Enrollment::Enrolled
    }
}

/// A Kubernetes Namespace: only its labels matter to the mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Namespace {
    /// The namespace's name.
    pub name: String,
    /// Its labels (enrollment lives here).
    pub labels: BTreeMap<String, String>,
}

/// A running pod: the unit that holds an identity and addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Stable key: `Kubernetes//Pod/<namespace>/<name>` (the shape Istio uses).
    pub uid: ArcStr,
    /// Pod name.
    pub name: ArcStr,
    /// Pod namespace.
    pub namespace: ArcStr,
    /// ServiceAccount the pod runs as (`default` when unset).
    pub service_account: ArcStr,
    /// Node the pod is scheduled on (empty when not yet scheduled).
    pub node: ArcStr,
    /// All pod addresses (`status.podIPs`, dual-stack aware), primary first. A boxed slice:
    /// 8 bytes less than a vector in every workload, which keeps `Arc<Workload>` in the
    /// allocator's 160-byte class.
    pub ips: Box<[IpAddr]>,
    /// Pod labels (policy selectors match these).
    pub labels: Labels,
    /// Named container ports, for Services whose `targetPort` is a name.
    pub named_ports: NamedPorts,
    /// Whether weft captures this pod.
    pub enrollment: Enrollment,
    /// The workload the pod belongs to (its Deployment, StatefulSet, ...; else the pod).
    pub workload_name: ArcStr,
    /// Istio's canonical service (`service.istio.io/canonical-name`, `app.kubernetes.io/name`,
    /// `app`, else the workload name).
    pub canonical_name: ArcStr,
    /// Istio's canonical revision (`service.istio.io/canonical-revision`,
    /// `app.kubernetes.io/version`, `version`, else `latest`).
    pub canonical_revision: ArcStr,
    /// The Envoy waypoint istiod announced for the workload (`Workload.waypoint`): every
    /// connection addressed to the workload's own IP goes through it. Not the in-binary
    /// waypoint of `istio.io/use-waypoint` (`crate::waypoint`), which the mesh file selects
    /// with labels. Boxed: few workloads have one, and every workload would carry its 64 bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<Box<GatewayAddress>>,
}

impl Workload {
    /// Decides the workload's enrollment again against its namespace as it is in
    /// `namespaces` (a missing namespace has no labels); a host-network pod stays one. For
    /// sources that build a workload before its namespace is known, or keep it while the
    /// namespace changes.
    pub fn enroll_in(&mut self, namespaces: &imbl::OrdMap<String, Namespace>) {
        if self.enrollment != Enrollment::HostNetwork {
            let none = BTreeMap::new();
            let ns_labels = namespaces
                .get(self.namespace.as_str())
                .map_or(&none, |n| &n.labels);
            self.enrollment = Enrollment::decide(ns_labels, &self.labels, false);
        }
    }

    /// Istio's canonical service and revision from pod labels.
    pub fn canonical(labels: &Labels, workload_name: &ArcStr) -> (ArcStr, ArcStr) {
        let pick = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).map(|v| intern(v));
        (
            pick(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| workload_name.clone()),
            pick(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| arcstr::literal!("latest")),
        )
    }

    /// The uid Istio gives a Kubernetes pod.
    pub fn pod_uid(namespace: &str, name: &str) -> ArcStr {
        arcstr::format!("Kubernetes//Pod/{namespace}/{name}")
    }
}

/// A Service port and where it lands on the pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name (may be empty for single-port services).
    pub name: String,
    /// The port clients connect to on the VIP.
    pub port: u16,
    /// Where the traffic goes on the endpoint.
    pub target_port: TargetPort,
}

/// A Service's `targetPort`: a number, or the name of a container port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A named container port, resolved per endpoint.
    Named(String),
}

/// A Kubernetes Service: virtual IPs in front of the pods its selector picks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
    /// Cluster IPs (empty for headless services).
    pub vips: Vec<IpAddr>,
    /// TCP ports.
    pub ports: Vec<ServicePort>,
    /// Label selector (empty: the service has no automatic endpoints).
    pub selector: BTreeMap<String, String>,
    /// Uids of the workloads behind the service, resolved from the selector.
    pub endpoints: Vec<String>,
    /// The Service's own labels (e.g. `istio.io/use-waypoint`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The Envoy waypoint istiod announced for the service (`Service.waypoint`): every
    /// connection to one of its VIPs goes through it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
}

/// Where a gateway of the mesh, here an Envoy waypoint, takes HBONE connections: Istio's
/// `GatewayAddress`, checked (an IP is an IP, the port a port).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    /// The waypoint: an address (of its workload, or a VIP of its service) or its service's
    /// hostname.
    pub destination: GatewayDestination,
    /// The port its HBONE (mTLS) listener takes connections on, `15008` in practice.
    pub hbone_mtls_port: u16,
}

/// A [`GatewayAddress`]'s destination. Serialized as ztunnel writes it: `<network>/<ip>` or
/// `<namespace>/<hostname>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GatewayDestination {
    /// The IP of the waypoint's workload or a VIP of its service, on `network` (empty: the
    /// default network, the only one weft knows).
    Address {
        /// The network the address is on.
        network: String,
        /// The address.
        ip: IpAddr,
    },
    /// The waypoint's service, by namespace and hostname.
    Hostname {
        /// The service's namespace.
        namespace: String,
        /// Its hostname (`<name>.<namespace>.svc.cluster.local` for Kubernetes).
        hostname: String,
    },
}

impl std::fmt::Display for GatewayDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GatewayDestination::Address { network, ip } => write!(f, "{network}/{ip}"),
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => write!(f, "{namespace}/{hostname}"),
        }
    }
}

impl Serialize for GatewayDestination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Service {
    /// `<namespace>/<name>`, the key services are indexed by.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The Service's DNS name, `<name>.<namespace>.svc.cluster.local` (Istio's hostname for a
    /// Kubernetes Service).
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

/// True when every `selector` label is present in `labels` with the same value. An empty
/// selector matches everything (Kubernetes' `matchLabels` semantics).
pub fn selector_matches(selector: &BTreeMap<String, String>, labels: &Labels) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.get(k.as_str()).is_some_and(|l| l == v))
}

/// Everything one source knows about the mesh, before indexing.
///
/// The collections are persistent (structurally shared, `imbl`): cloning a mesh is cheap and
/// a clone changed in one place shares everything else with the original, which is what lets
/// [`crate::state::StateStore::apply`] build the next snapshot in time proportional to the
/// change. Workloads and services sit behind `Arc`, so sharing never copies one.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Mesh {
    /// Namespaces by name.
    pub namespaces: imbl::OrdMap<String, Namespace>,
    /// Workloads (pods) by uid.
    pub workloads: imbl::OrdMap<ArcStr, Arc<Workload>>,
    /// Services by a key their source chooses, unique per service: `<namespace>/<name>` for
    /// Kubernetes ([`Service::key`]), `<namespace>/<hostname>` for xDS (one ServiceEntry may
    /// give several services of one name).
    pub services: imbl::OrdMap<String, Arc<Service>>,
    /// Security policies, in source order.
    pub policies: imbl::Vector<Policy>,
}

impl Mesh {
    /// Adds (or replaces) a workload, keyed by its uid.
    pub fn insert_workload(&mut self, w: Workload) {
        self.workloads.insert(w.uid.clone(), Arc::new(w));
    }

    /// Adds (or replaces) a service under [`Service::key`].
    pub fn insert_service(&mut self, s: Service) {
        self.services.insert(s.key(), Arc::new(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels<S, T>(pairs: &[(&str, &str)]) -> T
    where
        S: for<'a> From<&'a str>,
        T: FromIterator<(S, S)>,
    {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn enrollment_follows_namespace_and_pod_labels() {
        let ambient: BTreeMap<String, String> = labels(&[(DATAPLANE_MODE_LABEL, "ambient")]);
        let plain: BTreeMap<String, String> = labels(&[]);
        let pod = |m: &BTreeMap<String, String>| -> Labels {
            m.iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect()
        };
        let (pod_ambient, pod_plain) = (pod(&ambient), pod(&plain));
        let none: Labels = labels(&[(DATAPLANE_MODE_LABEL, "none")]);
        assert_eq!(
            Enrollment::decide(&ambient, &pod_plain, false),
            Enrollment::Enrolled
        );
        assert_eq!(
            Enrollment::decide(&ambient, &none, false),
            Enrollment::OptedOut
        );
        assert_eq!(
            Enrollment::decide(&plain, &pod_plain, false),
            Enrollment::NotEnrolled
        );
        assert_eq!(
            Enrollment::decide(&plain, &pod_ambient, false),
            Enrollment::Enrolled
        );
        assert_eq!(
            Enrollment::decide(&ambient, &pod_plain, true),
            Enrollment::HostNetwork
        );
    }

    #[test]
    fn a_workload_fits_the_allocators_160_byte_class() {
        // `Arc<Workload>` is the workload plus two counters: at most 160 bytes, one of
        // jemalloc's size classes (the next is 192). One per workload; a new field that
        // crosses it costs 32 bytes in every workload, so it should be boxed or shared.
        assert!(std::mem::size_of::<Workload>() + 16 <= 160);
    }

    #[test]
    fn interned_strings_are_shared_and_unused_ones_are_dropped() {
        let held = intern("interned-test-held");
        assert!(ArcStr::ptr_eq(&held, &intern("interned-test-held")));
        assert_eq!(held, "interned-test-held");
        // Many strings no one keeps: the sweeps drop them (other tests may intern a few of
        // their own meanwhile), and keep the one still held.
        for i in 0..10 * INTERN_SWEEP_MIN {
            drop(intern(&format!("interned-test-{i}")));
        }
        let len = INTERNED
            .lock()
            .unwrap()
            .set
            .as_ref()
            .map_or(0, HashSet::len);
        assert!(len <= 2 * INTERN_SWEEP_MIN, "{len} strings interned");
        assert!(ArcStr::ptr_eq(&held, &intern("interned-test-held")));
    }

    #[test]
    fn empty_selector_matches_everything_and_others_need_every_label() {
        let pod: Labels = labels(&[("app", "web"), ("tier", "front")]);
        assert!(selector_matches(&labels(&[]), &pod));
        assert!(selector_matches(&labels(&[("app", "web")]), &pod));
        assert!(!selector_matches(
            &labels(&[("app", "web"), ("x", "y")]),
            &pod
        ));
    }
}
