//! The data path: the listeners on `:15001` (outbound), `:15006` (plaintext inbound) and
//! `:15008` (HBONE inbound), the HBONE client pool, and connection tracking. In-pod, one
//! such data path per pod runs inside the pod's network namespace (`ProxyCtx::in_pod`,
//! `netns`), sharing the node's state, policies, certificates and connection table.
//!
//! Each accepted connection reads the state snapshot once and decides from it; nothing on
//! the accept path takes a lock shared with the control plane. On shutdown the listeners
//! stop accepting, live connections get a grace period to finish, then are closed.

pub mod conntrack;
pub mod envoy_waypoint;
pub mod h2io;
pub mod hbone;
pub mod inbound;
pub mod limit;
pub mod netns;
pub mod outbound;
pub mod pool;
pub mod relay;
pub mod socket;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::authz::{Authz, AuthzCache};
use crate::identity::{CertManager, Identity};
use crate::model::Workload;
use crate::state::{Snapshot, StateStore};
use crate::tls::TlsConfigs;
use conntrack::ConnTable;
use pool::Pool;
use socket::SocketMode;

/// Errors starting the data path.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What every connection handler reads.
pub struct ProxyCtx {
    /// This node's name.
    pub node: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Compiled policies of the latest snapshot seen (shared with the waypoint).
    pub policies: Arc<AuthzCache>,
    /// Denied connections, for metrics.
    pub denials: crate::metrics::DenialMetrics,
    /// The in-binary waypoint for destinations that need L7.
    pub waypoint: Arc<crate::waypoint::Waypoint>,
    /// Socket mode (transparent when capturing).
    pub mode: SocketMode,
    /// The mesh state.
    pub store: Arc<StateStore>,
    /// Workload certificates.
    pub certs: Arc<CertManager>,
    /// TLS configs.
    pub tls: Arc<TlsConfigs>,
    /// HBONE client pool.
    pub pool: Arc<Pool>,
    /// Live connections.
    pub conns: Arc<ConnTable>,
    /// Cancelled when the data path starts draining: HBONE connections then send GOAWAY.
    pub draining: tokio_util::sync::CancellationToken,
    /// Every connection's task from its accept, HBONE connections and their streams
    /// included: the drain waits for these, not only for the connections already registered
    /// (a stream still being routed, or accepted just before the GOAWAY, is not yet).
    pub tasks: tokio_util::task::TaskTracker,
    /// Each data-path listener's connection caps (both IP families of a port together).
    pub limits: limit::Limits,
    /// Connections refused over the caps, for metrics.
    pub limit_metrics: crate::metrics::LimitMetrics,
    /// HBONE TLS handshakes in progress; one that finds none left is refused.
    pub handshakes: Arc<tokio::sync::Semaphore>,
    /// TCP keepalive on tunnel and app sockets.
    pub keepalive: socket::Keepalive,
}

impl ProxyCtx {
    /// The SPIFFE identity of a workload.
    pub fn identity_of(&self, w: &Workload) -> Option<Identity> {
        Identity::new(&self.trust_domain, &w.namespace, &w.service_account).ok()
    }

    /// The local enrolled identities of `snap` without a usable certificate: none issued
    /// yet, or one whose renewals kept failing past its expiry. Readiness reports them; the
    /// listeners wait for none to be left.
    pub fn missing_certificates(&self, snap: &Snapshot) -> Vec<Identity> {
        let now = std::time::SystemTime::now();
        snap.local_identities(&self.node, &self.trust_domain)
            .into_iter()
            .filter(|id| self.certs.get(id).is_none_or(|c| c.not_after <= now))
            .collect()
    }

    /// Whether connections can be served: a mesh is loaded and every local enrolled
    /// identity has a usable certificate.
    pub fn can_serve(&self) -> bool {
        self.store.loaded() && self.missing_certificates(&self.store.snapshot()).is_empty()
    }

    /// The compiled policies of `snap` (compiled once per generation, on first use).
    pub fn authz(&self, snap: &Snapshot) -> Arc<Authz> {
        self.policies.get(snap.generation, &snap.mesh)
    }

