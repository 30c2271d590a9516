//! The Kubernetes API server stand-in (`support::apiserver`) driven by kube-rs itself: each
//! test holds one row of the stand-in's behaviour table, so kube's clients and watchers see
//! it as they see a real API server. Loopback, no root.

mod support;

use std::pin::Pin;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, ResourceExt, VersionMatch,
    WatchEvent, WatchParams,
};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::{json, Value};
use support::apiserver::{self, FakeApiServer, ADMIN_TOKEN};
use tokio_stream::{Stream, StreamExt};

const LIMIT: Duration = Duration::from_secs(15);

async fn client_from(path: &std::path::Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(path).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    // kube retries 429, 503 and 504 by default; the tests want to see them.
    config.default_retry = false;
    kube::Client::try_from(config).unwrap()
}

async fn client(api: &FakeApiServer) -> kube::Client {
    client_from(&api.kubeconfig()).await
}

fn ap_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.istio.io", version, "AuthorizationPolicy"),
        "authorizationpolicies",
    )
}

fn api_error(e: kube::Error) -> (u16, String, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason, s.message),
        other => panic!("not an API error: {other}"),
    }
}

/// Lists of `path` (not watches) in the request log.
fn lists_of(api: &FakeApiServer, path: &str) -> Vec<String> {
    api.requests()
        .into_iter()
        .filter(|r| r.starts_with(&format!("GET {path}?")) && !r.contains("watch=true"))
        .collect()
}

fn watches_of(api: &FakeApiServer, path: &str) -> Vec<String> {
    api.requests()
        .into_iter()
        .filter(|r| r.starts_with(&format!("GET {path}?")) && r.contains("watch=true"))
        .collect()
}

type Events = Pin<Box<dyn Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send>>;

fn pod_watcher(api: Api<Pod>, config: watcher::Config) -> Events {
    Box::pin(watcher(api, config).default_backoff())
}

fn summary(e: &Result<watcher::Event<Pod>, watcher::Error>) -> String {
    match e {
        Ok(watcher::Event::Init) => "Init".into(),
        Ok(watcher::Event::InitApply(p)) => format!("InitApply {}", p.name_any()),
        Ok(watcher::Event::InitDone) => "InitDone".into(),
        Ok(watcher::Event::Apply(p)) => format!("Apply {}", p.name_any()),
        Ok(watcher::Event::Delete(p)) => format!("Delete {}", p.name_any()),
        Err(e) => format!("Err {e}"),
    }
}

/// The watcher's events up to and including the first equal to `last`.
async fn events_until(events: &mut Events, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = tokio::time::timeout(left, events.next())
            .await
            .unwrap_or_else(|_| panic!("no {last:?} in time; saw {seen:?}"))
            .expect("the watcher goes on");
        let s = summary(&e);
        seen.push(s.clone());
        if s == last {
            return seen;
        }
    }
}

/// Without errors (which the watcher retries after).
fn ok_events(events: &[String]) -> Vec<&str> {
    events
        .iter()
        .filter(|e| !e.starts_with("Err"))
        .map(String::as_str)
        .collect()
}

async fn cluster_with_pods(names: &[&str]) -> FakeApiServer {
    let api = FakeApiServer::start().await;
    api.apply(apiserver::namespace(
        "shop",
        &[("istio.io/dataplane-mode", "ambient")],
    ));
    for name in names {
        api.apply(apiserver::pod("shop", name, "default", "node-1"));
    }
    api
}

type WatchStream = Pin<Box<dyn Stream<Item = kube::Result<WatchEvent<Pod>>> + Send>>;

/// `Api::watch`'s stream, boxed to be polled.
trait Boxed: Stream<Item = kube::Result<WatchEvent<Pod>>> + Send + Sized + 'static {
    fn boxed(self) -> WatchStream {
        Box::pin(self)
    }
}

impl<S: Stream<Item = kube::Result<WatchEvent<Pod>>> + Send + 'static> Boxed for S {}

