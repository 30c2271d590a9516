//! `istio.workload.Address` resources (a `Workload` or a `Service`) → accepted entries:
//! [`address`] checks one resource and translates it into an [`AddressEntry`] (the model
//! workload or service and what the assembly needs besides), or refuses it with an
//! [`AddressError`] naming the resource and the field.
//!
//! Owns the per-resource rules only; what spans resources (endpoints, target ports, policy
//! scopes) is the assembly's. No I/O, no protocol state.

use std::collections::BTreeMap;

use super::{ip_from_bytes, port, FieldError};
use crate::model::{
    intern, ArcStr, Enrollment, GatewayAddress, GatewayDestination, Labels, Service, Workload,
};
use crate::proto::istio::workload as xw;

/// A workload as accepted, with what [`assemble`] needs besides the model.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadEntry {
    /// The model workload (labels and named ports empty: xDS carries none).
    pub workload: Workload,
    /// Trust domain istiod gave (empty: the mesh default).
    pub trust_domain: String,
    /// Whether the workload may receive traffic as a service endpoint.
    pub healthy: bool,
    /// Services it backs (`<namespace>/<hostname>`) with per-workload `(service port, target
    /// port)` overrides (target 0: none).
    pub services: BTreeMap<String, Vec<(u16, u16)>>,
    /// Selector policies (`<namespace>/<name>`) that select it.
    pub policies: Vec<String>,
}

/// A service as accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceEntry {
    /// The model service, endpoints not yet resolved.
    pub service: Service,
    /// `<namespace>/<hostname>`: what workloads name it by.
    pub key: String,
    /// `(service port, default target port)`; target 0 means per endpoint only.
    pub ports: Vec<(u16, u16)>,
}

/// One accepted `istio.workload.Address`.
#[derive(Clone, Debug, PartialEq)]
pub enum AddressEntry {
    /// A workload.
    Workload(WorkloadEntry),
    /// A service.
    Service(ServiceEntry),
}

/// Why an `Address` resource is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Neither a workload nor a service.
    #[error("Address holds neither a workload nor a service")]
    Empty,
    /// A workload without a uid.
    #[error("workload: uid is required")]
    WorkloadUid,
    /// A workload without a namespace.
    #[error("workload {uid}: namespace is required (it is part of the identity)")]
    WorkloadNamespace {
        /// The workload.
        uid: String,
    },
    /// A workload field that does not hold what it must.
    #[error("workload {uid}: {error}")]
    Workload {
        /// The workload.
        uid: String,
        /// The field and what is wrong.
        #[source]
        error: FieldError,
    },
    /// A service missing its name, namespace or hostname.
    #[error("service {namespace}/{hostname}: name, namespace and hostname are required")]
    ServiceNames {
        /// Its namespace as sent.
        namespace: String,
        /// Its hostname as sent.
        hostname: String,
    },
    /// A service field that does not hold what it must.
    #[error("service {key}: {error}")]
    Service {
        /// `<namespace>/<hostname>`.
        key: String,
        /// The field and what is wrong.
        #[source]
        error: FieldError,
    },
}

/// Checks and translates one `Address`.
pub fn address(a: xw::Address) -> Result<AddressEntry, AddressError> {
    match a.r#type {
        Some(xw::address::Type::Workload(w)) => workload(w).map(AddressEntry::Workload),
        Some(xw::address::Type::Service(s)) => service(s).map(AddressEntry::Service),
        None => Err(AddressError::Empty),
    }
}

fn ports(list: &[xw::Port], what: &str) -> Result<Vec<(u16, u16)>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            Ok((
                port(p.service_port, &format!("{what}[{i}].service_port"), false)?,
                port(p.target_port, &format!("{what}[{i}].target_port"), true)?,
            ))
        })
        .collect()
}

/// The waypoint a workload or service names (`what`: the field, for errors): an address
/// (4 or 16 bytes) or a namespaced hostname (both parts set), and a non-zero HBONE port.
fn waypoint(g: &xw::GatewayAddress, what: &str) -> Result<GatewayAddress, FieldError> {
    use xw::gateway_address::Destination;
    let destination = match &g.destination {
        Some(Destination::Address(a)) => GatewayDestination::Address {
            network: a.network.clone(),
            ip: ip_from_bytes(&a.address, &format!("{what}.address.address"))?,
        },
        Some(Destination::Hostname(h)) => {
            for (v, field) in [(&h.namespace, "namespace"), (&h.hostname, "hostname")] {
                if v.is_empty() {
                    return Err(FieldError::EmptyString {
                        what: format!("{what}.hostname.{field}"),
                    });
                }
            }
            GatewayDestination::Hostname {
                namespace: h.namespace.clone(),
                hostname: h.hostname.clone(),
            }
        }
        None => {
            return Err(FieldError::Missing {
                what: format!("{what}.destination (an address or a hostname)"),
            })
        }
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port: port(g.hbone_mtls_port, &format!("{what}.hbone_mtls_port"), false)?,
    })
}

