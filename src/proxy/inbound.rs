//! Traffic arriving at local pods: HBONE on `:15008`, plaintext on `:15006`, and same-node
//! mesh traffic handed over by the outbound side.
//!
//! All three end in [`deliver`]: the destination must be a local enrolled workload, weft
//! connects to the app from the original client's address (so the app sees who connected)
//! and relays. HBONE learns the client from its certificate; the `forwarded` header's address
//! is believed only when it belongs to a workload with that same identity.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::Instrument;

use super::conntrack::{ConnGuard, ConnMeta, Outcome, Peer, Protocol, DENIED, FAILED_TO_CONNECT};
use super::h2io::H2Io;
use super::hbone::{Connect, ConnectError};
use super::limit::Permit;
use super::relay::relay;
use super::socket;
use super::ProxyCtx;
use crate::identity::Identity;
use crate::logging::access;
use crate::metrics::{DenialReason, Direction};
use crate::model::Workload;
use crate::state::Snapshot;

const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who the client is, as the inbound side can prove it.
#[derive(Clone, Debug)]
pub enum Client {
    /// Authenticated by mTLS (HBONE) or by being a local enrolled pod (same-node path).
    Mesh {
        /// Its identity.
        identity: Identity,
        /// Its original address.
        addr: SocketAddr,
    },
    /// Plaintext, unauthenticated.
    Plaintext {
        /// Its address.
        addr: SocketAddr,
    },
}

impl Client {
    fn addr(&self) -> SocketAddr {
        match self {
            Client::Mesh { addr, .. } | Client::Plaintext { addr } => *addr,
        }
    }
    fn identity(&self) -> Option<&Identity> {
        match self {
            Client::Mesh { identity, .. } => Some(identity),
            Client::Plaintext { .. } => None,
        }
    }
}

/// Why an inbound connection was not delivered, and the HTTP status HBONE answers with.
#[derive(Debug)]
pub struct Refusal {
    /// The status for HBONE.
    pub status: StatusCode,
    /// For logs.
    pub reason: String,
    /// Set when policy refused it: (`policy` or `mtls`, the deciding policy or `default`).
    pub denial: Option<(DenialReason, String)>,
}

fn refuse(status: StatusCode, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
        denial: None,
    }
}

/// What let a connection in: the deciding policy, for the access log.
#[derive(Debug)]
pub struct Admitted {
    /// `allow by <ns>/<name>` or `allow (no policy applies)`.
    pub decision: String,
    /// AUDIT policies that matched.
    pub audits: Vec<String>,
}

/// The policy decision for a connection from `src` (with `src_identity` when authenticated)
/// to `dst`, a local enrolled workload: PeerAuthentication first (plaintext to a STRICT port
/// is refused), then AuthorizationPolicy.
pub fn decide(
    ctx: &ProxyCtx,
    snap: &Snapshot,
    authz: &crate::authz::Authz,
    src: SocketAddr,
    src_identity: Option<&Identity>,
    dst: SocketAddr,
) -> Result<Admitted, Refusal> {
    let dst_w = local_destination(ctx, snap, dst.ip())?;
    let l7 = crate::waypoint::applies(snap, authz, dst_w);
    decide_at(authz, src, src_identity, dst, dst_w, !l7)
}

/// [`decide`] for `dst_w`, the local enrolled workload at `dst` (already looked up), with
/// AuthorizationPolicy checked here only when `l4_authz` (the waypoint decides per request
/// otherwise).
fn decide_at(
    authz: &crate::authz::Authz,
    src: SocketAddr,
    src_identity: Option<&Identity>,
    dst: SocketAddr,
    dst_w: &Workload,
    l4_authz: bool,
) -> Result<Admitted, Refusal> {
    if src_identity.is_none() {
        let m = authz.mtls(dst_w, dst.port());
        if m.mode == crate::authz::MtlsMode::Strict {
            let by = m
                .policy
                .as_ref()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .unwrap_or_else(|| "default".into());
            return Err(Refusal {
                status: StatusCode::FORBIDDEN,
                reason: format!(
                    "plaintext refused: PeerAuthentication {by} is STRICT for port {}",
                    dst.port()
                ),
                denial: Some((DenialReason::Mtls, by)),
            });
        }
    }
    if !l4_authz {
        return Ok(Admitted {
            decision: "to the waypoint (L7 policy decides per request)".into(),
            audits: Vec::new(),
        });
    }
    let verdict = authz.check(&crate::authz::Connection {
        src_ip: src.ip(),
        src_identity,
        dst: dst_w,
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    });
    let audits = verdict
        .audits
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    match verdict.decision {
        crate::authz::Decision::Allow { by } => Ok(Admitted {
            decision: match by {
                Some(p) => format!("allow by {}/{}", p.namespace, p.name),
                None => "allow (no ALLOW policy applies)".into(),
            },
            audits,
        }),
        d @ crate::authz::Decision::Deny { .. } => {
            let by = d
                .policy()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .unwrap_or_else(|| "default".into());
            Err(Refusal {
                status: StatusCode::FORBIDDEN,
                reason: format!("denied by policy: {d}"),
                denial: Some((DenialReason::Policy, by)),
            })
        }
    }
}

