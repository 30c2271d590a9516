//! In-pod capture (`redirect: inpod`): istio-cni's node agent captures each ambient pod's
//! traffic inside the pod (its iptables rules `REDIRECT` outbound to 15001 and inbound to
//! 15006; 15008 is reached directly) and hands the pod's network namespace to weft over ZDS
//! (`protocol`). weft then runs one data path per pod inside that namespace: the same
//! handlers, policy, waypoint hand-off, metrics and access log as node-level capture
//! (`proxy`), with sockets from the pod (`proxy::netns`, `SocketMode::InPod`).
//!
//! What this module owns: the ZDS session (connect, hello, one acknowledged request at a
//! time, reconnect with backoff), and the served pods by uid: `add` opens the pod's three
//! listeners inside its namespace and is acknowledged only once they listen; `del` closes
//! them at once and drains the pod's connections for `drainGrace` in the background; after a
//! reconnection, `snapshot_sent` forgets the pods the snapshot did not name (`add` or
//! `keep`). Pods stay served across reconnections. A bad request is refused (an `Ack` with
//! an error) and changes nothing else.
//!
//! It must not: program any rule (istio-cni does, in the pod), or decide anything on the
//! data path (each connection is decided by `proxy` on the state snapshot, by address).
//!
//! Which workload a pod is: the mesh state's workload with the `add`'s uid, else the one its
//! `workload_info` names (`Kubernetes//Pod/<namespace>/<name>`); one whose service account
//! differs is refused. A pod the state does not know yet is served anyway (istio-cni may be
//! ahead of the mesh source); its connections are decided by address once it is known.

pub mod protocol;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::metrics::Direction;
use crate::model::Workload;
use crate::proto::istio::workload::zds::WorkloadInfo;
use crate::proxy::netns::PodNetns;
use crate::proxy::{Listeners, Proxy, ProxyCtx};
use protocol::{Received, Request, ZdsConnection};

/// Reconnection delays to the node agent.
const BACKOFF: crate::backoff::Backoff = crate::backoff::Backoff {
    min: Duration::from_millis(100),
    max: Duration::from_secs(15),
};

/// What in-pod capture needs from the config.
#[derive(Clone, Debug)]
pub struct Settings {
    /// istio-cni's node-agent socket (`zdsSocket`).
    pub zds_socket: PathBuf,
    /// The listener ports, opened on `0.0.0.0` inside each pod.
    pub ports: Listeners,
    /// How long a removed pod's connections may finish (`drainGrace`).
    pub drain_grace: Duration,
}

/// Why a request was refused (the text of its error `Ack`).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("pod {uid}: {source}")]
    Netns { uid: String, source: io::Error },
    #[error("pod {uid}: cannot listen in its network namespace: {source}")]
    Listen {
        uid: String,
        source: crate::proxy::ProxyError,
    },
    #[error("pod {uid}: workload info says service account {sent:?}, the mesh says {mesh:?}")]
    ServiceAccount {
        uid: String,
        sent: String,
        mesh: String,
    },
    #[error("keep {uid:?} after the snapshot was complete")]
    KeepOutsideSnapshot { uid: String },
}

/// What `/config_dump` shows of in-pod capture (`inpod`): whether the ZDS connection is up
/// and the pods served.
#[derive(Debug, Default)]
pub struct Status {
    view: std::sync::Mutex<StatusView>,
}

/// A copy of [`Status`].
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    /// istio-cni's node-agent socket.
    pub zds_socket: PathBuf,
    /// Whether the ZDS connection is up.
    pub connected: bool,
    /// The served pods by istio-cni's uid.
    pub pods: std::collections::BTreeMap<String, PodView>,
}

/// One served pod in [`StatusView`].
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    /// `<namespace>/<name>`.
    pub pod: String,
    /// The mesh state's workload it was matched with, if any when it was added.
    pub workload: Option<String>,
}

impl Status {
    /// A copy of the current status.
    pub fn view(&self) -> StatusView {
        crate::sync::lock(&self.view).clone()
    }

    fn update(&self, f: impl FnOnce(&mut StatusView)) {
        f(&mut crate::sync::lock(&self.view));
    }
}

/// One served pod.
struct Pod {
    /// What istio-cni calls it, for logs.
    label: String,
    /// The mesh state's uid of the workload (the one it had, else the one istio-cni's
    /// workload info names), to find its addresses when it goes.
    mesh_uid: Option<String>,
    /// Its addresses when it was added (the connections to close when it goes).
    ips: Vec<IpAddr>,
    /// The network namespace's identity (device, inode): an `add` of the same pod with the
    /// same namespace keeps it served as it is.
    netns_id: (u64, u64),
    shutdown: watch::Sender<bool>,
    proxy: Proxy,
    /// Closed once the pod's connections are drained.
    netns: Arc<PodNetns>,
}

