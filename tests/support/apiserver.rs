//! An in-process Kubernetes API server stand-in for tests: HTTPS (rustls, a test CA of its
//! own), HTTP/1.1, JSON, on a unique loopback address (`start`) or on a listener a test made,
//! e.g. inside a network namespace (`start_on`), and a kubeconfig that points kube-rs at it.
//! kube-rs clients, `Api::list`/`Api::watch` and `kube::runtime::watcher`, work against it as
//! against a real API server; it was written from k8s.io/apiserver (`pkg/storage/cacher`,
//! `pkg/storage/etcd3`, `pkg/endpoints`) and kube-runtime 5's `watcher.rs`.
//!
//! Layout: this file is the test-facing API (`FakeApiServer`, object builders), the accept
//! loop and TokenReview; `apiserver/store.rs` the storage (objects, resource versions, event
//! log, compaction, open watches); `apiserver/serve.rs` the HTTP side (routing, discovery,
//! get, list, watch, `Status` errors).
//!
//! What it emulates, each row held by a test (`tests/apiserver.rs` unless named otherwise):
//!
//! | behaviour | as the API server | test |
//! |---|---|---|
//! | authentication | every request needs `Authorization: Bearer ADMIN_TOKEN`, else `401` `Status` `Unauthorized` | `requests_without_the_admin_token_are_unauthorized` |
//! | TokenReview | `POST /apis/authentication.k8s.io/v1/tokenreviews` (below) | `tests/ca_serve.rs` |
//! | kinds | core v1 `namespaces` (cluster-scoped), `pods`, `services`; `discovery.k8s.io/v1` `endpointslices`; `security.istio.io` `v1` and `v1beta1` `authorizationpolicies`, `peerauthentications`, `requestauthentications`, one storage served at both versions, `apiVersion` the version asked for | `istio_policies_are_served_at_v1_and_v1beta1_from_one_storage` |
//! | paths | `/api/v1/KIND`, `/api/v1/namespaces/NS/KIND` (list, watch), `/api/v1/namespaces/NS/KIND/NAME`, `/api/v1/namespaces/NAME` (get), the same under `/apis/GROUP/VERSION`; `404` `NotFound` `Status` for anything else, and for a missing object (`pods "x" not found`, `details`) | `get_answers_the_object_or_not_found` |
//! | discovery | `GET /api`, `/api/v1`, `/apis`, `/apis/GROUP`, `/apis/GROUP/VERSION` (APIResourceList: name, singularName, namespaced, kind, verbs) of what is served | `discovery_lists_what_is_served` |
//! | aggregated discovery | `GET /api`, `/apis` with an `Accept` asking `apidiscovery.k8s.io/v2` first (kube's `Discovery::run_aggregated`): an `APIGroupDiscoveryList` of what is served | `aggregated_discovery_lists_what_is_served` |
//! | CRD versions | `serve_version("security.istio.io/v1", false)`: its paths `404`, discovery omits it (preferred version the next); both versions off: the group is gone (CRDs not installed) | `a_crd_version_switched_off_is_not_found_and_not_discovered` |
//! | resource versions | one counter for all kinds, bumped by every write; every object carries its last write's, a delete's event the delete's; `metadata.uid` at creation, kept on replace; a list carries the version it was read at | `lists_carry_the_store_version_and_objects_their_own` |
//! | pagination | `limit` + `continue`: pages of a list at one version (writes between pages not seen), `remainingItemCount`; the token is etcd3's (base64url JSON `{"v","rv","start"}`) | `list_pages_with_limit_and_continue_are_consistent` |
//! | expired continue | a continue token of a compacted version: `410` `Expired` (etcd3's message; `metadata.continue` an inconsistent token for the rest) | `a_continue_from_a_compacted_version_is_expired` |
//! | list `resourceVersion` | unset/`""`: most recent, paginated; `"0"`: any (the watch cache: limit ignored, no continue); `N` with `resourceVersionMatch=Exact` (or a legacy `limit`ed list): state at `N`, `410` if compacted; `N` `NotOlderThan`: most recent; `N` newer than the store: `504` "Too large resource version" | `list_resource_version_semantics` |
//! | field selectors | `metadata.name`, `metadata.namespace` of every kind; pods also `spec.nodeName`, `spec.serviceAccountName`, `status.phase`, `status.podIP`; another field `400` "field label not supported"; in watches an object entering the selection is `ADDED`, leaving it `DELETED` | `field_selectors_filter_lists_and_watches`, `tests/ca_serve.rs` |
//! | watch | `watch=true` (or `1`): `200`, chunked, one `{"type","object"}` JSON line per event; from `resourceVersion=N` every event after `N` then live ones; from unset/`"0"` the state as synthetic `ADDED` then live | `watch_from_a_version_gets_every_later_event` |
//! | expired watch | from `N` older than the compacted history: `200`, one `ERROR` event (`Status` `410` `Expired` "too old resource version: N (M)"), end of stream, so the watcher relists | `a_watch_from_a_compacted_version_gets_an_expired_error_event` |
//! | bookmarks | with `allowWatchBookmarks=true`: `BOOKMARK` (the kind, only `metadata.resourceVersion`) every `set_bookmark_interval` (60 s by default) and on `send_bookmarks()`; never ahead of an event not yet sent | `bookmarks_come_on_request_and_at_the_interval` |
//! | streaming lists | `sendInitialEvents=true` (kube's `streaming_lists()`): the state as `ADDED`, then a `BOOKMARK` annotated `k8s.io/initial-events-end: "true"` | `a_streaming_list_watcher_gets_initial_events_and_their_end` |
//! | watch timeout | the stream ends cleanly at `timeoutSeconds` (unset: 1800 s) | `a_watch_ends_at_its_timeout` |
//! | kube's watcher | `watcher(api, Config::default())`: Init, InitApply per object, InitDone, then Apply/Delete; also with `page_size` and `any_semantic` (paged and not) | `the_kube_watcher_lists_in_pages_then_watches` |
//! | dropped watches | `drop_watches()`: every open watch ends abruptly; the watcher re-watches from its last version and misses nothing, without a new list | `a_watcher_survives_dropped_watches_without_relisting` |
//! | compaction | `compact()`: the event log before now is forgotten; with `drop_watches()` the watcher's re-watch is expired and it relists | `a_watcher_relists_after_compaction` |
//! | restart | `restart(down_for).await`: every connection dropped, connections refused for `down_for`, history compacted when it comes back (writes while down are in the state, not the history), then served on the same address; a watcher behind that state relists | `a_watcher_relists_after_a_restart` |
//! | networking | `start()` on a unique loopback address; `start_on(listener)` on one a test made (e.g. in a network namespace), the serving certificate naming its IP; `restart` keeps the listening socket (it stops listening, refusing connections, and listens again), so a namespace's listener needs no re-binding | `start_on_serves_a_listener_the_test_made_and_restarts_on_it` |
//! | slow lists | `set_list_delay(d)`: every list answers after `d` | `a_list_delay_slows_lists_not_watches` |
//! | request log | `requests()`: every request, `METHOD path?query` | all of the above |
//!
//! What kube 5's watcher sends (kube-runtime `watcher.rs`, kube-core `params.rs`; seen in the
//! request log): by default a list `?&limit=500` (more pages `&limit=500&continue=T`), then
//! `?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=N` with the
//! list's version, and after a stream ends or fails the same watch from the last version it
//! saw (event or bookmark); a list again only after a `410` (an ERROR event in the stream;
//! an HTTP `410` to the watch request itself would make it retry the watch for ever).
//! `any_semantic()` adds `resourceVersion=0&resourceVersionMatch=NotOlderThan` only with no
//! page size (kube drops "0" when a `limit` is set); `streaming_lists()` lists nothing and
//! watches with `sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0`.
//!
//! TokenReview: the answer is the request with a `status`. A token it did not issue, an
//! expired token, a token whose bound pod is gone (or was re-created with another uid), and a
//! token whose audiences do not include one of `spec.audiences` (no `spec.audiences`: the API
//! server's own, [`API_AUDIENCE`]) are `authenticated: false` with an `error` saying why. An
//! authenticated one has `user.username` `system:serviceaccount:NS:NAME`, `groups`
//! (`system:serviceaccounts`, `system:serviceaccounts:NS`, `system:authenticated`), `extra`
//! with `authentication.kubernetes.io/pod-name` and `pod-uid` for a pod-bound token, and
//! `audiences` (those of the request the token carries). Tokens are opaque strings, not JWTs:
//! only this stand-in reads them, as only the real API server reads real ones.
//!
//! What it does not emulate: label selectors (a non-empty `labelSelector` is `400`, so a
//! client relying on one notices), writes through the API (tests write the store with
//! `apply`/`delete`; no namespace deletion cascade, no garbage collection), `v2beta1`
//! aggregated discovery (an `Accept` asking for it first gets the legacy shapes), protobuf,
//! HTTP/2, RBAC (the admin token may do everything), the watch
//! cache's wait for a future `resourceVersion` (a watch from one simply waits for events, a
//! list answers `504` at once), validation of `sendInitialEvents` without
//! `resourceVersionMatch=NotOlderThan`, `resourceVersion` on get, `Table`/metadata-only
//! (`PartialObjectMetadata`) responses, and a watch cache of bounded size (history is lost
//! only by `compact` and `restart`).

