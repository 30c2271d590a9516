//! Traffic leaving local enrolled pods (`:15001`): find where it really goes, then tunnel it
//! (HBONE to another node), hand it to the inbound side (same node), or pass it through.
//!
//! The original destination is the accepted socket's local address (TPROXY), or in a pod
//! (in-pod capture) `SO_ORIGINAL_DST` (istio-cni's REDIRECT). A Service VIP
//! is resolved here to one of its endpoints and the target port, since nothing else on a
//! captured path will do it.
//!
//! First, a destination behind an Envoy waypoint istiod announced ([`envoy_waypoint`] says
//! which and where) is tunnelled to that waypoint only, `:authority` the original
//! destination (the VIP or the pod address, unresolved); a waypoint that cannot be found or
//! reached fails the connection, which never goes direct.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::net::TcpStream;

use super::conntrack::{ConnGuard, ConnMeta, Outcome, Peer, Protocol, ServiceRef};
use super::envoy_waypoint::{self, Via};
use super::inbound::{self, Client};
use super::limit::Permit;
use super::pool::PoolKey;
use super::relay::relay;
use super::socket;
use super::ProxyCtx;
use crate::identity::{Identity, IssuedCert};
use crate::metrics::Direction;
use crate::model::{Service, TargetPort, Workload};
use crate::state::{Address, Snapshot};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a captured connection goes.
#[derive(Debug)]
pub struct Target<'a> {
    /// The address to reach (an endpoint's for a VIP).
    pub addr: SocketAddr,
    /// The workload owning `addr`, if known.
    pub workload: Option<&'a Arc<Workload>>,
    /// The Service reached through its VIP, if any.
    pub service: Option<&'a Service>,
}

/// Why a connection has nowhere to go.
#[derive(Debug, PartialEq, Eq)]
pub struct NoRoute(pub String);

/// Resolves the original destination: a pod, a Service VIP (to an endpoint and target
/// port), or something outside the mesh state (passed through as is).
pub fn resolve(snap: &Snapshot, dst: SocketAddr) -> Result<Target<'_>, NoRoute> {
    match snap.address(dst.ip()) {
        Some(Address::Workload(w)) => Ok(Target {
            addr: dst,
            workload: Some(w),
            service: None,
        }),
        Some(Address::Service(svc)) => {
            let Some(port) = svc.ports.iter().find(|p| p.port == dst.port()) else {
                return Err(NoRoute(format!(
                    "service {}/{} has no port {}",
                    svc.namespace,
                    svc.name,
                    dst.port()
                )));
            };
            let candidates: Vec<(&Arc<Workload>, SocketAddr)> = snap
                .endpoints(svc)
                .filter_map(|w| {
                    let ip = *w.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4())?;
                    let p = match &port.target_port {
                        TargetPort::Number(p) => *p,
                        TargetPort::Named(n) => *w.named_ports.get(n)?,
                    };
                    Some((w, SocketAddr::new(ip, p)))
                })
                .collect();
            if candidates.is_empty() {
                return Err(NoRoute(format!(
                    "service {}/{} has no ready endpoint for port {}",
                    svc.namespace,
                    svc.name,
                    dst.port()
                )));
            }
            let (w, addr) = candidates[rand::rng().random_range(0..candidates.len())];
            Ok(Target {
                addr,
                workload: Some(w),
                service: Some(svc),
            })
        }
        None => Ok(Target {
            addr: dst,
            workload: None,
            service: None,
        }),
    }
}

/// Handles one connection accepted on the outbound listener, holding its place (`permit`)
/// until it ends; the original destination is the accepted socket's local address (TPROXY),
/// or in a pod `SO_ORIGINAL_DST` (REDIRECT).
pub fn serve_outbound(
    ctx: Arc<ProxyCtx>,
    client: TcpStream,
    peer: SocketAddr,
    permit: Permit,
) -> impl Future<Output = ()> + Send {
    // Not an `async fn` awaiting `serve` (see `serve`).
    let dst = socket::original_dst(&client, &ctx.mode).ok();
    serve(ctx, client, peer, dst, Some(permit))
}

/// Handles one outbound connection from `peer` whose original destination is `dst` (for
/// callers that learned the destination another way than TPROXY, e.g. benches on loopback).
pub fn serve_outbound_to(
    ctx: Arc<ProxyCtx>,
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
) -> impl Future<Output = ()> + Send {
    serve(ctx, client, peer, Some(dst), None)
}

