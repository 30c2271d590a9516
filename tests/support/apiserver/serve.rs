//! The stand-in's HTTP side: routing, discovery, get, list (pagination and resource-version
//! semantics), watch (a chunked stream of JSON lines fed from the store), TokenReview, and
//! the `Status` errors, each as the API server answers it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::authentication::v1::TokenReview;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::store::{resource_by_plural, Event, EventType, FieldSelector, Key, Store, RESOURCES};
use super::{review_token, Shared, ADMIN_TOKEN};

pub type Body = BoxBody<Bytes, std::io::Error>;

fn json_response(code: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never: Infallible| match never {})
                .boxed(),
        )
        .unwrap()
}

/// A `Status` object, as the API server answers errors.
fn status_object(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    })
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, status_object(code, reason, message))
}

/// What the API server answers for a path nothing serves (genericapiserver's NotFound
/// handler), including a group or version that is not (or no longer) served.
fn not_found() -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// A request's query, last value of each key winning.
type Query = HashMap<String, String>;

pub async fn handle(shared: Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query_text = req.uri().query().unwrap_or("").to_string();
    shared
        .store
        .lock()
        .unwrap()
        .requests
        .push(format!("{method} {path}?{query_text}"));
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {ADMIN_TOKEN}"));
    if !authorized {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    // Aggregated discovery (apidiscovery.k8s.io/v2) when the client accepts it first.
    let aggregated = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.starts_with("application/json;g=apidiscovery.k8s.io;v=v2;"));
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    let query: Query = form_urlencoded::parse(query_text.as_bytes())
        .into_owned()
        .collect();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            let review: TokenReview = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
            };
            let review = review_token(&shared.store.lock().unwrap(), review);
            json_response(StatusCode::CREATED, serde_json::to_value(review).unwrap())
        }
        ("GET", ["api"]) if aggregated => {
            aggregated_discovery(&shared.store.lock().unwrap(), &[""])
        }
        ("GET", ["apis"]) if aggregated => {
            let groups = group_names();
            aggregated_discovery(&shared.store.lock().unwrap(), &groups[1..])
        }
        ("GET", ["api"]) => json_response(
            StatusCode::OK,
            json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}
                ],
            }),
        ),
        ("GET", ["apis"]) => {
            json_response(StatusCode::OK, group_list(&shared.store.lock().unwrap()))
        }
        ("GET", ["apis", group]) => match api_group(&shared.store.lock().unwrap(), group) {
            Some(g) => json_response(StatusCode::OK, g),
            None => not_found(),
        },
        ("GET", ["api", "v1"]) => json_response(
            StatusCode::OK,
            resource_list(&shared.store.lock().unwrap(), "", "v1"),
        ),
        ("GET", ["apis", "authentication.k8s.io", "v1"]) => json_response(
            StatusCode::OK,
            json!({
                "kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": "authentication.k8s.io/v1",
                "resources": [{
                    "name": "tokenreviews", "singularName": "tokenreview", "namespaced": false,
                    "kind": "TokenReview", "verbs": ["create"],
                }],
            }),
        ),
        ("GET", ["apis", group, version]) => {
            let store = shared.store.lock().unwrap();
            if served(&store, group, version) {
                json_response(StatusCode::OK, resource_list(&store, group, version))
            } else {
                not_found()
            }
        }
        ("GET", ["api", "v1", rest @ ..]) => read(shared, "", "v1", rest, &query).await,
        ("GET", ["apis", group, version, rest @ ..]) => {
            read(shared.clone(), group, version, rest, &query).await
        }
        _ => not_found(),
    }
}

// === discovery ===

/// Whether `group/version` serves anything now.
fn served(store: &Store, group: &str, version: &str) -> bool {
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    !store.disabled.contains(&gv)
        && RESOURCES
            .iter()
            .any(|r| r.group == group && r.versions.contains(&version))
}

/// The served versions of `group`, preferred first.
fn served_versions(store: &Store, group: &str) -> Vec<&'static str> {
    let mut versions: Vec<&'static str> = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group) {
        for v in r.versions {
            if served(store, group, v) && !versions.contains(v) {
                versions.push(v);
            }
        }
    }
    versions
}

