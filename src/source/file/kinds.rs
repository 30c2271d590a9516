//! The Kubernetes object kinds a mesh file may hold, and the two passes that read them:
//! the first reads only `apiVersion` and `kind` of each document and `kind: List` item
//! ([`Head`]), the second deserializes each object into the type its kind names
//! ([`Object`]), directly on the YAML so the deserializer's errors keep their positions.
//!
//! Owns the serde shapes (k8s-openapi's for Namespace, Pod, Service; [`Crd`] for Istio's
//! `security.istio.io` v1 and v1beta1 CRDs). Does not own where each object sits
//! (`parse::Origin`, recorded by the parser), does not turn objects into the model
//! (`translate`) and never touches files, state or sockets.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::parse::{Origin, Parser};
use crate::model::policy::{
    AuthorizationPolicySpec, PeerAuthenticationSpec, RequestAuthenticationSpec,
};
use crate::model::Workload;
use crate::source::objects::{self, FieldError};

const ISTIO_SECURITY_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

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
pub(super) struct Crd<S> {
    #[serde(default)]
    pub(super) metadata: ObjectMeta,
    #[serde(default)]
    pub(super) spec: S,
}

pub(super) enum Object {
    Namespace(core::Namespace),
    /// A Pod, already translated ([`objects::workload`]) as it is read: holding every Pod
    /// object (about 2 KB each) until the end of the file would scatter the workloads built
    /// from them among the memory those objects leave free, and keep it resident. Its
    /// enrollment is decided again with its namespace's labels, which may come later in the
    /// file (`translate`).
    Pod(Result<Option<Workload>, Vec<FieldError>>),
    Service(Box<core::Service>),
    AuthorizationPolicy(Crd<AuthorizationPolicySpec>),
    PeerAuthentication(Crd<PeerAuthenticationSpec>),
    RequestAuthentication(Crd<RequestAuthenticationSpec>),
}

struct ObjectSeed<'k>(&'k Kind);

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = Option<Object>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Ok(Some(match self.0 {
            Kind::Namespace => Object::Namespace(core::Namespace::deserialize(d)?),
            Kind::Pod => Object::Pod(objects::workload(
                &core::Pod::deserialize(d)?,
                &BTreeMap::new(),
            )),
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

impl Parser<'_> {
    /// Both passes: every object with its origin. Stops at the first YAML syntax error, since
    /// nothing after it can be trusted.
    pub(super) fn read_objects(&mut self) -> Vec<(Origin, Object)> {
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
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::super::parse::fixtures::{errors, LIST};
    use super::super::parse_mesh;

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
            m.workloads["Kubernetes//Pod/x/p"].ips.to_vec(),
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
}
