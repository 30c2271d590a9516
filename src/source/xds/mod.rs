//! The xDS source: a delta ADS client of istiod that keeps the [`StateStore`] in step with
//! Istio's control plane, the way ztunnel's xDS client does.
//!
//! Protocol (Envoy's incremental xDS over one aggregated gRPC stream, TLS to istiod):
//! - On every (re)connect the client sends, per type, a wildcard subscription with its
//!   [`Node`](crate::proto::envoy::config::core::v3::Node) (id and metadata as ztunnel sends
//!   them) and `initial_resource_versions`: the resources it already holds, so istiod sends
//!   only what changed while it was away (and removals).
//! - Types: [`ADDRESS_TYPE`] (workloads and services) and [`AUTHORIZATION_TYPE`].
//! - Each resource of a response is decoded and translated ([`translate`]); the good ones
//!   become edits of the state in force (one per changed resource and per item derived from
//!   it, see [`translate::Assembly`]), applied in one [`StateStore::apply_with_warnings`].
//!   A response with no bad resource is ACKed (its nonce); otherwise it is NACKed with
//!   `error_detail` naming only the bad resources, which keep their last good version (the
//!   store records the rejection for the admin). This is what ztunnel does, and what istiod
//!   relies on: it does not send a NACKed response again, so refusing it whole would leave
//!   its good resources missing until the next reconnect.
//! - Nothing is published until each type has been answered once on the first stream, so
//!   readiness (`StateStore::loaded`) means a complete first sync, not half of one.
//! - A broken stream is retried with capped exponential backoff and jitter; the state in
//!   force stays until the new stream brings changes.
//!
//! Owns the protocol state (the versions of the last good resources, the edits waiting for
//! the first sync). Does not own the translation and assembly (`translate`), the connection
//! details (`istiod`) or the snapshot (`state`).

pub mod translate;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::istiod::ControlPlane;
use crate::istiod::{chain, Istiod};
use crate::metrics::{XdsMetrics, XdsTermination};
use crate::proto::envoy::config::core::v3::{node::UserAgentVersionType, Node};
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use crate::proto::google::rpc::Status;
use crate::proto::istio::security::Authorization;
use crate::proto::istio::workload::Address;
use crate::state::{Edit, Snapshot, StateStore};
use translate::Assembly;

/// Type URL of Istio's workload API resources.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of ztunnel's L4 authorization resources.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// First reconnect delay; doubles per consecutive failure (ztunnel starts at 10 ms; a little
/// more spares istiod a storm when it restarts).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Cap of the reconnect delay (ztunnel's).
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// istiod sends large snapshots on the first sync (ztunnel allows 200 MiB).
const MAX_MESSAGE: usize = 200 * 1024 * 1024;
/// google.rpc.Code INVALID_ARGUMENT, for NACKs.
const INVALID_ARGUMENT: i32 = 3;

/// Who weft tells istiod it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Kubernetes node (metadata `NODE_NAME`).
    pub node_name: String,
    /// weft's own pod (metadata `NAME`; env `POD_NAME`).
    pub pod_name: String,
    /// weft's own namespace (metadata `NAMESPACE`; env `POD_NAMESPACE`).
    pub pod_namespace: String,
    /// weft's pod IP (metadata `INSTANCE_IPS`; env `INSTANCE_IP`). With host networking, the
    /// node's IP.
    pub ip: Option<IpAddr>,
    /// Metadata `CLUSTER_ID`.
    pub cluster_id: String,
}

impl NodeInfo {
    /// From the downward-API environment variables ztunnel reads (`POD_NAME`,
    /// `POD_NAMESPACE`, `INSTANCE_IP`); missing ones are left empty.
    pub fn from_env(node_name: &str, cluster_id: &str) -> NodeInfo {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        NodeInfo {
            node_name: node_name.to_string(),
            pod_name: var("POD_NAME"),
            pod_namespace: var("POD_NAMESPACE"),
            ip: var("INSTANCE_IP").parse().ok(),
            cluster_id: cluster_id.to_string(),
        }
    }

