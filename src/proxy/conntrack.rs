//! Live connections: what `/connections` lists, what the access log and Istio's TCP metrics
//! report, and the handle that lets weft close a connection from outside (policy changes,
//! drain). A connection the waypoint upgraded (WebSocket) stays here, with the request that
//! upgraded it ([`Recheck`]), so policy changes and drain reach it too.
//!
//! A connection is registered when weft has decided where it goes and removed when its
//! [`ConnGuard`] drops; the drop writes one access-log event (target `access`) and updates
//! the `istio_tcp_*` counters. Byte counts are live atomics, so `/connections` shows progress.

use crate::sync::lock;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::authz::Authz;
use crate::identity::Identity;
use crate::logging::access;
use crate::metrics::{
    Cluster, Direction, RequestProtocol, SecurityPolicy, TcpLabels, TcpMetrics, Transport, UNKNOWN,
};
use crate::model::Workload;
use crate::state::Snapshot;
use prometheus_client::metrics::counter::Counter;

/// How the bytes travel between the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/2 CONNECT over mTLS.
    Hbone,
    /// Plain TCP.
    Plain,
    /// Handled inside this weft (same-node mesh traffic), identities known.
    Local,
}

impl Protocol {
    /// The name the access log and `/connections` write.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Hbone => "hbone",
            Protocol::Plain => "plain",
            Protocol::Local => "local",
        }
    }

    /// Istio's `connection_security_policy` for a connection carried this way.
    pub fn security_policy(self) -> SecurityPolicy {
        match self {
            Protocol::Hbone | Protocol::Local => SecurityPolicy::MutualTls,
            Protocol::Plain => SecurityPolicy::Unknown,
        }
    }

    /// The `transport` label of a denial.
    pub fn transport(self) -> Transport {
        match self {
            Protocol::Hbone => Transport::Hbone,
            Protocol::Plain => Transport::Plaintext,
            Protocol::Local => Transport::Local,
        }
    }
}

/// One end's workload, as the telemetry reports it (name, workload, namespace, `app`,
/// canonical service and revision). Shares the snapshot's workload instead of copying its
/// strings: a live connection holds two of these on each side.
#[derive(Clone, Debug)]
pub struct Peer(Arc<Workload>);

impl Peer {
    /// The facts about a workload.
    pub fn of(w: &Arc<Workload>) -> Peer {
        Peer(w.clone())
    }

    /// Pod name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Workload (Deployment...) name.
    pub fn workload(&self) -> &str {
        &self.0.workload_name
    }

    /// Namespace.
    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    /// `app` label (empty when unset).
    pub fn app(&self) -> &str {
        self.0
            .labels
            .get("app")
            .map(crate::model::ArcStr::as_str)
            .unwrap_or("")
    }

    /// Canonical service.
    pub fn canonical_service(&self) -> &str {
        &self.0.canonical_name
    }

    /// Canonical revision.
    pub fn canonical_revision(&self) -> &str {
        &self.0.canonical_revision
    }
}

impl Serialize for Peer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Peer", 6)?;
        st.serialize_field("name", self.name())?;
        st.serialize_field("workload", self.workload())?;
        st.serialize_field("namespace", self.namespace())?;
        st.serialize_field("app", self.app())?;
        st.serialize_field("canonicalService", self.canonical_service())?;
        st.serialize_field("canonicalRevision", self.canonical_revision())?;
        st.end()
    }
}

/// A service the destination was reached through (by its VIP).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ServiceRef {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
}