/// What an outbound connection becomes, decided on one snapshot before anything is awaited
/// (so nothing of the decision stays in the connection's task).
enum Plan {
    /// Refused (logged); the client is reset.
    Refused,
    /// Through the Envoy waypoint istiod announced for the destination.
    Waypoint(ConnGuard, WaypointTunnel),
    /// Same node, destination in the mesh: the inbound side takes it.
    Local {
        who: Client,
        addr: SocketAddr,
        guard: ConnGuard,
    },
    /// Another node, both ends in the mesh: HBONE.
    Hbone {
        key: PoolKey,
        cert: Arc<IssuedCert>,
        addr: SocketAddr,
        guard: ConnGuard,
    },
    /// Anything else: plain TCP from the client's own address.
    Plain { addr: SocketAddr, guard: ConnGuard },
}

/// An `async` block, not an `async fn`: an `async fn` copies its arguments into the body's
/// own variables and keeps both for as long as the connection lives, where a block uses what
/// it captured (ARCHITECTURE.md, "A connection's task").
#[allow(clippy::manual_async_fn)] // the point: the `async fn` form holds its arguments twice
fn serve(
    ctx: Arc<ProxyCtx>,
    mut client: TcpStream,
    peer: SocketAddr,
    dst: Option<SocketAddr>,
    permit: Option<Permit>,
) -> impl Future<Output = ()> + Send {
    async move {
        // Held until the connection ends (captured, dropped with the task).
        let _permit = &permit;
        let Some(dst) = dst else { return };
        match plan(&ctx, peer, dst) {
            Plan::Refused => socket::reset_on_close(&client),
            Plan::Waypoint(mut guard, tunnel) => {
                // Boxed, as the other rare paths: a connection's task is as large as its
                // largest path, for as long as it lives.
                Box::pin(serve_through_waypoint(
                    &ctx,
                    &mut client,
                    peer,
                    dst,
                    &mut guard,
                    tunnel,
                ))
                .await
            }
            Plan::Local { who, addr, guard } => {
                if let Err(r) =
                    Box::pin(inbound::serve_local(ctx.clone(), client, who, addr, guard)).await
                {
                    tracing::info!(src = %peer, dst = %addr, reason = %r.reason, "same-node connection refused");
                }
            }
            Plan::Hbone {
                key,
                cert,
                addr,
                mut guard,
            } => tunnel_and_relay(&ctx, &mut client, peer, addr, &mut guard, &key, &cert).await,
            Plan::Plain { addr, mut guard } => {
                match socket::connect(addr, Some(peer.ip()), &ctx.mode, CONNECT_TIMEOUT).await {
                    Ok(mut upstream) => {
                        socket::keepalive(&upstream, &ctx.keepalive);
                        if inbound::pump(&mut client, &mut upstream, &mut guard, None).await {
                            socket::reset_on_close(&client);
                        }
                    }
                    Err(e) => {
                        tracing::info!(src = %peer, dst = %addr, error = %e, "passthrough connect failed");
                        socket::reset_on_close(&client);
                        guard.set_outcome(Outcome::ConnectFailed(e.to_string()));
                    }
                }
            }
        }
    }
}