/// Logs and counts a refused connection.
fn log_refusal(
    ctx: &ProxyCtx,
    dst_w: &Workload,
    client: &Client,
    dst: SocketAddr,
    protocol: Protocol,
    r: &Refusal,
) {
    let Some((reason, policy)) = &r.denial else {
        tracing::info!(src = %client.addr(), dst = %dst, reason = %r.reason, "inbound connection refused");
        return;
    };
    ctx.denials
        .denied
        .get_or_create(&crate::metrics::DenialLabels {
            destination_workload: dst_w.workload_name.to_string(),
            destination_workload_namespace: dst_w.namespace.to_string(),
            transport: protocol.transport(),
            reason: *reason,
            policy: policy.clone(),
        })
        .inc();
    let src_identity = client.identity().map(|i| i.to_string()).unwrap_or_default();
    let dst_identity = Identity::new(&ctx.trust_domain, &dst_w.namespace, &dst_w.service_account)
        .map(|i| i.to_string())
        .unwrap_or_default();
    let src_w = ctx
        .store
        .snapshot()
        .workload_by_ip(client.addr().ip())
        .cloned();
    access::connection_denied(
        &access::Common {
            direction: Direction::Inbound.as_str(),
            protocol: protocol.as_str(),
            src: access::End {
                addr: client.addr(),
                workload: src_w.as_ref().map_or("", |w| w.name.as_str()),
                namespace: src_w.as_ref().map_or("", |w| w.namespace.as_str()),
                identity: &src_identity,
            },
            dst: access::End {
                addr: dst,
                workload: &dst_w.name,
                namespace: &dst_w.namespace,
                identity: &dst_identity,
            },
            dst_service: "",
        },
        policy,
        reason.as_str(),
        &r.reason,
    );
}

/// The destination workload if `ip` is a local enrolled pod.
pub fn local_destination<'a>(
    ctx: &ProxyCtx,
    snap: &'a Snapshot,
    ip: IpAddr,
) -> Result<&'a Arc<Workload>, Refusal> {
    match snap.workload_by_ip(ip) {
        Some(w) if w.node == ctx.node && w.enrollment.is_enrolled() => Ok(w),
        Some(w) => Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{ip} is {} on node {:?}, not a local enrolled workload",
                w.uid, w.node
            ),
        )),
        None => Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{ip} is not a known workload"),
        )),
    }
}

/// Where an admitted inbound connection goes.
enum Route {
    /// Straight to the app (L4): the app connection is open.
    App(TcpStream, ConnGuard),
    /// Through the waypoint, which connects to the app per request.
    Waypoint(ConnGuard),
}

/// Applies PeerAuthentication and (for L4 destinations) AuthorizationPolicy, registers the
/// connection, and connects to the app from the client's address unless the waypoint takes
/// it.
async fn route(
    ctx: &ProxyCtx,
    snap: &Snapshot,
    client: &Client,
    dst: SocketAddr,
    protocol: Protocol,
) -> Result<Route, Refusal> {
    let authz = ctx.authz(snap);
    let dst_w = local_destination(ctx, snap, dst.ip())?;
    let l7 = crate::waypoint::applies(snap, &authz, dst_w);
    let meta = |decision: Option<String>, audits: Vec<String>| ConnMeta {
        direction: Direction::Inbound,
        protocol,
        src: client.addr(),
        dst,
        original_dst: None,
        src_identity: client.identity().cloned(),
        dst_identity: ctx.identity_of(dst_w),
        src_workload: snap.workload_by_ip(client.addr().ip()).map(Peer::of),
        dst_workload: Some(Peer::of(dst_w)),
        service: None,
        decision,
        audits,
    };
    let admitted = match decide_at(&authz, client.addr(), client.identity(), dst, dst_w, !l7) {
        Ok(a) => a,
        Err(r) => {
            log_refusal(ctx, dst_w, client, dst, protocol, &r);
            if r.denial.is_some() {
                // As ztunnel: a denied connection is one that failed, flagged `DENY`.
                ctx.conns.count_failure(&meta(None, Vec::new()), DENIED);
            }
            return Err(r);
        }
    };
    let meta = meta(Some(admitted.decision), admitted.audits);
    if l7 {
        return Ok(Route::Waypoint(ctx.conns.open(meta)));
    }
    let app = socket::connect(
        dst,
        Some(client.addr().ip()),
        &ctx.mode,
        APP_CONNECT_TIMEOUT,
    )
    .await
    .map_err(|e| {
        ctx.conns.count_failure(&meta, FAILED_TO_CONNECT);
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("connect to app {dst}: {e}"),
        )
    })?;
    socket::keepalive(&app, &ctx.keepalive);
    Ok(Route::App(app, ctx.conns.open(meta)))
}