// Paths spelled out: the benchmark includes this file with `#[path]` from elsewhere, and a
// `#[path]`-loaded file finds its children beside itself.
#[path = "apiserver/serve.rs"]
mod serve;
#[path = "apiserver/store.rs"]
mod store;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use store::{resource_by_kind, Key, Store};

/// The token the API server's clients (`weft ca serve`, weft's Kubernetes source, kube-rs in
/// tests) authenticate with.
pub const ADMIN_TOKEN: &str = "apiserver-admin-token";
/// The audience of tokens issued without one (the API server's own).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// A token the stand-in issued.
#[derive(Debug, Clone)]
struct TokenInfo {
    namespace: String,
    service_account: String,
    audiences: Vec<String>,
    expires: SystemTime,
    /// `(name, uid)` of the pod it is bound to.
    pod: Option<(String, String)>,
}

/// What the serving side shares with the test-facing handle.
struct Shared {
    addr: SocketAddr,
    store: Mutex<Store>,
    /// Bumped by `send_bookmarks`; every watch with bookmarks sends one on change.
    bookmarks: watch::Sender<u64>,
    /// Cancelled (and replaced) by `drop_watches`.
    watch_cut: Mutex<CancellationToken>,
    /// Cancelled (and replaced) by `restart`: every open connection.
    connections: Mutex<CancellationToken>,
    /// Between `restart` and serving again.
    down: AtomicBool,
}