/// Everything known about one connection when it is opened.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnMeta {
    /// Outbound or inbound.
    pub direction: Direction,
    /// HBONE, plain or local.
    pub protocol: Protocol,
    /// The client's address.
    pub src: SocketAddr,
    /// The destination: the original one, or on the outbound side the endpoint chosen for it.
    pub dst: SocketAddr,
    /// What the client asked for when it differs from `dst` (a Service's VIP and port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_dst: Option<SocketAddr>,
    /// The client's identity, when known (mTLS or a local enrolled pod).
    pub src_identity: Option<Identity>,
    /// The server's identity, when the destination is in the mesh.
    pub dst_identity: Option<Identity>,
    /// Client workload, when in the mesh state.
    pub src_workload: Option<Peer>,
    /// Server workload, when in the mesh state.
    pub dst_workload: Option<Peer>,
    /// Service reached by VIP, if any. Boxed: most connections have none, and inline its two
    /// strings would put every connection record (`Conn`, in an `Arc`) in the allocator's
    /// next size class (328 → 384 bytes; boxed 288 → 320).
    pub service: Option<Box<ServiceRef>>,
    /// The policy decision that let it in (inbound side).
    pub decision: Option<String>,
    /// AUDIT policies that matched.
    pub audits: Vec<String>,
}

/// One live connection.
#[derive(Debug)]
pub struct Conn {
    /// Unique id within this process.
    pub id: u64,
    /// What it is.
    pub meta: ConnMeta,
    /// Bytes from the client towards the server.
    pub received: AtomicU64,
    /// Bytes from the server towards the client.
    pub sent: AtomicU64,
    /// When it was opened.
    pub started: Instant,
    /// Cancelled to close the connection from outside.
    pub close: CancellationToken,
    /// What else must still be allowed for the connection to stay open, beyond the inbound
    /// decision on its addresses: set once, by the waypoint, when a request upgraded the
    /// connection (a WebSocket's bytes are no longer requests to decide, so the policy
    /// follower decides the upgrading request again instead).
    pub upgraded: std::sync::OnceLock<Box<dyn Recheck>>,
    /// Its counters (for a clean close: response flags `-`), found once at open. Handles, not
    /// labels: a live connection keeps one pointer instead of its ~1 KiB label set, and a
    /// clean close updates the metrics without hashing labels or taking the family's lock.
    counters: Arc<Counters>,
}

/// A request that took a connection over (an HTTP upgrade), decided again on every new
/// state by the policy follower (`proxy::spawn_policy_follower`).
pub trait Recheck: Send + Sync + std::fmt::Debug {
    /// What it is, for `/connections` (`websocket GET /chat`).
    fn describe(&self) -> String;
    /// `Err` with the reason when `snap`'s policies no longer allow it.
    fn check(&self, snap: &Snapshot, authz: &Authz) -> Result<(), String>;
}

/// The counters of one label set (response flags `-`).
#[derive(Debug)]
struct Counters {
    opened: Counter,
    closed: Counter,
    received: Counter,
    sent: Counter,
}

/// A label set's counters, found by what the labels are made of without building them: the
/// workloads by address (the entry holds them, so a cached address is never reused), the
/// identities, service, direction and protocol.
#[derive(Debug)]
struct Cached {
    direction: Direction,
    protocol: Protocol,
    src: Option<Arc<Workload>>,
    dst: Option<Arc<Workload>>,
    src_identity: Option<Identity>,
    dst_identity: Option<Identity>,
    service: Option<Box<ServiceRef>>,
    counters: Arc<Counters>,
}

impl Cached {
    fn matches(&self, m: &ConnMeta) -> bool {
        let same = |a: &Option<Arc<Workload>>, b: &Option<Peer>| match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, &b.0),
            _ => false,
        };
        self.direction == m.direction
            && self.protocol == m.protocol
            && same(&self.src, &m.src_workload)
            && same(&self.dst, &m.dst_workload)
            && self.src_identity == m.src_identity
            && self.dst_identity == m.dst_identity
            && self.service == m.service
    }
}

fn label_hash(m: &ConnMeta) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (m.direction as u8, m.protocol as u8).hash(&mut h);
    for p in [&m.src_workload, &m.dst_workload] {
        p.as_ref().map(|p| Arc::as_ptr(&p.0) as usize).hash(&mut h);
    }
    m.src_identity.hash(&mut h);
    m.dst_identity.hash(&mut h);
    m.service.hash(&mut h);
    h.finish()
}

/// Label sets cached before the cache starts over: workloads replaced by newer versions of
/// the state leave entries behind, and this bounds them.
const LABEL_CACHE_MAX: usize = 4096;

type LabelCache = imbl::HashMap<u64, imbl::Vector<Arc<Cached>>>;