async fn watch_events(stream: &mut WatchStream, n: usize) -> Vec<WatchEvent<Pod>> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = tokio::time::timeout(LIMIT, stream.next())
            .await
            .expect("a watch event in time")
            .expect("the stream goes on")
            .expect("no stream error");
        out.push(e);
    }
    out
}

fn watch_summary(e: &WatchEvent<Pod>) -> String {
    match e {
        WatchEvent::Added(p) => format!("ADDED {} {}", p.name_any(), p.resource_version().unwrap()),
        WatchEvent::Modified(p) => {
            format!(
                "MODIFIED {} {}",
                p.name_any(),
                p.resource_version().unwrap()
            )
        }
        WatchEvent::Deleted(p) => {
            format!("DELETED {} {}", p.name_any(), p.resource_version().unwrap())
        }
        WatchEvent::Bookmark(b) => format!("BOOKMARK {}", b.metadata.resource_version),
        WatchEvent::Error(s) => format!("ERROR {} {} {}", s.code, s.reason, s.message),
    }
}

// === requests, kinds, discovery ===

#[tokio::test]
async fn requests_without_the_admin_token_are_unauthorized() {
    let api = cluster_with_pods(&["a"]).await;
    let text = std::fs::read_to_string(api.kubeconfig()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("kubeconfig");
    std::fs::write(&wrong, text.replace(ADMIN_TOKEN, "someone-else")).unwrap();
    let pods: Api<Pod> = Api::all(client_from(&wrong).await);
    let (code, reason, _) = api_error(pods.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (401, "Unauthorized"));
    let pods: Api<Pod> = Api::all(client(&api).await);
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test]
async fn get_answers_the_object_or_not_found() {
    let api = cluster_with_pods(&["a"]).await;
    let c = client(&api).await;
    let pods: Api<Pod> = Api::namespaced(c.clone(), "shop");
    let a = pods.get("a").await.unwrap();
    assert_eq!(a.spec.unwrap().node_name.as_deref(), Some("node-1"));
    let (code, reason, message) = api_error(pods.get("b").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    assert_eq!(message, "pods \"b\" not found");
    let namespaces: Api<Namespace> = Api::all(c);
    let shop = namespaces.get("shop").await.unwrap();
    assert_eq!(shop.labels()["istio.io/dataplane-mode"], "ambient");
    assert_eq!(namespaces.get_opt("nope").await.unwrap(), None);
}

#[tokio::test]
async fn istio_policies_are_served_at_v1_and_v1beta1_from_one_storage() {
    let api = FakeApiServer::start().await;
    api.apply(apiserver::istio(
        "AuthorizationPolicy",
        "shop",
        "deny-all",
        json!({"action": "DENY", "rules": [{}]}),
    ));
    let c = client(&api).await;
    for version in ["v1", "v1beta1"] {
        let policies: Api<DynamicObject> =
            Api::namespaced_with(c.clone(), "shop", &ap_resource(version));
        let list = policies.list(&ListParams::default()).await.unwrap();
        assert_eq!(list.items.len(), 1, "{version}");
        let p = &list.items[0];
        let types = p.types.as_ref().unwrap();
        assert_eq!(types.api_version, format!("security.istio.io/{version}"));
        assert_eq!(types.kind, "AuthorizationPolicy");
        assert_eq!(p.data["spec"]["action"], "DENY");
        let got = policies.get("deny-all").await.unwrap();
        assert_eq!(
            got.types.unwrap().api_version,
            format!("security.istio.io/{version}")
        );
    }
    // A v1beta1 object replaces the same one.
    let mut beta = apiserver::istio("AuthorizationPolicy", "shop", "deny-all", json!({}));
    beta["apiVersion"] = json!("security.istio.io/v1beta1");
    api.apply(beta);
    let v1: Api<DynamicObject> = Api::namespaced_with(c, "shop", &ap_resource("v1"));
    let list = v1.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].data["spec"], json!({}));
}

