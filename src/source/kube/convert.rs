//! API objects → [`Object`]s: only what weft uses of each object is kept, and the full object
//! is dropped as soon as it is converted (inside the watch task that received it).
//!
//! Owns the per-kind conversions and their errors (`field: reason`). Pods and Services follow
//! the mesh file's rules ([`crate::source::objects`]); policies are read from their `spec`
//! with the same serde types as the mesh file, the field of a bad value named.

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use kube::ResourceExt;
use serde::de::DeserializeOwned;

use super::apply::{Item, Kind, Object, Slice, SliceEndpoint};
use crate::model::{
    AuthorizationPolicy, Namespace, PeerAuthentication, Policy, RequestAuthentication, Workload,
};
use crate::source::objects;

/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn object(kind: Kind, namespace: String, name: String, item: Result<Item, String>) -> Object {
    Object {
        kind,
        namespace,
        name,
        item,
    }
}

/// A Namespace: its name and labels.
pub fn namespace(ns: core::Namespace) -> Object {
    let name = ns.name_any();
    let labels = ns.metadata.labels.unwrap_or_default();
    object(
        Kind::Namespace,
        String::new(),
        name.clone(),
        Ok(Item::Namespace(Namespace { name, labels })),
    )
}

/// A Pod: its workload (enrollment decided later, against its namespace).
pub fn pod(pod: core::Pod) -> Object {
    let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
    let item = objects::workload(&pod, &Default::default())
        .map(Item::Pod)
        .map_err(|errors| {
            errors
                .into_iter()
                .map(|e| e.message)
                .collect::<Vec<_>>()
                .join("; ")
        });
    object(Kind::Pod, ns, name, item)
}

/// A Service: VIPs, TCP ports, selector.
pub fn service(svc: core::Service) -> Object {
    let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
    let item = objects::service(&svc)
        .map(Item::Service)
        .map_err(|e| e.message);
    object(Kind::Service, ns, name, item)
}

/// An EndpointSlice: its service and ready endpoints.
pub fn endpoint_slice(slice: EndpointSlice) -> Object {
    let (ns, name) = (slice.namespace().unwrap_or_default(), slice.name_any());
    let item = slice_item(&slice, &ns).map(Item::Slice);
    object(Kind::EndpointSlice, ns, name, item)
}

fn slice_item(slice: &EndpointSlice, ns: &str) -> Result<Slice, String> {
    let service = slice
        .labels()
        .get(SERVICE_NAME_LABEL)
        .cloned()
        .unwrap_or_default();
    let mut endpoints = Vec::new();
    if slice.address_type == "FQDN" {
        // Names, not addresses: nothing weft can route to.
        return Ok(Slice { service, endpoints });
    }
    for (i, e) in slice.endpoints.iter().enumerate() {
        // Kubernetes: an unset `ready` means ready.
        if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        if let Some(r) = e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
        {
            if let Some(pod) = r.name.as_deref().filter(|n| !n.is_empty()) {
                let pns = r
                    .namespace
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .unwrap_or(ns);
                endpoints.push(SliceEndpoint::Pod(Workload::pod_uid(pns, pod).to_string()));
                continue;
            }
        }
        for (j, a) in e.addresses.iter().enumerate() {
            let ip = a
                .parse::<IpAddr>()
                .map_err(|_| format!("endpoints[{i}].addresses[{j}]: invalid IP address {a:?}"))?;
            endpoints.push(SliceEndpoint::Ip(ip));
        }
    }
    Ok(Slice { service, endpoints })
}