/// The stand-in; stops serving when dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    /// To the accept loop: go down for this long, say when down.
    restarts: mpsc::UnboundedSender<(Duration, oneshot::Sender<()>)>,
    ca_pem: String,
    dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.cancel();
        self.shared.connections.lock().unwrap().cancel();
    }
}

impl FakeApiServer {
    /// Starts serving on a unique loopback address.
    pub async fn start() -> FakeApiServer {
        let ip: IpAddr = super::unique_loopback();
        // An explicit port, so the socket keeps it while `restart` has it not listening
        // (a port the kernel picked is given back when listening stops).
        let port = std::net::TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listener = std::net::TcpListener::bind((ip, port)).unwrap();
        FakeApiServer::start_on(listener).await
    }

    /// Starts serving on `listener`, e.g. one a test made inside a network namespace
    /// (`Netns::tcp_listen`); the serving certificate names its IP. For `restart` to keep
    /// the address, the listener must be bound to an explicit port (not 0).
    pub async fn start_on(listener: std::net::TcpListener) -> FakeApiServer {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();

        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "kubernetes test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::IpAddress(addr.ip()),
            SanType::DnsName("kubernetes.default.svc".try_into().unwrap()),
        ];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(weft::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let shared = Arc::new(Shared {
            addr,
            store: Mutex::new(Store::default()),
            bookmarks: watch::Sender::new(0),
            watch_cut: Mutex::new(CancellationToken::new()),
            connections: Mutex::new(CancellationToken::new()),
            down: AtomicBool::new(false),
        });
        let stop = CancellationToken::new();
        let (restarts, restart_rx) = mpsc::unbounded_channel();
        tokio::spawn(accept_loop(
            listener,
            acceptor,
            shared.clone(),
            stop.clone(),
            restart_rx,
        ));
        FakeApiServer {
            shared,
            restarts,
            ca_pem: ca_cert.pem(),
            dir: tempfile::tempdir().unwrap(),
            stop,
        }
    }