fn api_group(store: &Store, group: &str) -> Option<Value> {
    if group == "authentication.k8s.io" {
        let gv = json!({"groupVersion": "authentication.k8s.io/v1", "version": "v1"});
        return Some(json!({
            "kind": "APIGroup", "apiVersion": "v1", "name": group,
            "versions": [gv.clone()], "preferredVersion": gv,
        }));
    }
    let versions: Vec<Value> = served_versions(store, group)
        .into_iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    let preferred = versions.first()?.clone();
    Some(json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": group,
        "versions": versions, "preferredVersion": preferred,
    }))
}

/// Every group, the core one (`""`) first.
fn group_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = vec![""];
    for r in RESOURCES {
        if !names.contains(&r.group) {
            names.push(r.group);
        }
    }
    names
}

/// An `APIGroupDiscoveryList` (apidiscovery.k8s.io/v2) of `groups`' served versions, as
/// `/api` (the core group) and `/apis` answer it; `authentication.k8s.io` is left out.
fn aggregated_discovery(store: &Store, groups: &[&str]) -> Response<Body> {
    let items: Vec<Value> = groups
        .iter()
        .filter_map(|&group| {
            let versions: Vec<Value> = served_versions(store, group)
                .into_iter()
                .map(|version| {
                    let resources: Vec<Value> = RESOURCES
                        .iter()
                        .filter(|r| r.group == group && r.versions.contains(&version))
                        .map(|r| {
                            json!({
                                "resource": r.plural,
                                "responseKind": {"group": group, "version": version, "kind": r.kind},
                                "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                                "singularResource": r.kind.to_lowercase(),
                                "verbs": ["get", "list", "watch"],
                            })
                        })
                        .collect();
                    json!({"version": version, "resources": resources, "freshness": "Current"})
                })
                .collect();
            (!versions.is_empty())
                .then(|| json!({"metadata": {"name": group}, "versions": versions}))
        })
        .collect();
    let body = json!({
        "kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {}, "items": items,
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(
            "content-type",
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
        )
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never: Infallible| match never {})
                .boxed(),
        )
        .unwrap()
}

