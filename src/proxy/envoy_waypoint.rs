//! Envoy waypoints istiod announces (`Service.waypoint`, `Workload.waypoint`): which
//! outbound connections must go through one, and where that waypoint is reached. The
//! outbound side then tunnels such a connection over HBONE to the waypoint, with the original
//! destination as the CONNECT's `:authority`.
//!
//! The rules are ztunnel's (`proxy/outbound.rs` `build_request`, `state.rs`
//! `fetch_waypoint`, `proxy.rs` `check_from_waypoint`):
//! - a connection to a Service VIP goes through the service's waypoint; one to a workload's
//!   own IP through the workload's. A connection to a VIP of a service without a waypoint
//!   goes to an endpoint directly, even one with a waypoint of its own;
//! - the waypoint's own connections go direct: the source is the waypoint when one of the
//!   waypoint's workloads has the source's IP and identity. (ztunnel asks this for
//!   connections to a workload only; weft asks it for a VIP too, where a waypoint calling a
//!   service it fronts would otherwise be sent back to itself);
//! - a waypoint named by address is the workload with that IP, or an endpoint of the service
//!   with that VIP; one named by hostname is an endpoint of the service of that namespace and
//!   hostname (an endpoint of the original destination's IP family first). It is dialled at
//!   that workload's IP and the announced HBONE port, and must prove that workload's identity;
//! - a waypoint that cannot be resolved fails the connection ([`Unresolved`]): it is never
//!   sent to its destination directly.
//!
//! Owns those decisions only, on one snapshot; no I/O. Not the in-binary waypoint
//! (`crate::waypoint`), which the mesh file selects with `istio.io/use-waypoint` labels and
//! which sits behind the inbound side.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::Rng;

use crate::model::{GatewayAddress, GatewayDestination, Service, Workload};
use crate::state::{Address, Snapshot};

/// A connection that must go through a waypoint.
#[derive(Debug)]
pub struct Via<'a> {
    /// The waypoint.
    pub waypoint: &'a GatewayAddress,
    /// The service addressed (by a VIP), if any.
    pub service: Option<&'a Service>,
    /// The workload addressed (by its own IP), if any.
    pub workload: Option<&'a Arc<Workload>>,
}

/// Where a waypoint is reached.
#[derive(Debug)]
pub struct Hop<'a> {
    /// The waypoint's workload: whose identity the HBONE server must prove.
    pub workload: &'a Arc<Workload>,
    /// Its HBONE address.
    pub addr: SocketAddr,
}

/// Why a waypoint cannot be reached.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unresolved {
    /// No workload or service has the waypoint's address.
    #[error("waypoint {0}: no workload or service has this address")]
    UnknownAddress(String),
    /// No service has the waypoint's hostname.
    #[error("waypoint {0}: no such service")]
    UnknownHostname(String),
    /// The waypoint's service has no endpoint with an address.
    #[error("waypoint {0}: its service has no endpoint with an address")]
    NoEndpoint(String),
}

/// The waypoint a connection from `src` (the source workload, if known, at `src_ip`) to
/// `dst` must go through, if any (see the module doc).
pub fn required<'a>(
    snap: &'a Snapshot,
    dst: SocketAddr,
    src_ip: IpAddr,
    src: Option<&Workload>,
) -> Option<Via<'a>> {
    let via = match snap.address(dst.ip())? {
        Address::Service(s) => Via {
            waypoint: s.waypoint.as_ref()?,
            service: Some(s),
            workload: None,
        },
        Address::Workload(w) => Via {
            waypoint: w.waypoint.as_deref()?,
            service: None,
            workload: Some(w),
        },
    };
    let from_waypoint = src.is_some_and(|src| {
        members(snap, via.waypoint).iter().any(|w| {
            w.namespace == src.namespace
                && w.service_account == src.service_account
                && w.ips.contains(&src_ip)
        })
    });
    (!from_waypoint).then_some(via)
}