    /// The xDS node: id `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` (istiod keys the
    /// proxy type on the first field and serves the workload API to `ztunnel` nodes) and
    /// metadata `NAME`, `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME`, `CLUSTER_ID`.
    pub fn node(&self) -> Node {
        // ztunnel's placeholder when the IP is unknown.
        let ip = self
            .ip
            .map(|ip| ip.to_string())
            .unwrap_or_else(|| "1.1.1.1".to_string());
        let ns = &self.pod_namespace;
        let string = |s: &str| prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(s.to_string())),
        };
        let fields = BTreeMap::from([
            ("NAME".to_string(), string(&self.pod_name)),
            ("NAMESPACE".to_string(), string(ns)),
            ("INSTANCE_IPS".to_string(), string(&ip)),
            ("NODE_NAME".to_string(), string(&self.node_name)),
            ("CLUSTER_ID".to_string(), string(&self.cluster_id)),
        ]);
        Node {
            id: format!("ztunnel~{ip}~{}.{ns}~{ns}.svc.cluster.local", self.pod_name),
            cluster: String::new(),
            metadata: Some(prost_types::Struct { fields }),
            user_agent_name: "weft".to_string(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").to_string(),
            )),
        }
    }
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Istiod(#[from] crate::istiod::IstiodError),
    #[error("{address}: stream failed: {status}")]
    Status { address: String, status: String },
    #[error("{address}: stream closed by istiod")]
    Closed { address: String },
}

/// Why a response is refused (NACKed); the text goes back to istiod as `error_detail`.
#[derive(Debug, thiserror::Error)]
enum ResponseError {
    #[error("type {0:?} was not subscribed to")]
    Unsubscribed(String),
    /// Every bad resource, in order.
    #[error("{}", join(.0))]
    Resources(Vec<ResourceError>),
}

