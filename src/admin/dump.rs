//! The parts of `/config_dump` that have ztunnel's shape: `workloads`, `services`, `policies`,
//! `certificates` and `workloadState` are the keys `istioctl ztunnel-config` reads (its
//! `configdump` writer decodes them into Go structs, so every field it reads must have the
//! type ztunnel gives it). weft's own facts ride along in the same objects under names
//! istioctl does not read (`identity`, `local`, `labels`, `enrollment`, ...), and the
//! policies as weft holds them stay under `meshPolicies`.
//!
//! Owns: the translation of weft's state into that shape. Does not own: the state, the
//! certificates or the connections it reads.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::identity::ca::IssuedCert;
use crate::identity::Identity;
use crate::metrics::Direction;
use crate::model::policy::{
    Action, AuthorizationPolicy, IpBlock, PolicyScope, PortNumber, RuleFrom, RuleTo, StringMatch,
};
use crate::model::{Enrollment, GatewayAddress, Policy, Service, TargetPort, Workload};
use crate::proxy::conntrack::{Conn, Protocol};
use crate::state::Snapshot;

/// ztunnel writes an address as `<network>/<ip>`; weft's workloads are all on the default
/// (unnamed) network.
fn network_address(ip: IpAddr) -> String {
    format!("/{ip}")
}

/// One workload as ztunnel dumps it, plus weft's facts about it.
pub(super) fn workload(w: &Workload, snap: &Snapshot, cfg: &Config) -> Value {
    let identity = Identity::new(
        &cfg.trust_domain,
        w.namespace.as_str(),
        w.service_account.as_str(),
    )
    .map(|i| i.to_string())
    .ok();
    let services: Vec<String> = snap
        .services_of(&w.uid)
        .map(|s| format!("{}/{}", s.namespace, s.hostname()))
        .collect();
    let mut out = json!({
        // ztunnel's fields (istioctl's `ZtunnelWorkload`).
        "uid": w.uid,
        "workloadIps": w.ips,
        // weft's node proxy carries a pod's traffic in HBONE only when it is enrolled.
        "protocol": if w.enrollment.is_enrolled() { "HBONE" } else { "TCP" },
        "networkMode": if w.enrollment == Enrollment::HostNetwork { "HostNetwork" } else { "Standard" },
        "name": w.name,
        "namespace": w.namespace,
        "trustDomain": cfg.trust_domain,
        "serviceAccount": w.service_account,
        "workloadName": w.workload_name,
        "workloadType": workload_type(w),
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "node": w.node,
        "status": "Healthy",
        "clusterId": cfg.cluster_id(),
        "services": services,
        "capacity": 1,
        // weft's.
        "identity": identity,
        "local": w.node == cfg.node_name,
        "labels": w.labels,
        "enrollment": w.enrollment,
    });
    with_waypoint(&mut out, w.waypoint.as_deref());
    out
}

/// Adds `waypoint` as ztunnel writes it (`{"destination": "<network>/<ip>" or
/// "<namespace>/<hostname>", "hboneMtlsPort": 15008}`), absent without one.
fn with_waypoint(out: &mut Value, waypoint: Option<&GatewayAddress>) {
    if let (Some(obj), Some(wp)) = (out.as_object_mut(), waypoint) {
        obj.insert(
            "waypoint".to_string(),
            json!({
                "destination": wp.destination.to_string(),
                "hboneMtlsPort": wp.hbone_mtls_port,
            }),
        );
    }
}

/// Istio's workload type: `deployment` for a pod a ReplicaSet made (`<workload>-<hash>-<id>`),
/// else `pod` (weft's model keeps no owner kind beyond the name it derived).
fn workload_type(w: &Workload) -> &'static str {
    let replica_set_pod = w
        .name
        .strip_prefix(w.workload_name.as_str())
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|rest| rest.split('-').count() == 2);
    if w.workload_name != w.name && replica_set_pod {
        "deployment"
    } else {
        "pod"
    }
}