/// A `security.istio.io` object of `kind`, its `spec` read as the mesh file reads it.
pub fn policy(kind: Kind, obj: DynamicObject) -> Object {
    let (ns, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
    let spec = obj
        .data
        .get("spec")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    let (n, m) = (ns.clone(), name.clone());
    let item = match kind {
        Kind::AuthorizationPolicy => spec_of(spec).map(|spec| {
            Policy::AuthorizationPolicy(AuthorizationPolicy {
                namespace: n,
                name: m,
                spec,
            })
        }),
        Kind::PeerAuthentication => spec_of(spec).map(|spec| {
            Policy::PeerAuthentication(PeerAuthentication {
                namespace: n,
                name: m,
                spec,
            })
        }),
        Kind::RequestAuthentication => spec_of(spec).map(|spec| {
            Policy::RequestAuthentication(RequestAuthentication {
                namespace: n,
                name: m,
                spec,
            })
        }),
        other => Err(format!("{} is not a policy kind", other.name())),
    };
    object(kind, ns, name, item.map(Item::Policy))
}

/// A spec from JSON, an error naming the field (`spec.rules[0].to[0].operation.ports[0]:
/// ...`); no spec at all is the default (empty) spec, as in the mesh file.
fn spec_of<S: DeserializeOwned + Default>(spec: serde_json::Value) -> Result<S, String> {
    if spec.is_null() {
        return Ok(S::default());
    }
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            format!("spec: {inner}")
        } else {
            format!("spec.{path}: {inner}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::Action;
    use serde_json::json;

    fn dynamic(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_policy_is_read_from_its_spec_and_a_bad_field_is_named() {
        let good = policy(
            Kind::AuthorizationPolicy,
            dynamic(
                json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "p", "namespace": "shop", "resourceVersion": "7"},
                "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]},
                "status": {"validationMessages": []}}),
            ),
        );
        let Ok(Item::Policy(Policy::AuthorizationPolicy(p))) = good.item else {
            panic!("{:?}", good.item)
        };
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("shop", "p"));
        assert_eq!(p.spec.action, Action::Deny);

        let bad = policy(
            Kind::AuthorizationPolicy,
            dynamic(
                json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "p", "namespace": "shop"},
                "spec": {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}}),
            ),
        );
        let err = bad.item.unwrap_err();
        assert!(
            err.starts_with("spec.rules[0].to[0].operation.ports[0]: "),
            "{err}"
        );
        let bad = policy(
            Kind::PeerAuthentication,
            dynamic(
                json!({"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
                "metadata": {"name": "p", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICTER"}}}),
            ),
        );
        assert!(bad.item.unwrap_err().starts_with("spec.mtls.mode: "));
        // No spec: the empty spec, as in a mesh file.
        let empty = policy(
            Kind::RequestAuthentication,
            dynamic(
                json!({"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
                "metadata": {"name": "p", "namespace": "shop"}}),
            ),
        );
        assert!(empty.item.is_ok());
    }

    #[test]
    fn a_pod_keeps_only_what_weft_uses_and_a_bad_address_is_named() {
        let p: core::Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f", "uid": "u", "controller": true}]},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "nope"}]}
        }))
        .unwrap();
        let o = pod(p);
        assert_eq!((o.namespace.as_str(), o.name.as_str()), ("shop", "web-1"));
        assert_eq!(
            o.item.unwrap_err(),
            "status.podIPs[1].ip: invalid IP address \"nope\""
        );
        let p: core::Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop"},
            "spec": {"hostNetwork": true, "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": "172.18.0.1"}
        }))
        .unwrap();
        let Ok(Item::Pod(Some(w))) = pod(p).item else {
            panic!()
        };
        assert_eq!(w.enrollment, crate::model::Enrollment::HostNetwork);
        let p: core::Pod = serde_json::from_value(json!({
            "metadata": {"name": "done", "namespace": "shop"},
            "status": {"phase": "Succeeded", "podIP": "10.0.0.9"}
        }))
        .unwrap();
        assert_eq!(
            pod(p).item,
            Ok(Item::Pod(None)),
            "an ended pod is no workload"
        );
    }

    #[test]
    fn a_slice_gives_its_ready_endpoints_by_pod_or_address() {
        let s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "ext-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "ext"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "a", "namespace": "shop"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": true}},
            ]
        }))
        .unwrap();
        let Ok(Item::Slice(slice)) = endpoint_slice(s).item else {
            panic!()
        };
        assert_eq!(slice.service, "ext");
        assert_eq!(
            slice.endpoints,
            [
                SliceEndpoint::Pod(Workload::pod_uid("shop", "a").to_string()),
                SliceEndpoint::Ip("10.0.0.3".parse().unwrap())
            ]
        );
        let s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "ext-bad", "namespace": "shop"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.x"]}]
        }))
        .unwrap();
        assert_eq!(
            endpoint_slice(s).item.unwrap_err(),
            "endpoints[0].addresses[0]: invalid IP address \"10.0.0.x\""
        );
    }
}
