//! Kubernetes-style YAML (as `kubectl get -o yaml` prints it) → the mesh [`model`].
//!
//! Owns parsing and translation of Namespaces, Pods, Services and Istio's security CRDs
//! (`security.istio.io` v1 and v1beta1), in multi-document files and `kind: List`s. It reads
//! text and returns data or errors; it never touches files, state or sockets.
//!
//! Every error carries `file:line` (a contract: `weft check` and reload failures print it).
//! Type errors come straight from the YAML deserializer with their position. Errors found
//! after parsing (duplicate pod IPs, an unparsable pod IP, ...) are located by walking the
//! document again to the offending field, which the deserializer then marks; that costs a
//! re-parse, but only on the error path.
//!
//! Parsing is two passes over the text so that typed deserialization runs directly on the
//! YAML (keeping positions) whatever the key order: the first pass reads only `apiVersion`
//! and `kind` of each document and list item, the second deserializes each object into the
//! type its kind names.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::model::policy::{
    AuthorizationPolicySpec, PeerAuthenticationSpec, RequestAuthenticationSpec,
};
use crate::model::{
    AuthorizationPolicy, Enrollment, Mesh, Namespace, PeerAuthentication, Policy,
    RequestAuthentication, Service, ServicePort, TargetPort, Workload,
};

/// One problem in a mesh file, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshError {
    /// The file's name as given by the caller.
    pub file: String,
    /// 1-based line (0 when the position is unknown).
    pub line: usize,
    /// What is wrong, naming the field.
    pub message: String,
}

impl fmt::Display for MeshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// Every error found in a mesh file; the file is rejected whole when there is any.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct MeshErrors(pub Vec<MeshError>);

impl fmt::Display for MeshErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A parsed mesh and the warnings met on the way (same `file:line: message` form).
#[derive(Clone, Debug)]
pub struct Parsed {
    /// The mesh.
    pub mesh: Mesh,
    /// Things skipped or worth a look; they do not reject the file.
    pub warnings: Vec<MeshError>,
}

const ISTIO_SECURITY_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// Parses a mesh file's text. `file` is only used in messages.
pub fn parse_mesh(file: &str, text: &str) -> Result<Parsed, MeshErrors> {
    let mut p = Parser {
        file,
        text,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let objects = p.read_objects();
    if objects.is_empty() && p.errors.is_empty() {
        p.error_at(
            1,
            "the file holds no Kubernetes objects (empty or only comments); refusing to apply an \
             empty mesh"
                .into(),
        );
        return Err(MeshErrors(p.errors));
    }
    let mesh = p.translate(objects);
    if !p.errors.is_empty() {
        return Err(MeshErrors(p.errors));
    }
    Ok(Parsed {
        mesh,
        warnings: p.warnings,
    })
}

// === first pass: kinds ===

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "apiVersion", default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    items: Option<Vec<ItemHead>>,
}

#[derive(Deserialize)]
struct ItemHead {
    #[serde(rename = "apiVersion", default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

/// What a document or list item is, decided from its `apiVersion` and `kind`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Namespace,
    Pod,
    Service,
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
    /// Skipped with a warning.
    Unknown(String),
    /// No `kind:` at all: an error.
    Missing,
}

fn classify(api_version: Option<&str>, kind: Option<&str>) -> Kind {
    let Some(kind) = kind else {
        return Kind::Missing;
    };
    let api = api_version.unwrap_or("");
    match (api, kind) {
        ("v1", "Namespace") => Kind::Namespace,
        ("v1", "Pod") => Kind::Pod,
        ("v1", "Service") => Kind::Service,
        (a, "AuthorizationPolicy") if ISTIO_SECURITY_VERSIONS.contains(&a) => {
            Kind::AuthorizationPolicy
        }
        (a, "PeerAuthentication") if ISTIO_SECURITY_VERSIONS.contains(&a) => {
            Kind::PeerAuthentication
        }
        (a, "RequestAuthentication") if ISTIO_SECURITY_VERSIONS.contains(&a) => {
            Kind::RequestAuthentication
        }
        _ => Kind::Unknown(format!("{kind} (apiVersion {api:?})")),
    }
}

// === second pass: typed objects ===

/// An Istio CRD object: metadata and a typed spec; `status` and the rest are ignored.
#[derive(Deserialize)]
struct Crd<S> {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: S,
}

enum Object {
    Namespace(core::Namespace),
    Pod(Box<core::Pod>),
    Service(Box<core::Service>),
    AuthorizationPolicy(Crd<AuthorizationPolicySpec>),
    PeerAuthentication(Crd<PeerAuthenticationSpec>),
    RequestAuthentication(Crd<RequestAuthenticationSpec>),
}

/// Where an object sits: document index and, inside a `List`, the item index.
#[derive(Clone, Copy, Debug)]
struct Origin {
    doc: usize,
    item: Option<usize>,
}

struct ObjectSeed<'k>(&'k Kind);

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = Option<Object>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Ok(Some(match self.0 {
            Kind::Namespace => Object::Namespace(core::Namespace::deserialize(d)?),
            Kind::Pod => Object::Pod(Box::new(core::Pod::deserialize(d)?)),
            Kind::Service => Object::Service(Box::new(core::Service::deserialize(d)?)),
            Kind::AuthorizationPolicy => Object::AuthorizationPolicy(Crd::deserialize(d)?),
            Kind::PeerAuthentication => Object::PeerAuthentication(Crd::deserialize(d)?),
            Kind::RequestAuthentication => Object::RequestAuthentication(Crd::deserialize(d)?),
            Kind::Unknown(_) | Kind::Missing => {
                IgnoredAny::deserialize(d)?;
                return Ok(None);
            }
        }))
    }
}