    /// `https://IP:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.shared.addr)
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A kubeconfig file for `--kubeconfig` and kube-rs: this server, its CA, the admin token.
    pub fn kubeconfig(&self) -> PathBuf {
        use base64::Engine as _;
        let path = self.dir.path().join("kubeconfig");
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    \
                 server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: ca\n  \
                 user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: test\n  context:\n    \
                 cluster: test\n    user: ca\ncurrent-context: test\n",
                self.url()
            ),
        )
        .unwrap();
        path
    }

    // --- the store ---

    /// Creates or replaces `obj` (by apiVersion, kind, namespace, name): sets
    /// `metadata.resourceVersion` (and `uid` when created, kept when replaced), emits ADDED
    /// or MODIFIED; returns the new resource version. A namespaced object without
    /// `metadata.namespace` goes to `default`. Panics on a kind it does not serve.
    pub fn apply(&self, obj: Value) -> u64 {
        self.shared.store.lock().unwrap().apply(obj)
    }

    /// Deletes an object, emitting DELETED with its last state at a new resource version;
    /// returns that version, or None if there was no such object.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<u64> {
        let resource = resource_by_kind(api_version, kind)
            .unwrap_or_else(|| panic!("the stand-in does not serve {api_version} {kind}"));
        let key = Key {
            resource,
            namespace: namespace.unwrap_or_default().to_string(),
            name: name.to_string(),
        };
        self.shared.store.lock().unwrap().delete(&key)
    }

    /// An object as stored now (at its group's first version), if any.
    pub fn object(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let resource = resource_by_kind(api_version, kind)?;
        let key = Key {
            resource,
            namespace: namespace.unwrap_or_default().to_string(),
            name: name.to_string(),
        };
        self.shared.store.lock().unwrap().current.get(&key).cloned()
    }

    /// The resource version of the last write.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().rv
    }

    /// Adds a running pod `namespace/name` with `service_account` on `node`; returns its uid.
    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        service_account: &str,
        node: &str,
    ) -> String {
        self.apply(pod(namespace, name, service_account, node));
        self.object("v1", "Pod", Some(namespace), name).unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Deletes pod `namespace/name`.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.delete("v1", "Pod", Some(namespace), name);
    }

    // --- serving and faults ---

    /// Serves `group/version` (e.g. `security.istio.io/v1`) or not: switched off, its paths
    /// answer `404` and discovery leaves it out, as when a CRD stops serving a version.
    /// Switching off every version of a group is the CRDs not being installed.
    pub fn serve_version(&self, group_version: &str, serve: bool) {
        let mut store = self.shared.store.lock().unwrap();
        if serve {
            store.disabled.remove(group_version);
        } else {
            store.disabled.insert(group_version.to_string());
        }
    }

    /// Every list answers after `delay` (0: at once).
    pub fn set_list_delay(&self, delay: Duration) {
        self.shared.store.lock().unwrap().list_delay = delay;
    }

    /// How often watches that allow bookmarks get one; applies to watches opened afterwards.
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.store.lock().unwrap().bookmark_interval = every;
    }

    /// Every open watch that allows bookmarks sends one now.
    pub fn send_bookmarks(&self) {
        self.shared.bookmarks.send_modify(|n| *n += 1);
    }

    /// Ends every open watch stream abruptly (the connection closed mid-body).
    pub fn drop_watches(&self) {
        let mut cut = self.shared.watch_cut.lock().unwrap();
        cut.cancel();
        *cut = CancellationToken::new();
    }

    /// Forgets the event log up to now: watches and continue tokens from older versions are
    /// `410 Expired`. Open watches go on.
    pub fn compact(&self) {
        self.shared.store.lock().unwrap().compact();
    }

    /// As an API server restarting: drops every connection, refuses connections for
    /// `down_for` (the listening socket stops listening and keeps its address), compacts (a
    /// new watch cache starts from the state at its start), then serves again on the same
    /// address. Returns once down; serving resumes in the background. A watcher that had
    /// seen every event resumes its watch (as against a real restart); one behind the
    /// state at the restart (writes while down, or elsewhere) relists.
    pub async fn restart(&self, down_for: Duration) {
        self.shared.down.store(true, Ordering::SeqCst);
        let (done, down) = oneshot::channel();
        self.restarts.send((down_for, done)).unwrap();
        down.await.unwrap();
        {
            let mut conns = self.shared.connections.lock().unwrap();
            conns.cancel();
            *conns = CancellationToken::new();
        }
        self.shared.store.lock().unwrap().forget_watchers();
    }

    /// Whether it serves (false between `restart` and serving again).
    pub fn is_serving(&self) -> bool {
        !self.shared.down.load(Ordering::SeqCst)
    }

    /// Every request served so far, `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.store.lock().unwrap().requests.clone()
    }

    // --- tokens ---

    /// Issues a token of the pod `namespace/pod`'s ServiceAccount, bound to that pod, for
    /// `audiences`, valid until `expires` (a projected ServiceAccount token).
    pub fn pod_token(
        &self,
        namespace: &str,
        pod: &str,
        audiences: &[&str],
        expires: SystemTime,
    ) -> String {
        let p = self
            .object("v1", "Pod", Some(namespace), pod)
            .expect("pod exists");
        let mut store = self.shared.store.lock().unwrap();
        let info = TokenInfo {
            namespace: namespace.into(),
            service_account: p["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                .into(),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expires,
            pod: Some((pod.into(), p["metadata"]["uid"].as_str().unwrap().into())),
        };
        store.next_token += 1;
        let token = format!("test-sa-token-{}", store.next_token);
        store.tokens.insert(token.clone(), info);
        token
    }

    /// Issues a token of ServiceAccount `namespace/service_account` bound to no pod (as
    /// `kubectl create token` without `--bound-object-kind Pod`).
    pub fn unbound_token(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        expires: SystemTime,
    ) -> String {
        let mut store = self.shared.store.lock().unwrap();
        store.next_token += 1;
        let token = format!("test-sa-token-{}", store.next_token);
        store.tokens.insert(
            token.clone(),
            TokenInfo {
                namespace: namespace.into(),
                service_account: service_account.into(),
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                expires,
                pod: None,
            },
        );
        token
    }
}