/// One service as ztunnel dumps it, plus weft's port detail and selector.
pub(super) fn service(s: &Service, snap: &Snapshot) -> Value {
    let host = s.hostname();
    // Service port -> target port; a named target port is per endpoint (0 here, as istiod
    // sends it).
    let target = |t: &TargetPort| match t {
        TargetPort::Number(n) => *n,
        TargetPort::Named(_) => 0,
    };
    let ports: BTreeMap<String, u16> = s
        .ports
        .iter()
        .map(|p| (p.port.to_string(), target(&p.target_port)))
        .collect();
    let mut endpoints = Map::new();
    for uid in &s.endpoints {
        let Some(w) = snap.mesh.workloads.get(uid.as_str()) else {
            continue;
        };
        let ports: BTreeMap<String, u16> = s
            .ports
            .iter()
            .map(|p| {
                let to = match &p.target_port {
                    TargetPort::Number(n) => *n,
                    TargetPort::Named(name) => w.named_ports.get(name).copied().unwrap_or(0),
                };
                (p.port.to_string(), to)
            })
            .collect();
        endpoints.insert(
            uid.clone(),
            json!({
                "workloadUid": uid,
                "service": format!("{}/{}", s.namespace, host),
                "port": ports,
                "status": "Healthy",
            }),
        );
    }
    let v4 = s.vips.iter().any(IpAddr::is_ipv4);
    let v6 = s.vips.iter().any(IpAddr::is_ipv6);
    let families = match (v4, v6) {
        (true, true) => "Dual",
        (false, true) => "IPv6",
        _ => "IPv4",
    };
    let mut out = json!({
        "name": s.name,
        "namespace": s.namespace,
        "hostname": host,
        "vips": s.vips.iter().map(|ip| network_address(*ip)).collect::<Vec<_>>(),
        "ports": ports,
        "endpoints": endpoints,
        "subjectAltNames": [],
        "ipFamilies": families,
        // weft's.
        "portsDetail": s.ports,
        "selector": s.selector,
        "labels": s.labels,
    });
    with_waypoint(&mut out, s.waypoint.as_ref());
    out
}

/// The AuthorizationPolicies in ztunnel's shape (`rules`: rules, each a list of clauses that
/// must all match, each clause a list of matches of which one must); the L4 attributes only,
/// as ztunnel holds them. weft's full policies are in `meshPolicies`.
pub(super) fn policies(snap: &Snapshot, root_namespace: &str) -> Vec<Value> {
    let mut out: Vec<Value> = snap
        .mesh
        .policies
        .iter()
        .filter_map(|p| match p {
            Policy::AuthorizationPolicy(ap) => Some(authorization(ap, root_namespace)),
            _ => None,
        })
        .collect();
    out.sort_by(|a, b| {
        (a["namespace"].as_str(), a["name"].as_str())
            .cmp(&(b["namespace"].as_str(), b["name"].as_str()))
    });
    out
}

fn authorization(p: &AuthorizationPolicy, root_namespace: &str) -> Value {
    let spec = &p.spec;
    let scope = match &spec.scope {
        PolicyScope::Mesh => "Global",
        PolicyScope::Namespace => "Namespace",
        PolicyScope::Workloads(_) => "WorkloadSelector",
        PolicyScope::Selector => match (&spec.selector, p.namespace == root_namespace) {
            (Some(s), _) if !s.match_labels.is_empty() => "WorkloadSelector",
            (_, true) => "Global",
            _ => "Namespace",
        },
    };
    let action = match spec.action {
        Action::Allow => "Allow",
        Action::Deny => "Deny",
        Action::Audit => "Audit",
        Action::Custom => "Custom",
    };
    let rules: Vec<Value> = spec
        .rules
        .iter()
        .map(|r| {
            let mut clauses = Vec::new();
            if !r.from.is_empty() {
                clauses.push(Value::Array(r.from.iter().map(source_match).collect()));
            }
            if !r.to.is_empty() {
                clauses.push(Value::Array(r.to.iter().map(operation_match).collect()));
            }
            Value::Array(clauses)
        })
        .collect();
    let mut v = json!({
        "name": p.name,
        "namespace": p.namespace,
        "scope": scope,
        "action": action,
        "rules": rules,
    });
    if spec.dry_run {
        v["dryRun"] = Value::Bool(true);
    }
    v
}

/// ztunnel's `StringMatch` as it serializes: `{"Exact": v}`, `{"Prefix": v}`, ...
fn string_match(m: &StringMatch) -> Value {
    match m {
        StringMatch::Exact(v) => json!({ "Exact": v }),
        StringMatch::Prefix(v) => json!({ "Prefix": v }),
        StringMatch::Suffix(v) => json!({ "Suffix": v }),
        StringMatch::Any => json!({ "Presence": {} }),
    }
}

fn set(v: &mut Map<String, Value>, key: &str, items: Vec<Value>) {
    if !items.is_empty() {
        v.insert(key.to_string(), Value::Array(items));
    }
}

fn source_match(f: &RuleFrom) -> Value {
    let s = &f.source;
    let strings = |ms: &[StringMatch]| ms.iter().map(string_match).collect::<Vec<_>>();
    let cidrs = |bs: &[IpBlock]| {
        bs.iter()
            .map(|b| Value::String(b.0.to_string()))
            .collect::<Vec<_>>()
    };
    let mut v = Map::new();
    set(&mut v, "namespaces", strings(&s.namespaces));
    set(&mut v, "notNamespaces", strings(&s.not_namespaces));
    set(&mut v, "principals", strings(&s.principals));
    set(&mut v, "notPrincipals", strings(&s.not_principals));
    set(&mut v, "sourceIps", cidrs(&s.ip_blocks));
    set(&mut v, "notSourceIps", cidrs(&s.not_ip_blocks));
    Value::Object(v)
}