/// Deserializes a `kind: List` document, each item with the kind the first pass found.
struct ListSeed<'k>(&'k [Kind]);

impl<'de> DeserializeSeed<'de> for ListSeed<'_> {
    type Value = Vec<Option<Object>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ListSeed<'_> {
    type Value = Vec<Option<Object>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a List")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                out = map.next_value_seed(ItemsSeed(self.0))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

struct ItemsSeed<'k>(&'k [Kind]);

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_> {
    type Value = Vec<Option<Object>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_> {
    type Value = Vec<Option<Object>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of Kubernetes objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(self.0.len());
        for kind in self.0 {
            match seq.next_element_seed(ObjectSeed(kind))? {
                Some(o) => out.push(o),
                None => break,
            }
        }
        Ok(out)
    }
}

// === locating fields after parsing ===

/// A step on the way to a field: a mapping key or a sequence index.
#[derive(Clone, Copy, Debug)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

const LOCATED: &str = "\u{0}weft-located";

/// Walks to `path` inside document `doc` and makes the deserializer mark it: returns the
/// 1-based line of the node the path names (or of the deepest ancestor that exists).
fn locate(text: &str, doc: usize, path: &[Seg<'_>]) -> Option<usize> {
    let de = serde_yaml_ng::Deserializer::from_str(text).nth(doc)?;
    let err = match (LocateSeed { path }).deserialize(de) {
        Ok(()) => return None,
        Err(e) => e,
    };
    if err.to_string().contains(LOCATED) {
        err.location().map(|l| l.line())
    } else {
        None
    }
}

/// The 1-based line of `metadata.name` of the object of `kind` named `namespace/name` (an
/// object without a namespace is in `default`), searching documents and `kind: List` items.
/// For messages about objects found after parsing, such as `weft check`'s policy warnings.
pub fn locate_object(text: &str, kind: &str, namespace: &str, name: &str) -> Option<usize> {
    #[derive(Deserialize)]
    struct Named {
        #[serde(default)]
        kind: Option<String>,
        #[serde(default)]
        metadata: Option<NamedMeta>,
        #[serde(default)]
        items: Option<Vec<Named>>,
    }
    #[derive(Deserialize)]
    struct NamedMeta {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
    }
    let is = |o: &Named| {
        o.kind.as_deref() == Some(kind)
            && o.metadata.as_ref().is_some_and(|m| {
                m.name.as_deref() == Some(name)
                    && m.namespace
                        .as_deref()
                        .filter(|n| !n.is_empty())
                        .unwrap_or("default")
                        == namespace
            })
    };
    for (doc, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        // Stop at an error: after a syntax error the iterator would repeat it. Files that
        // `parse_mesh` accepted have none.
        let Ok(head) = Option::<Named>::deserialize(de) else {
            return None;
        };
        let Some(head) = head else { continue };
        let mut path: Vec<Seg<'_>> = if is(&head) {
            Vec::new()
        } else if let Some(i) = head.items.iter().flatten().position(is) {
            vec![Seg::Key("items"), Seg::Index(i)]
        } else {
            continue;
        };
        path.extend([Seg::Key("metadata"), Seg::Key("name")]);
        return locate(text, doc, &path);
    }
    None
}

struct LocateSeed<'p, 'a> {
    path: &'p [Seg<'a>],
}

impl<'de> DeserializeSeed<'de> for LocateSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.path.first() {
            None => d.deserialize_any(Here),
            Some(Seg::Key(_)) => d.deserialize_map(self),
            Some(Seg::Index(_)) => d.deserialize_seq(self),
        }
    }
}

impl<'de> Visitor<'de> for LocateSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a path")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some(Seg::Key(want)) = self.path.first() else {
            return Err(serde::de::Error::custom(LOCATED));
        };
        while let Some(key) = map.next_key::<AnyKey>()? {
            if key.0.as_deref() == Some(*want) {
                return map.next_value_seed(LocateSeed {
                    path: &self.path[1..],
                });
            }
            map.next_value::<IgnoredAny>()?;
        }
        // Not found: mark the mapping that should have had the key.
        Err(serde::de::Error::custom(LOCATED))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some(Seg::Index(want)) = self.path.first() else {
            return Err(serde::de::Error::custom(LOCATED));
        };
        for _ in 0..*want {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(serde::de::Error::custom(LOCATED));
            }
        }
        match seq.next_element_seed(LocateSeed {
            path: &self.path[1..],
        })? {
            Some(()) => Ok(()),
            None => Err(serde::de::Error::custom(LOCATED)),
        }
    }
}

/// A mapping key of any scalar type (`None` for non-string keys).
struct AnyKey(Option<String>);

impl<'de> Deserialize<'de> for AnyKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AnyKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AnyKey, E> {
                Ok(AnyKey(Some(v.to_string())))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<AnyKey, E> {
                Ok(AnyKey(None))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<AnyKey, E> {
                Ok(AnyKey(None))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<AnyKey, E> {
                Ok(AnyKey(None))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<AnyKey, E> {
                Ok(AnyKey(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Marks the node it is asked to deserialize.
struct Here;

impl<'de> Visitor<'de> for Here {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anything")
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(serde::de::Error::custom(LOCATED))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(serde::de::Error::custom(LOCATED))
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(LOCATED))
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(LOCATED))
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(LOCATED))
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(LOCATED))
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(LOCATED))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Err(E::custom(LOCATED))
    }
}

// === the parser ===

struct Parser<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<MeshError>,
    warnings: Vec<MeshError>,
}