/// Serves the pods istio-cni hands over until `shutdown`, then drains them; the status
/// follows.
pub fn spawn(
    node: Arc<ProxyCtx>,
    settings: Settings,
    mut shutdown: watch::Receiver<bool>,
) -> (tokio::task::JoinHandle<()>, Arc<Status>) {
    let status = Arc::new(Status::default());
    status.update(|v| v.zds_socket = settings.zds_socket.clone());
    let task_status = status.clone();
    let task = tokio::spawn(async move {
        let mut pods = Pods {
            node,
            settings,
            served: HashMap::new(),
            drains: TaskTracker::new(),
            status: task_status,
        };
        let mut failures = 0u32;
        loop {
            let ended = tokio::select! {
                r = pods.session(&mut failures) => r,
                _ = crate::sync::shut_down(&mut shutdown) => break,
            };
            pods.status.update(|v| v.connected = false);
            failures = failures.saturating_add(1);
            let delay = BACKOFF.delay(failures);
            match ended {
                Ok(()) => {
                    tracing::info!(retry_in = ?delay, "istio-cni closed the ZDS connection; pods stay served")
                }
                Err(e) => tracing::warn!(
                    socket = %pods.settings.zds_socket.display(),
                    error = %e,
                    retry_in = ?delay,
                    "ZDS connection to istio-cni failed; pods stay served"
                ),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = crate::sync::shut_down(&mut shutdown) => break,
            }
        }
        pods.stop_all().await;
    });
    (task, status)
}

/// The served pods and how to serve more.
struct Pods {
    node: Arc<ProxyCtx>,
    settings: Settings,
    served: HashMap<String, Pod>,
    /// The drains of removed pods still running.
    drains: TaskTracker,
    status: Arc<Status>,
}

impl Pods {
    /// One connection to the node agent: hello, then each request answered in turn. Ends
    /// with `Ok` when the agent closes it, `Err` when it fails.
    async fn session(&mut self, failures: &mut u32) -> io::Result<()> {
        let conn = ZdsConnection::connect(&self.settings.zds_socket).await?;
        tracing::info!(socket = %self.settings.zds_socket.display(), served = self.served.len(), "connected to istio-cni (ZDS)");
        self.status.update(|v| v.connected = true);
        // The pods named before `snapshot_sent`; `None` once the snapshot is complete.
        let mut snapshot: Option<HashSet<String>> = Some(HashSet::new());
        loop {
            let error = match conn.recv().await? {
                Received::Closed => return Ok(()),
                Received::Invalid(why) => Some(why),
                Received::Request(r) => {
                    *failures = 0;
                    self.handle(r, &mut snapshot)
                        .await
                        .err()
                        .map(|e| e.to_string())
                }
            };
            if let Some(why) = &error {
                tracing::warn!(reason = %why, "ZDS request refused");
            }
            conn.ack(error).await?;
        }
    }