fn downstream(client: &Client, mode: &socket::SocketMode) -> crate::waypoint::http::Downstream {
    crate::waypoint::http::Downstream {
        addr: client.addr(),
        identity: client.identity().cloned(),
        mode: mode.clone(),
    }
}

/// Relays between a client stream and the app (or, outbound, the upstream). On failure the
/// app side is reset here and `true` returned so the caller resets the client side (an HBONE
/// stream resets itself when dropped unfinished).
pub(super) async fn pump<C>(
    client: &mut C,
    app: &mut TcpStream,
    guard: &mut ConnGuard,
    extra: Option<&ConnGuard>,
) -> bool
where
    C: super::relay::Endpoint + ?Sized,
{
    let ours = guard.conn().clone();
    let result = match extra {
        Some(g) => relay(client, app, &[ours, g.conn().clone()]).await,
        None => relay(client, app, &[ours]).await,
    };
    let outcome = result.map_or_else(Outcome::from, |()| Outcome::Closed);
    let failed = !matches!(outcome, Outcome::Closed);
    if failed {
        socket::reset_on_close(app);
    }
    guard.set_outcome(outcome);
    failed
}

/// Hands a connection to the in-binary waypoint; true when it failed. Boxed: the HTTP server's
/// state is large, and a connection that never needs it should not carry room for it.
async fn to_waypoint<I>(
    ctx: &ProxyCtx,
    io: I,
    who: &Client,
    dst: SocketAddr,
    guard: ConnGuard,
) -> bool
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(crate::waypoint::http::serve(
        ctx.waypoint.clone(),
        io,
        downstream(who, &ctx.mode),
        dst,
        guard,
    ))
    .await
}

// === plaintext :15006 ===

/// Handles one connection accepted on the plaintext inbound listener, holding its place
/// (`_permit`) until it ends.
pub async fn serve_plaintext(
    ctx: Arc<ProxyCtx>,
    client: TcpStream,
    peer: SocketAddr,
    _permit: Permit,
) {
    let Ok(dst) = socket::original_dst(&client, &ctx.mode) else {
        return;
    };
    let snap = ctx.store.snapshot();
    let who = Client::Plaintext { addr: peer };
    match Box::pin(route(&ctx, &snap, &who, dst, Protocol::Plain)).await {
        Ok(Route::App(mut app, mut guard)) => {
            drop(snap);
            let mut client = client;
            if pump(&mut client, &mut app, &mut guard, None).await {
                socket::reset_on_close(&client);
            }
        }
        Ok(Route::Waypoint(guard)) => {
            drop(snap);
            to_waypoint(&ctx, client, &who, dst, guard).await;
        }
        Err(r) => {
            tracing::info!(src = %peer, dst = %dst, reason = %r.reason, "plaintext inbound refused");
            socket::reset_on_close(&client);
        }
    }
}

// === same-node ===

/// Delivers same-node mesh traffic exactly as if it had arrived over HBONE.
pub async fn serve_local(
    ctx: Arc<ProxyCtx>,
    mut client: TcpStream,
    who: Client,
    dst: SocketAddr,
    outbound: ConnGuard,
) -> Result<(), Refusal> {
    let snap = ctx.store.snapshot();
    let protocol = match who {
        Client::Mesh { .. } => Protocol::Local,
        Client::Plaintext { .. } => Protocol::Plain,
    };
    let (mut app, mut guard) = match Box::pin(route(&ctx, &snap, &who, dst, protocol)).await {
        Ok(Route::App(app, guard)) => (app, guard),
        Ok(Route::Waypoint(guard)) => {
            drop(snap);
            let mut outbound = outbound;
            let failed = to_waypoint(&ctx, client, &who, dst, guard).await;
            outbound.set_outcome(if failed {
                Outcome::Failed("waypoint connection failed".into())
            } else {
                Outcome::Closed
            });
            return Ok(());
        }
        Err(r) => {
            socket::reset_on_close(&client);
            let mut outbound = outbound;
            outbound.set_outcome(Outcome::Failed(r.reason.clone()));
            return Err(r);
        }
    };
    drop(snap);
    let mut outbound = outbound;
    if pump(&mut client, &mut app, &mut guard, Some(&outbound)).await {
        socket::reset_on_close(&client);
        outbound.set_outcome(Outcome::Failed("inbound side failed".into()));
    } else {
        outbound.set_outcome(Outcome::Closed);
    }
    Ok(())
}