/// The message of a YAML error without the trailing ` at line N column M` (the line is
/// reported separately, as `file:line:`). Also used for the daemon config.
pub(crate) fn yaml_message(e: &serde_yaml_ng::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

impl Parser<'_> {
    fn error_at(&mut self, line: usize, message: String) {
        self.errors.push(MeshError {
            file: self.file.to_string(),
            line,
            message,
        });
    }

    fn yaml_error(&mut self, e: &serde_yaml_ng::Error) {
        let line = e.location().map(|l| l.line()).unwrap_or(0);
        let message = yaml_message(e);
        self.error_at(line, message);
    }

    /// The line of `path` below the object at `origin`.
    fn line_of(&self, origin: Origin, path: &[Seg<'_>]) -> usize {
        let mut full: Vec<Seg<'_>> = Vec::with_capacity(path.len() + 2);
        if let Some(i) = origin.item {
            full.push(Seg::Key("items"));
            full.push(Seg::Index(i));
        }
        full.extend_from_slice(path);
        locate(self.text, origin.doc, &full).unwrap_or(0)
    }

    fn error_in(&mut self, origin: Origin, path: &[Seg<'_>], message: String) {
        let line = self.line_of(origin, path);
        self.error_at(line, message);
    }

    fn warn_in(&mut self, origin: Origin, path: &[Seg<'_>], message: String) {
        let line = self.line_of(origin, path);
        self.warnings.push(MeshError {
            file: self.file.to_string(),
            line,
            message,
        });
    }

    /// Both passes: every object with its origin. Stops at the first YAML syntax error, since
    /// nothing after it can be trusted.
    fn read_objects(&mut self) -> Vec<(Origin, Object)> {
        // Pass 1: kinds.
        let mut heads: Vec<Option<Head>> = Vec::new();
        for de in serde_yaml_ng::Deserializer::from_str(self.text) {
            match Option::<Head>::deserialize(de) {
                Ok(h) => heads.push(h),
                Err(e) => {
                    // A syntax error ends the stream (and the iterator would repeat it).
                    self.yaml_error(&e);
                    return Vec::new();
                }
            }
        }
        // Pass 2: typed objects.
        let mut objects = Vec::new();
        let docs = serde_yaml_ng::Deserializer::from_str(self.text);
        for (doc, (de, head)) in docs.zip(heads.iter()).enumerate() {
            let Some(head) = head else { continue };
            let kind = classify(head.api_version.as_deref(), head.kind.as_deref());
            if head.kind.as_deref() == Some("List") {
                let items = head.items.as_deref().unwrap_or_default();
                let kinds: Vec<Kind> = items
                    .iter()
                    .map(|i| classify(i.api_version.as_deref(), i.kind.as_deref()))
                    .collect();
                match ListSeed(&kinds).deserialize(de) {
                    Ok(objs) => {
                        for (item, (obj, kind)) in objs.into_iter().zip(&kinds).enumerate() {
                            let origin = Origin {
                                doc,
                                item: Some(item),
                            };
                            self.keep(origin, kind, obj, &mut objects);
                        }
                    }
                    Err(e) => self.yaml_error(&e),
                }
            } else {
                match ObjectSeed(&kind).deserialize(de) {
                    Ok(obj) => {
                        self.keep(Origin { doc, item: None }, &kind, obj, &mut objects);
                    }
                    Err(e) => self.yaml_error(&e),
                }
            }
        }
        objects
    }

    fn keep(
        &mut self,
        origin: Origin,
        kind: &Kind,
        obj: Option<Object>,
        out: &mut Vec<(Origin, Object)>,
    ) {
        match (kind, obj) {
            (_, Some(o)) => out.push((origin, o)),
            (Kind::Missing, None) => {
                self.error_in(
                    origin,
                    &[],
                    "object has no `kind` (a `kind: List` whose last lines are cut off looks like this)"
                        .into(),
                );
            }
            (Kind::Unknown(what), None) => {
                self.warn_in(origin, &[], format!("skipping unsupported object {what}"));
            }
            (_, None) => {}
        }
    }

    /// Checks metadata.name and returns (namespace, name).
    fn name_of(
        &mut self,
        origin: Origin,
        meta: &ObjectMeta,
        namespaced: bool,
    ) -> Option<(String, String)> {
        let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
            self.error_in(
                origin,
                &[Seg::Key("metadata")],
                "metadata.name is required".into(),
            );
            return None;
        };
        let ns = if namespaced {
            meta.namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".to_string())
        } else {
            String::new()
        };
        Some((ns, name))
    }

    fn translate(&mut self, objects: Vec<(Origin, Object)>) -> Mesh {
        let mut mesh = Mesh::default();
        // Namespaces first: pods need their labels whatever the order in the file.
        for (origin, obj) in &objects {
            if let Object::Namespace(ns) = obj {
                let Some((_, name)) = self.name_of(*origin, &ns.metadata, false) else {
                    continue;
                };
                if mesh.namespaces.contains_key(&name) {
                    self.error_in(
                        *origin,
                        &[Seg::Key("metadata"), Seg::Key("name")],
                        format!("duplicate Namespace {name:?}"),
                    );
                    continue;
                }
                let labels = ns.metadata.labels.clone().unwrap_or_default();
                mesh.namespaces
                    .insert(name.clone(), Namespace { name, labels });
            }
        }
        let mut pod_keys: HashSet<String> = HashSet::new();
        let mut ip_owner: HashMap<IpAddr, String> = HashMap::new();
        let mut services_seen: HashSet<String> = HashSet::new();
        let mut policies_seen: HashSet<(crate::model::PolicyKind, String, String)> = HashSet::new();
        for (origin, obj) in objects {
            match obj {
                Object::Namespace(_) => {}
                Object::Pod(pod) => {
                    if let Some(w) = self.workload(origin, &pod, &mesh.namespaces) {
                        let key = format!("{}/{}", w.namespace, w.name);
                        if !pod_keys.insert(key.clone()) {
                            self.error_in(
                                origin,
                                &[Seg::Key("metadata"), Seg::Key("name")],
                                format!("duplicate Pod {key}"),
                            );
                            continue;
                        }
                        if w.enrollment != Enrollment::HostNetwork {
                            for (i, ip) in w.ips.iter().enumerate() {
                                if let Some(other) = ip_owner.insert(*ip, format!("Pod {key}")) {
                                    self.error_in(
                                        origin,
                                        &[Seg::Key("status"), Seg::Key("podIPs"), Seg::Index(i)],
                                        format!("duplicate IP {ip}: Pod {key} and {other} both claim it"),
                                    );
                                }
                            }
                        }
                        if w.enrollment.is_enrolled() {
                            if let Some(v6) = w.ips.iter().find(|ip| ip.is_ipv6()) {
                                self.warn_in(
                                    origin,
                                    &[Seg::Key("status")],
                                    format!(
                                        "Pod {key}: its IPv6 address {v6} is not captured (weft \
                                         captures IPv4 only): IPv6 traffic to and from it bypasses \
                                         mTLS and policy"
                                    ),
                                );
                            }
                        }
                        mesh.insert_workload(w);
                    }
                }
                Object::Service(svc) => {
                    if let Some(s) = self.service(origin, &svc) {
                        let key = s.key();
                        if !services_seen.insert(key.clone()) {
                            self.error_in(
                                origin,
                                &[Seg::Key("metadata"), Seg::Key("name")],
                                format!("duplicate Service {key}"),
                            );
                            continue;
                        }
                        for ip in &s.vips {
                            if let Some(other) = ip_owner.insert(*ip, format!("Service {key}")) {
                                self.error_in(
                                    origin,
                                    &[Seg::Key("spec"), Seg::Key("clusterIP")],
                                    format!("duplicate IP {ip}: Service {key} and {other} both claim it"),
                                );
                            }
                        }
                        mesh.insert_service(s);
                    }
                }
                Object::AuthorizationPolicy(crd) => {
                    if let Some((namespace, name)) = self.name_of(origin, &crd.metadata, true) {
                        let p = Policy::AuthorizationPolicy(AuthorizationPolicy {
                            name,
                            namespace,
                            spec: crd.spec,
                        });
                        self.push_policy(origin, p, &mut policies_seen, &mut mesh);
                    }
                }
                Object::PeerAuthentication(crd) => {
                    if let Some((namespace, name)) = self.name_of(origin, &crd.metadata, true) {
                        let p = Policy::PeerAuthentication(PeerAuthentication {
                            name,
                            namespace,
                            spec: crd.spec,
                        });
                        self.push_policy(origin, p, &mut policies_seen, &mut mesh);
                    }
                }
                Object::RequestAuthentication(crd) => {
                    if let Some((namespace, name)) = self.name_of(origin, &crd.metadata, true) {
                        let p = Policy::RequestAuthentication(RequestAuthentication {
                            name,
                            namespace,
                            spec: crd.spec,
                        });
                        self.push_policy(origin, p, &mut policies_seen, &mut mesh);
                    }
                }
            }
        }
        mesh
    }

    fn push_policy(
        &mut self,
        origin: Origin,
        p: Policy,
        seen: &mut HashSet<(crate::model::PolicyKind, String, String)>,
        mesh: &mut Mesh,
    ) {
        let (ns, name) = p.key();
        let key = (p.kind(), ns.to_string(), name.to_string());
        if !seen.insert(key) {
            self.error_in(
                origin,
                &[Seg::Key("metadata"), Seg::Key("name")],
                format!("duplicate {:?} {ns}/{name}", p.kind()),
            );
            return;
        }
        mesh.policies.push_back(p);
    }

    fn workload(
        &mut self,
        origin: Origin,
        pod: &core::Pod,
        namespaces: &imbl::OrdMap<String, Namespace>,
    ) -> Option<Workload> {
        let (namespace, name) = self.name_of(origin, &pod.metadata, true)?;
        let spec = pod.spec.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        if matches!(status.phase.as_deref(), Some("Succeeded") | Some("Failed")) {
            // Terminal pods hold no address any more (and theirs may be reused).
            return None;
        }
        let mut ips = Vec::new();
        let mut bad = false;
        match status.pod_ips.as_deref() {
            Some(list) if !list.is_empty() => {
                for (i, entry) in list.iter().enumerate() {
                    match entry.ip.parse::<IpAddr>() {
                        Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                        Ok(_) => {}
                        Err(_) => {
                            bad = true;
                            self.error_in(
                                origin,
                                &[
                                    Seg::Key("status"),
                                    Seg::Key("podIPs"),
                                    Seg::Index(i),
                                    Seg::Key("ip"),
                                ],
                                format!("status.podIPs[{i}].ip: invalid IP address {:?}", entry.ip),
                            );
                        }
                    }
                }
            }
            _ => {
                if let Some(ip) = status.pod_ip.as_deref().filter(|s| !s.is_empty()) {
                    match ip.parse::<IpAddr>() {
                        Ok(ip) => ips.push(ip),
                        Err(_) => {
                            bad = true;
                            self.error_in(
                                origin,
                                &[Seg::Key("status"), Seg::Key("podIP")],
                                format!("status.podIP: invalid IP address {ip:?}"),
                            );
                        }
                    }
                }
            }
        }
        if bad {
            return None;
        }
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let ns_labels = namespaces
            .get(&namespace)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        let enrollment =
            Enrollment::decide(&ns_labels, &labels, spec.host_network.unwrap_or(false));
        let mut named_ports = BTreeMap::new();
        for c in &spec.containers {
            for p in c.ports.as_deref().unwrap_or_default() {
                if let (Some(n), Ok(port)) = (&p.name, u16::try_from(p.container_port)) {
                    named_ports.insert(n.clone(), port);
                }
            }
        }
        let service_account = spec
            .service_account_name
            .clone()
            .or(spec.service_account.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_string());
        let workload_name = owner_workload(&pod.metadata).unwrap_or_else(|| name.clone());
        let (canonical_name, canonical_revision) = Workload::canonical(&labels, &workload_name);
        Some(Workload {
            uid: Workload::pod_uid(&namespace, &name),
            workload_name,
            canonical_name,
            canonical_revision,
            name,
            namespace,
            service_account,
            node: spec.node_name.clone().unwrap_or_default(),
            ips,
            labels,
            named_ports,
            enrollment,
        })
    }

    fn service(&mut self, origin: Origin, svc: &core::Service) -> Option<Service> {
        let (namespace, name) = self.name_of(origin, &svc.metadata, true)?;
        let spec = svc.spec.clone().unwrap_or_default();
        let mut vips = Vec::new();
        let listed: Vec<(Seg<'static>, String)> = match spec.cluster_ips.as_deref() {
            Some(l) if !l.is_empty() => l
                .iter()
                .enumerate()
                .map(|(i, s)| (Seg::Index(i), s.clone()))
                .collect(),
            _ => spec
                .cluster_ip
                .iter()
                .map(|s| (Seg::Key("clusterIP"), s.clone()))
                .collect(),
        };
        for (seg, s) in listed {
            if s.is_empty() || s == "None" {
                continue;
            }
            match s.parse::<IpAddr>() {
                Ok(ip) if !vips.contains(&ip) => vips.push(ip),
                Ok(_) => {}
                Err(_) => {
                    let (path, field): (Vec<Seg<'_>>, String) = match seg {
                        Seg::Index(i) => (
                            vec![Seg::Key("spec"), Seg::Key("clusterIPs"), seg],
                            format!("spec.clusterIPs[{i}]"),
                        ),
                        _ => (vec![Seg::Key("spec"), seg], "spec.clusterIP".into()),
                    };
                    self.error_in(origin, &path, format!("{field}: invalid IP address {s:?}"));
                    return None;
                }
            }
        }
        let mut ports = Vec::new();
        for (i, p) in spec.ports.as_deref().unwrap_or_default().iter().enumerate() {
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                continue;
            }
            let Ok(port) = u16::try_from(p.port).map_err(|_| ()).and_then(|v| {
                if v == 0 {
                    Err(())
                } else {
                    Ok(v)
                }
            }) else {
                self.error_in(
                    origin,
                    &[
                        Seg::Key("spec"),
                        Seg::Key("ports"),
                        Seg::Index(i),
                        Seg::Key("port"),
                    ],
                    format!("spec.ports[{i}].port: {} is not a port (1-65535)", p.port),
                );
                return None;
            };
            let target_port = match &p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => match u16::try_from(*n) {
                    Ok(t) if t != 0 => TargetPort::Number(t),
                    _ => {
                        self.error_in(
                            origin,
                            &[
                                Seg::Key("spec"),
                                Seg::Key("ports"),
                                Seg::Index(i),
                                Seg::Key("targetPort"),
                            ],
                            format!("spec.ports[{i}].targetPort: {n} is not a port (1-65535)"),
                        );
                        return None;
                    }
                },
                Some(IntOrString::String(s)) => match s.parse::<u16>() {
                    Ok(t) if t != 0 => TargetPort::Number(t),
                    _ => TargetPort::Named(s.clone()),
                },
            };
            ports.push(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port,
                target_port,
            });
        }
        Some(Service {
            name,
            namespace,
            vips,
            ports,
            selector: spec.selector.clone().unwrap_or_default(),
            endpoints: Vec::new(),
            labels: svc.metadata.labels.clone().unwrap_or_default(),
        })
    }
}

