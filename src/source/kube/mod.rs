//! The cluster's API server as the mesh source (`mesh: {kubernetes: {}}`): kube-rs watchers of
//! Namespaces, Pods, Services, EndpointSlices and Istio's `security.istio.io`
//! AuthorizationPolicy, PeerAuthentication and RequestAuthentication (v1, else v1beta1),
//! each event applied to the state as an edit.
//!
//! Shape: one task per kind runs a kube-rs [`watcher`] (paginated lists, watches resumed from
//! the last resource version, bookmarks, a relist after `410 Gone`, kube-rs's backoff on
//! errors) and converts each object at once (`convert`: only what weft uses is kept); the
//! changes meet in one channel, and one task applies them in batches (`apply`: the rules of
//! readiness, relists, bad objects). The state in force is never emptied by an error: while
//! the API server is away, watches retry and the last good state serves on.
//!
//! Owns the watches, CRD version discovery and the source's metrics. Does not own the
//! client's configuration ([`crate::kubeapi`]) or what an object means (`apply`, `convert`,
//! [`crate::source::objects`]).

pub mod apply;
mod convert;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Resource;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;

use self::apply::{Applier, Change, Kind};
use crate::backoff::Backoff;
use crate::config::KubeSettings;
use crate::metrics::KubeMetrics;
use crate::state::StateStore;

/// The API group of Istio's security CRDs, and its versions in order of preference.
const ISTIO_SECURITY: &str = "security.istio.io";
const ISTIO_SECURITY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// Objects per list page.
const PAGE_SIZE: u32 = 500;
/// How often a CRD that is not served is looked for again.
const CRD_RECHECK: Duration = Duration::from_secs(30);
/// Changes applied together, at most (one snapshot per batch).
const BATCH: usize = 1024;
/// Retry delays of the client's creation and of CRD discovery.
const RETRY: Backoff = Backoff {
    min: Duration::from_millis(500),
    max: Duration::from_secs(30),
};

/// Where the store's status says the mesh comes from.
pub fn describe(settings: &KubeSettings) -> String {
    match &settings.kubeconfig {
        Some(p) => format!("kubernetes (kubeconfig {})", p.display()),
        None => "kubernetes (in-cluster)".to_string(),
    }
}

/// Starts watching; the state is published once every kind has been listed, then kept in
/// step until `shutdown` turns true.
pub fn spawn(
    settings: KubeSettings,
    store: Arc<StateStore>,
    metrics: KubeMetrics,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = {
            let mut failures = 0;
            loop {
                match crate::kubeapi::client(settings.kubeconfig.as_deref()).await {
                    Ok(c) => break c,
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, "cannot make the Kubernetes client; retrying");
                        store.reject(e.to_string());
                        tokio::select! {
                            _ = crate::sync::shut_down(&mut shutdown) => return,
                            _ = tokio::time::sleep(RETRY.delay(failures)) => {}
                        }
                    }
                }
            }
        };
        let (tx, rx) = mpsc::channel::<Change>(BATCH);
        let mut tasks = tokio::task::JoinSet::new();
        let m = &metrics;
        tasks.spawn(watch_kind(
            Api::<core::Namespace>::all(client.clone()),
            Kind::Namespace,
            convert::namespace,
            tx.clone(),
            m.clone(),
        ));
        tasks.spawn(watch_kind(
            Api::<core::Pod>::all(client.clone()),
            Kind::Pod,
            convert::pod,
            tx.clone(),
            m.clone(),
        ));
        tasks.spawn(watch_kind(
            Api::<core::Service>::all(client.clone()),
            Kind::Service,
            convert::service,
            tx.clone(),
            m.clone(),
        ));
        tasks.spawn(watch_kind(
            Api::<EndpointSlice>::all(client.clone()),
            Kind::EndpointSlice,
            convert::endpoint_slice,
            tx.clone(),
            m.clone(),
        ));
        for (kind, plural) in [
            (Kind::AuthorizationPolicy, "authorizationpolicies"),
            (Kind::PeerAuthentication, "peerauthentications"),
            (Kind::RequestAuthentication, "requestauthentications"),
        ] {
            tasks.spawn(watch_policies(
                client.clone(),
                kind,
                plural,
                tx.clone(),
                m.clone(),
            ));
        }
        drop(tx);
        tokio::select! {
            _ = crate::sync::shut_down(&mut shutdown) => {}
            _ = apply_changes(rx, store, metrics) => {}
        }
        tasks.abort_all();
    })
}