/// Decides what the connection from `peer` to `dst` becomes, and opens its record.
fn plan(ctx: &ProxyCtx, peer: SocketAddr, dst: SocketAddr) -> Plan {
    let snap = ctx.store.snapshot();
    let src_w = snap
        .workload_by_ip(peer.ip())
        .filter(|w| w.node == ctx.node && w.enrollment.is_enrolled());
    // In a pod (in-pod), every connection on 15001 is that pod's: one the mesh state does not
    // know as a local enrolled workload is refused, never passed through in plaintext.
    if src_w.is_none() && ctx.mode.is_in_pod() {
        tracing::info!(src = %peer, dst = %dst, "outbound from a pod the mesh state does not know as local and enrolled; refused");
        return Plan::Refused;
    }
    let src_id = src_w.and_then(|w| ctx.identity_of(w));

    // Behind an Envoy waypoint istiod announced: only through it, never direct.
    if let Some(via) = envoy_waypoint::required(&snap, dst, peer.ip(), src_w.map(|w| &**w)) {
        let (guard, tunnel) = to_waypoint(ctx, &snap, via, peer, dst, src_w, src_id);
        return Plan::Waypoint(guard, tunnel);
    }

    let target = match resolve(&snap, dst) {
        Ok(t) => t,
        Err(NoRoute(why)) => {
            tracing::info!(src = %peer, dst = %dst, reason = %why, "outbound refused");
            return Plan::Refused;
        }
    };
    let dst_mesh = target.workload.filter(|w| w.enrollment.is_enrolled());
    let meta = |protocol, dst_identity| ConnMeta {
        direction: Direction::Outbound,
        protocol,
        src: peer,
        dst: target.addr,
        original_dst: (dst != target.addr).then_some(dst),
        src_identity: src_id.clone(),
        dst_identity,
        src_workload: src_w.map(Peer::of),
        dst_workload: target.workload.map(Peer::of),
        service: target.service.map(|s| {
            Box::new(ServiceRef {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
            })
        }),
        decision: None,
        audits: Vec::new(),
    };

    // Same node, destination in the mesh: the inbound side takes it, as if via HBONE. Not
    // from inside a pod (in-pod): the destination's listeners are in its own pod, reached
    // over HBONE like another node's.
    if let Some(w) = dst_mesh.filter(|w| w.node == ctx.node && !ctx.mode.is_in_pod()) {
        let who = match &src_id {
            Some(id) => Client::Mesh {
                identity: id.clone(),
                addr: peer,
            },
            None => Client::Plaintext { addr: peer },
        };
        return Plan::Local {
            who,
            addr: target.addr,
            guard: ctx.conns.open(meta(Protocol::Local, ctx.identity_of(w))),
        };
    }

    // Another node, both ends in the mesh: HBONE.
    if let (Some(src_id), Some(w)) = (&src_id, dst_mesh) {
        let Some(dst_id) = ctx.identity_of(w) else {
            return Plan::Refused;
        };
        let Some(cert) = ctx.certs.get(src_id) else {
            tracing::warn!(src = %peer, identity = %src_id, "no certificate yet for the source; refusing");
            return Plan::Refused;
        };
        let key = PoolKey {
            src: src_id.clone(),
            dst: dst_id.clone(),
            dst_ip: target.addr.ip(),
            dst_port: ctx.pool.hbone_port(),
        };
        return Plan::Hbone {
            key,
            cert,
            addr: target.addr,
            guard: ctx.conns.open(meta(Protocol::Hbone, Some(dst_id))),
        };
    }

    // Anything else: plain TCP, from the client's own address.
    Plan::Plain {
        addr: target.addr,
        guard: ctx.conns.open(meta(Protocol::Plain, None)),
    }
}

/// Opens an HBONE stream for `key` with `:authority` `authority` (the original destination,
/// or the endpoint a VIP resolved to) and relays `client` over it; a failure resets the
/// client and is recorded on `guard` (`ConnectFailed` when the tunnel could not be opened).
#[allow(clippy::manual_async_fn)] // as `serve`
fn tunnel_and_relay<'a>(
    ctx: &'a ProxyCtx,
    client: &'a mut TcpStream,
    peer: SocketAddr,
    authority: SocketAddr,
    guard: &'a mut ConnGuard,
    key: &'a PoolKey,
    cert: &'a Arc<IssuedCert>,
) -> impl Future<Output = ()> + Send + 'a {
    // A block, not an `async fn` (see `serve`).
    async move {
        // Boxed: opening a stream (and, the first time, its pooled connection's handshakes) is
        // over once the stream is open, and the connection's task would otherwise keep room for
        // it for as long as the connection lives.
        let mut tunnel = match Box::pin(ctx.pool.tunnel_early(key, cert, authority, peer)).await {
            Ok(t) => t,
            Err(e) => {
                tracing::info!(src = %peer, dst = %authority, via = %key.peer(), error = %e, "HBONE tunnel failed");
                socket::reset_on_close(client);
                guard.set_outcome(Outcome::ConnectFailed(e.to_string()));
                return;
            }
        };
        let conns = [guard.conn().clone()];
        match relay(client, &mut tunnel.io, &conns).await {
            Ok(()) => guard.set_outcome(Outcome::Closed),
            Err(e) => {
                // A refusal reads, and fails a write, naming the peer's answer.
                socket::reset_on_close(client);
                tunnel.io.reset();
                guard.set_outcome(e.into());
            }
        }
    }
}