/// The workload a pod belongs to, from its controller owner: a ReplicaSet `web-7d9c6b5f4`
/// is Deployment `web`'s (the pod-template hash is dropped), other owners name themselves.
fn owner_workload(meta: &ObjectMeta) -> Option<String> {
    let owners = meta.owner_references.as_deref().unwrap_or_default();
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or(owners.first())?;
    Some(match (owner.kind.as_str(), owner.name.rsplit_once('-')) {
        ("ReplicaSet", Some((deployment, hash))) if !hash.is_empty() => deployment.to_string(),
        _ => owner.name.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::{Action, ConditionKey, IpBlock, MtlsMode, PortNumber, StringMatch};
    use crate::model::DATAPLANE_MODE_LABEL;

    const LIST: &str = include_str!("../tests/data/kubectl-list.yaml");

    fn errors(text: &str) -> Vec<String> {
        match parse_mesh("mesh.yaml", text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// The 1-based line of the first line containing `needle`, searching from `after`.
    fn line_of(text: &str, needle: &str, after: usize) -> usize {
        text.lines()
            .enumerate()
            .skip(after)
            .find(|(_, l)| l.contains(needle))
            .map(|(i, _)| i + 1)
            .unwrap()
    }

    #[test]
    fn a_kubectl_list_becomes_the_expected_model() {
        let parsed = parse_mesh("list.yaml", LIST).unwrap();
        let m = &parsed.mesh;
        assert_eq!(m.namespaces.len(), 2);
        assert_eq!(m.namespaces["shop"].labels[DATAPLANE_MODE_LABEL], "ambient");

        // Workloads are keyed by uid: `Kubernetes//Pod/<namespace>/<name>`.
        let names: Vec<_> = m.workloads.values().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "old-0",
                "cart-0",
                "web-7d9c6b5f4-abcde",
                "web-7d9c6b5f4-fghij",
            ]
        );
        let pod = |name: &str| {
            m.workloads
                .values()
                .find(|w| w.name == name)
                .unwrap()
                .clone()
        };
        let web = pod("web-7d9c6b5f4-abcde");
        assert_eq!(web.uid, "Kubernetes//Pod/shop/web-7d9c6b5f4-abcde");
        assert_eq!(web.namespace, "shop");
        assert_eq!(web.service_account, "web");
        assert_eq!(web.node, "node-1");
        assert_eq!(
            web.ips,
            vec![
                "10.244.1.10".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::a".parse().unwrap()
            ]
        );
        assert_eq!(web.named_ports["http"], 8080);
        assert_eq!(web.labels["app"], "web");
        assert_eq!(web.enrollment, Enrollment::Enrolled);
        assert_eq!(
            web.workload_name, "web",
            "the Deployment behind the ReplicaSet"
        );
        assert_eq!(
            (web.canonical_name.as_str(), web.canonical_revision.as_str()),
            ("web", "latest")
        );
        assert_eq!(
            pod("cart-0").workload_name,
            "cart-0",
            "no owner: the pod itself"
        );
        assert_eq!(pod("web-7d9c6b5f4-fghij").node, "node-2");
        assert_eq!(pod("cart-0").enrollment, Enrollment::OptedOut);
        assert_eq!(pod("old-0").enrollment, Enrollment::NotEnrolled);
        assert_eq!(pod("old-0").service_account, "default");

        assert_eq!(m.services.len(), 2);
        let svc = &m.services["shop/web"];
        assert_eq!(svc.vips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            svc.ports,
            vec![
                ServicePort {
                    name: "http".into(),
                    port: 80,
                    target_port: TargetPort::Named("http".into())
                },
                ServicePort {
                    name: "metrics".into(),
                    port: 9090,
                    target_port: TargetPort::Number(9090)
                },
            ]
        );
        // Endpoints are resolved from the selector by the snapshot (one owner of that rule).
        let snap = crate::state::Snapshot::new(1, m.clone());
        assert_eq!(
            snap.mesh.services["shop/web"].endpoints,
            vec![
                "Kubernetes//Pod/shop/web-7d9c6b5f4-abcde".to_string(),
                "Kubernetes//Pod/shop/web-7d9c6b5f4-fghij".to_string()
            ]
        );
        let headless = &m.services["shop/web-headless"];
        assert!(headless.vips.is_empty(), "headless service has no VIP");
        assert_eq!(headless.ports[0].target_port, TargetPort::Number(8080));

        assert_eq!(m.policies.len(), 7);
        let Policy::AuthorizationPolicy(ap) = &m.policies[0] else {
            panic!()
        };
        assert_eq!(
            (ap.namespace.as_str(), ap.name.as_str()),
            ("shop", "web-allow-frontend")
        );
        assert_eq!(ap.spec.action, Action::Allow);
        assert_eq!(
            ap.spec.selector.as_ref().unwrap().match_labels["app"],
            "web"
        );
        let rule = &ap.spec.rules[0];
        let src = &rule.from[0].source;
        assert_eq!(
            src.principals,
            vec![
                StringMatch::Exact("cluster.local/ns/shop/sa/frontend".into()),
                StringMatch::Prefix("cluster.local/ns/ops/".into())
            ]
        );
        assert_eq!(src.namespaces, vec![StringMatch::Exact("shop".into())]);
        assert_eq!(
            src.ip_blocks,
            vec![IpBlock("10.244.0.0/16".parse().unwrap())]
        );
        assert_eq!(
            src.not_ip_blocks,
            vec![IpBlock("10.244.9.9/32".parse().unwrap())]
        );
        let op = &rule.to[0].operation;
        assert_eq!(op.ports, vec![PortNumber(8080)]);
        assert_eq!(op.not_ports, vec![PortNumber(9090)]);
        assert_eq!(rule.when[0].key, ConditionKey::SourceNamespace);
        assert_eq!(
            rule.when[1].key,
            ConditionKey::RequestAuthClaims(vec!["groups".into(), "admin".into()])
        );
        assert_eq!(
            rule.when[1].not_values,
            vec![StringMatch::Exact("false".into())]
        );

        let Policy::AuthorizationPolicy(deny) = &m.policies[1] else {
            panic!()
        };
        assert_eq!(deny.spec.action, Action::Deny);
        assert_eq!(deny.namespace, "istio-system");
        let Policy::AuthorizationPolicy(all) = &m.policies[2] else {
            panic!()
        };
        assert_eq!(
            all.spec,
            AuthorizationPolicySpec::default(),
            "spec: {{}} is an ALLOW with no rules"
        );

        let Policy::PeerAuthentication(pa) = &m.policies[3] else {
            panic!()
        };
        assert_eq!(pa.spec.mtls.unwrap().mode, MtlsMode::Strict);
        let Policy::PeerAuthentication(pa) = &m.policies[4] else {
            panic!()
        };
        assert_eq!(pa.spec.mtls.unwrap().mode, MtlsMode::Permissive);
        assert_eq!(pa.spec.port_level_mtls[&9090].mode, MtlsMode::Disable);

        let Policy::RequestAuthentication(ra) = &m.policies[5] else {
            panic!()
        };
        let rule = &ra.spec.jwt_rules[0];
        assert_eq!(rule.issuer, "https://issuer.example");
        assert_eq!(rule.from_headers[0].prefix.as_deref(), Some("Bearer "));
        assert!(rule.forward_original_token);
        let Policy::RequestAuthentication(ra) = &m.policies[6] else {
            panic!()
        };
        assert_eq!(ra.spec.jwt_rules[0].output_claim_to_headers[0].claim, "sub");

        // The Deployment is skipped with a warning that points at it; the dual-stack enrolled
        // pod's IPv6 address is named as not captured.
        assert_eq!(parsed.warnings.len(), 2, "{:?}", parsed.warnings);
        let v6 = parsed.warnings[1].to_string();
        assert!(
            v6.contains("IPv6 address fd00:10:244:1::a is not captured"),
            "{v6}"
        );
        let w = parsed.warnings[0].to_string();
        let line = line_of(LIST, "kind: Deployment", 0) - 1;
        assert!(
            w.starts_with(&format!(
                "list.yaml:{line}: skipping unsupported object Deployment"
            )),
            "{w}"
        );
    }

    #[test]
    fn objects_are_located_by_kind_namespace_and_name() {
        let at = line_of(LIST, "name: web-allow-frontend", 0);
        assert_eq!(
            locate_object(LIST, "AuthorizationPolicy", "shop", "web-allow-frontend"),
            Some(at)
        );
        assert_eq!(
            locate_object(LIST, "PeerAuthentication", "shop", "web-allow-frontend"),
            None
        );
        assert_eq!(
            locate_object(LIST, "AuthorizationPolicy", "other", "web-allow-frontend"),
            None
        );
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n";
        assert_eq!(
            locate_object(text, "AuthorizationPolicy", "default", "p"),
            Some(8)
        );
    }

    #[test]
    fn multi_document_files_in_any_key_order_give_the_same_model() {
        let list = parse_mesh("a.yaml", LIST).unwrap().mesh;
        // Turn the List into separate documents by dedenting each item.
        let mut docs = String::new();
        for line in LIST.lines().skip(2) {
            if line.starts_with("kind: List") {
                break;
            }
            if let Some(rest) = line.strip_prefix("- ") {
                docs.push_str("---\n");
                docs.push_str(rest);
            } else {
                docs.push_str(line.strip_prefix("  ").unwrap_or(line));
            }
            docs.push('\n');
        }
        let multi = parse_mesh("b.yaml", &docs).unwrap().mesh;
        assert_eq!(list, multi);

        // `kind` after `spec` still works.
        let text = "metadata: {name: p, namespace: x}\nspec: {nodeName: n}\nstatus: {podIP: 10.0.0.1}\nkind: Pod\napiVersion: v1\n";
        let m = parse_mesh("c.yaml", text).unwrap().mesh;
        assert_eq!(
            m.workloads["Kubernetes//Pod/x/p"].ips,
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn malformed_yaml_is_reported_with_its_line() {
        let e = errors("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: [a\n  labels: {}\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("mesh.yaml:"), "{e:?}");
        assert!(!e[0].starts_with("mesh.yaml:0:"), "{e:?}");
    }

    #[test]
    fn wrong_field_types_name_the_field_and_line() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers: 5\n";
        let e = errors(text);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("mesh.yaml:6: spec.containers: invalid type: integer `5`"),
            "{e:?}"
        );

        let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\nspec:\n  mtls:\n    mode: STRICTEST\n";
        let e = errors(text);
        assert!(
            e[0].starts_with("mesh.yaml:6: spec.mtls.mode: unknown variant `STRICTEST`"),
            "{e:?}"
        );
    }

    #[test]
    fn an_enrolled_pod_with_an_ipv6_address_is_a_warning_at_its_status() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
                    apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata: {name: dual, namespace: mesh}\nstatus:\n  podIPs:\n  - ip: 10.0.0.1\n  - ip: fd00::1\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata: {name: outside, namespace: plain}\nstatus:\n  podIPs:\n  - ip: 10.0.0.2\n  - ip: fd00::2\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata: {name: v4, namespace: mesh}\nstatus: {podIP: 10.0.0.3}\n";
        let parsed = parse_mesh("m.yaml", text).unwrap();
        let w: Vec<String> = parsed.warnings.iter().map(|w| w.to_string()).collect();
        // Only the enrolled pod with an IPv6 address, at its status (the block's first line).
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("m.yaml:13: Pod mesh/dual: its IPv6 address fd00::1 is not captured"),
            "{w:?}"
        );
    }

    #[test]
    fn duplicate_pod_ips_are_refused_at_the_second_claim() {
        let text = "\
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: n}
status:
  podIP: 10.0.0.1
  podIPs:
  - ip: 10.0.0.1
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: n}
status:
  podIP: 10.0.0.1
  podIPs:
  - ip: 10.0.0.1
";
        let e = errors(text);
        assert_eq!(
            e,
            ["mesh.yaml:15: duplicate IP 10.0.0.1: Pod n/b and Pod n/a both claim it"]
        );
    }

    #[test]
    fn a_service_vip_may_not_reuse_a_pod_ip() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  clusterIP: 10.0.0.1\n";
        let e = errors(text);
        assert_eq!(e, ["mesh.yaml:10: duplicate IP 10.0.0.1: Service default/s and Pod default/a both claim it"]);
    }

    #[test]
    fn an_invalid_cidr_in_a_policy_is_refused_with_its_line() {
        let text = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: n}