/// Shards of the live table (a power of two). Connection ids are sequential, so consecutive
/// connections land in different shards and the accept paths of the workers never wait for
/// each other; only the rare whole-table readers (`/connections`, drain, the policy follower)
/// visit every shard.
const SHARDS: usize = 64;

type Shard = Mutex<HashMap<u64, Arc<Conn>>>;

/// The table of live connections.
pub struct ConnTable {
    next: AtomicU64,
    live: Box<[Shard]>,
    metrics: TcpMetrics,
    /// Counters by label set, read without a lock on every open (building the ~20 labels and
    /// looking them up in four metric families, under their locks, was 7 % of the user CPU a
    /// connection cost); replaced copy-on-write when a new label set is seen.
    cache: ArcSwap<LabelCache>,
}

impl ConnTable {
    /// An empty table reporting to `metrics`.
    pub fn new(metrics: TcpMetrics) -> Arc<ConnTable> {
        Arc::new(ConnTable {
            next: AtomicU64::new(1),
            live: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            metrics,
            cache: ArcSwap::default(),
        })
    }

    /// Registers a connection; keep the guard for as long as it lives.
    pub fn open(self: &Arc<Self>, meta: ConnMeta) -> ConnGuard {
        let counters = self.counters(&meta);
        counters.opened.inc();
        let conn = Arc::new(Conn {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            meta,
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            started: Instant::now(),
            close: CancellationToken::new(),
            upgraded: std::sync::OnceLock::new(),
            counters,
        });
        lock(self.shard(conn.id)).insert(conn.id, conn.clone());
        ConnGuard {
            table: self.clone(),
            conn,
            outcome: Outcome::Open,
        }
    }

    /// The counters of `m`'s label set (response flags `-`).
    fn counters(&self, m: &ConnMeta) -> Arc<Counters> {
        let hash = label_hash(m);
        if let Some(c) = self
            .cache
            .load()
            .get(&hash)
            .and_then(|v| v.iter().find(|c| c.matches(m)))
        {
            return c.counters.clone();
        }
        let labels = labels(m, "-", &self.metrics.cluster);
        let mx = &self.metrics;
        let counters = Arc::new(Counters {
            opened: mx.opened.get_or_create(&labels).clone(),
            closed: mx.closed.get_or_create(&labels).clone(),
            received: mx.received_bytes.get_or_create(&labels).clone(),
            sent: mx.sent_bytes.get_or_create(&labels).clone(),
        });
        let entry = Arc::new(Cached {
            direction: m.direction,
            protocol: m.protocol,
            src: m.src_workload.as_ref().map(|p| p.0.clone()),
            dst: m.dst_workload.as_ref().map(|p| p.0.clone()),
            src_identity: m.src_identity.clone(),
            dst_identity: m.dst_identity.clone(),
            service: m.service.clone(),
            counters: counters.clone(),
        });
        self.cache.rcu(|cache| {
            let mut cache = if cache.len() >= LABEL_CACHE_MAX {
                LabelCache::new()
            } else {
                LabelCache::clone(cache)
            };
            let list = cache.entry(hash).or_default();
            if !list.iter().any(|c| c.matches(m)) {
                list.push_back(entry.clone());
            }
            cache
        });
        counters
    }

    /// Counts a connection that failed before it was opened in this table (the destination
    /// app could not be reached): `istio_tcp_connections_failed_total` with `flags`.
    pub fn count_failure(&self, m: &ConnMeta, flags: &'static str) {
        let labels = labels(m, flags, &self.metrics.cluster);
        self.metrics.failed.get_or_create(&labels).inc();
    }

    /// Drops the cached label sets (the state changed): the workload records they hold are
    /// released, and the next connection of each label set finds its counters again.
    pub fn forget_label_sets(&self) {
        self.cache.store(Arc::default());
    }

    fn shard(&self, id: u64) -> &Shard {
        &self.live[id as usize % SHARDS]
    }

    /// The live connections, oldest first.
    pub fn list(&self) -> Vec<Arc<Conn>> {
        let mut v = Vec::new();
        for shard in self.live.iter() {
            v.extend(lock(shard).values().cloned());
        }
        v.sort_by_key(|c| c.id);
        v
    }