fn group_list(store: &Store) -> Value {
    let mut names = group_names();
    names[0] = "authentication.k8s.io";
    let groups: Vec<Value> = names
        .into_iter()
        .filter_map(|g| api_group(store, g))
        .map(|mut g| {
            let o = g.as_object_mut().unwrap();
            o.remove("kind");
            o.remove("apiVersion");
            g
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(store: &Store, group: &str, version: &str) -> Value {
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| {
            r.group == group && r.versions.contains(&version) && served(store, group, version)
        })
        .map(|r| {
            json!({
                "name": r.plural, "singularName": r.kind.to_lowercase(),
                "namespaced": r.namespaced, "kind": r.kind,
                "verbs": ["get", "list", "watch"],
            })
        })
        .collect();
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

// === reads ===

/// What a read path names.
struct Target {
    resource: usize,
    /// The version asked for; objects are served at it.
    api_version: String,
    namespace: Option<String>,
    name: Option<String>,
}

fn target(group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let namespaced =
        |plural: &str| resource_by_plural(group, plural).filter(|&r| RESOURCES[r].namespaced);
    let (resource, namespace, name) = match rest {
        [plural] => (resource_by_plural(group, plural)?, None, None),
        [plural, name] => {
            let r = resource_by_plural(group, plural).filter(|&r| !RESOURCES[r].namespaced)?;
            (r, None, Some(name.to_string()))
        }
        ["namespaces", ns, plural] => (namespaced(plural)?, Some(ns.to_string()), None),
        ["namespaces", ns, plural, name] => (
            namespaced(plural)?,
            Some(ns.to_string()),
            Some(name.to_string()),
        ),
        _ => return None,
    };
    let rt = &RESOURCES[resource];
    rt.versions.contains(&version).then(|| Target {
        resource,
        api_version: rt.api_version(version),
        namespace,
        name,
    })
}

async fn read(
    shared: Arc<Shared>,
    group: &str,
    version: &str,
    rest: &[&str],
    q: &Query,
) -> Response<Body> {
    let Some(t) = target(group, version, rest) else {
        return not_found();
    };
    if !served(&shared.store.lock().unwrap(), group, version) {
        return not_found();
    }
    if t.name.is_some() {
        return get(&shared.store.lock().unwrap(), &t);
    }
    if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        return watch(shared, t, q);
    }
    let delay = shared.store.lock().unwrap().list_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    list(&shared.store.lock().unwrap(), &t, q)
}

/// The object as served at the version asked for.
fn served_object(obj: &Value, t: &Target) -> Value {
    let mut obj = obj.clone();
    obj["apiVersion"] = json!(t.api_version);
    obj["kind"] = json!(RESOURCES[t.resource].kind);
    obj
}

fn get(store: &Store, t: &Target) -> Response<Body> {
    let key = Key {
        resource: t.resource,
        namespace: t.namespace.clone().unwrap_or_default(),
        name: t.name.clone().unwrap_or_default(),
    };
    match store.current.get(&key) {
        Some(obj) => json_response(StatusCode::OK, served_object(obj, t)),
        None => {
            let rt = &RESOURCES[t.resource];
            let mut s = status_object(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{}\" not found", rt.qualified(), key.name),
            );
            s["details"] = json!({"name": key.name, "group": rt.group, "kind": rt.plural});
            json_response(StatusCode::NOT_FOUND, s)
        }
    }
}

/// The message etcd3's store answers a continue token of a compacted version with.
const EXPIRED_CONTINUE: &str = "The provided continue parameter is too old to display a \
    consistent list result. You can start a new list without the continue parameter, or use \
    the continue token in this response to retrieve the remainder of the results. Continuing \
    with the provided token results in an inconsistent list - objects that were created, \
    modified, or deleted between the time the first chunk was returned and now may show up in \
    the list.";

/// A continue token as apiserver/pkg/storage encodes it: base64url (no padding) of
/// `{"v":"meta.k8s.io/v1","rv":RV,"start":"KEY\u0000"}`, KEY the last key returned.
fn encode_continue(rv: i64, key: &Key) -> String {
    use base64::Engine as _;
    let start = if key.namespace.is_empty() {
        format!("{}\u{0}", key.name)
    } else {
        format!("{}/{}\u{0}", key.namespace, key.name)
    };
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

/// `(rv, (namespace, name) of the last key returned)`; `rv` -1 for "the latest".
fn decode_continue(token: &str) -> Result<(i64, (String, String)), String> {
    use base64::Engine as _;
    let bad = |why: &str| format!("continue key is not valid: {why}");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|e| bad(&e.to_string()))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| bad(&e.to_string()))?;
    if v["v"] != "meta.k8s.io/v1" {
        return Err(bad(
            "incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        ));
    }
    let rv = v["rv"].as_i64().ok_or_else(|| bad("no rv"))?;
    let start = v["start"].as_str().ok_or_else(|| bad("no start"))?;
    let start = start.trim_end_matches('\u{0}');
    let last = match start.split_once('/') {
        Some((ns, name)) => (ns.to_string(), name.to_string()),
        None => (String::new(), start.to_string()),
    };
    Ok((rv, last))
}

fn list(store: &Store, t: &Target, q: &Query) -> Response<Body> {
    let rt = &RESOURCES[t.resource];
    if q.get("labelSelector").is_some_and(|s| !s.is_empty()) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the stand-in does not emulate label selectors",
        );
    }
    let selector = match FieldSelector::parse(
        q.get("fieldSelector").map(String::as_str).unwrap_or(""),
        t.resource,
    ) {
        Ok(s) => s,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let mut limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    let rv_param = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let rv_match = q
        .get("resourceVersionMatch")
        .map(String::as_str)
        .unwrap_or("");
    let too_large = |n: u64| {
        status(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            &format!("Too large resource version: {n}, current: {}", store.rv),
        )
    };
    let (list_rv, after) = if let Some(token) = q.get("continue").filter(|c| !c.is_empty()) {
        let (rv, last) = match decode_continue(token) {
            Ok(c) => c,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
        };
        let rv = if rv <= 0 { store.rv } else { rv as u64 };
        if rv < store.compacted {
            let mut s = status_object(StatusCode::GONE, "Expired", EXPIRED_CONTINUE);
            let key = Key {
                resource: t.resource,
                namespace: last.0,
                name: last.1,
            };
            s["metadata"]["continue"] = json!(encode_continue(-1, &key));
            return json_response(StatusCode::GONE, s);
        }
        (rv, Some(last))
    } else {
        match (rv_param, rv_match) {
            ("", _) => (store.rv, None),
            // "Any": served from the watch cache, which ignores limit.
            ("0", _) => {
                limit = 0;
                (store.rv, None)
            }
            (n, m) => {
                let Ok(n) = n.parse::<u64>() else {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("invalid resource version: {n}"),
                    );
                };
                if n > store.rv {
                    return too_large(n);
                }
                // Exact, or a legacy paginated list at N, is read from etcd at N.
                if m == "Exact" || (m.is_empty() && limit > 0) {
                    if n < store.compacted {
                        return status(
                            StatusCode::GONE,
                            "Expired",
                            "The resourceVersion for the provided list is too old.",
                        );
                    }
                    (n, None)
                } else {
                    (store.rv, None)
                }
            }
        }
    };
    let state = store.state_at(list_rv);
    // Keys are ordered by resource, namespace, name: start at the page's first candidate.
    let from = Key {
        resource: t.resource,
        namespace: after.as_ref().map(|a| a.0.clone()).unwrap_or_default(),
        name: after.as_ref().map(|a| a.1.clone()).unwrap_or_default(),
    };
    let mut matching = state
        .range(from..)
        .take_while(|(k, _)| k.resource == t.resource)
        .filter(|(k, obj)| {
            k.resource == t.resource
                && t.namespace.as_ref().is_none_or(|ns| *ns == k.namespace)
                && after
                    .as_ref()
                    .is_none_or(|(ns, name)| (&k.namespace, &k.name) > (ns, name))
                && selector.matches(obj, t.resource)
        });
    let mut items = Vec::new();
    let mut last_key = None;
    for (k, obj) in matching.by_ref() {
        items.push(served_object(obj, t));
        last_key = Some(k.clone());
        if limit > 0 && items.len() == limit {
            break;
        }
    }
    let remaining = matching.count();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if remaining > 0 {
        metadata["continue"] = json!(encode_continue(list_rv as i64, &last_key.unwrap()));
        metadata["remainingItemCount"] = json!(remaining);
    }
    json_response(
        StatusCode::OK,
        json!({
            "kind": format!("{}List", rt.kind), "apiVersion": t.api_version,
            "metadata": metadata, "items": items,
        }),
    )
}