/// Applies changes as they come, in batches of what has arrived.
async fn apply_changes(
    mut rx: mpsc::Receiver<Change>,
    store: Arc<StateStore>,
    metrics: KubeMetrics,
) {
    let mut applier = Applier::new();
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let was_ready = applier.ready();
        applier.apply(std::mem::take(&mut batch), &store);
        if applier.ready() && !was_ready {
            tracing::info!(
                generation = store.snapshot().generation,
                "every kind listed: the Kubernetes state is in force"
            );
        }
        for kind in Kind::ALL {
            metrics.set_invalid(kind.name(), applier.invalid_count(kind));
        }
    }
}

/// Watches one kind for ever, converting each object with `convert`.
async fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    convert: impl Fn(K) -> apply::Object + Send + 'static,
    tx: mpsc::Sender<Change>,
    metrics: KubeMetrics,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let config = watcher::Config::default().page_size(PAGE_SIZE);
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(Event::Init) => Change::Listing(kind),
            Ok(Event::InitApply(o)) => Change::Listed(convert(o)),
            Ok(Event::InitDone) => Change::ListDone(kind),
            Ok(Event::Apply(o)) => Change::Applied(convert(o)),
            Ok(Event::Delete(o)) => {
                let meta = o.meta();
                Change::Deleted {
                    kind,
                    namespace: meta.namespace.clone().unwrap_or_default(),
                    name: meta.name.clone().unwrap_or_default(),
                }
            }
            Err(e) => {
                metrics.watch_error(kind.name());
                tracing::warn!(kind = kind.name(), error = %e, "Kubernetes watch failed; retrying (the state in force stays)");
                continue;
            }
        };
        if tx.send(change).await.is_err() {
            return;
        }
    }
}

/// Watches one `security.istio.io` kind at the version the API server serves; while it
/// serves none, the kind is empty with a warning, and looked for again every
/// [`CRD_RECHECK`].
async fn watch_policies(
    client: kube::Client,
    kind: Kind,
    plural: &'static str,
    tx: mpsc::Sender<Change>,
    metrics: KubeMetrics,
) {
    let mut failures = 0;
    let mut reported_missing = false;
    let resource = loop {
        match served_version(&client, plural).await {
            Ok(Some(r)) => break r,
            Ok(None) => {
                failures = 0;
                if !reported_missing {
                    reported_missing = true;
                    let warning = format!(
                        "{} is not served (no {plural} in {ISTIO_SECURITY}/v1 or /v1beta1: is Istio's CRD installed?); no {} applies",
                        kind.name(),
                        kind.name()
                    );
                    tracing::warn!("{warning}");
                    if tx.send(Change::Missing(kind, warning)).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(CRD_RECHECK).await;
            }
            Err(e) => {
                failures += 1;
                metrics.watch_error(kind.name());
                tracing::warn!(kind = kind.name(), error = %e, "cannot discover {ISTIO_SECURITY}; retrying");
                tokio::time::sleep(RETRY.delay(failures)).await;
            }
        }
    };
    if reported_missing && tx.send(Change::Found(kind)).await.is_err() {
        return;
    }
    tracing::info!(kind = kind.name(), version = %resource.api_version, "watching");
    let api = Api::<DynamicObject>::all_with(client, &resource);
    watch_kind(api, kind, move |o| convert::policy(kind, o), tx, metrics).await;
}

/// The resource `plural` of `security.istio.io` at the first version the API server serves
/// it at; `None` when it serves it at neither.
async fn served_version(
    client: &kube::Client,
    plural: &str,
) -> Result<Option<ApiResource>, kube::Error> {
    for version in ISTIO_SECURITY_VERSIONS {
        let api_version = format!("{ISTIO_SECURITY}/{version}");
        match client.list_api_group_resources(&api_version).await {
            Ok(list) => {
                if let Some(r) = list.resources.iter().find(|r| r.name == plural) {
                    return Ok(Some(ApiResource {
                        group: ISTIO_SECURITY.to_string(),
                        version: version.to_string(),
                        api_version,
                        kind: r.kind.clone(),
                        plural: plural.to_string(),
                    }));
                }
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}