    /// Closes every live connection (drain deadline reached).
    pub fn close_all(&self) {
        for shard in self.live.iter() {
            for c in lock(shard).values() {
                c.close.cancel();
            }
        }
    }

    /// How many connections are live.
    pub fn len(&self) -> usize {
        self.live.iter().map(|s| lock(s).len()).sum()
    }

    /// True when no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The response flag of a connection that could not be established (ztunnel's `CONNECT`).
pub const FAILED_TO_CONNECT: &str = "CONNECT";

/// The response flag of a connection policy refused (ztunnel's `DENY`).
pub const DENIED: &str = "DENY";

fn id(i: &Option<Identity>) -> String {
    i.as_ref().map(|i| i.to_string()).unwrap_or_default()
}

/// The Service reached by VIP as a host name (`name.namespace.svc.cluster.local`), or empty.
fn service_host(m: &ConnMeta) -> String {
    m.service
        .as_ref()
        .map(|svc| format!("{}.{}.svc.cluster.local", svc.name, svc.namespace))
        .unwrap_or_default()
}

/// What the access log says of every connection; `src_identity`, `dst_identity` and
/// `service` are `m`'s, formatted by the caller (they are borrowed).
pub fn access_common<'a>(
    m: &'a ConnMeta,
    src_identity: &'a str,
    dst_identity: &'a str,
    service: &'a str,
) -> access::Common<'a> {
    let end = |addr, p: &'a Option<Peer>, identity| access::End {
        addr,
        workload: p.as_ref().map_or("", |p| p.name()),
        namespace: p.as_ref().map_or("", |p| p.namespace()),
        identity,
    };
    access::Common {
        direction: m.direction.as_str(),
        protocol: m.protocol.as_str(),
        src: end(m.src, &m.src_workload, src_identity),
        dst: end(m.dst, &m.dst_workload, dst_identity),
        dst_service: service,
    }
}

fn labels(m: &ConnMeta, flags: &'static str, cluster: &Cluster) -> TcpLabels {
    let s = m.src_workload.as_ref();
    let d = m.dst_workload.as_ref();
    let known = |p: Option<&Peer>, f: fn(&Peer) -> &str| {
        p.map_or_else(|| UNKNOWN.to_string(), |p| f(p).to_string())
    };
    let cluster_of =
        |p: Option<&Peer>| p.map_or_else(|| UNKNOWN.to_string(), |_| cluster.to_string());
    let principal = |i: &Option<Identity>| {
        i.as_ref()
            .map_or_else(|| UNKNOWN.to_string(), |i| i.to_string())
    };
    let service =
        |f: fn(&ServiceRef) -> String| m.service.as_deref().map_or_else(|| UNKNOWN.to_string(), f);
    TcpLabels {
        reporter: m.direction.reporter(),
        source_workload: known(s, Peer::workload),
        source_canonical_service: known(s, Peer::canonical_service),
        source_canonical_revision: known(s, Peer::canonical_revision),
        source_workload_namespace: known(s, Peer::namespace),
        source_principal: principal(&m.src_identity),
        source_app: known(s, Peer::canonical_service),
        source_version: known(s, Peer::canonical_revision),
        source_cluster: cluster_of(s),
        destination_service: service(|svc| {
            format!("{}.{}.svc.cluster.local", svc.name, svc.namespace)
        }),
        destination_service_namespace: service(|svc| svc.namespace.clone()),
        destination_service_name: service(|svc| svc.name.clone()),
        destination_workload: known(d, Peer::workload),
        destination_canonical_service: known(d, Peer::canonical_service),
        destination_canonical_revision: known(d, Peer::canonical_revision),
        destination_workload_namespace: known(d, Peer::namespace),
        destination_principal: principal(&m.dst_identity),
        destination_app: known(d, Peer::canonical_service),
        destination_version: known(d, Peer::canonical_revision),
        destination_cluster: cluster_of(d),
        request_protocol: RequestProtocol::Tcp,
        response_flags: flags,
        connection_security_policy: m.protocol.security_policy(),
        source_region: UNKNOWN,
        source_zone: UNKNOWN,
        destination_region: UNKNOWN,
        destination_zone: UNKNOWN,
    }
}

