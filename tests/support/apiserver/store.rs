//! The stand-in's storage, shaped as etcd and the watch cache behind the API server: one
//! resource-version counter for every kind, the objects as JSON, the state at any version
//! since the last compaction (for paginated lists), the event log since then (for watches),
//! and the open watches that every write is pushed to.
//!
//! It knows nothing of HTTP: `serve` renders what it keeps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::TokenInfo;

/// One kind the stand-in serves.
#[derive(Debug)]
pub struct ResourceType {
    /// `""` for the core group.
    pub group: &'static str,
    /// Every version the group serves it at, preferred first; all share one storage.
    pub versions: &'static [&'static str],
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

/// What is served: core v1, discovery.k8s.io/v1, and Istio's security CRDs at v1 and v1beta1.
pub const RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
    },
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "pods",
        kind: "Pod",
        namespaced: true,
    },
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "services",
        kind: "Service",
        namespaced: true,
    },
    ResourceType {
        group: "discovery.k8s.io",
        versions: &["v1"],
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
    },
    ResourceType {
        group: "security.istio.io",
        versions: &["v1", "v1beta1"],
        plural: "authorizationpolicies",
        kind: "AuthorizationPolicy",
        namespaced: true,
    },
    ResourceType {
        group: "security.istio.io",
        versions: &["v1", "v1beta1"],
        plural: "peerauthentications",
        kind: "PeerAuthentication",
        namespaced: true,
    },
    ResourceType {
        group: "security.istio.io",
        versions: &["v1", "v1beta1"],
        plural: "requestauthentications",
        kind: "RequestAuthentication",
        namespaced: true,
    },
];

impl ResourceType {
    /// `v1` for the core group, `GROUP/VERSION` otherwise.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    /// `pods`, `authorizationpolicies.security.istio.io`: how errors name the resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// The index in [`RESOURCES`] of `(group, plural)`.
pub fn resource_by_plural(group: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.plural == plural)
}

/// The index in [`RESOURCES`] of an object's `apiVersion` and `kind`.
pub fn resource_by_kind(api_version: &str, kind: &str) -> Option<usize> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.kind == kind && r.versions.contains(&version))
}

/// Where an object is kept; ordered as etcd orders `/registry/KIND/NS/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub resource: usize,
    /// `""` for a cluster-scoped kind.
    pub namespace: String,
    pub name: String,
}

/// A watch event's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One write, as the watch cache keeps it: the object after it (the last state for a
/// delete, with the delete's resource version) and before it.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: EventType,
    pub key: Key,
    pub object: Value,
    pub prev: Option<Value>,
}

/// The storage and the stand-in's settings, behind one lock.
#[derive(Debug)]
pub struct Store {
    /// The resource version of the last write.
    pub rv: u64,
    next_uid: u64,
    /// History before this version is forgotten: lists and watches from older versions
    /// (and continue tokens of lists at them) are `410 Expired`.
    pub compacted: u64,
    /// The state at `compacted`.
    base: BTreeMap<Key, Value>,
    /// Every write after `compacted`, in order.
    pub log: Vec<Arc<Event>>,
    /// The state now (`base` with `log` applied).
    pub current: BTreeMap<Key, Value>,
    /// Open watches; a write is pushed to each, in order, under the lock that made it.
    watchers: Vec<mpsc::UnboundedSender<Arc<Event>>>,
    /// `GROUP/VERSION`s switched off (`serve_version`).
    pub disabled: BTreeSet<String>,
    pub list_delay: Duration,
    pub bookmark_interval: Duration,
    pub tokens: HashMap<String, TokenInfo>,
    pub next_token: u64,
    /// Every request, `METHOD path?query`.
    pub requests: Vec<String>,
}

impl Default for Store {
    fn default() -> Store {
        Store {
            rv: 0,
            next_uid: 0,
            compacted: 0,
            base: BTreeMap::new(),
            log: Vec::new(),
            current: BTreeMap::new(),
            watchers: Vec::new(),
            disabled: BTreeSet::new(),
            list_delay: Duration::ZERO,
            // The watch cache's bookmark frequency (cacher.go: bookmarkFrequency, a minute).
            bookmark_interval: Duration::from_secs(60),
            tokens: HashMap::new(),
            next_token: 0,
            requests: Vec::new(),
        }
    }
}