    /// The data path of one pod (in-pod capture): everything shared with the node's (state,
    /// policies, certificates, live connections, metrics, caps), but sockets inside the pod's
    /// network namespace, an HBONE pool of its own (its connections leave from the pod), and
    /// its own drain (`draining`, `tasks`), so a pod going away drains alone.
    pub fn in_pod(&self, netns: Arc<netns::PodNetns>) -> ProxyCtx {
        let mode = SocketMode::InPod(netns);
        ProxyCtx {
            node: self.node.clone(),
            trust_domain: self.trust_domain.clone(),
            policies: self.policies.clone(),
            denials: self.denials.clone(),
            waypoint: self.waypoint.clone(),
            pool: self.pool.in_mode(mode.clone()),
            mode,
            store: self.store.clone(),
            certs: self.certs.clone(),
            tls: self.tls.clone(),
            conns: self.conns.clone(),
            draining: tokio_util::sync::CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
            limits: self.limits,
            limit_metrics: self.limit_metrics.clone(),
            handshakes: self.handshakes.clone(),
            keepalive: self.keepalive,
        }
    }
}

/// Re-evaluates live inbound connections whenever the state changes and closes those the new
/// policies deny (a plaintext connection to a port now STRICT included, and a connection the
/// waypoint upgraded whose upgrading request the new L7 policies deny).
pub fn spawn_policy_follower(
    ctx: Arc<ProxyCtx>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut changes = ctx.store.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = crate::sync::shut_down(&mut shutdown) => return,
            }
            let snap = ctx.store.snapshot();
            let authz = ctx.authz(&snap);
            ctx.waypoint.update(&snap);
            // Cached metric label sets hold the previous state's workload records.
            ctx.conns.forget_label_sets();
            for conn in ctx.conns.list() {
                let m = &conn.meta;
                if m.direction != crate::metrics::Direction::Inbound {
                    continue;
                }
                let verdict =
                    inbound::decide(&ctx, &snap, &authz, m.src, m.src_identity.as_ref(), m.dst)
                        .map_err(|refusal| {
                            let policy = refusal.denial.map(|(_, p)| p).unwrap_or_default();
                            (policy, refusal.reason)
                        })
                        .and_then(|_| match conn.upgraded.get() {
                            // The request that upgraded it must still be allowed too.
                            Some(upgrade) => upgrade
                                .check(&snap, &authz)
                                .map_err(|reason| (String::new(), reason)),
                            None => Ok(()),
                        });
                if let Err((policy, reason)) = verdict {
                    conn.log_closed_by_policy(&policy, &reason);
                    conn.close.cancel();
                }
            }
        }
    })
}

/// The three listeners' addresses.
#[derive(Clone, Copy, Debug)]
pub struct Listeners {
    /// Outbound (15001).
    pub outbound: SocketAddr,
    /// Plaintext inbound (15006).
    pub inbound_plaintext: SocketAddr,
    /// HBONE inbound (15008).
    pub hbone: SocketAddr,
}

/// The running data path.
pub struct Proxy {
    ctx: Arc<ProxyCtx>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ipv6_unavailable: Option<String>,
}

/// The IPv6 listeners' addresses: `[::]` at each data-path listener's port, when every one
/// listens on the unspecified IPv4 address (one bound to a given IPv4 address cannot take
/// IPv6 connections meant for it).
pub fn ipv6_listeners(l: &Listeners) -> Result<[SocketAddr; 3], String> {
    let six = |what: &str, addr: SocketAddr| match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => Ok(SocketAddr::new(
            std::net::Ipv6Addr::UNSPECIFIED.into(),
            addr.port(),
        )),
        _ => Err(format!(
            "listen.{what} is {addr}, not 0.0.0.0:<port>, so it has no IPv6 counterpart"
        )),
    };
    Ok([
        six("outbound", l.outbound)?,
        six("inboundPlaintext", l.inbound_plaintext)?,
        six("hbone", l.hbone)?,
    ])
}