/// The workloads that make up a waypoint: the one with its address, or its service's
/// endpoints.
fn members<'a>(snap: &'a Snapshot, g: &GatewayAddress) -> Vec<&'a Arc<Workload>> {
    match &g.destination {
        GatewayDestination::Address { ip, .. } => match snap.address(*ip) {
            Some(Address::Workload(w)) => vec![w],
            Some(Address::Service(s)) => snap.endpoints(s).collect(),
            None => Vec::new(),
        },
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => snap
            .service_by_hostname(namespace, hostname)
            .map(|s| snap.endpoints(s).collect())
            .unwrap_or_default(),
    }
}

/// Where the waypoint `g` is reached, for a connection whose original destination is in
/// `family`'s IP family.
pub fn resolve<'a>(
    snap: &'a Snapshot,
    g: &GatewayAddress,
    family: IpAddr,
) -> Result<Hop<'a>, Unresolved> {
    let name = || g.destination.to_string();
    let service = match &g.destination {
        GatewayDestination::Address { ip, .. } => match snap.address(*ip) {
            // By a workload's address: that address (ztunnel keeps it, whatever the family).
            Some(Address::Workload(w)) => {
                return Ok(Hop {
                    workload: w,
                    addr: SocketAddr::new(*ip, g.hbone_mtls_port),
                })
            }
            Some(Address::Service(s)) => s,
            None => return Err(Unresolved::UnknownAddress(name())),
        },
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => snap
            .service_by_hostname(namespace, hostname)
            .ok_or_else(|| Unresolved::UnknownHostname(name()))?,
    };
    let with_ip = |same_family: bool| -> Vec<(&'a Arc<Workload>, IpAddr)> {
        snap.endpoints(service)
            .filter_map(|w| {
                let ip = w
                    .ips
                    .iter()
                    .find(|ip| !same_family || ip.is_ipv4() == family.is_ipv4())?;
                Some((w, *ip))
            })
            .collect()
    };
    let mut candidates = with_ip(true);
    if candidates.is_empty() {
        candidates = with_ip(false);
    }
    if candidates.is_empty() {
        return Err(Unresolved::NoEndpoint(name()));
    }
    let (workload, ip) = candidates[rand::rng().random_range(0..candidates.len())];
    Ok(Hop {
        workload,
        addr: SocketAddr::new(ip, g.hbone_mtls_port),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Enrollment, Mesh, ServicePort, TargetPort};
    use std::collections::BTreeMap;

    fn workload(name: &str, sa: &str, ip: &str, waypoint: Option<GatewayAddress>) -> Workload {
        Workload {
            uid: Workload::pod_uid("shop", name),
            name: name.into(),
            namespace: "shop".into(),
            service_account: sa.into(),
            node: "n1".into(),
            ips: [ip.parse().unwrap()].into(),
            labels: Default::default(),
            named_ports: Default::default(),
            enrollment: Enrollment::Enrolled,
            workload_name: name.into(),
            canonical_name: name.into(),
            canonical_revision: "latest".into(),
            waypoint: waypoint.map(Box::new),
        }
    }

    fn service(
        name: &str,
        vip: &str,
        endpoints: &[&str],
        waypoint: Option<GatewayAddress>,
    ) -> Service {
        Service {
            name: name.into(),
            namespace: "shop".into(),
            vips: vec![vip.parse().unwrap()],
            ports: vec![ServicePort {
                name: String::new(),
                port: 80,
                target_port: TargetPort::Number(8080),
            }],
            selector: BTreeMap::new(),
            endpoints: endpoints
                .iter()
                .map(|n| Workload::pod_uid("shop", n).to_string())
                .collect(),
            labels: BTreeMap::new(),
            waypoint,
        }
    }

    fn by_address(ip: &str) -> GatewayAddress {
        GatewayAddress {
            destination: GatewayDestination::Address {
                network: String::new(),
                ip: ip.parse().unwrap(),
            },
            hbone_mtls_port: 15008,
        }
    }

    fn by_hostname(host: &str) -> GatewayAddress {
        GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: "shop".into(),
                hostname: host.into(),
            },
            hbone_mtls_port: 15008,
        }
    }

    /// `cart` (own waypoint by address), `orders` behind service `orders` (waypoint by
    /// hostname), `plain` behind service `plain` (none), and the waypoint `wp` behind its
    /// service `waypoint`.
    fn snapshot() -> Snapshot {
        let mut mesh = Mesh::default();
        mesh.insert_workload(workload("client", "client", "10.0.0.1", None));
        mesh.insert_workload(workload("wp", "waypoint", "10.0.0.9", None));
        mesh.insert_workload(workload(
            "cart",
            "cart",
            "10.0.0.2",
            Some(by_address("10.0.0.9")),
        ));
        mesh.insert_workload(workload("orders", "orders", "10.0.0.3", None));
        mesh.insert_service(service("waypoint", "10.96.0.9", &["wp"], None));
        mesh.insert_service(service(
            "orders",
            "10.96.0.3",
            &["orders"],
            Some(by_hostname("waypoint.shop.svc.cluster.local")),
        ));
        mesh.insert_service(service("plain", "10.96.0.2", &["cart"], None));
        Snapshot::new(1, mesh)
    }

    fn sa(addr: &str) -> SocketAddr {
        addr.parse().unwrap()
    }

    #[test]
    fn a_vip_uses_its_services_waypoint_and_a_pod_ip_its_workloads() {
        let snap = snapshot();
        let client = snap.workload(&Workload::pod_uid("shop", "client")).cloned();
        let src = client.as_deref();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let via = required(&snap, sa("10.96.0.3:80"), ip, src).unwrap();
        assert_eq!(via.service.map(|s| s.name.as_str()), Some("orders"));
        let hop = resolve(&snap, via.waypoint, ip).unwrap();
        assert_eq!(
            (hop.workload.name.as_str(), hop.addr),
            ("wp", sa("10.0.0.9:15008"))
        );
        let via = required(&snap, sa("10.0.0.2:8080"), ip, src).unwrap();
        assert!(via.service.is_none());
        let hop = resolve(&snap, via.waypoint, ip).unwrap();
        assert_eq!(
            (hop.workload.name.as_str(), hop.addr),
            ("wp", sa("10.0.0.9:15008"))
        );
        // A VIP of a service without a waypoint goes direct, even to an endpoint with one.
        assert!(required(&snap, sa("10.96.0.2:80"), ip, src).is_none());
        assert!(required(&snap, sa("10.0.0.3:8080"), ip, src).is_none());
        assert!(required(&snap, sa("192.0.2.1:80"), ip, src).is_none());
    }

    #[test]
    fn the_waypoints_own_connections_go_direct_and_an_impostor_ip_does_not() {
        let snap = snapshot();
        let wp = snap.workload(&Workload::pod_uid("shop", "wp")).cloned();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        assert!(required(&snap, sa("10.0.0.2:8080"), ip, wp.as_deref()).is_none());
        assert!(required(&snap, sa("10.96.0.3:80"), ip, wp.as_deref()).is_none());
        // Same identity, another address: not the waypoint.
        let other: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(required(&snap, sa("10.0.0.2:8080"), other, wp.as_deref()).is_some());
    }

    #[test]
    fn a_waypoint_that_cannot_be_found_is_an_error_naming_it() {
        let snap = snapshot();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            resolve(&snap, &by_address("10.0.0.99"), ip)
                .unwrap_err()
                .to_string(),
            "waypoint /10.0.0.99: no workload or service has this address"
        );
        assert_eq!(
            resolve(&snap, &by_hostname("nope.shop.svc.cluster.local"), ip)
                .unwrap_err()
                .to_string(),
            "waypoint shop/nope.shop.svc.cluster.local: no such service"
        );
        // A waypoint by the VIP of a service: one of its endpoints.
        let hop = resolve(&snap, &by_address("10.96.0.9"), ip).unwrap();
        assert_eq!(hop.addr, sa("10.0.0.9:15008"));
        let mut mesh = snap.mesh.clone();
        mesh.insert_service(service("empty", "10.96.0.8", &[], None));
        let snap = Snapshot::new(2, mesh);
        assert!(matches!(
            resolve(&snap, &by_address("10.96.0.8"), ip),
            Err(Unresolved::NoEndpoint(_))
        ));
    }
}