fn workload(w: xw::Workload) -> Result<WorkloadEntry, AddressError> {
    if w.uid.is_empty() {
        return Err(AddressError::WorkloadUid);
    }
    let ctx = |error: FieldError| AddressError::Workload {
        uid: w.uid.clone(),
        error,
    };
    if w.namespace.is_empty() {
        return Err(AddressError::WorkloadNamespace { uid: w.uid.clone() });
    }
    let mut ips = Vec::with_capacity(w.addresses.len());
    for (i, a) in w.addresses.iter().enumerate() {
        let ip = ip_from_bytes(a, &format!("addresses[{i}]")).map_err(ctx)?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        services.insert(
            key.clone(),
            ports(&list.ports, &format!("services[{key}].ports")).map_err(ctx)?,
        );
    }
    let waypoint = w
        .waypoint
        .as_ref()
        .map(|g| waypoint(g, "waypoint"))
        .transpose()
        .map_err(ctx)?;
    let host_network = w.network_mode == xw::NetworkMode::HostNetwork as i32;
    let hbone = w.tunnel_protocol == xw::TunnelProtocol::Hbone as i32;
    let enrollment = match (host_network, hbone) {
        (true, _) => Enrollment::HostNetwork,
        (false, true) => Enrollment::Enrolled,
        (false, false) => Enrollment::NotEnrolled,
    };
    // Namespace, service account, node and the workload's names repeat across workloads: held
    // once (`model::intern`). A workload that is its own workload shares its name.
    let uid = ArcStr::from(&w.uid);
    let name = if w.name.is_empty() {
        uid.clone()
    } else {
        ArcStr::from(&w.name)
    };
    let workload_name = if w.workload_name.is_empty() || w.workload_name == *name {
        name.clone()
    } else {
        intern(&w.workload_name)
    };
    let (default_name, default_revision) = Workload::canonical(&Labels::new(), &workload_name);
    let or = |v: &str, d: ArcStr| if v.is_empty() { d } else { intern(v) };
    Ok(WorkloadEntry {
        workload: Workload {
            uid,
            name,
            namespace: intern(&w.namespace),
            service_account: or(&w.service_account, arcstr::literal!("default")),
            node: intern(&w.node),
            ips: ips.into(),
            labels: Labels::new(),
            named_ports: Default::default(),
            enrollment,
            canonical_name: or(&w.canonical_name, default_name),
            canonical_revision: or(&w.canonical_revision, default_revision),
            workload_name,
            waypoint: waypoint.map(Box::new),
        },
        trust_domain: w.trust_domain,
        healthy: w.status != xw::WorkloadStatus::Unhealthy as i32,
        services,
        policies: w.authorization_policies,
    })
}