#[tokio::test]
async fn discovery_lists_what_is_served() {
    let api = FakeApiServer::start().await;
    let c = client(&api).await;
    let core = c.list_core_api_versions().await.unwrap();
    assert_eq!(core.versions, vec!["v1"]);
    let v1 = c.list_core_api_resources("v1").await.unwrap();
    let namespaces = v1
        .resources
        .iter()
        .find(|r| r.name == "namespaces")
        .unwrap();
    assert!(!namespaces.namespaced);
    assert_eq!(namespaces.kind, "Namespace");
    let pods = v1.resources.iter().find(|r| r.name == "pods").unwrap();
    assert!(pods.namespaced);
    assert!(pods.verbs.contains(&"watch".to_string()));
    assert!(v1.resources.iter().any(|r| r.name == "services"));
    let groups = c.list_api_groups().await.unwrap();
    let istio = groups
        .groups
        .iter()
        .find(|g| g.name == "security.istio.io")
        .unwrap();
    let versions: Vec<&str> = istio.versions.iter().map(|v| v.version.as_str()).collect();
    assert_eq!(versions, ["v1", "v1beta1"]);
    assert_eq!(istio.preferred_version.as_ref().unwrap().version, "v1");
    let slices = c
        .list_api_group_resources("discovery.k8s.io/v1")
        .await
        .unwrap();
    assert_eq!(slices.resources[0].kind, "EndpointSlice");
    // kube's own discovery finds the kinds.
    let discovery = kube::Discovery::new(c).run().await.unwrap();
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "PeerAuthentication");
    let (ar, caps) = discovery.resolve_gvk(&gvk).unwrap();
    assert_eq!(ar.plural, "peerauthentications");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
}

#[tokio::test]
async fn aggregated_discovery_lists_what_is_served() {
    let api = FakeApiServer::start().await;
    let c = client(&api).await;
    let discovery = kube::Discovery::new(c.clone())
        .run_aggregated()
        .await
        .unwrap();
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1beta1", "RequestAuthentication");
    let (ar, caps) = discovery.resolve_gvk(&gvk).unwrap();
    assert_eq!(ar.plural, "requestauthentications");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    let ns = GroupVersionKind::gvk("", "v1", "Namespace");
    let (_, caps) = discovery.resolve_gvk(&ns).unwrap();
    assert_eq!(caps.scope, kube::discovery::Scope::Cluster);
    assert!(discovery.has_group("discovery.k8s.io"));
    assert!(api.requests().iter().any(|r| r.starts_with("GET /apis?")));

    api.serve_version("security.istio.io/v1", false);
    api.serve_version("security.istio.io/v1beta1", false);
    let discovery = kube::Discovery::new(c).run_aggregated().await.unwrap();
    assert!(!discovery.has_group("security.istio.io"));
    assert!(discovery.has_group("discovery.k8s.io"));
}