/// How a connection ended, for the access log.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Still open (a guard dropped in this state ended without a recorded outcome).
    Open,
    /// Both sides finished.
    Closed,
    /// Failed after it was established: the reason.
    Failed(String),
    /// Could not be established (the tunnel or the destination could not be reached): the
    /// reason. Also counted in `istio_tcp_connections_failed_total`.
    ConnectFailed(String),
    /// Closed by weft from outside (drain, policy).
    Killed,
}

/// Keeps a connection registered; dropping it logs and counts the close.
pub struct ConnGuard {
    table: Arc<ConnTable>,
    conn: Arc<Conn>,
    outcome: Outcome,
}

impl ConnGuard {
    /// The connection.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// Records how it ended.
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(self.table.shard(self.conn.id)).remove(&self.conn.id);
        let c = &self.conn;
        let m = &c.meta;
        let received = c.received.load(Ordering::Relaxed);
        let sent = c.sent.load(Ordering::Relaxed);
        let (flags, error) = match &self.outcome {
            Outcome::Open | Outcome::Closed => ("-", None),
            Outcome::Failed(e) => ("UF", Some(e.as_str())),
            Outcome::ConnectFailed(e) => (FAILED_TO_CONNECT, Some(e.as_str())),
            Outcome::Killed => ("DC", Some("closed by weft")),
        };
        if flags == "-" {
            c.counters.closed.inc();
            c.counters.received.inc_by(received);
            c.counters.sent.inc_by(sent);
        } else {
            // A failure adds its response flag: other series (rare, so found by label here).
            let mx = &self.table.metrics;
            let labels = labels(m, flags, &mx.cluster);
            if flags == FAILED_TO_CONNECT {
                mx.failed.get_or_create(&labels).inc();
            }
            mx.closed.get_or_create(&labels).inc();
            mx.received_bytes.get_or_create(&labels).inc_by(received);
            mx.sent_bytes.get_or_create(&labels).inc_by(sent);
        }
        let (src_identity, dst_identity) = (id(&m.src_identity), id(&m.dst_identity));
        let service = service_host(m);
        access::connection_closed(
            &access_common(m, &src_identity, &dst_identity, &service),
            m.decision.as_deref().unwrap_or(""),
            &m.audits.join(","),
            access::Bytes {
                sent,
                recv: received,
            },
            c.started.elapsed(),
            error.unwrap_or(""),
        );
    }
}

impl Conn {
    /// Logs that the policy follower closes this connection: the state in force no longer
    /// allows it (`policy` the deciding policy when one did, `reason` why).
    pub fn log_closed_by_policy(&self, policy: &str, reason: &str) {
        let m = &self.meta;
        let (src_identity, dst_identity) = (id(&m.src_identity), id(&m.dst_identity));
        let service = service_host(m);
        access::live_connection_closed(
            &access_common(m, &src_identity, &dst_identity, &service),
            policy,
            access::Bytes {
                sent: self.sent.load(Ordering::Relaxed),
                recv: self.received.load(Ordering::Relaxed),
            },
            self.started.elapsed(),
            reason,
        );
    }
}

/// `/connections` view of one connection.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnView<'a> {
    id: u64,
    #[serde(flatten)]
    meta: &'a ConnMeta,
    bytes_received: u64,
    bytes_sent: u64,
    age_secs: f64,
    /// The request that upgraded it (`websocket GET /chat`), when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    upgraded: Option<String>,
}