fn service(s: xw::Service) -> Result<ServiceEntry, AddressError> {
    if s.name.is_empty() || s.namespace.is_empty() || s.hostname.is_empty() {
        return Err(AddressError::ServiceNames {
            namespace: s.namespace,
            hostname: s.hostname,
        });
    }
    let key = format!("{}/{}", s.namespace, s.hostname);
    let ctx = |error: FieldError| AddressError::Service {
        key: key.clone(),
        error,
    };
    let mut vips = Vec::new();
    for (i, a) in s.addresses.iter().enumerate() {
        let ip = ip_from_bytes(&a.address, &format!("addresses[{i}].address")).map_err(ctx)?;
        if !vips.contains(&ip) {
            vips.push(ip);
        }
    }
    let ports = ports(&s.ports, "ports").map_err(ctx)?;
    let waypoint = s
        .waypoint
        .as_ref()
        .map(|g| waypoint(g, "waypoint"))
        .transpose()
        .map_err(ctx)?;
    Ok(ServiceEntry {
        service: Service {
            name: s.name,
            namespace: s.namespace,
            vips,
            ports: Vec::new(),
            selector: BTreeMap::new(),
            endpoints: Vec::new(),
            labels: Default::default(),
            waypoint,
        },
        key,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::wl;
    use super::*;

    #[test]
    fn malformed_addresses_are_refused() {
        assert!(address(xw::Address { r#type: None }).is_err());
        let mut bad = wl("a", [10, 0, 0, 1], &[]);
        if let Some(xw::address::Type::Workload(w)) = &mut bad.r#type {
            w.addresses = vec![vec![1, 2, 3, 4, 5]];
        }
        assert!(address(bad).unwrap_err().to_string().contains("5 bytes"));
        let bad_port = wl("a", [10, 0, 0, 1], &[("ns1/x", 70000, 1)]);
        assert!(address(bad_port)
            .unwrap_err()
            .to_string()
            .contains("70000 is not a port"));
    }

    fn gateway(
        destination: Option<xw::gateway_address::Destination>,
        port: u32,
    ) -> xw::GatewayAddress {
        xw::GatewayAddress {
            destination,
            hbone_mtls_port: port,
        }
    }

    fn by_address(ip: Vec<u8>) -> Option<xw::gateway_address::Destination> {
        Some(xw::gateway_address::Destination::Address(
            xw::NetworkAddress {
                network: "net1".into(),
                address: ip,
            },
        ))
    }

    fn by_hostname(namespace: &str, hostname: &str) -> Option<xw::gateway_address::Destination> {
        Some(xw::gateway_address::Destination::Hostname(
            xw::NamespacedHostname {
                namespace: namespace.into(),
                hostname: hostname.into(),
            },
        ))
    }

    fn with_workload_waypoint(g: xw::GatewayAddress) -> xw::Address {
        let mut a = wl("a", [10, 0, 0, 1], &[]);
        if let Some(xw::address::Type::Workload(w)) = &mut a.r#type {
            w.waypoint = Some(g);
        }
        a
    }

    fn with_service_waypoint(g: xw::GatewayAddress) -> xw::Address {
        xw::Address {
            r#type: Some(xw::address::Type::Service(xw::Service {
                name: "cart".into(),
                namespace: "ns1".into(),
                hostname: "cart.ns1.svc.cluster.local".into(),
                waypoint: Some(g),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_workloads_and_a_services_waypoint_are_decoded() {
        let Ok(AddressEntry::Workload(w)) = address(with_workload_waypoint(gateway(
            by_address(vec![10, 0, 0, 9]),
            15008,
        ))) else {
            panic!("workload refused")
        };
        assert_eq!(
            w.workload.waypoint,
            Some(Box::new(GatewayAddress {
                destination: GatewayDestination::Address {
                    network: "net1".into(),
                    ip: "10.0.0.9".parse().unwrap(),
                },
                hbone_mtls_port: 15008,
            }))
        );
        let Ok(AddressEntry::Service(s)) = address(with_service_waypoint(gateway(
            by_hostname("ns1", "waypoint.ns1.svc.cluster.local"),
            15008,
        ))) else {
            panic!("service refused")
        };
        assert_eq!(
            s.service.waypoint,
            Some(GatewayAddress {
                destination: GatewayDestination::Hostname {
                    namespace: "ns1".into(),
                    hostname: "waypoint.ns1.svc.cluster.local".into(),
                },
                hbone_mtls_port: 15008,
            })
        );
        // Without one, none.
        let Ok(AddressEntry::Workload(w)) = address(wl("a", [10, 0, 0, 1], &[])) else {
            panic!("workload refused")
        };
        assert_eq!(w.workload.waypoint, None);
    }

    #[test]
    fn a_malformed_waypoint_refuses_its_resource_naming_the_field() {
        let cases = [
            (
                gateway(None, 15008),
                "waypoint.destination (an address or a hostname) is required",
            ),
            (
                gateway(by_address(vec![10, 0, 9]), 15008),
                "waypoint.address.address: 3 bytes is neither",
            ),
            (
                gateway(by_address(vec![10, 0, 0, 9]), 0),
                "waypoint.hbone_mtls_port: port 0 is not allowed",
            ),
            (
                gateway(by_address(vec![10, 0, 0, 9]), 70000),
                "waypoint.hbone_mtls_port: 70000 is not a port",
            ),
            (
                gateway(by_hostname("", "w.ns1.svc.cluster.local"), 15008),
                "waypoint.hostname.namespace must not be empty",
            ),
            (
                gateway(by_hostname("ns1", ""), 15008),
                "waypoint.hostname.hostname must not be empty",
            ),
        ];
        for (g, want) in cases {
            let e = address(with_workload_waypoint(g.clone()))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("workload a: ") && e.contains(want), "{e}");
            let e = address(with_service_waypoint(g)).unwrap_err().to_string();
            assert!(
                e.starts_with("service ns1/cart.ns1.svc.cluster.local: ") && e.contains(want),
                "{e}"
            );
        }
    }
}