// === HBONE :15008 ===

/// Handles one TCP connection accepted on the HBONE listener, holding its place (`_permit`)
/// until it ends: TLS as the destination workload, then HTTP/2 CONNECT streams.
pub async fn serve_hbone(ctx: Arc<ProxyCtx>, tcp: TcpStream, peer: SocketAddr, _permit: Permit) {
    let Ok(local) = tcp.local_addr() else { return };
    let snap = ctx.store.snapshot();
    let server_cert = match local_destination(&ctx, &snap, local.ip())
        .ok()
        .and_then(|w| ctx.identity_of(w))
        .and_then(|id| ctx.certs.get(&id))
    {
        Some(c) => c,
        None => {
            tracing::info!(peer = %peer, local = %local, "HBONE connection to an address with no local workload certificate");
            socket::reset_on_close(&tcp);
            return;
        }
    };
    drop(snap);
    // A bounded number of handshakes at once: each costs a signature and its buffers, and
    // anyone who can reach 15008 can start one.
    let Ok(handshaking) = ctx.handshakes.clone().try_acquire_owned() else {
        ctx.limit_metrics
            .refused("hbone", crate::metrics::RefusalReason::Handshakes);
        socket::reset_on_close(&tcp);
        return;
    };
    let cfg = match ctx.tls.server(&server_cert) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build TLS server config");
            return;
        }
    };
    let tls = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(cfg).accept(tcp),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::info!(peer = %peer, error = %e, "HBONE TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(peer = %peer, "HBONE TLS handshake timed out");
            return;
        }
    };
    drop(handshaking);
    let peer_id = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(crate::tls::identity_of)
    {
        Some(Ok(id)) => id,
        Some(Err(e)) => {
            tracing::info!(peer = %peer, error = %e, "HBONE client identity refused");
            return;
        }
        None => {
            tracing::info!(peer = %peer, "HBONE client presented no certificate");
            return;
        }
    };
    let span = tracing::debug_span!("hbone", peer = %peer, src.identity = %peer_id, dst.identity = %server_cert.identity);
    serve_h2(ctx, tls, peer_id, peer, local.ip())
        .instrument(span)
        .await;
}

async fn serve_h2<T>(
    ctx: Arc<ProxyCtx>,
    io: T,
    peer_id: Identity,
    peer: SocketAddr,
    tunnel_ip: IpAddr,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = match h2::server::Builder::new()
        .initial_window_size(super::pool::STREAM_WINDOW)
        .initial_connection_window_size(super::pool::CONN_WINDOW)
        .max_frame_size(super::pool::MAX_FRAME)
        .data_frame_budget(super::pool::DATA_FRAME_BUDGET)
        .max_header_list_size(super::pool::MAX_HEADER_LIST)
        .max_concurrent_streams(super::pool::MAX_STREAMS as u32)
        .handshake::<_, Bytes>(io)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(error = %e, "HBONE HTTP/2 handshake failed");
            return;
        }
    };
    let mut going_away = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            _ = ctx.draining.cancelled(), if !going_away => {
                // Draining: GOAWAY. The client opens its next streams elsewhere; the streams
                // in flight go on until they end or the drain deadline closes them.
                conn.graceful_shutdown();
                going_away = true;
                continue;
            }
        };
        let Some(next) = next else { return };
        match next {
            Ok((req, respond)) => {
                let peer_id = peer_id.clone();
                let task = handle_connect(ctx.clone(), req, respond, peer_id, peer, tunnel_ip);
                ctx.tasks.spawn(task.in_current_span());
            }
            Err(e) => {
                tracing::debug!(error = %e, "HBONE connection ended");
                return;
            }
        }
    }
}

fn reply(
    respond: &mut SendResponse<Bytes>,
    code: StatusCode,
    end: bool,
) -> Option<SendStream<Bytes>> {
    let mut r = Response::new(());
    *r.status_mut() = code;
    respond.send_response(r, end).ok()
}