// === watch ===

type Chunk = Result<Frame<Bytes>, std::io::Error>;

fn line(kind: &str, object: Value) -> Bytes {
    let mut text = json!({"type": kind, "object": object}).to_string();
    text.push('\n');
    Bytes::from(text)
}

fn streaming(rx: mpsc::Receiver<Chunk>) -> Response<Body> {
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .unwrap()
}

/// One open watch: what it selects and how it renders.
struct Watch {
    t: Target,
    selector: FieldSelector,
}

impl Watch {
    fn selects(&self, key: &Key, obj: &Value) -> bool {
        key.resource == self.t.resource
            && self
                .t
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == key.namespace)
            && self.selector.matches(obj, key.resource)
    }

    /// The event as this watch sees it (cacher.go `convertToWatchEvent`): an object that
    /// starts matching is ADDED, one that stops matching DELETED (its previous state at the
    /// event's version).
    fn render(&self, e: &Event) -> Option<Bytes> {
        let now = self.selects(&e.key, &e.object);
        let before = e.prev.as_ref().is_some_and(|p| self.selects(&e.key, p));
        let (kind, mut obj) = match e.kind {
            EventType::Deleted if before => (EventType::Deleted, e.object.clone()),
            EventType::Deleted => return None,
            _ if now && before => (EventType::Modified, e.object.clone()),
            _ if now => (EventType::Added, e.object.clone()),
            _ if before => {
                let mut prev = e.prev.clone().unwrap();
                prev["metadata"]["resourceVersion"] = json!(e.rv.to_string());
                (EventType::Deleted, prev)
            }
            _ => return None,
        };
        obj = served_object(&obj, &self.t);
        Some(line(kind.as_str(), obj))
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(
            "BOOKMARK",
            json!({
                "kind": RESOURCES[self.t.resource].kind, "apiVersion": self.t.api_version,
                "metadata": metadata,
            }),
        )
    }
}