fn join(errors: &[ResourceError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// One bad resource of a response, by name.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {problem}")]
struct ResourceError {
    name: String,
    problem: ResourceProblem,
}

/// What is wrong with one resource.
#[derive(Debug, thiserror::Error)]
enum ResourceProblem {
    #[error("resource body missing")]
    MissingBody,
    #[error("body is a {body:?}, not a {want:?}")]
    WrongType { body: String, want: &'static str },
    #[error("undecodable: {0}")]
    Undecodable(#[from] prost::DecodeError),
    #[error(transparent)]
    Address(#[from] translate::AddressError),
    #[error(transparent)]
    Authorization(#[from] translate::AuthorizationError),
}

/// The versions of the last good resources of each type; survives reconnects.
#[derive(Default)]
struct Known {
    addresses: BTreeMap<String, String>,
    authorizations: BTreeMap<String, String>,
}

impl Known {
    fn versions(&self, type_url: &str) -> std::collections::HashMap<String, String> {
        let map = match type_url {
            ADDRESS_TYPE => &self.addresses,
            _ => &self.authorizations,
        };
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// The client; create with [`XdsClient::new`], run with [`XdsClient::spawn`].
pub struct XdsClient {
    istiod: Istiod,
    node: NodeInfo,
    store: Arc<StateStore>,
    known: Known,
    /// The last good resources, and what spans them: turns a response into edits.
    assembly: Assembly,
    /// Edits accepted before both types were answered, applied together at the first sync.
    pending: Vec<Edit>,
    /// Types answered on the first stream; publishing starts once both are.
    synced: BTreeSet<&'static str>,
    /// ztunnel's xDS counters.
    metrics: XdsMetrics,
}

impl XdsClient {
    /// A client for `config` that publishes into `store`.
    pub fn new(
        config: ControlPlane,
        node: NodeInfo,
        trust_domain: &str,
        store: Arc<StateStore>,
        metrics: XdsMetrics,
    ) -> XdsClient {
        XdsClient {
            istiod: Istiod::new(config),
            node,
            store,
            known: Known::default(),
            assembly: Assembly::new(trust_domain),
            pending: Vec::new(),
            synced: BTreeSet::new(),
            metrics,
        }
    }

    /// Runs the client until `shutdown` turns true (or its sender is dropped).
    pub fn spawn(mut self, mut shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut failures: u32 = 0;
            loop {
                if *shutdown.borrow_and_update() {
                    break;
                }
                let mut progressed = false;
                let result = tokio::select! {
                    r = self.stream(&mut progressed) => r,
                    _ = shutdown.changed() => {
                        self.metrics.terminated(XdsTermination::Complete);
                        break;
                    }
                };
                self.metrics.terminated(match &result {
                    Ok(()) => XdsTermination::Complete,
                    Err(StreamError::Istiod(_)) => XdsTermination::ConnectionError,
                    Err(StreamError::Status { .. }) => XdsTermination::Error,
                    Err(StreamError::Closed { .. }) => XdsTermination::Reconnect,
                });
                if progressed {
                    failures = 0;
                }
                failures = failures.saturating_add(1);
                let delay = backoff(failures);
                if let Err(e) = result {
                    tracing::warn!(
                        target: "weft::xds",
                        error = %e,
                        retry_in = ?delay,
                        "xDS stream ended; reconnecting"
                    );
                    if !self.store.loaded() {
                        // Readiness shows why the mesh is not there yet.
                        self.store.reject(format!("xDS: {e}"));
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => break,
                }
            }
            tracing::debug!(target: "weft::xds", "xDS client stopped");
        })
    }

    /// One stream: connect, subscribe, then apply responses until it breaks. Sets
    /// `progressed` once a response was accepted (resets the backoff).
    async fn stream(&mut self, progressed: &mut bool) -> Result<(), StreamError> {
        // Only the first stream gates publishing; later ones apply on top of what is known.
        let address = self.istiod.address().to_string();
        let channel = self.istiod.connect().await?;
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        let node = self.node.node();
        for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
            let initial = DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: type_url.to_string(),
                initial_resource_versions: self.known.versions(type_url),
                ..DeltaDiscoveryRequest::default()
            };
            tracing::debug!(target: "weft::xds", type_url, known = initial.initial_resource_versions.len(), "subscribing");
            // The channel is new and larger than two requests: this cannot block.
            let _ = tx.send(initial).await;
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        self.istiod.authorize(request.metadata_mut()).await?;
        let mut responses = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .delta_aggregated_resources(request)
            .await
            .map_err(|s| StreamError::Status {
                address: address.clone(),
                status: status_text(&s),
            })?
            .into_inner();
        tracing::info!(target: "weft::xds", %address, "xDS stream established");
        loop {
            let response = match responses.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(StreamError::Closed { address }),
                Err(s) => {
                    return Err(StreamError::Status {
                        address,
                        status: status_text(&s),
                    })
                }
            };
            let type_url = response.type_url.clone();
            let nonce = response.nonce.clone();
            let bytes: usize = response
                .resources
                .iter()
                .map(|r| r.resource.as_ref().map_or(0, |a| a.value.len()))
                .sum();
            self.metrics.received(&type_url, bytes as u64);
            let reply = match self.apply(response) {
                Ok(()) => {
                    *progressed = true;
                    DeltaDiscoveryRequest {
                        type_url,
                        response_nonce: nonce,
                        ..DeltaDiscoveryRequest::default()
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    tracing::error!(target: "weft::xds", %type_url, %nonce, "NACK: refused (the rest of the response applies; a refused resource keeps its last good version): {message}");
                    self.store.reject(format!("xDS {type_url}: {message}"));
                    DeltaDiscoveryRequest {
                        type_url,
                        response_nonce: nonce,
                        error_detail: Some(Status {
                            code: INVALID_ARGUMENT,
                            message,
                            details: Vec::new(),
                        }),
                        ..DeltaDiscoveryRequest::default()
                    }
                }
            };
            if tx.send(reply).await.is_err() {
                return Err(StreamError::Closed { address });
            }
        }
    }

    /// Applies one response's good resources; returns the bad ones (for the NACK), which
    /// change nothing.
    fn apply(&mut self, response: DeltaDiscoveryResponse) -> Result<(), ResponseError> {
        let type_url: &'static str = match response.type_url.as_str() {
            ADDRESS_TYPE => ADDRESS_TYPE,
            AUTHORIZATION_TYPE => AUTHORIZATION_TYPE,
            other => return Err(ResponseError::Unsubscribed(other.to_string())),
        };
        let mut errors = Vec::new();
        let mut addresses = Vec::new();
        let mut authorizations = Vec::new();
        for r in response.resources {
            let name = r.name;
            let Some(any) = r.resource else {
                errors.push(ResourceError {
                    name,
                    problem: ResourceProblem::MissingBody,
                });
                continue;
            };
            if any.type_url != type_url {
                errors.push(ResourceError {
                    name,
                    problem: ResourceProblem::WrongType {
                        body: any.type_url,
                        want: type_url,
                    },
                });
                continue;
            }
            let result: Result<(), ResourceProblem> = match type_url {
                ADDRESS_TYPE => Address::decode(any.value.as_slice())
                    .map_err(ResourceProblem::from)
                    .and_then(|a| Ok(translate::address(a)?))
                    .map(|a| addresses.push((name.clone(), (r.version, a)))),
                _ => Authorization::decode(any.value.as_slice())
                    .map_err(ResourceProblem::from)
                    .and_then(|a| Ok(translate::authorization(a)?))
                    .map(|a| authorizations.push((name.clone(), (r.version, a)))),
            };
            if let Err(problem) = result {
                errors.push(ResourceError { name, problem });
            }
        }
        // As ztunnel (and as istiod expects: it does not send a refused response again): the
        // good resources apply, the bad ones are named in the NACK and keep their last good
        // version, if any.
        let (added, removed) = (
            addresses.len() + authorizations.len(),
            response.removed_resources.len(),
        );
        let edits = match type_url {
            ADDRESS_TYPE => {
                for n in &response.removed_resources {
                    self.known.addresses.remove(n);
                }
                let mut upserts = Vec::with_capacity(addresses.len());
                for (name, (version, entry)) in addresses {
                    self.known.addresses.insert(name.clone(), version);
                    upserts.push((name, entry));
                }
                self.assembly
                    .update_addresses(upserts, &response.removed_resources)
            }
            _ => {
                for n in &response.removed_resources {
                    self.known.authorizations.remove(n);
                }
                let mut upserts = Vec::with_capacity(authorizations.len());
                for (name, (version, policy)) in authorizations {
                    self.known.authorizations.insert(name.clone(), version);
                    upserts.push((name, policy));
                }
                self.assembly
                    .update_policies(upserts, &response.removed_resources)
            }
        };
        tracing::debug!(target: "weft::xds", type_url, added, removed, edits = edits.len(), "applied");
        self.pending.extend(edits);
        self.synced.insert(type_url);
        if self.synced.len() == 2 {
            self.publish();
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ResponseError::Resources(errors))
        }
    }

    /// Applies the pending edits that change something to the snapshot in force.
    fn publish(&mut self) {
        let current = self.store.snapshot();
        let loaded = self.store.loaded();
        // Each edit states the whole of one item, so the last per item is all that counts;
        // of those, the ones that change nothing are dropped.
        let mut seen = HashSet::new();
        let mut edits: Vec<Edit> = std::mem::take(&mut self.pending)
            .into_iter()
            .rev()
            .filter(|e| item(e).is_none_or(|i| seen.insert(i)))
            .filter(|e| !loaded || changes(&current, e))
            .collect();
        edits.reverse();
        if loaded && edits.is_empty() {
            return;
        }
        let count = edits.len();
        let base = self.assembly.warnings();
        let generation = self.store.apply_with_warnings(edits, |snap| {
            let mut warnings = base;
            warnings.extend(snap.ip_conflicts());
            for w in &warnings {
                tracing::warn!(target: "weft::xds", "{w}");
            }
            warnings
        });
        tracing::info!(
            target: "weft::xds",
            generation,
            edits = count,
            addresses = self.known.addresses.len(),
            authorizations = self.known.authorizations.len(),
            "mesh published from xDS"
        );
    }
}

/// The item an edit is about, for those the xDS source makes.
fn item(edit: &Edit) -> Option<(u8, String)> {
    match edit {
        Edit::UpsertWorkload(w) => Some((0, w.uid.to_string())),
        Edit::RemoveWorkload(uid) => Some((0, uid.clone())),
        Edit::UpsertService { key, .. } | Edit::RemoveService(key) => Some((1, key.clone())),
        Edit::UpsertPolicy(p) => {
            let (ns, name) = p.key();
            Some((2 + p.kind() as u8, format!("{ns}/{name}")))
        }
        Edit::RemovePolicy {
            kind,
            namespace,
            name,
        } => Some((2 + *kind as u8, format!("{namespace}/{name}"))),
        _ => None,
    }
}

/// Whether `edit` changes `snap` (istiod resends unchanged resources on a reconnect).
fn changes(snap: &Snapshot, edit: &Edit) -> bool {
    match edit {
        Edit::UpsertWorkload(w) => snap
            .mesh
            .workloads
            .get(w.uid.as_str())
            .is_none_or(|o| **o != *w),
        Edit::RemoveWorkload(uid) => snap.mesh.workloads.contains_key(uid.as_str()),
        Edit::UpsertService { key, service } => {
            snap.mesh.services.get(key).is_none_or(|o| **o != *service)
        }
        Edit::RemoveService(key) => snap.mesh.services.contains_key(key),
        Edit::UpsertPolicy(p) => !snap.mesh.policies.contains(p),
        Edit::RemovePolicy {
            kind,
            namespace,
            name,
        } => snap
            .mesh
            .policies
            .iter()
            .any(|p| p.kind() == *kind && p.key() == (namespace, name)),
        _ => true,
    }
}

fn status_text(s: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", s.code(), s.message());
    if let Some(src) = std::error::Error::source(s) {
        text.push_str(": ");
        text.push_str(&chain(src));
    }
    text
}

/// This client's retry schedule.
fn backoff(failures: u32) -> Duration {
    crate::backoff::Backoff {
        min: BACKOFF_MIN,
        max: BACKOFF_MAX,
    }
    .delay(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_looks_like_ztunnels() {
        let n = NodeInfo {
            node_name: "node-1".into(),
            pod_name: "weft-abc".into(),
            pod_namespace: "istio-system".into(),
            ip: Some("10.0.0.7".parse().unwrap()),
            cluster_id: "Kubernetes".into(),
        }
        .node();
        assert_eq!(
            n.id,
            "ztunnel~10.0.0.7~weft-abc.istio-system~istio-system.svc.cluster.local"
        );
        let md = n.metadata.unwrap().fields;
        let get = |k: &str| match &md[k].kind {
            Some(prost_types::value::Kind::StringValue(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(get("NODE_NAME"), "node-1");
        assert_eq!(get("NAMESPACE"), "istio-system");
        assert_eq!(get("NAME"), "weft-abc");
        assert_eq!(get("INSTANCE_IPS"), "10.0.0.7");
        assert_eq!(get("CLUSTER_ID"), "Kubernetes");
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap() {
        for (failures, ceiling) in [(1, 0.1), (2, 0.2), (3, 0.4), (20, 15.0)] {
            for _ in 0..20 {
                let d = backoff(failures).as_secs_f64();
                assert!(
                    d >= ceiling / 2.0 - 1e-9 && d <= ceiling + 1e-9,
                    "{failures}: {d}"
                );
            }
        }
    }
}