// === object builders ===

/// A Namespace with `labels`.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels_json(labels)},
        "status": {"phase": "Active"},
    })
}

/// A running Pod of `service_account` on `node` (add `status.podIP`, labels as needed).
pub fn pod(namespace: &str, name: &str, service_account: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeName": node, "serviceAccountName": service_account,
            "containers": [{"name": "app", "image": "app"}],
        },
        "status": {"phase": "Running"},
    })
}

/// A ClusterIP Service selecting `selector`, with TCP `ports`.
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    selector: &[(&str, &str)],
    ports: &[u16],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"name": format!("tcp-{p}"), "port": p, "protocol": "TCP", "targetPort": p}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "selector": labels_json(selector), "ports": ports,
        },
    })
}

/// An Istio security object (`kind` AuthorizationPolicy, PeerAuthentication or
/// RequestAuthentication) at `security.istio.io/v1` with `spec`.
pub fn istio(kind: &str, namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

// === serving ===

async fn accept_loop(
    mut listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    stop: CancellationToken,
    mut restarts: mpsc::UnboundedReceiver<(Duration, oneshot::Sender<()>)>,
) {
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            Some((down_for, done)) = restarts.recv() => {
                // Out of the reactor first: a socket that stops listening reads as closed,
                // which tokio keeps as ready for good, so accept would spin.
                let std_listener = listener.into_std().unwrap();
                let socket = socket2::SockRef::from(&std_listener);
                socket.shutdown(std::net::Shutdown::Read).unwrap();
                let _ = done.send(());
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(down_for) => {}
                }
                // The new watch cache starts from the state now: writes made while down are
                // in it, not in its history, so a watch from before them is expired.
                shared.store.lock().unwrap().compact();
                socket.listen(1024).unwrap();
                assert_eq!(
                    std_listener.local_addr().unwrap(),
                    shared.addr,
                    "restart needs a listener bound to an explicit port"
                );
                listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                shared.down.store(false, Ordering::SeqCst);
                continue;
            }
            r = listener.accept() => match r {
                Ok((t, _)) => t,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        if shared.down.load(Ordering::SeqCst) {
            continue;
        }
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        let closed = shared.connections.lock().unwrap().clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(serve::handle(shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
            tokio::select! {
                _ = closed.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

/// The API server's TokenReview (module doc).
fn review_token(store: &Store, mut review: TokenReview) -> TokenReview {
    let wanted: Vec<String> = review
        .spec
        .audiences
        .clone()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| vec![API_AUDIENCE.to_string()]);
    let token = review.spec.token.clone().unwrap_or_default();
    let refuse = |error: String| TokenReviewStatus {
        authenticated: Some(false),
        error: Some(error),
        ..TokenReviewStatus::default()
    };
    let status = match store.tokens.get(&token) {
        None => refuse(
            "[invalid bearer token, square/go-jose: error in cryptographic primitive]".into(),
        ),
        Some(info) if SystemTime::now() >= info.expires => {
            refuse("[invalid bearer token, service account token has expired]".into())
        }
        Some(info) if !info.audiences.iter().any(|a| wanted.contains(a)) => refuse(format!(
            "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
            info.audiences, wanted
        )),
        Some(info) => {
            let bound_pod_alive = match &info.pod {
                None => Ok(()),
                Some((name, uid)) => {
                    let key = Key {
                        resource: store::resource_by_kind("v1", "Pod").unwrap(),
                        namespace: info.namespace.clone(),
                        name: name.clone(),
                    };
                    match store.current.get(&key) {
                        None => Err(format!("[invalid bearer token, pods \"{name}\" not found]")),
                        Some(p) if p["metadata"]["uid"].as_str() != Some(uid) => Err(format!(
                        "[invalid bearer token, pod \"{name}\" (uid {uid}) does not exist any more]"
                    )),
                        Some(_) => Ok(()),
                    }
                }
            };
            match bound_pod_alive {
                Err(e) => refuse(e),
                Ok(()) => {
                    let mut extra = BTreeMap::new();
                    if let Some((name, uid)) = &info.pod {
                        extra.insert(
                            "authentication.kubernetes.io/pod-name".to_string(),
                            vec![name.clone()],
                        );
                        extra.insert(
                            "authentication.kubernetes.io/pod-uid".to_string(),
                            vec![uid.clone()],
                        );
                    }
                    TokenReviewStatus {
                        authenticated: Some(true),
                        audiences: Some(
                            info.audiences
                                .iter()
                                .filter(|a| wanted.contains(a))
                                .cloned()
                                .collect(),
                        ),
                        user: Some(UserInfo {
                            username: Some(format!(
                                "system:serviceaccount:{}:{}",
                                info.namespace, info.service_account
                            )),
                            uid: Some(format!(
                                "sa-uid-{}-{}",
                                info.namespace, info.service_account
                            )),
                            groups: Some(vec![
                                "system:serviceaccounts".into(),
                                format!("system:serviceaccounts:{}", info.namespace),
                                "system:authenticated".into(),
                            ]),
                            extra: Some(extra),
                        }),
                        error: None,
                    }
                }
            }
        }
    };
    review.status = Some(status);
    review
}