impl Store {
    /// Creates or replaces `obj` (by apiVersion, kind, namespace, name); returns the new
    /// resource version. Panics on an object of a kind not in [`RESOURCES`] (a test's mistake).
    pub fn apply(&mut self, mut obj: Value) -> u64 {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let resource = resource_by_kind(&api_version, &kind)
            .unwrap_or_else(|| panic!("the stand-in does not serve {api_version} {kind}"));
        let rt = &RESOURCES[resource];
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        let namespace = if rt.namespaced {
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            obj["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        let key = Key {
            resource,
            namespace,
            name,
        };
        self.rv += 1;
        let prev = self.current.get(&key).cloned();
        let uid = match prev.as_ref().and_then(|p| p["metadata"]["uid"].as_str()) {
            Some(uid) => uid.to_string(),
            None => obj["metadata"]["uid"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| self.new_uid()),
        };
        obj["metadata"]["uid"] = json!(uid);
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if prev.is_none() || obj["metadata"].get("creationTimestamp").is_none() {
            let created = prev
                .as_ref()
                .and_then(|p| p["metadata"].get("creationTimestamp").cloned())
                .unwrap_or_else(|| json!("2026-01-01T00:00:00Z"));
            obj["metadata"]["creationTimestamp"] = created;
        }
        // Stored at the group's preferred version; served at the one asked for.
        obj["apiVersion"] = json!(rt.api_version(rt.versions[0]));
        let kind = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.current.insert(key.clone(), obj.clone());
        self.record(Event {
            rv: self.rv,
            kind,
            key,
            object: obj,
            prev,
        });
        self.rv
    }

    /// Deletes the object at `key`; returns the delete's resource version, or None if there
    /// was none.
    pub fn delete(&mut self, key: &Key) -> Option<u64> {
        let mut last = self.current.remove(key)?;
        self.rv += 1;
        let prev = Some(last.clone());
        // The DELETED event carries the last state at the delete's version, as etcd3's
        // watcher hands it to the watch cache.
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(Event {
            rv: self.rv,
            kind: EventType::Deleted,
            key: key.clone(),
            object: last,
            prev,
        });
        Some(self.rv)
    }

    fn record(&mut self, event: Event) {
        let event = Arc::new(event);
        self.log.push(event.clone());
        self.watchers.retain(|w| w.send(event.clone()).is_ok());
    }

    pub fn new_uid(&mut self) -> String {
        self.next_uid += 1;
        format!("00000000-0000-4000-8000-{:012}", self.next_uid)
    }

    /// Forgets every event up to now, as etcd's compaction and the watch cache's eviction do.
    pub fn compact(&mut self) {
        self.base = self.current.clone();
        self.log.clear();
        self.compacted = self.rv;
    }

    /// The state at `rv` (`compacted <= rv <= self.rv`).
    pub fn state_at(&self, rv: u64) -> std::borrow::Cow<'_, BTreeMap<Key, Value>> {
        if rv >= self.rv {
            // Borrowed: a page of a large list must not copy the whole store.
            return std::borrow::Cow::Borrowed(&self.current);
        }
        let mut state = self.base.clone();
        for e in self.log.iter().take_while(|e| e.rv <= rv) {
            match e.kind {
                EventType::Deleted => state.remove(&e.key),
                _ => state.insert(e.key.clone(), e.object.clone()),
            };
        }
        std::borrow::Cow::Owned(state)
    }

    /// Registers a watch: returns the events after `rv` and the channel every later write
    /// comes on, taken under one lock so none is missed or seen twice.
    pub fn watch_from(
        &mut self,
        rv: u64,
    ) -> (Vec<Arc<Event>>, mpsc::UnboundedReceiver<Arc<Event>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.push(tx);
        let past = self.log.iter().filter(|e| e.rv > rv).cloned().collect();
        (past, rx)
    }

    /// Closes every registered watch channel (their streams end).
    pub fn forget_watchers(&mut self) {
        self.watchers.clear();
    }
}

/// A field selector: `,`-separated `f=v`, `f==v`, `f!=v` terms.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector {
    terms: Vec<(String, String, bool)>,
}

impl FieldSelector {
    /// Parses `selector`, checking every field is one the kind supports.
    pub fn parse(selector: &str, resource: usize) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for t in selector.split(',').filter(|t| !t.is_empty()) {
            let (f, v, eq) = if let Some((f, v)) = t.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                (f, v, true)
            } else {
                return Err(format!(
                    "invalid selector: '{selector}'; can't understand '{t}'"
                ));
            };
            field(&Value::Null, resource, f)?;
            terms.push((f.to_string(), v.to_string(), eq));
        }
        Ok(FieldSelector { terms })
    }

    pub fn matches(&self, obj: &Value, resource: usize) -> bool {
        self.terms
            .iter()
            .all(|(f, v, eq)| field(obj, resource, f).is_ok_and(|actual| (actual == *v) == *eq))
    }
}

/// A field's value for field selectors: `metadata.name` and `metadata.namespace` of every
/// kind (registry/generic: DefaultClusterScopedAttr / DefaultNamespaceScopedAttr), and the
/// pod fields of pkg/registry/core/pod's `ToSelectableFields` that tests use.
fn field(obj: &Value, resource: usize, f: &str) -> Result<String, String> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let pods = RESOURCES[resource].plural == "pods";
    Ok(match f {
        "metadata.name" => s(&obj["metadata"]["name"]),
        "metadata.namespace" if RESOURCES[resource].namespaced => s(&obj["metadata"]["namespace"]),
        "spec.nodeName" if pods => s(&obj["spec"]["nodeName"]),
        "spec.serviceAccountName" if pods => s(&obj["spec"]["serviceAccountName"]),
        "status.phase" if pods => s(&obj["status"]["phase"]),
        "status.podIP" if pods => s(&obj["status"]["podIP"]),
        other => return Err(format!("field label not supported: {other}")),
    })
}