#[tokio::test]
async fn a_crd_version_switched_off_is_not_found_and_not_discovered() {
    let api = FakeApiServer::start().await;
    api.apply(apiserver::istio(
        "AuthorizationPolicy",
        "shop",
        "p",
        json!({}),
    ));
    let c = client(&api).await;
    api.serve_version("security.istio.io/v1", false);
    let v1: Api<DynamicObject> = Api::all_with(c.clone(), &ap_resource("v1"));
    let (code, reason, _) = api_error(v1.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    let (code, _, _) = api_error(
        c.list_api_group_resources("security.istio.io/v1")
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404);
    let beta: Api<DynamicObject> = Api::all_with(c.clone(), &ap_resource("v1beta1"));
    assert_eq!(
        beta.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    let groups = c.list_api_groups().await.unwrap();
    let istio = groups
        .groups
        .iter()
        .find(|g| g.name == "security.istio.io")
        .unwrap();
    assert_eq!(istio.versions.len(), 1);
    assert_eq!(istio.preferred_version.as_ref().unwrap().version, "v1beta1");

    // No version at all: the CRDs are not installed.
    api.serve_version("security.istio.io/v1beta1", false);
    let (code, _, _) = api_error(beta.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(code, 404);
    let groups = c.list_api_groups().await.unwrap();
    assert!(groups.groups.iter().all(|g| g.name != "security.istio.io"));
    assert!(groups.groups.iter().any(|g| g.name == "discovery.k8s.io"));

    api.serve_version("security.istio.io/v1", true);
    assert_eq!(
        v1.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

// === lists ===

#[tokio::test]
async fn lists_carry_the_store_version_and_objects_their_own() {
    let api = cluster_with_pods(&["a"]).await;
    let pods: Api<Pod> = Api::namespaced(client(&api).await, "shop");
    let rv_b = api.apply(apiserver::pod("shop", "b", "default", "node-1"));
    let namespaces: Api<Namespace> = Api::all(client(&api).await);
    let list = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        list.metadata.resource_version,
        Some(api.resource_version().to_string())
    );
    let b = list.items.iter().find(|p| p.name_any() == "b").unwrap();
    assert_eq!(b.resource_version(), Some(rv_b.to_string()));
    let uid = b.uid().unwrap();
    // A replace keeps the uid and takes a new version, above every earlier one.
    let rv_b2 = api.apply(apiserver::pod("shop", "b", "default", "node-2"));
    assert!(rv_b2 > rv_b);
    let b2 = pods.get("b").await.unwrap();
    assert_eq!(b2.uid(), Some(uid));
    assert_eq!(b2.resource_version(), Some(rv_b2.to_string()));
    // One counter for every kind.
    let rv_ns = api.apply(apiserver::namespace("other", &[]));
    assert_eq!(rv_ns, rv_b2 + 1);
    let nl = namespaces.list(&ListParams::default()).await.unwrap();
    assert_eq!(nl.metadata.resource_version, Some(rv_ns.to_string()));
    let rv_del = api.delete("v1", "Pod", Some("shop"), "b").unwrap();
    assert_eq!(rv_del, rv_ns + 1);
    assert_eq!(api.delete("v1", "Pod", Some("shop"), "b"), None);
}

#[tokio::test]
async fn list_pages_with_limit_and_continue_are_consistent() {
    let api = cluster_with_pods(&["a", "b", "c", "d", "e"]).await;
    let pods: Api<Pod> = Api::all(client(&api).await);
    let mut names = Vec::new();
    let mut versions = Vec::new();
    let mut lp = ListParams::default().limit(2);
    for page in 0.. {
        assert!(page < 5, "too many pages");
        let list = pods.list(&lp).await.unwrap();
        assert!(list.items.len() <= 2);
        names.extend(list.items.iter().map(|p| p.name_any()));
        versions.push(list.metadata.resource_version.clone().unwrap());
        if page == 0 {
            assert_eq!(list.metadata.remaining_item_count, Some(3));
            // Written between pages: not in this list, which is read at its first version.
            api.apply(apiserver::pod("shop", "f", "default", "node-1"));
            api.delete("v1", "Pod", Some("shop"), "e");
        }
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => lp = ListParams::default().limit(2).continue_token(&token),
            None => break,
        }
    }
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    assert!(versions.iter().all(|v| *v == versions[0]), "{versions:?}");
    let all = pods.list(&ListParams::default()).await.unwrap();
    let now: Vec<String> = all.items.iter().map(|p| p.name_any()).collect();
    assert_eq!(now, ["a", "b", "c", "d", "f"]);
    let paths: Vec<String> = lists_of(&api, "/api/v1/pods");
    assert!(paths[0].ends_with("limit=2"), "{paths:?}");
    assert!(paths[1].contains("&continue="), "{paths:?}");
}

#[tokio::test]
async fn a_continue_from_a_compacted_version_is_expired() {
    let api = cluster_with_pods(&["a", "b", "c"]).await;
    let pods: Api<Pod> = Api::all(client(&api).await);
    let first = pods.list(&ListParams::default().limit(2)).await.unwrap();
    let token = first.metadata.continue_.unwrap();
    api.apply(apiserver::pod("shop", "d", "default", "node-1"));
    api.compact();
    let (code, reason, message) = api_error(
        pods.list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (410, "Expired"));
    assert!(
        message.contains("continue parameter is too old"),
        "{message}"
    );
}

#[tokio::test]
async fn list_resource_version_semantics() {
    let api = cluster_with_pods(&["a", "b", "c"]).await;
    let c = client(&api).await;
    let pods: Api<Pod> = Api::all(c.clone());
    let rv_abc = api.resource_version();
    api.apply(apiserver::pod("shop", "d", "default", "node-1"));

    // "0": any version, from the watch cache, limit ignored.
    let req = http::Request::get("/api/v1/pods?limit=1&resourceVersion=0")
        .body(Vec::new())
        .unwrap();
    let any: Value = c.request(req).await.unwrap();
    assert_eq!(any["items"].as_array().unwrap().len(), 4);
    assert!(any["metadata"].get("continue").is_none());
    let lp = ListParams {
        resource_version: Some("0".into()),
        version_match: Some(VersionMatch::NotOlderThan),
        ..ListParams::default()
    };
    assert_eq!(pods.list(&lp).await.unwrap().items.len(), 4);

    // Exact: the state at that version.
    let exact = ListParams::default()
        .at(&rv_abc.to_string())
        .matching(VersionMatch::Exact);
    let then = pods.list(&exact).await.unwrap();
    assert_eq!(then.items.len(), 3);
    assert_eq!(then.metadata.resource_version, Some(rv_abc.to_string()));
    // NotOlderThan: the latest.
    let not_older = ListParams::default()
        .at(&rv_abc.to_string())
        .matching(VersionMatch::NotOlderThan);
    assert_eq!(pods.list(&not_older).await.unwrap().items.len(), 4);
    // A version not reached yet.
    let future = ListParams::default()
        .at(&(api.resource_version() + 10).to_string())
        .matching(VersionMatch::NotOlderThan);
    let (code, _, message) = api_error(pods.list(&future).await.unwrap_err());
    assert_eq!(code, 504);
    assert!(
        message.starts_with("Too large resource version"),
        "{message}"
    );
    // Compacted away.
    api.compact();
    let (code, reason, _) = api_error(pods.list(&exact).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (410, "Expired"));
}

#[tokio::test]
async fn field_selectors_filter_lists_and_watches() {
    let api = cluster_with_pods(&["a"]).await;
    api.apply(apiserver::pod("shop", "b", "default", "node-2"));
    let pods: Api<Pod> = Api::all(client(&api).await);
    let on_1 = pods
        .list(&ListParams::default().fields("spec.nodeName=node-1"))
        .await
        .unwrap();
    let names: Vec<String> = on_1.items.iter().map(|p| p.name_any()).collect();
    assert_eq!(names, ["a"]);
    let (code, _, message) = api_error(
        pods.list(&ListParams::default().fields("spec.hostname=x"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 400);
    assert!(message.contains("field label not supported"), "{message}");

    let rv = on_1.metadata.resource_version.unwrap();
    let mut stream = pods
        .watch(&WatchParams::default().fields("spec.nodeName=node-1"), &rv)
        .await
        .unwrap()
        .boxed();
    // b moves onto node-1, a off it.
    let rv_b = api.apply(apiserver::pod("shop", "b", "default", "node-1"));
    let rv_a = api.apply(apiserver::pod("shop", "a", "default", "node-2"));
    let got: Vec<String> = watch_events(&mut stream, 2)
        .await
        .iter()
        .map(watch_summary)
        .collect();
    assert_eq!(
        got,
        [format!("ADDED b {rv_b}"), format!("DELETED a {rv_a}")]
    );
}

#[tokio::test]
async fn a_list_delay_slows_lists_not_watches() {
    let api = cluster_with_pods(&["a"]).await;
    let pods: Api<Pod> = Api::all(client(&api).await);
    api.set_list_delay(Duration::from_millis(600));
    let start = Instant::now();
    let list = pods.list(&ListParams::default()).await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(600));
    let start = Instant::now();
    let _stream = pods
        .watch(
            &WatchParams::default(),
            &list.metadata.resource_version.unwrap(),
        )
        .await
        .unwrap();
    assert!(start.elapsed() < Duration::from_millis(600));
}

// === watch ===

#[tokio::test]
async fn watch_from_a_version_gets_every_later_event() {
    let api = cluster_with_pods(&["a"]).await;
    let pods: Api<Pod> = Api::namespaced(client(&api).await, "shop");
    let rv = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    // Written before the watch opens, after the version it starts from.
    let rv_b = api.apply(apiserver::pod("shop", "b", "default", "node-1"));
    let mut stream = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let rv_a = api.apply(apiserver::pod("shop", "a", "default", "node-2"));
    let rv_del = api.delete("v1", "Pod", Some("shop"), "b").unwrap();
    // Another namespace: not this watch's.
    api.apply(apiserver::pod("other", "x", "default", "node-1"));
    let got: Vec<String> = watch_events(&mut stream, 3)
        .await
        .iter()
        .map(watch_summary)
        .collect();
    assert_eq!(
        got,
        [
            format!("ADDED b {rv_b}"),
            format!("MODIFIED a {rv_a}"),
            format!("DELETED b {rv_del}"),
        ]
    );
    let w = watches_of(&api, "/api/v1/namespaces/shop/pods");
    assert_eq!(w.len(), 1);
    assert!(w[0].contains(&format!("resourceVersion={rv}")), "{w:?}");
}

#[tokio::test]
async fn a_watch_from_a_compacted_version_gets_an_expired_error_event() {
    let api = cluster_with_pods(&["a"]).await;
    let pods: Api<Pod> = Api::all(client(&api).await);
    let old = api.resource_version();
    api.apply(apiserver::pod("shop", "b", "default", "node-1"));
    api.compact();
    // The watch itself is accepted (200); the error is its one event, then it ends.
    let mut stream = pods
        .watch(&WatchParams::default(), &old.to_string())
        .await
        .unwrap()
        .boxed();
    let got = watch_summary(&watch_events(&mut stream, 1).await[0]);
    assert_eq!(
        got,
        format!(
            "ERROR 410 Expired too old resource version: {old} ({})",
            api.resource_version()
        )
    );
    let end = tokio::time::timeout(LIMIT, stream.next()).await.unwrap();
    assert!(end.is_none());
    // From the compacted version itself: fine.
    let now = api.resource_version().to_string();
    let mut stream = pods
        .watch(&WatchParams::default(), &now)
        .await
        .unwrap()
        .boxed();
    let rv_c = api.apply(apiserver::pod("shop", "c", "default", "node-1"));
    let got = watch_summary(&watch_events(&mut stream, 1).await[0]);
    assert_eq!(got, format!("ADDED c {rv_c}"));
}

#[tokio::test]
async fn bookmarks_come_on_request_and_at_the_interval() {
    let api = cluster_with_pods(&["a"]).await;
    let pods: Api<Pod> = Api::all(client(&api).await);
    let rv = api.resource_version().to_string();
    let mut with = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let mut without = pods
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    // Events in other kinds move the version; a bookmark says so.
    let rv_ns = api.apply(apiserver::namespace("other", &[]));
    api.send_bookmarks();
    let got = watch_summary(&watch_events(&mut with, 1).await[0]);
    assert_eq!(got, format!("BOOKMARK {rv_ns}"));
    let rv_b = api.apply(apiserver::pod("shop", "b", "default", "node-1"));
    let got = watch_summary(&watch_events(&mut without, 1).await[0]);
    assert_eq!(got, format!("ADDED b {rv_b}"), "no bookmark without asking");

    api.set_bookmark_interval(Duration::from_millis(200));
    let mut ticking = pods
        .watch(&WatchParams::default(), &rv_b.to_string())
        .await
        .unwrap()
        .boxed();
    let got = watch_summary(&watch_events(&mut ticking, 1).await[0]);
    assert_eq!(got, format!("BOOKMARK {rv_b}"));
}

#[tokio::test]
async fn a_watch_ends_at_its_timeout() {
    let api = cluster_with_pods(&["a"]).await;
    let pods: Api<Pod> = Api::all(client(&api).await);
    let start = Instant::now();
    let mut stream = pods
        .watch(
            &WatchParams::default().timeout(1),
            &api.resource_version().to_string(),
        )
        .await
        .unwrap()
        .boxed();
    let end = tokio::time::timeout(LIMIT, stream.next()).await.unwrap();
    assert!(end.is_none(), "a clean end, no error");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(watches_of(&api, "/api/v1/pods")[0].contains("timeoutSeconds=1"));
}

// === kube's watcher ===

#[tokio::test]
async fn the_kube_watcher_lists_in_pages_then_watches() {
    let api = cluster_with_pods(&["a", "b", "c", "d", "e"]).await;
    let c = client(&api).await;
    let configs = [
        ("default", watcher::Config::default()),
        ("page_size", watcher::Config::default().page_size(2)),
        ("any_semantic", watcher::Config::default().any_semantic()),
        (
            "any_semantic_unpaged",
            watcher::Config {
                page_size: None,
                ..watcher::Config::default().any_semantic()
            },
        ),
    ];
    for (what, config) in configs {
        let before = api.requests().len();
        let mut events = pod_watcher(Api::all(c.clone()), config);
        let got = events_until(&mut events, "InitDone").await;
        assert_eq!(
            got,
            [
                "Init",
                "InitApply a",
                "InitApply b",
                "InitApply c",
                "InitApply d",
                "InitApply e",
                "InitDone"
            ],
            "{what}"
        );
        let name = format!("new-{what}").replace('_', "-");
        api.apply(apiserver::pod("shop", &name, "default", "node-1"));
        let got = events_until(&mut events, &format!("Apply {name}")).await;
        assert_eq!(got, [format!("Apply {name}")], "{what}");
        api.delete("v1", "Pod", Some("shop"), &name);
        let got = events_until(&mut events, &format!("Delete {name}")).await;
        assert_eq!(got, [format!("Delete {name}")], "{what}");
        let requests = api.requests()[before..].to_vec();
        eprintln!("kube watcher ({what}) sent: {requests:#?}");
        let lists: Vec<&String> = requests.iter().filter(|r| !r.contains("watch=")).collect();
        if what == "page_size" {
            assert_eq!(lists.len(), 3, "{requests:?}");
            assert!(lists[1].contains("continue="), "{requests:?}");
        } else {
            assert_eq!(lists.len(), 1, "{requests:?}");
        }
        if what == "any_semantic_unpaged" {
            // kube sends "0" only without a limit.
            assert!(
                lists[0].contains("resourceVersion=0&resourceVersionMatch=NotOlderThan"),
                "{requests:?}"
            );
        }
        let watch = requests.iter().find(|r| r.contains("watch=true")).unwrap();
        assert!(watch.contains("allowWatchBookmarks=true"), "{watch}");
    }
}

#[tokio::test]
async fn a_streaming_list_watcher_gets_initial_events_and_their_end() {
    let api = cluster_with_pods(&["a", "b"]).await;
    let c = client(&api).await;
    let mut events = pod_watcher(Api::all(c), watcher::Config::default().streaming_lists());
    let got = events_until(&mut events, "InitDone").await;
    assert_eq!(got, ["Init", "InitApply a", "InitApply b", "InitDone"]);
    api.apply(apiserver::pod("shop", "c", "default", "node-1"));
    assert_eq!(events_until(&mut events, "Apply c").await, ["Apply c"]);
    let requests = api.requests();
    assert!(lists_of(&api, "/api/v1/pods").is_empty(), "{requests:?}");
    let w = watches_of(&api, "/api/v1/pods");
    eprintln!("kube watcher (streaming_lists) sent: {w:#?}");
    assert!(w[0].contains("sendInitialEvents=true"), "{w:?}");
}

#[tokio::test]
async fn a_watcher_survives_dropped_watches_without_relisting() {
    let api = cluster_with_pods(&["a"]).await;
    let mut events = pod_watcher(Api::all(client(&api).await), watcher::Config::default());
    events_until(&mut events, "InitDone").await;
    api.apply(apiserver::pod("shop", "b", "default", "node-1"));
    events_until(&mut events, "Apply b").await;
    api.drop_watches();
    // Written while the watcher is away: it gets them when it re-watches from its version.
    api.apply(apiserver::pod("shop", "c", "default", "node-1"));
    api.delete("v1", "Pod", Some("shop"), "a");
    let got = events_until(&mut events, "Delete a").await;
    assert_eq!(ok_events(&got), ["Apply c", "Delete a"], "{got:?}");
    assert_eq!(lists_of(&api, "/api/v1/pods").len(), 1);
    let watches = watches_of(&api, "/api/v1/pods");
    eprintln!("kube watcher re-watching sent: {watches:#?}");
    assert!(watches.len() >= 2, "{watches:?}");
    let rv_b = api.object("v1", "Pod", Some("shop"), "b").unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        watches[1].contains(&format!("resourceVersion={rv_b}")),
        "{watches:?}"
    );
}

#[tokio::test]
async fn a_watcher_relists_after_compaction() {
    let api = cluster_with_pods(&["a"]).await;
    let mut events = pod_watcher(
        Api::namespaced(client(&api).await, "shop"),
        watcher::Config::default(),
    );
    events_until(&mut events, "InitDone").await;
    // Writes elsewhere move the version past the watcher's, which compaction then forgets.
    api.apply(apiserver::pod("other", "x", "default", "node-1"));
    api.compact();
    api.drop_watches();
    api.apply(apiserver::pod("shop", "b", "default", "node-1"));
    let got = events_until(&mut events, "InitDone").await;
    assert!(
        got.iter().any(|e| e.contains("too old resource version")),
        "{got:?}"
    );
    assert_eq!(
        ok_events(&got),
        ["Init", "InitApply a", "InitApply b", "InitDone"],
        "{got:?}"
    );
    assert_eq!(lists_of(&api, "/api/v1/namespaces/shop/pods").len(), 2);
}

#[tokio::test]
async fn a_watcher_relists_after_a_restart() {
    let api = cluster_with_pods(&["a"]).await;
    let mut events = pod_watcher(Api::all(client(&api).await), watcher::Config::default());
    events_until(&mut events, "InitDone").await;
    api.restart(Duration::from_millis(500)).await;
    assert!(!api.is_serving());
    // Refused while down.
    let refused = tokio::net::TcpStream::connect(api.addr()).await;
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    // Written while down: the new watch cache starts after it.
    api.apply(apiserver::pod("shop", "b", "default", "node-1"));
    let got = events_until(&mut events, "InitDone").await;
    assert!(api.is_serving());
    assert_eq!(
        ok_events(&got),
        ["Init", "InitApply a", "InitApply b", "InitDone"],
        "{got:?}"
    );
    assert_eq!(lists_of(&api, "/api/v1/pods").len(), 2);
    api.apply(apiserver::pod("shop", "c", "default", "node-1"));
    assert_eq!(events_until(&mut events, "Apply c").await, ["Apply c"]);
}

// === networking ===

#[tokio::test]
async fn start_on_serves_a_listener_the_test_made_and_restarts_on_it() {
    // As a test does inside a network namespace (`Netns::tcp_listen(ip:6443)`).
    let ip = support::unique_loopback();
    let listener = std::net::TcpListener::bind((ip, 6443)).unwrap();
    let api = FakeApiServer::start_on(listener).await;
    assert_eq!(api.url(), format!("https://{ip}:6443"));
    api.apply(apiserver::pod("shop", "a", "default", "node-1"));
    // The kubeconfig's CA and the certificate's IP SAN: TLS verifies.
    let pods: Api<Pod> = Api::all(client(&api).await);
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    api.restart(Duration::from_millis(200)).await;
    let refused = tokio::net::TcpStream::connect(api.addr()).await;
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let back = support::eventually(LIMIT, || api.is_serving().then_some(())).await;
    assert!(back.is_some());
    let pods: Api<Pod> = Api::all(client(&api).await);
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}