spec:
  rules:
  - from:
    - source:
        ipBlocks:
        - 10.0.0.0/8
        - 10.0.0.0/33
";
        let e = errors(text);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("mesh.yaml:10: spec.rules[0].from[0].source.ipBlocks[1]: invalid IP address or CIDR \"10.0.0.0/33\""),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_policy_fields_and_condition_keys_are_refused() {
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n  - from:\n    - source:\n        principal: [x]\n";
        let e = errors(text);
        assert!(
            e[0].starts_with(
                "mesh.yaml:8: spec.rules[0].from[0].source: unknown field `principal`"
            ),
            "{e:?}"
        );
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n  - when:\n    - key: source.ipp\n      values: [a]\n";
        let e = errors(text);
        assert!(
            e[0].contains("unknown condition key \"source.ipp\""),
            "{e:?}"
        );
        assert!(e[0].starts_with("mesh.yaml:7:"), "{e:?}");
    }

    #[test]
    fn invalid_service_addresses_and_ports_are_refused_where_they_stand() {
        let svc = |spec: &str| {
            errors(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: a}}\nspec:\n{spec}"
            ))
        };
        let e = svc("  clusterIPs:\n  - 10.96.0.1\n  - 10.96.0.300\n  ports: [{port: 80}]\n");
        assert_eq!(
            e,
            ["mesh.yaml:7: spec.clusterIPs[1]: invalid IP address \"10.96.0.300\""]
        );
        let e = svc("  clusterIP: banana\n  ports: [{port: 80}]\n");
        assert_eq!(
            e,
            ["mesh.yaml:5: spec.clusterIP: invalid IP address \"banana\""]
        );
        for bad in ["0", "70000"] {
            let e = svc(&format!(
                "  clusterIP: 10.96.0.1\n  ports: [{{port: {bad}}}]\n"
            ));
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(e[0].starts_with("mesh.yaml:6: spec.ports[0]"), "{e:?}");
        }
    }

    #[test]
    fn invalid_pod_ips_and_missing_names_are_refused() {
        let e = errors("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus:\n  podIPs:\n  - ip: 10.0.0.300\n");
        assert_eq!(
            e,
            ["mesh.yaml:6: status.podIPs[0].ip: invalid IP address \"10.0.0.300\""]
        );
        let e = errors("apiVersion: v1\nkind: Namespace\nmetadata:\n  labels: {a: b}\n");
        assert_eq!(e, ["mesh.yaml:4: metadata.name is required"]);
        let e = errors("apiVersion: v1\nmetadata: {name: x}\n");
        assert!(
            e[0].starts_with("mesh.yaml:1: object has no `kind`"),
            "{e:?}"
        );
    }

    #[test]
    fn a_truncated_file_is_refused() {
        // A List cut anywhere loses its closing `kind: List` and is refused.
        for marker in [
            "    portLevelMtls:",
            "    podIPs:\n    - ip: 10.244.1.10",
            "  kind: Service",
        ] {
            let cut = &LIST[..LIST.find(marker).unwrap() + marker.len() / 2];
            let e = errors(cut);
            // Either the List lost its `kind` line, or the cut left a syntax error, reported
            // where the text ends (the cut line, or just past it at end of input).
            let n = cut.lines().count();
            let at_cut = |e: &str| {
                e.starts_with(&format!("mesh.yaml:{n}: "))
                    || e.starts_with(&format!("mesh.yaml:{}: ", n + 1))
            };
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(
                e[0].starts_with("mesh.yaml:1: object has no `kind`") || at_cut(&e[0]),
                "{marker:?} (cut after line {n}): {e:?}"
            );
        }
        // Multi-document files cut inside a value or a flow collection are refused too.
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  mtls: {mode: STRI";
        let e = errors(text);
        assert!(
            e[0].starts_with("mesh.yaml:10: did not find expected ',' or '}'"),
            "{e:?}"
        );
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  mtls:\n    mode: STRI";
        let e = errors(text);
        assert!(
            e[0].starts_with("mesh.yaml:10: spec.mtls.mode: unknown variant `STRI`"),
            "{e:?}"
        );
    }

    #[test]
    fn an_empty_file_is_refused() {
        for text in ["", "\n\n", "# only a comment\n", "---\n---\n"] {
            let e = errors(text);
            assert_eq!(e.len(), 1);
            assert!(e[0].contains("holds no Kubernetes objects"), "{e:?}");
        }
    }

    #[test]
    fn duplicate_objects_are_refused() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n";
        assert_eq!(errors(text), ["mesh.yaml:8: duplicate Pod default/a"]);
    }

    #[test]
    fn several_errors_are_all_reported() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\nspec: {containers: 1}\n";
        let e = errors(text);
        assert_eq!(e.len(), 2, "{e:?}");
    }
}
