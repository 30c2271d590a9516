//! Kubernetes objects → the mesh [`model`](crate::model), one object at a time: a Pod becomes
//! a [`Workload`], a Service a [`Service`]. Shared by the mesh file ([`super::file`], which
//! locates each error at its line) and the API-server watch ([`super::kube`], which names the
//! object and skips it).
//!
//! Owns the per-object rules (addresses, ports, ServiceAccount, owner workload, canonical
//! names) and what counts as a bad field. Does not check what spans objects (duplicates, IPs
//! claimed twice: the file's translation and the state do) and decides enrollment only from
//! the namespace labels it is given. Never touches files, state or sockets.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{
    intern, ArcStr, Enrollment, Labels, Service, ServicePort, TargetPort, Workload,
};

/// A step on the way to a field: a mapping key or a sequence index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// A bad field of one object: where it is and what is wrong. `message` starts with the
/// field's dotted path (`status.podIPs[1].ip: invalid IP address "x"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub(crate) path: Vec<Seg<'static>>,
    pub(crate) message: String,
}

impl FieldError {
    fn new(path: Vec<Seg<'static>>, message: String) -> FieldError {
        FieldError { path, message }
    }
}

/// `(namespace, name)` of an object; a namespaced object without a namespace is in
/// `default`, as `kubectl` puts it.
pub(crate) fn name_of(meta: &ObjectMeta, namespaced: bool) -> Result<(String, String), FieldError> {
    let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
        return Err(FieldError::new(
            vec![Seg::Key("metadata")],
            "metadata.name is required".into(),
        ));
    };
    let ns = if namespaced {
        meta.namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_string())
    } else {
        String::new()
    };
    Ok((ns, name))
}

/// The workload a pod is, enrolled as `namespace_labels` and its own labels decide; `Ok(None)`
/// for a pod that has ended (`Succeeded`, `Failed`: it holds no address any more, and its
/// may be reused). Every bad field is reported.
pub(crate) fn workload(
    pod: &core::Pod,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<Option<Workload>, Vec<FieldError>> {
    let (namespace, name) = name_of(&pod.metadata, true).map_err(|e| vec![e])?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    ) {
        return Ok(None);
    }
    let mut ips = Vec::new();
    let mut errors = Vec::new();
    match status.and_then(|s| s.pod_ips.as_deref()) {
        Some(list) if !list.is_empty() => {
            for (i, entry) in list.iter().enumerate() {
                match entry.ip.parse::<IpAddr>() {
                    Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                    Ok(_) => {}
                    Err(_) => errors.push(FieldError::new(
                        vec![
                            Seg::Key("status"),
                            Seg::Key("podIPs"),
                            Seg::Index(i),
                            Seg::Key("ip"),
                        ],
                        format!("status.podIPs[{i}].ip: invalid IP address {:?}", entry.ip),
                    )),
                }
            }
        }
        _ => {
            if let Some(ip) = status
                .and_then(|s| s.pod_ip.as_deref())
                .filter(|s| !s.is_empty())
            {
                match ip.parse::<IpAddr>() {
                    Ok(ip) => ips.push(ip),
                    Err(_) => errors.push(FieldError::new(
                        vec![Seg::Key("status"), Seg::Key("podIP")],
                        format!("status.podIP: invalid IP address {ip:?}"),
                    )),
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let labels: Labels = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| (intern(k), intern(v)))
        .collect();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let enrollment = Enrollment::decide(namespace_labels, &labels, host_network);
    let mut named_ports = BTreeMap::new();
    for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
        for p in c.ports.as_deref().unwrap_or_default() {
            if let (Some(n), Ok(port)) = (&p.name, u16::try_from(p.container_port)) {
                named_ports.insert(n.clone(), port);
            }
        }
    }
    // Namespace, service account, node and the workload's names repeat across pods: held once
    // (`model::intern`). A pod that is its own workload shares its name.
    let service_account = spec
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .or(s.service_account.as_deref())
        })
        .filter(|s| !s.is_empty())
        .map_or(arcstr::literal!("default"), intern);
    let name = ArcStr::from(name);
    let workload_name = owner_workload(&pod.metadata).map_or_else(|| name.clone(), |w| intern(&w));
    let (canonical_name, canonical_revision) = Workload::canonical(&labels, &workload_name);
    Ok(Some(Workload {
        uid: Workload::pod_uid(&namespace, &name),
        workload_name,
        canonical_name,
        canonical_revision,
        name,
        namespace: intern(&namespace),
        service_account,
        node: spec
            .and_then(|s| s.node_name.as_deref())
            .map_or_else(ArcStr::new, intern),
        ips: ips.into(),
        labels,
        named_ports: named_ports.into_iter().collect(),
        enrollment,
        // Kubernetes objects carry no istiod-announced waypoint; `istio.io/use-waypoint`
        // labels select the in-binary one instead.
        waypoint: None,
    }))
}

/// The service a Kubernetes Service is: its cluster IPs, its TCP ports, its selector. The
/// endpoints are left empty (the state resolves a selector; EndpointSlices fill the rest).
pub(crate) fn service(svc: &core::Service) -> Result<Service, FieldError> {
    let (namespace, name) = name_of(&svc.metadata, true)?;
    let spec = svc.spec.as_ref();
    let mut vips = Vec::new();
    let listed: Vec<(Seg<'static>, &String)> = match spec.and_then(|s| s.cluster_ips.as_deref()) {
        Some(l) if !l.is_empty() => l
            .iter()
            .enumerate()
            .map(|(i, s)| (Seg::Index(i), s))
            .collect(),
        _ => spec
            .and_then(|s| s.cluster_ip.as_ref())
            .map(|s| (Seg::Key("clusterIP"), s))
            .into_iter()
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
                let (path, field) = match seg {
                    Seg::Index(i) => (
                        vec![Seg::Key("spec"), Seg::Key("clusterIPs"), seg],
                        format!("spec.clusterIPs[{i}]"),
                    ),
                    _ => (vec![Seg::Key("spec"), seg], "spec.clusterIP".into()),
                };
                return Err(FieldError::new(
                    path,
                    format!("{field}: invalid IP address {s:?}"),
                ));
            }
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let port_path = |key: &'static str| {
            vec![
                Seg::Key("spec"),
                Seg::Key("ports"),
                Seg::Index(i),
                Seg::Key(key),
            ]
        };
        let Some(port) = u16::try_from(p.port).ok().filter(|v| *v != 0) else {
            return Err(FieldError::new(
                port_path("port"),
                format!("spec.ports[{i}].port: {} is not a port (1-65535)", p.port),
            ));
        };
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => match u16::try_from(*n) {
                Ok(t) if t != 0 => TargetPort::Number(t),
                _ => {
                    return Err(FieldError::new(
                        port_path("targetPort"),
                        format!("spec.ports[{i}].targetPort: {n} is not a port (1-65535)"),
                    ));
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
    Ok(Service {
        name,
        namespace,
        vips,
        ports,
        selector: spec.and_then(|s| s.selector.clone()).unwrap_or_default(),
        endpoints: Vec::new(),
        labels: svc.metadata.labels.clone().unwrap_or_default(),
        waypoint: None,
    })
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