/// Serves one CONNECT stream. Opening it (parsing, policy, the app connect) is boxed and over
/// once the stream is open: only what relaying needs stays in the stream's task for as long
/// as it lives (ARCHITECTURE.md, "A connection's task").
pub(super) fn handle_connect(
    ctx: Arc<ProxyCtx>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    peer_id: Identity,
    peer: SocketAddr,
    tunnel_ip: IpAddr,
) -> impl std::future::Future<Output = ()> + Send {
    let opening = Box::pin(open_connect(
        ctx.clone(),
        req,
        respond,
        peer_id,
        peer,
        tunnel_ip,
    ));
    // A block, not an `async fn` (as `outbound::serve`).
    async move {
        let Some(Opened {
            mut io,
            routed,
            who,
            dst,
        }) = opening.await
        else {
            return;
        };
        match routed {
            Route::App(mut app, mut guard) => {
                if pump(&mut io, &mut app, &mut guard, None).await {
                    io.reset();
                }
            }
            Route::Waypoint(guard) => {
                // An unfinished stream resets itself when dropped. The HTTP server stops reading
                // while the app is slow to take a body: the stream's bytes must not pile up in h2.
                to_waypoint(&ctx, io.absorbing(), &who, dst, guard).await;
            }
        }
    }
}

/// A CONNECT stream answered 200, and where it goes.
struct Opened {
    io: H2Io,
    routed: Route,
    who: Client,
    dst: SocketAddr,
}

/// Checks a CONNECT, applies policy and reaches its destination; answers it (200, or the
/// refusal) and returns the open stream, or `None` when it was refused or failed.
async fn open_connect(
    ctx: Arc<ProxyCtx>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer_id: Identity,
    peer: SocketAddr,
    tunnel_ip: IpAddr,
) -> Option<Opened> {
    let connect = match Connect::parse(&req) {
        Ok(c) => c,
        Err(e @ ConnectError::Method(_)) => {
            tracing::info!(peer = %peer, error = %e, "HBONE request refused");
            reply(&mut respond, StatusCode::METHOD_NOT_ALLOWED, true);
            return None;
        }
        Err(e @ ConnectError::Authority(_)) => {
            tracing::info!(peer = %peer, error = %e, "HBONE CONNECT without an IP:port authority (port 1-65535)");
            reply(&mut respond, StatusCode::BAD_REQUEST, true);
            return None;
        }
    };
    let dst = connect.authority;
    if dst.ip() != tunnel_ip {
        tracing::info!(peer = %peer, authority = %dst, tunnel = %tunnel_ip, "HBONE authority does not match the tunnel's destination");
        reply(&mut respond, StatusCode::BAD_REQUEST, true);
        return None;
    }
    let snap = ctx.store.snapshot();
    // Believe the claimed client address only if it belongs to the authenticated identity.
    let src = match connect.forwarded_for {
        Some(addr)
            if snap
                .workload_by_ip(addr.ip())
                .and_then(|w| ctx.identity_of(w))
                .as_ref()
                == Some(&peer_id) =>
        {
            addr
        }
        _ => peer,
    };
    let who = Client::Mesh {
        identity: peer_id,
        addr: src,
    };
    // While the destination is being reached (an app connect may take seconds), whatever the
    // client already sends is taken off h2 into one buffer, credit still owed: the stream's
    // window bounds the bytes, and no frame stays queued in h2 however small the frames are.
    let mut body = req.into_body();
    let mut received = bytes::BytesMut::new();
    let mut ended: Option<Result<(), String>> = None;
    let mut routing = Box::pin(route(&ctx, &snap, &who, dst, Protocol::Hbone));
    let routed = loop {
        tokio::select! {
            r = &mut routing => break r,
            d = std::future::poll_fn(|cx| body.poll_data(cx)), if ended.is_none() => match d {
                Some(Ok(data)) => received.extend_from_slice(&data),
                Some(Err(e)) => ended = Some(Err(e.to_string())),
                None => ended = Some(Ok(())),
            },
        }
    };
    drop(routing);
    let routed = match routed {
        Ok(x) => x,
        Err(r) => {
            tracing::info!(src = %src, dst = %dst, reason = %r.reason, "HBONE CONNECT refused");
            reply(&mut respond, r.status, true);
            return None;
        }
    };
    drop(snap);
    let Some(send) = reply(&mut respond, StatusCode::OK, false) else {
        if let Route::App(app, _) = &routed {
            socket::reset_on_close(app);
        }
        return None;
    };
    let io = H2Io::with_received(send, body, received.freeze(), ended);
    Some(Opened {
        io,
        routed,
        who,
        dst,
    })
}