    async fn handle(
        &mut self,
        req: Request,
        snapshot: &mut Option<HashSet<String>>,
    ) -> Result<(), Refusal> {
        match req {
            Request::Add { uid, info, netns } => {
                if let Some(seen) = snapshot.as_mut() {
                    seen.insert(uid.clone());
                }
                self.add(uid, info, netns).await
            }
            Request::Keep { uid } => match snapshot.as_mut() {
                Some(seen) => {
                    if !self.served.contains_key(&uid) {
                        tracing::info!(uid = %uid, "istio-cni keeps a pod weft does not serve");
                    }
                    seen.insert(uid);
                    Ok(())
                }
                None => Err(Refusal::KeepOutsideSnapshot { uid }),
            },
            Request::Del { uid } => {
                match self.served.remove(&uid) {
                    Some(pod) => self.remove(&uid, pod, "deleted by istio-cni"),
                    None => {
                        tracing::info!(uid = %uid, "istio-cni deletes a pod weft does not serve")
                    }
                }
                Ok(())
            }
            Request::SnapshotSent => {
                if let Some(seen) = snapshot.take() {
                    let gone: Vec<String> = self
                        .served
                        .keys()
                        .filter(|uid| !seen.contains(*uid))
                        .cloned()
                        .collect();
                    for uid in gone {
                        if let Some(pod) = self.served.remove(&uid) {
                            self.remove(&uid, pod, "not in istio-cni's snapshot");
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Serves a pod: its listeners listen inside its namespace when this returns `Ok`.
    async fn add(
        &mut self,
        uid: String,
        info: Option<WorkloadInfo>,
        netns: OwnedFd,
    ) -> Result<(), Refusal> {
        let netns_id = rustix::fs::fstat(netns.as_fd())
            .map(|st| (st.st_dev, st.st_ino))
            .map_err(|e| Refusal::Netns {
                uid: uid.clone(),
                source: io::Error::new(
                    io::Error::from(e).kind(),
                    format!("cannot stat the network namespace fd: {e}"),
                ),
            })?;
        let workload = self.workload(&uid, info.as_ref())?;
        let label = match (&info, &workload) {
            (_, Some(w)) => format!("{}/{}", w.namespace, w.name),
            (Some(i), None) => format!("{}/{}", i.namespace, i.name),
            (None, None) => uid.clone(),
        };
        if let Some(pod) = self.served.get(&uid) {
            if pod.netns_id == netns_id {
                tracing::info!(pod = %pod.label, uid = %uid, "pod already served in this network namespace");
                return Ok(());
            }
        }
        let ns_label = label.clone();
        let entered = tokio::task::spawn_blocking(move || PodNetns::enter(netns, &ns_label))
            .await
            .map_err(|e| io::Error::other(format!("netns task: {e}")))
            .and_then(|r| r)
            .map_err(|source| Refusal::Netns {
                uid: uid.clone(),
                source,
            })?;
        let ctx = Arc::new(self.node.in_pod(entered.clone()));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let proxy = Proxy::start(ctx, self.pod_listeners(), shutdown_rx).map_err(|source| {
            Refusal::Listen {
                uid: uid.clone(),
                source,
            }
        })?;
        // The same pod in another namespace (its sandbox was recreated): the old one goes.
        if let Some(old) = self.served.remove(&uid) {
            self.remove(&uid, old, "replaced by a new network namespace");
        }
        match &workload {
            Some(w) => {
                tracing::info!(pod = %label, uid = %uid, workload = %w.uid, ips = ?w.ips, "pod served in its network namespace")
            }
            None => {
                tracing::warn!(pod = %label, uid = %uid, "pod served in its network namespace, but the mesh state does not know it yet")
            }
        }
        self.status.update(|v| {
            v.pods.insert(
                uid.clone(),
                PodView {
                    pod: label.clone(),
                    workload: workload.as_ref().map(|w| w.uid.to_string()),
                },
            );
        });
        self.served.insert(
            uid,
            Pod {
                label,
                mesh_uid: workload.as_ref().map(|w| w.uid.to_string()).or_else(|| {
                    info.as_ref()
                        .map(|i| Workload::pod_uid(&i.namespace, &i.name).to_string())
                }),
                ips: workload.map(|w| w.ips.to_vec()).unwrap_or_default(),
                netns_id,
                shutdown,
                proxy,
                netns: entered,
            },
        );
        Ok(())
    }

    /// The mesh state's workload for a pod istio-cni names, when the state has it.
    fn workload(
        &self,
        uid: &str,
        info: Option<&WorkloadInfo>,
    ) -> Result<Option<Arc<Workload>>, Refusal> {
        let snap = self.node.store.snapshot();
        let found = snap.workload(uid).or_else(|| {
            info.and_then(|i| snap.workload(&Workload::pod_uid(&i.namespace, &i.name)))
        });
        let Some(w) = found else { return Ok(None) };
        if let Some(i) = info.filter(|i| !i.service_account.is_empty()) {
            if i.service_account != w.service_account {
                return Err(Refusal::ServiceAccount {
                    uid: uid.to_string(),
                    sent: i.service_account.clone(),
                    mesh: w.service_account.to_string(),
                });
            }
        }
        if w.node != self.node.node {
            tracing::warn!(uid = %uid, workload = %w.uid, node = %w.node, "istio-cni hands over a pod the mesh state places on another node");
        }
        Ok(Some(w.clone()))
    }

    /// `0.0.0.0` at each configured listener port: inside the pod.
    fn pod_listeners(&self) -> Listeners {
        let any = |a: SocketAddr| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), a.port());
        Listeners {
            outbound: any(self.settings.ports.outbound),
            inbound_plaintext: any(self.settings.ports.inbound_plaintext),
            hbone: any(self.settings.ports.hbone),
        }
    }

    /// Stops serving a pod: its listeners close now; its connections get the drain grace in
    /// the background, then the rest are closed.
    fn remove(&self, uid: &str, pod: Pod, why: &'static str) {
        tracing::info!(pod = %pod.label, reason = why, "pod no longer served");
        self.status.update(|v| {
            v.pods.remove(uid);
        });
        pod.shutdown.send_replace(true);
        // Its addresses now, if the state still has it, else when it was added.
        let ips = pod
            .mesh_uid
            .as_deref()
            .and_then(|uid| {
                self.node
                    .store
                    .snapshot()
                    .workload(uid)
                    .map(|w| w.ips.to_vec())
            })
            .unwrap_or(pod.ips);
        let grace = self.settings.drain_grace;
        let shutdown = pod.shutdown;
        self.drains.spawn(async move {
            pod.proxy.drain_matching(grace, |c| owned_by(c, &ips)).await;
            pod.netns.close();
            drop(shutdown);
        });
    }

    /// Daemon shutdown: every pod drains at once, each for the grace period.
    async fn stop_all(mut self) {
        for (uid, pod) in std::mem::take(&mut self.served) {
            self.remove(&uid, pod, "weft is stopping");
        }
        self.drains.close();
        self.drains.wait().await;
    }
}

/// Whether a live connection is a pod's: from it (outbound) or to it (inbound).
fn owned_by(c: &crate::proxy::conntrack::Conn, ips: &[IpAddr]) -> bool {
    let ip = match c.meta.direction {
        Direction::Outbound => c.meta.src.ip(),
        _ => c.meta.dst.ip(),
    };
    ips.contains(&ip)
}