/// Why a connection behind a waypoint cannot be sent to it (it then fails; it never goes
/// direct).
#[derive(Debug, thiserror::Error)]
enum WaypointUnusable {
    /// The waypoint is not in the state.
    #[error(transparent)]
    Unresolved(#[from] envoy_waypoint::Unresolved),
    /// The source is not a workload weft holds an identity for.
    #[error("the source has no mesh identity to present to the waypoint")]
    NoSourceIdentity,
    /// The source's certificate is not issued yet.
    #[error("no certificate yet for {0}")]
    NoCertificate(Identity),
    /// The waypoint's workload has no valid SPIFFE identity to expect.
    #[error("waypoint workload {0} has no valid identity")]
    NoWaypointIdentity(String),
}

/// The tunnel to a waypoint (its pool key and the source's certificate), or why there is
/// none.
type WaypointTunnel = Result<(PoolKey, Arc<IssuedCert>), WaypointUnusable>;

/// Decides, on `snap`, how a connection from `peer` to `dst` reaches the waypoint `via`
/// names: the connection record (to the waypoint when it was found, else to `dst`) and the
/// pool key and source certificate, or why the connection must fail.
fn to_waypoint(
    ctx: &ProxyCtx,
    snap: &crate::state::Snapshot,
    via: Via<'_>,
    peer: SocketAddr,
    dst: SocketAddr,
    src_w: Option<&Arc<Workload>>,
    src_id: Option<Identity>,
) -> (ConnGuard, WaypointTunnel) {
    let hop = envoy_waypoint::resolve(snap, via.waypoint, dst.ip());
    let waypoint_id = hop.as_ref().ok().and_then(|h| ctx.identity_of(h.workload));
    let meta = ConnMeta {
        direction: Direction::Outbound,
        protocol: Protocol::Hbone,
        src: peer,
        dst: hop.as_ref().map_or(dst, |h| h.addr),
        original_dst: hop.is_ok().then_some(dst),
        src_identity: src_id.clone(),
        dst_identity: waypoint_id.clone(),
        src_workload: src_w.map(Peer::of),
        dst_workload: match &hop {
            Ok(h) => Some(Peer::of(h.workload)),
            Err(_) => via.workload.map(Peer::of),
        },
        service: via.service.map(|s| {
            Box::new(ServiceRef {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
            })
        }),
        decision: None,
        audits: Vec::new(),
    };
    let guard = ctx.conns.open(meta);
    (guard, waypoint_tunnel(ctx, hop, src_id, waypoint_id))
}

/// The pool key and source certificate of a tunnel to the waypoint at `hop`.
fn waypoint_tunnel(
    ctx: &ProxyCtx,
    hop: Result<envoy_waypoint::Hop<'_>, envoy_waypoint::Unresolved>,
    src_id: Option<Identity>,
    waypoint_id: Option<Identity>,
) -> WaypointTunnel {
    let hop = hop?;
    let src_id = src_id.ok_or(WaypointUnusable::NoSourceIdentity)?;
    let cert = ctx
        .certs
        .get(&src_id)
        .ok_or_else(|| WaypointUnusable::NoCertificate(src_id.clone()))?;
    let dst_id = waypoint_id
        .ok_or_else(|| WaypointUnusable::NoWaypointIdentity(hop.workload.uid.to_string()))?;
    let key = PoolKey {
        src: src_id,
        dst: dst_id,
        dst_ip: hop.addr.ip(),
        dst_port: hop.addr.port(),
    };
    Ok((key, cert))
}

/// Tunnels a connection to its waypoint, `:authority` the original destination `dst`; a
/// waypoint that could not be found or reached fails the connection (reset, logged,
/// `istio_tcp_connections_failed_total`).
async fn serve_through_waypoint(
    ctx: &ProxyCtx,
    client: &mut TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    guard: &mut ConnGuard,
    tunnel: WaypointTunnel,
) {
    match tunnel {
        Ok((key, cert)) => tunnel_and_relay(ctx, client, peer, dst, guard, &key, &cert).await,
        Err(why) => {
            tracing::info!(src = %peer, dst = %dst, reason = %why, "waypoint unreachable; connection refused");
            socket::reset_on_close(client);
            guard.set_outcome(Outcome::ConnectFailed(why.to_string()));
        }
    }
}