/// A watch request (module doc of `apiserver`): the response streams until `timeoutSeconds`,
/// `drop_watches`, a restart, or the client going away.
fn watch(shared: Arc<Shared>, t: Target, q: &Query) -> Response<Body> {
    if q.get("labelSelector").is_some_and(|s| !s.is_empty()) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the stand-in does not emulate label selectors",
        );
    }
    let selector = match FieldSelector::parse(
        q.get("fieldSelector").map(String::as_str).unwrap_or(""),
        t.resource,
    ) {
        Ok(s) => s,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let send_initial = q.get("sendInitialEvents").map(|v| v == "true");
    // Unset: the API server's default, minRequestTimeout (1800 s) times a random 1..2.
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|s| s.parse().ok())
            .unwrap_or(1800),
    );
    let rv_param = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let w = Watch { t, selector };

    let mut first: Vec<Bytes> = Vec::new();
    let (past, events, bookmark_every) = {
        let mut store = shared.store.lock().unwrap();
        let from_state = match (rv_param, send_initial) {
            (_, Some(b)) => b,
            ("" | "0", None) => true,
            _ => false,
        };
        let from = if from_state {
            // The state now as synthetic ADDED events, then what follows it.
            for (k, obj) in &store.current {
                if w.selects(k, obj) {
                    first.push(line("ADDED", served_object(obj, &w.t)));
                }
            }
            if send_initial == Some(true) && bookmarks {
                first.push(w.bookmark(store.rv, true));
            }
            store.rv
        } else {
            let n = match rv_param {
                "" | "0" => store.rv,
                n => match n.parse::<u64>() {
                    Ok(n) => n,
                    Err(_) => {
                        return status(
                            StatusCode::BAD_REQUEST,
                            "BadRequest",
                            &format!("invalid resource version: {n}"),
                        )
                    }
                },
            };
            if n < store.compacted {
                // The watch cache answers a too-old version in the stream (cacher.go:
                // newErrWatcher), after a 200.
                let err = status_object(
                    StatusCode::GONE,
                    "Expired",
                    &format!("too old resource version: {n} ({})", store.compacted),
                );
                return json_response_lines(line("ERROR", err));
            }
            n
        };
        let (past, rx) = store.watch_from(from);
        (past, rx, store.bookmark_interval)
    };
    first.extend(past.iter().filter_map(|e| w.render(e)));

    let (tx, rx) = mpsc::channel::<Chunk>(64);
    let cut = shared.watch_cut.lock().unwrap().clone();
    let mut asked = shared.bookmarks.subscribe();
    tokio::spawn(async move {
        let mut events = events;
        for b in first {
            if tx.send(Ok(Frame::data(b))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + bookmark_every, bookmark_every);
        loop {
            let mut out: Vec<Bytes> = Vec::new();
            // Biased: a cut or an end wins over events already queued, so a watch dropped
            // before a write never carries it.
            tokio::select! {
                biased;
                _ = cut.cancelled() => {
                    // Abruptly: an error in the body makes hyper close the connection
                    // without the last chunk.
                    let _ = tx.send(Err(std::io::Error::other("watch dropped"))).await;
                    return;
                }
                _ = tx.closed() => return,
                _ = tokio::time::sleep_until(deadline) => return,
                e = events.recv() => match e {
                    Some(e) => out.extend(w.render(&e)),
                    None => {
                        let _ = tx.send(Err(std::io::Error::other("server going away"))).await;
                        return;
                    }
                },
                _ = ticker.tick(), if bookmarks => out = bookmark_now(&shared, &w, &mut events),
                r = asked.changed(), if bookmarks => {
                    if r.is_err() {
                        return;
                    }
                    out = bookmark_now(&shared, &w, &mut events);
                }
            }
            for b in out {
                if tx.send(Ok(Frame::data(b))).await.is_err() {
                    return;
                }
            }
        }
    });
    streaming(rx)
}

/// The events not yet sent, then a bookmark at the store's version: taken under the store's
/// lock, so the bookmark never claims a version whose events are still queued.
fn bookmark_now(
    shared: &Shared,
    w: &Watch,
    events: &mut mpsc::UnboundedReceiver<Arc<Event>>,
) -> Vec<Bytes> {
    let store = shared.store.lock().unwrap();
    let mut out: Vec<Bytes> = Vec::new();
    while let Ok(e) = events.try_recv() {
        out.extend(w.render(&e));
    }
    out.push(w.bookmark(store.rv, false));
    out
}

/// A 200 whose body is `lines` and then the end.
fn json_response_lines(lines: Bytes) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(
            Full::new(lines)
                .map_err(|never: Infallible| match never {})
                .boxed(),
        )
        .unwrap()
}