impl Conn {
    /// The admin view.
    pub fn view(&self) -> ConnView<'_> {
        ConnView {
            id: self.id,
            meta: &self.meta,
            bytes_received: self.received.load(Ordering::Relaxed),
            bytes_sent: self.sent.load(Ordering::Relaxed),
            age_secs: self.started.elapsed().as_secs_f64(),
            upgraded: self.upgraded.get().map(|r| r.describe()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn workload(name: &str, revision: &str) -> Arc<Workload> {
        Arc::new(Workload {
            uid: arcstr::format!("Kubernetes//Pod/ns/{name}"),
            name: name.into(),
            namespace: "ns".into(),
            service_account: name.into(),
            node: "n".into(),
            ips: Box::default(),
            labels: [("app".into(), name.into())].into_iter().collect(),
            named_ports: Default::default(),
            enrollment: crate::model::Enrollment::Enrolled,
            workload_name: name.into(),
            canonical_name: name.into(),
            canonical_revision: revision.into(),
            waypoint: None,
        })
    }

    fn meta(src: &Arc<Workload>, dst: &Arc<Workload>, service: Option<&str>) -> ConnMeta {
        let id = |w: &Arc<Workload>| Identity::new("cluster.local", "ns", &w.name).ok();
        ConnMeta {
            direction: Direction::Outbound,
            protocol: Protocol::Hbone,
            src: "10.0.0.1:40000".parse().unwrap(),
            dst: "10.0.0.2:80".parse().unwrap(),
            original_dst: None,
            src_identity: id(src),
            dst_identity: id(dst),
            src_workload: Some(Peer::of(src)),
            dst_workload: Some(Peer::of(dst)),
            service: service.map(|s| {
                Box::new(ServiceRef {
                    name: s.into(),
                    namespace: "ns".into(),
                })
            }),
            decision: None,
            audits: vec![],
        }
    }

    /// `istio_tcp_connections_opened_total` by destination workload, canonical revision and
    /// service.
    fn opened(t: &ConnTable) -> BTreeMap<(String, String, String), u64> {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("opened", "", t.metrics.opened.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let label = |line: &str, key: &str| {
            let start = line.find(&format!("{key}=\"")).unwrap() + key.len() + 2;
            line[start..].split('"').next().unwrap().to_string()
        };
        text.lines()
            .filter(|l| l.starts_with("opened_total{"))
            .map(|l| {
                let n = l.rsplit(' ').next().unwrap().parse().unwrap();
                let key = (
                    label(l, "destination_workload"),
                    label(l, "destination_canonical_revision"),
                    label(l, "destination_service_name"),
                );
                (key, n)
            })
            .collect()
    }

    #[test]
    fn connections_count_in_their_own_label_set_through_the_cache() {
        let t = ConnTable::new(TcpMetrics::default());
        let (client, v1) = (workload("client", "v1"), workload("server", "v1"));
        // Same workloads twice: one cached label set, counted twice.
        drop(t.open(meta(&client, &v1, None)));
        drop(t.open(meta(&client, &v1, None)));
        assert_eq!(t.cache.load().values().map(|v| v.len()).sum::<usize>(), 1);
        // A new version of the server (the state changed): its own labels, never the old ones.
        let v2 = workload("server", "v2");
        drop(t.open(meta(&client, &v2, None)));
        // Through a service: another series.
        drop(t.open(meta(&client, &v2, Some("web"))));
        let key = |rev: &str, svc: &str| ("server".to_string(), rev.to_string(), svc.to_string());
        let want = BTreeMap::from([
            (key("v1", "unknown"), 2),
            (key("v2", "unknown"), 1),
            (key("v2", "web"), 1),
        ]);
        assert_eq!(opened(&t), want);
        // The cache is bounded: past its size it starts over, and the counts stay right.
        for i in 0..LABEL_CACHE_MAX + 10 {
            let w = workload(&format!("s{i}"), "v1");
            drop(t.open(meta(&client, &w, None)));
        }
        assert!(t.cache.load().len() <= LABEL_CACHE_MAX);
        drop(t.open(meta(&client, &v1, None)));
        // A state change releases the cached records; counting goes on in the same series.
        t.forget_label_sets();
        assert!(t.cache.load().is_empty());
        assert_eq!(
            Arc::strong_count(&v1),
            1,
            "the cache still holds the old record"
        );
        drop(t.open(meta(&client, &v1, None)));
        let all = opened(&t);
        assert_eq!(all[&key("v1", "unknown")], 4);
        assert_eq!(all.len(), 3 + LABEL_CACHE_MAX + 10);
        assert!(all.values().all(|n| *n >= 1));
    }
}