fn operation_match(t: &RuleTo) -> Value {
    let o = &t.operation;
    let ports = |ps: &[PortNumber]| ps.iter().map(|p| Value::from(p.0)).collect::<Vec<_>>();
    let mut v = Map::new();
    set(&mut v, "destinationPorts", ports(&o.ports));
    set(&mut v, "notDestinationPorts", ports(&o.not_ports));
    Value::Object(v)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One certificate as ztunnel dumps it: its PEM base64-encoded, the serial in decimal.
fn cert(der: &[u8]) -> Value {
    let pem = pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
    let parsed = x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c);
    let serial = parsed
        .as_ref()
        .map(|c| c.serial.to_string())
        .unwrap_or_default();
    let time = |t: Option<x509_parser::time::ASN1Time>| {
        t.and_then(|t| u64::try_from(t.timestamp()).ok())
            .map(|secs| rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)))
            .unwrap_or_default()
    };
    json!({
        "pem": base64::engine::general_purpose::STANDARD.encode(pem),
        "serialNumber": serial,
        "validFrom": time(parsed.as_ref().map(|c| c.validity().not_before)),
        "expirationTime": time(parsed.as_ref().map(|c| c.validity().not_after)),
    })
}

/// The workload certificates as ztunnel dumps them (`certChain`: leaf then intermediates;
/// `rootCerts`), plus weft's hex serial and validity.
pub(super) fn certificates(certs: &[std::sync::Arc<IssuedCert>]) -> Vec<Value> {
    let mut out: Vec<Value> = certs
        .iter()
        .map(|c| {
            // The roots this certificate came with, which its connections trust.
            let roots: Vec<Value> = c.roots.iter().map(|r| cert(r)).collect();
            // The chain weft presents; the root is listed apart, as ztunnel does.
            let chain: Vec<Value> = c
                .chain_der
                .iter()
                .filter(|d| !roots.iter().any(|r| r["pem"] == cert(d)["pem"]))
                .map(|d| cert(d))
                .collect();
            json!({
                "identity": c.identity.to_string(),
                "state": "Available",
                "certChain": chain,
                "rootCerts": roots,
                // weft's.
                "serial": c.serial_hex,
                "notBefore": rfc3339(c.not_before),
                "notAfter": rfc3339(c.not_after),
                "chain": c.chain_pem,
            })
        })
        .collect();
    out.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
    out
}

/// ztunnel's `workloadState`: per local enrolled workload (by uid), its live connections
/// (`inbound`: `src`, `actualDst` the app; `outbound`: `src`, `originalDst` what the app
/// asked for, `actualDst` where weft sent it) and who it is.
pub(super) fn workload_state(
    snap: &Snapshot,
    cfg: &Config,
    conns: &[std::sync::Arc<Conn>],
) -> Value {
    let mut inbound: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    let mut outbound: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    let hbone_port = cfg.listen.hbone.port();
    let addr = |a: SocketAddr| Value::String(a.to_string());
    for c in conns {
        let m = &c.meta;
        let protocol = match m.protocol {
            Protocol::Hbone | Protocol::Local => "HBONE",
            Protocol::Plain => "TCP",
        };
        match m.direction {
            Direction::Inbound => {
                if let Some(w) = snap.workload_by_ip(m.dst.ip()) {
                    inbound.entry(w.uid.as_str()).or_default().push(json!({
                        "src": addr(m.src),
                        "originalDst": null,
                        "actualDst": addr(m.dst),
                        "protocol": protocol,
                    }));
                }
            }
            Direction::Outbound => {
                if let Some(w) = snap.workload_by_ip(m.src.ip()) {
                    let actual = match m.protocol {
                        Protocol::Hbone => SocketAddr::new(m.dst.ip(), hbone_port),
                        _ => m.dst,
                    };
                    outbound.entry(w.uid.as_str()).or_default().push(json!({
                        "src": addr(m.src),
                        "originalDst": addr(m.original_dst.unwrap_or(m.dst)),
                        "actualDst": addr(actual),
                        "protocol": protocol,
                    }));
                }
            }
        }
    }
    let mut out = Map::new();
    for w in snap.mesh.workloads.values() {
        if w.node != cfg.node_name || !w.enrollment.is_enrolled() {
            continue;
        }
        out.insert(
            w.uid.to_string(),
            json!({
                "state": "Up",
                "connections": {
                    "inbound": inbound.remove(w.uid.as_str()).unwrap_or_default(),
                    "outbound": outbound.remove(w.uid.as_str()).unwrap_or_default(),
                },
                "info": {
                    "name": w.name,
                    "namespace": w.namespace,
                    "serviceAccount": w.service_account,
                    "trustDomain": cfg.trust_domain,
                },
            }),
        );
    }
    Value::Object(out)
}