impl Proxy {
    /// Binds the listeners (a taken port fails here) and starts accepting until `shutdown`.
    pub fn start(
        ctx: Arc<ProxyCtx>,
        listeners: Listeners,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Proxy, ProxyError> {
        // Capturing, a listener is bound now (a port taken by something else fails here) and
        // listens from the first complete mesh load on; otherwise it listens at once.
        let bind = |what, addr| -> Result<Listener, ProxyError> {
            let bound = socket::bind(addr, &ctx.mode).map_err(|source| ProxyError::Bind {
                what,
                addr,
                source,
            })?;
            Ok(match &ctx.mode {
                SocketMode::Transparent => Listener::Deferred(bound),
                // In a pod, the pod is handed over only now: it listens at once.
                SocketMode::Plain | SocketMode::InPod(_) => Listener::Listening(
                    socket::listen_on(bound).map_err(|source| ProxyError::Bind {
                        what,
                        addr,
                        source,
                    })?,
                ),
            })
        };
        let out = bind("outbound", listeners.outbound)?;
        let plain = bind("inboundPlaintext", listeners.inbound_plaintext)?;
        let hbone = bind("hbone", listeners.hbone)?;
        // Capturing, IPv6 gets listeners of its own (`[::]`, IPv6 only) on the same ports, for
        // the ip6tables rules; without them IPv6 is refused instead (see `redirect`).
        let mut ipv6 = Err("IPv6 is captured only by transparent listeners".to_string());
        if ctx.mode == SocketMode::Transparent {
            ipv6 = ipv6_listeners(&listeners).and_then(|[o, p, h]| {
                let bind6 =
                    |what, addr| bind(what, addr).map_err(|e| format!("no IPv6 listener: {e}"));
                Ok([
                    bind6("outbound", o)?,
                    bind6("inboundPlaintext", p)?,
                    bind6("hbone", h)?,
                ])
            });
        }
        let limiter = |name| limit::Limiter::new(name, ctx.limits, ctx.limit_metrics.clone());
        let (out_limit, plain_limit, hbone_limit) = (
            limiter("outbound"),
            limiter("inbound_plaintext"),
            limiter("hbone"),
        );
        let mut tasks = vec![
            accept_loop(
                out,
                out_limit.clone(),
                ctx.clone(),
                shutdown.clone(),
                outbound::serve_outbound,
            ),
            accept_loop(
                plain,
                plain_limit.clone(),
                ctx.clone(),
                shutdown.clone(),
                inbound::serve_plaintext,
            ),
            accept_loop(
                hbone,
                hbone_limit.clone(),
                ctx.clone(),
                shutdown.clone(),
                inbound::serve_hbone,
            ),
            ctx.pool.spawn_reaper(shutdown.clone()),
        ];
        // One follower re-checks every live connection of the node (the table is shared): a
        // pod's data path (in-pod) leaves it to the node's (`Proxy::without_listeners`).
        if !ctx.mode.is_in_pod() {
            tasks.push(spawn_policy_follower(ctx.clone(), shutdown.clone()));
        }
        let ipv6_unavailable = match ipv6 {
            Ok([out6, plain6, hbone6]) => {
                tasks.push(accept_loop(
                    out6,
                    out_limit,
                    ctx.clone(),
                    shutdown.clone(),
                    outbound::serve_outbound,
                ));
                tasks.push(accept_loop(
                    plain6,
                    plain_limit,
                    ctx.clone(),
                    shutdown.clone(),
                    inbound::serve_plaintext,
                ));
                tasks.push(accept_loop(
                    hbone6,
                    hbone_limit,
                    ctx.clone(),
                    shutdown,
                    inbound::serve_hbone,
                ));
                None
            }
            Err(why) => Some(why),
        };
        Ok(Proxy {
            ctx,
            tasks,
            ipv6_unavailable,
        })
    }

    /// The node's data path when the listeners are in the pods (in-pod capture, each pod's
    /// own [`Proxy`] from `inpod`): no listener here, only the policy re-check of every live
    /// connection and the node pool's reaper.
    pub fn without_listeners(ctx: Arc<ProxyCtx>, shutdown: watch::Receiver<bool>) -> Proxy {
        Proxy {
            tasks: vec![
                ctx.pool.spawn_reaper(shutdown.clone()),
                spawn_policy_follower(ctx.clone(), shutdown),
            ],
            ctx,
            ipv6_unavailable: Some("in-pod capture: the listeners are in the pods".to_string()),
        }
    }

    /// Why there are no IPv6 listeners (so IPv6 cannot be captured), when there are none.
    pub fn ipv6_unavailable(&self) -> Option<&str> {
        self.ipv6_unavailable.as_deref()
    }

    /// The shared context.
    pub fn ctx(&self) -> Arc<ProxyCtx> {
        self.ctx.clone()
    }

    /// After shutdown was signalled: waits for the listeners to close, gives live
    /// connections up to `grace` to finish, then closes the rest.
    pub async fn drain(self, grace: Duration) {
        self.drain_matching(grace, |_| true).await
    }

    /// [`Proxy::drain`] for a data path whose connections share the node's table with
    /// others' (a pod's, in-pod): at the end of the grace period only the live connections
    /// `mine` picks are closed.
    pub async fn drain_matching(self, grace: Duration, mine: impl Fn(&conntrack::Conn) -> bool) {
        for t in self.tasks {
            let _ = t.await;
        }
        // The listeners are closed: no connection arrives and no task is added from here on.
        // Then clients stop opening streams on our HBONE connections and take their next
        // ones elsewhere (a new weft on this node; a GOAWAY before the listener closed would
        // have sent them back here); the streams in flight finish below.
        self.ctx.draining.cancel();
        let tasks = self.ctx.tasks.clone();
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            let conns = &self.ctx.conns;
            tracing::info!(
                open = conns.len(),
                tasks = tasks.len(),
                "drain grace period over; closing connections"
            );
            for conn in conns.list() {
                if mine(&conn) {
                    conn.close.cancel();
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
        }
        self.ctx.pool.clear();
    }
}

/// A data-path listener: listening, or bound and waiting for the first mesh load.
enum Listener {
    Listening(TcpListener),
    Deferred(socket2::Socket),
}

fn accept_loop<F, Fut>(
    listener: Listener,
    limiter: Arc<limit::Limiter>,
    ctx: Arc<ProxyCtx>,
    mut shutdown: watch::Receiver<bool>,
    handler: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Arc<ProxyCtx>, tokio::net::TcpStream, SocketAddr, limit::Permit) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let listener = match listener {
            Listener::Listening(l) => l,
            Listener::Deferred(socket) => {
                // Captured connections are taken only once they can be served: the first
                // complete mesh load done and every local identity's certificate issued. Until
                // then the kernel hands them to a weft still running beside this one (the port
                // is shared), or TPROXY drops them and the client sends them again.
                let mut changes = ctx.store.subscribe();
                while !ctx.can_serve() {
                    tokio::select! {
                        r = changes.changed() => if r.is_err() { return },
                        // Certificates are issued without a notification: look again soon.
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = crate::sync::shut_down(&mut shutdown) => return,
                    }
                }
                match socket::listen_on(socket) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen");
                        return;
                    }
                }
            }
        };
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => match limiter.admit(peer.ip()) {
                        Ok(permit) => {
                            socket::tune_accepted(&stream, &ctx.keepalive);
                            // The handler holds the permit (the connection's place) until
                            // it ends. A wrapping `async` block would hold the handler's
                            // future twice: once captured, once being awaited.
                            ctx.tasks.spawn(handler(ctx.clone(), stream, peer, permit));
                        }
                        // Over the caps: reset at once (counted and logged by the limiter).
                        Err(_) => socket::reset_on_close(&stream),
                    },
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = crate::sync::shut_down(&mut shutdown) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it (a connection's task is its future).
    fn returned_size4<A, B, C, D, R>(_: fn(A, B, C, D) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    fn returned_size6<A, B, C, D, E, G, R>(_: fn(A, B, C, D, E, G) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// An idle connection costs mostly its tasks, whose size is their future's largest state
    /// (ARCHITECTURE.md, "A connection's task"). This pins the handlers' futures; that
    /// `accept_loop` spawns them unwrapped is not tested (its comment says why). Pinned here
    /// in the test build (debug: 1,064, 760 and 880 bytes when written; a release build's are
    /// 1,048, 744 and 840). Before: 2,624, 1,888 and 920 in release, the
    /// transient paths (the pool's handshakes, the waypoint) inline, and an `async` wrapper
    /// around the handler held it twice (the outbound task 5,320 bytes).
    #[test]
    fn connection_tasks_stay_small() {
        let outbound = returned_size4(outbound::serve_outbound);
        let stream = returned_size6(inbound::handle_connect);
        let plaintext = returned_size4(inbound::serve_plaintext);
        assert!(
            outbound <= 1_200,
            "outbound connection task: {outbound} bytes"
        );
        assert!(stream <= 900, "inbound stream task: {stream} bytes");
        assert!(
            plaintext <= 1_000,
            "plaintext inbound task: {plaintext} bytes"
        );
        // Each connection's record, in an `Arc` (two counts before it): in jemalloc's 320-byte
        // class, not the 384 one (it was 328 with the service's strings inline).
        let record = std::mem::size_of::<conntrack::Conn>() + 16;
        assert!(record <= 320, "connection record: {record} bytes");
    }
}
