//! The waypoint's HTTP side: terminates HTTP/1.1 and HTTP/2 (prior knowledge) on an inbound
//! connection that already passed mTLS and PeerAuthentication, makes one decision per request
//! (RequestAuthentication, then L7 AuthorizationPolicy), and forwards allowed requests to the
//! app over pooled connections that keep the client's address.
//!
//! The app receives the request policy decided on, not a different reading of the same bytes:
//! - the path is the normalized one `paths`/`notPaths` matched ([`target`]: Istio's default
//!   `BASE` normalization, see `authz::path`; `%2F` and `%5C` are kept as received, as
//!   Envoy's default `KEEP_UNCHANGED` does), followed by the query as received;
//! - `Host` (or HTTP/2 `:authority`) is the authority `hosts` matched ([`authority`]); a
//!   request whose `Host` header disagrees with its absolute-form target or `:authority`, or
//!   that has several `Host` headers, is refused;
//! - `x-forwarded-client-cert` is never taken from the client: it is removed, and set from the
//!   tunnel's verified peer identity when there is one ([`client_cert_header`]), before policy
//!   and token checks see the request (Envoy's `SANITIZE_SET`).
//!
//! Denied requests get `403 RBAC: access denied` and the connection stays usable; an invalid
//! token gets `401`; a path that cannot be normalised safely, a request whose framing is
//! ambiguous (both `Content-Length` and `Transfer-Encoding`, or a chunk size beyond 64 bits
//! earlier on the connection), a `Host` that disagrees with the target, or an `Upgrade` to
//! anything but `websocket` (`h2c` would let a client talk HTTP/2 to the app past every
//! per-request decision) gets `400` and the connection is closed without anything reaching the
//! app. An HTTP/1.1 WebSocket upgrade is passed through once the app accepts it; the upgraded
//! connection keeps its record in the connection table, with the upgrading request, so drain,
//! `/connections` and the policy follower (which decides that request again on every change)
//! reach it. A connection whose upgrade the app declined is closed after the answer: its
//! framing is no longer watched.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::Waypoint;
use crate::authz::{
    normalize_path, Authz, Connection, Decision, DenyReason, HttpRequest, PathError, RequestAuth,
};
use crate::identity::Identity;
use crate::logging::access;
use crate::metrics::RequestSides;
use crate::model::Workload;
use crate::proxy::conntrack::{Conn, ConnGuard, Outcome, Recheck};
use crate::state::Snapshot;
use crate::waypoint::jwt::AuthnResult;

type Body = BoxBody<Bytes, hyper::Error>;

/// Largest request head accepted (HTTP/1 buffer, HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Who sent the requests of one downstream connection.
#[derive(Clone, Debug)]
pub struct Downstream {
    /// The client's address (the app sees this IP).
    pub addr: SocketAddr,
    /// Its mTLS identity, when authenticated.
    pub identity: Option<Identity>,
    /// How the app is reached: the socket mode of the data path that took the connection (in
    /// a pod, from inside its network namespace).
    pub mode: crate::proxy::socket::SocketMode,
}

fn full(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// Same, and asks the server to close the connection after it.
fn full_and_close(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = full(status, body);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// An upgrade both sides agreed to, waiting for [`serve`] to relay it once hyper lets go of
/// the connection.
struct PendingUpgrade {
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
}

/// What is left to do with an HTTP/1 connection once hyper let go of it after a request that
/// asked to upgrade it (an `Upgrade` header, or CONNECT): hyper then hands the connection over
/// whatever the answer was, and dropping it would end the stream without the answer (an HBONE
/// stream dropped unfinished is reset).
enum AfterServe {
    /// Both sides switched protocols: relay bytes.
    Relay(PendingUpgrade),
    /// No switch (refused, denied, or declined by the app): close after the answer.
    Close(hyper::upgrade::OnUpgrade),
}

/// The connection's last request's [`AfterServe`], when it asked for an upgrade (HTTP/1: after
/// such a request the connection serves no other).
type UpgradeSlot = Arc<std::sync::Mutex<Option<AfterServe>>>;

/// Serves HTTP on `io` until the client closes, an error, or the connection is closed from
/// outside; an upgraded connection is relayed here too, so it stays registered (`guard`) and
/// closable until its bytes stop. Returns true when it ended in failure.
pub async fn serve<I>(
    wp: Arc<Waypoint>,
    io: I,
    client: Downstream,
    dst: SocketAddr,
    mut guard: ConnGuard,
) -> bool
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = guard.conn().clone();
    let verdicts = super::framing::Verdicts::default();
    let upgraded = UpgradeSlot::default();
    let io = super::framing::Watched::new(
        super::counting::Counting::new(io, conn.clone()),
        verdicts.clone(),
    );
    let svc = {
        let (wp, client, conn, upgraded) =
            (wp.clone(), client.clone(), conn.clone(), upgraded.clone());
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let (wp, client, conn, upgraded) =
                (wp.clone(), client.clone(), conn.clone(), upgraded.clone());
            let h1 = req.version() != Version::HTTP_2;
            // HTTP/1 requests are served one at a time, in order: this is this request's.
            let ambiguous = h1 && verdicts.next_is_ambiguous();
            // Present when hyper will hand the connection over after this request.
            let mut down = if h1 {
                req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>()
            } else {
                None
            };
            async move {
                let this = This {
                    wp: &wp,
                    client: &client,
                    dst,
                    conn: &conn,
                    upgraded: &upgraded,
                };
                let resp = handle(this, req, ambiguous, &mut down).await;
                // Not taken for a relay: the connection closes after this answer.
                if let Some(down) = down {
                    *crate::sync::lock(&upgraded) = Some(AfterServe::Close(down));
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEADER_BYTES)
        .timer(hyper_util::rt::TokioTimer::new());
    builder
        .http2()
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .timer(hyper_util::rt::TokioTimer::new());
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(served);
    let mut outcome = tokio::select! {
        r = served.as_mut() => match r {
            Ok(()) => Outcome::Closed,
            Err(e) => {
                tracing::debug!(error = %e, "waypoint connection ended with an error");
                Outcome::Failed(e.to_string())
            }
        },
        _ = conn.close.cancelled() => Outcome::Killed,
    };
    // hyper handed the connection over: relay it after a `101`, still tracked and closable;
    // otherwise end it cleanly, after the answer.
    let after = crate::sync::lock(&upgraded).take();
    if let (Outcome::Closed, Some(after)) = (&outcome, after) {
        outcome = tokio::select! {
            r = after_serve(after) => match r {
                Ok(()) => Outcome::Closed,
                Err(e) => {
                    tracing::debug!(error = %e, "upgraded waypoint connection ended with an error");
                    Outcome::Failed(e)
                }
            },
            _ = conn.close.cancelled() => Outcome::Killed,
        };
    }
    let failed = !matches!(outcome, Outcome::Closed);
    guard.set_outcome(outcome);
    failed
}

/// Copies bytes both ways between the client and the app once both upgrades completed, or
/// shuts the connection down when there was no switch.
async fn after_serve(after: AfterServe) -> Result<(), String> {
    let pending = match after {
        AfterServe::Relay(pending) => pending,
        AfterServe::Close(down) => {
            // Err: hyper kept the connection and closed it itself.
            if let Ok(down) = down.await {
                let _ = TokioIo::new(down).shutdown().await;
            }
            return Ok(());
        }
    };
    let down = pending
        .down
        .await
        .map_err(|e| format!("client side of the upgrade: {e}"))?;
    let up = pending
        .up
        .await
        .map_err(|e| format!("app side of the upgrade: {e}"))?;
    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
    tokio::io::copy_bidirectional(&mut down, &mut up)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// What one request's handling reads of its connection.
struct This<'a> {
    wp: &'a Arc<Waypoint>,
    client: &'a Downstream,
    dst: SocketAddr,
    conn: &'a Arc<Conn>,
    upgraded: &'a UpgradeSlot,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) that must not be forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// The request header Envoy names `x-forwarded-client-cert` (XFCC).
pub const XFCC: &str = "x-forwarded-client-cert";

/// Decides and forwards one request. `down` is the client side of the connection when hyper
/// will hand it over after this request; it is taken only to relay a WebSocket.
async fn handle(
    this: This<'_>,
    req: Request<Incoming>,
    ambiguous_framing: bool,
    down: &mut Option<hyper::upgrade::OnUpgrade>,
) -> Response<Body> {
    let This {
        wp,
        client,
        dst,
        conn,
        upgraded,
    } = this;
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let method = parts.method.clone();
    let raw_path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let named = authority(&parts.uri, &parts.headers);
    let authority_text = match &named {
        Ok(Some(a)) => a.as_str().to_string(),
        Ok(None) => String::new(),
        // Logged as received.
        Err(_) => parts
            .headers
            .get(header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .unwrap_or_default(),
    };
    let mut log = RequestLog {
        wp,
        client,
        dst,
        method: &method,
        authority: &authority_text,
        path: &raw_path,
        policy: String::new(),
        principal: String::new(),
        started,
        flags: "-",
    };

    // Ambiguous framing is a smuggling attempt: never forward it. Only the framing watch can
    // tell (hyper drops one of the conflicting headers before this point).
    if ambiguous_framing {
        return log.done(full_and_close(
            StatusCode::BAD_REQUEST,
            "bad request: ambiguous message framing\n",
        ));
    }
    // Only WebSocket may take the connection over (h2c would carry requests no policy sees).
    let upgrade = match upgrade_of(&parts.headers) {
        Ok(u) => u && parts.version == Version::HTTP_11,
        Err(()) => {
            return log.done(full_and_close(
                StatusCode::BAD_REQUEST,
                "bad request: only a websocket upgrade is allowed\n",
            ))
        }
    };
    let authority = match named {
        Ok(a) => a,
        Err(why) => {
            tracing::debug!(reason = why, "authority refused");
            return log.done(full_and_close(
                StatusCode::BAD_REQUEST,
                "bad request: Host\n",
            ));
        }
    };
    let target = match target(&parts.uri) {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(path = %raw_path, error = %e, "path refused");
            return log.done(full_and_close(
                StatusCode::BAD_REQUEST,
                "bad request: invalid path\n",
            ));
        }
    };

    let snap = wp.ctx.store.snapshot();
    let Some(dst_w) = snap.workload_by_ip(dst.ip()) else {
        return log.done(full(
            StatusCode::SERVICE_UNAVAILABLE,
            "destination unknown\n",
        ));
    };
    let authz = wp.ctx.policies.get(snap.generation, &snap.mesh);

    // The client's certificate details come from the tunnel, never from the client.
    parts.headers.remove(XFCC);
    let by = Identity::new(
        &wp.ctx.trust_domain,
        &dst_w.namespace,
        &dst_w.service_account,
    )
    .ok();
    if let Some(v) = client_cert_header(by.as_ref(), client.identity.as_ref()) {
        parts.headers.insert(XFCC, v);
    }

    // RequestAuthentication.
    let authn = wp.authenticator(&snap, dst_w);
    let result = match authn.as_ref() {
        Ok(a) => a.authenticate(&parts).await,
        // A RequestAuthentication that cannot be used fails closed.
        Err(e) => AuthnResult::Invalid(format!("RequestAuthentication unusable: {e}")),
    };
    if let AuthnResult::Invalid(reason) = &result {
        tracing::debug!(reason = %reason, "JWT refused");
        log.policy = "request-authentication".into();
        return log.done(full(StatusCode::UNAUTHORIZED, "Jwt verification fails\n"));
    }
    let request_auth = result.claims().map(|c| c.request_auth());
    if let Some(a) = &request_auth {
        log.principal = a.principal.clone();
    }

    // AuthorizationPolicy, L4 and L7 together, on the request as it will be forwarded.
    // Kept for an upgrade only, to decide it again while the connection lives.
    let decided = upgrade.then(|| UpgradedRequest {
        src_ip: client.addr.ip(),
        src_identity: client.identity.clone(),
        dst,
        method: method.as_str().to_string(),
        host: authority_text.clone(),
        path: target.path.clone(),
        headers: parts.headers.clone(),
        auth: request_auth.clone(),
    });
    let verdict = authz.check_http(
        &Connection {
            src_ip: client.addr.ip(),
            src_identity: client.identity.as_ref(),
            dst: dst_w,
            dst_ip: dst.ip(),
            dst_port: dst.port(),
        },
        &HttpRequest {
            method: method.as_str(),
            host: &authority_text,
            path: &target.path,
            headers: &parts.headers,
            auth: request_auth.as_ref(),
        },
    );
    log.policy = match verdict.decision.policy() {
        Some(p) => format!("{}/{}", p.namespace, p.name),
        None => "default".into(),
    };
    match verdict.decision {
        Decision::Allow { .. } => {}
        // Not evaluable safely (e.g. a lower-case method): a bad request, not a denial.
        Decision::Deny {
            reason: DenyReason::BadRequest,
            ..
        } => {
            return log.done(full_and_close(
                StatusCode::BAD_REQUEST,
                "bad request: cannot be evaluated safely\n",
            ))
        }
        Decision::Deny { .. } => {
            log.flags = "RBAC";
            return log.done(close_if(
                upgrade,
                full(StatusCode::FORBIDDEN, "RBAC: access denied"),
            ));
        }
    }
    drop(snap);

    // Forward.
    if let Ok(a) = authn.as_ref() {
        a.rewrite(&mut parts, &result);
    }
    let upgrade = upgrade && down.is_some();
    for h in HOP_BY_HOP {
        parts.headers.remove(h);
    }
    if upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        parts.headers.remove(header::UPGRADE);
    }
    let h2 = parts.version == Version::HTTP_2;
    // The authority policy matched is the one the app gets: `Host` over HTTP/1, `:authority`
    // (the URI's) over HTTP/2. The connection itself always goes to `dst`.
    parts.headers.remove(header::HOST);
    if let (Some(a), false) = (&authority, h2) {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
    }
    let uri_authority = authority
        .as_ref()
        .map(|a| a.as_str().to_string())
        .unwrap_or_else(|| dst.to_string());
    parts.uri = match Uri::builder()
        .scheme("http")
        .authority(uri_authority)
        .path_and_query(target.forwarded)
        .build()
    {
        Ok(u) => u,
        Err(_) => return log.done(full_and_close(StatusCode::BAD_REQUEST, "bad request\n")),
    };
    let forwarded = Request::from_parts(parts, body);
    let upstream = wp
        .upstream
        .client(client.addr.ip(), dst, h2, client.mode.clone());
    let mut resp = match upstream.request(forwarded).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(dst = %dst, error = %e, "waypoint: app unreachable");
            log.flags = "UF";
            return log.done(close_if(
                upgrade,
                full(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error\n"),
            ));
        }
    };
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    match (switched, upgrade.then(|| down.take()).flatten()) {
        (true, Some(down)) => {
            let up = hyper::upgrade::on(&mut resp);
            *crate::sync::lock(upgraded) = Some(AfterServe::Relay(PendingUpgrade { down, up }));
            if let Some(decided) = decided {
                let _ = conn.upgraded.set(Box::new(decided));
            }
        }
        // Switching protocols the client did not ask for would leave both sides lost.
        (true, None) => {
            return log.done(full_and_close(
                StatusCode::BAD_GATEWAY,
                "upstream switched protocols unasked\n",
            ))
        }
        (false, _) => {}
    }
    let (parts, body) = resp.into_parts();
    let mut resp = Response::from_parts(parts, body.boxed());
    for h in HOP_BY_HOP {
        if h != "connection" || !switched {
            resp.headers_mut().remove(h);
        }
    }
    // A declined upgrade: the framing watch stopped at its head, so nothing more is read.
    log.done(close_if(upgrade && !switched, resp))
}

/// `resp`, asking the server to close the connection after it when `close`.
fn close_if(close: bool, mut resp: Response<Body>) -> Response<Body> {
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Whether the request asks to upgrade to WebSocket (`Ok(true)`), asks for no upgrade
/// (`Ok(false)`), or asks for anything else, `h2c` included (`Err`): exactly one `Upgrade`
/// field naming the single protocol `websocket`, ASCII case aside, is accepted.
fn upgrade_of(headers: &HeaderMap) -> Result<bool, ()> {
    let mut values = headers.get_all(header::UPGRADE).iter();
    let Some(first) = values.next() else {
        return Ok(false);
    };
    let websocket = first
        .to_str()
        .is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    if websocket && values.next().is_none() {
        Ok(true)
    } else {
        Err(())
    }
}

/// The authority a request names: its target's (absolute form, HTTP/2 `:authority`) or its
/// `Host` header's. This is what `hosts` match and what the app receives. Refused: several
/// `Host` fields, one that is not an authority, or one that disagrees with the target's
/// (ASCII case aside; a port written on one side only is a disagreement).
pub fn authority(uri: &Uri, headers: &HeaderMap) -> Result<Option<Authority>, &'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(h), None) => Some(
            h.to_str()
                .ok()
                .and_then(|h| h.parse::<Authority>().ok())
                .ok_or("the Host header is not an authority")?,
        ),
        (Some(_), Some(_)) => return Err("several Host headers"),
    };
    match (uri.authority(), host) {
        (Some(target), Some(host)) if !target.as_str().eq_ignore_ascii_case(host.as_str()) => {
            Err("the Host header disagrees with the request target")
        }
        (Some(target), _) => Ok(Some(target.clone())),
        (None, host) => Ok(host),
    }
}

/// Why a request target cannot be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Its path cannot be normalized safely.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The normalized path and the query do not make a request target.
    #[error("{0}")]
    Invalid(#[from] http::uri::InvalidUri),
}

/// A request's target as the waypoint decides and forwards it.
#[derive(Clone, Debug)]
pub struct Target {
    /// The normalized path (`authz::normalize_path`), the one `paths`/`notPaths` match.
    pub path: String,
    /// What the app receives: exactly `path`, then `?` and the query as received when the
    /// request had one (the fragment, never sent by clients, is dropped by the URI parser).
    pub forwarded: PathAndQuery,
}

/// The path policy decides on, and the target forwarded with it: the same path.
pub fn target(uri: &Uri) -> Result<Target, TargetError> {
    let raw = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = normalize_path(raw)?;
    let forwarded = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    Ok(Target {
        forwarded: PathAndQuery::try_from(forwarded)?,
        path,
    })
}

/// The `x-forwarded-client-cert` value for a request from `client` (its verified mesh
/// identity) to the workload whose identity is `by`, in Envoy's format: `By=<server URI
/// SAN>;URI=<client URI SAN>`. None for a client without an identity (plaintext): the header is
/// then only removed. Envoy also writes `Hash` (the client certificate's digest) and `Subject`
/// (empty in Istio's certificates); weft does not, since a same-node client is identified
/// without a certificate of its own reaching the waypoint.
pub fn client_cert_header(by: Option<&Identity>, client: Option<&Identity>) -> Option<HeaderValue> {
    let client = client?;
    let value = match by {
        Some(by) => format!("By={by};URI={client}"),
        None => format!("URI={client}"),
    };
    HeaderValue::from_str(&value).ok()
}

/// A request that upgraded its connection, kept to be decided again when policies change.
#[derive(Debug)]
struct UpgradedRequest {
    src_ip: std::net::IpAddr,
    src_identity: Option<Identity>,
    dst: SocketAddr,
    method: String,
    host: String,
    path: String,
    headers: HeaderMap,
    auth: Option<RequestAuth>,
}

impl Recheck for UpgradedRequest {
    fn describe(&self) -> String {
        format!("websocket {} {}", self.method, self.path)
    }

    /// Decides the request again as [`handle`] did (its token's claims as validated then).
    fn check(&self, snap: &Snapshot, authz: &Authz) -> Result<(), String> {
        let dst_w = snap
            .workload_by_ip(self.dst.ip())
            .ok_or_else(|| format!("{} is no longer a known workload", self.dst.ip()))?;
        let verdict = authz.check_http(
            &Connection {
                src_ip: self.src_ip,
                src_identity: self.src_identity.as_ref(),
                dst: dst_w,
                dst_ip: self.dst.ip(),
                dst_port: self.dst.port(),
            },
            &HttpRequest {
                method: &self.method,
                host: &self.host,
                path: &self.path,
                headers: &self.headers,
                auth: self.auth.as_ref(),
            },
        );
        match verdict.decision {
            Decision::Allow { .. } => Ok(()),
            d => Err(format!("{} {} {d}", self.method, self.path)),
        }
    }
}

/// The service a request was for, as ztunnel guesses it at a destination: the destination
/// workload's service whose hostname (or short name) the request's host names, else its only
/// service.
fn request_service<'s>(
    snap: &'s Snapshot,
    dst: &crate::model::Workload,
    authority: &str,
) -> Option<&'s crate::model::Service> {
    let host = authority
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(authority, |(h, _)| h);
    let mut services = snap.services_of(&dst.uid);
    let first = services.next()?;
    let named = |s: &crate::model::Service| {
        host == s.hostname()
            || host == s.name
            || host == format!("{}.{}", s.name, s.namespace)
            || host == format!("{}.{}.svc", s.name, s.namespace)
    };
    if named(first) {
        return Some(first);
    }
    let mut only = true;
    for s in services {
        if named(s) {
            return Some(s);
        }
        only = false;
    }
    only.then_some(first)
}

/// One request's telemetry, written when the response is chosen.
struct RequestLog<'a> {
    wp: &'a Waypoint,
    client: &'a Downstream,
    dst: SocketAddr,
    method: &'a Method,
    authority: &'a str,
    path: &'a str,
    policy: String,
    principal: String,
    started: Instant,
    /// Envoy's response flag: `-`, `RBAC` (denied by policy), `UF` (the app unreachable).
    flags: &'static str,
}

impl RequestLog<'_> {
    fn done(self, resp: Response<Body>) -> Response<Body> {
        let status = resp.status().as_u16();
        let ms = self.started.elapsed().as_secs_f64() * 1e3;
        let snap = self.wp.ctx.store.snapshot();
        let src_w = snap.workload_by_ip(self.client.addr.ip()).map(|w| &**w);
        let dst_w = snap.workload_by_ip(self.dst.ip()).map(|w| &**w);
        let dst_identity = dst_w.and_then(|w| {
            Identity::new(&self.wp.ctx.trust_domain, &w.namespace, &w.service_account).ok()
        });
        let dst_service = dst_w.and_then(|w| request_service(&snap, w, self.authority));
        let sides = RequestSides {
            src_identity: self.client.identity.as_ref(),
            src_workload: src_w,
            dst_workload: dst_w,
            dst_identity: dst_identity.as_ref(),
            dst_service,
            response_flags: self.flags,
        };
        self.wp.metrics.record(&sides, status, ms);
        let src_identity = self
            .client
            .identity
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_default();
        let dst_identity = dst_identity.map(|i| i.to_string()).unwrap_or_default();
        fn end<'a>(
            addr: SocketAddr,
            w: Option<&'a Workload>,
            identity: &'a str,
        ) -> access::End<'a> {
            access::End {
                addr,
                workload: w.map_or("", |w| w.name.as_str()),
                namespace: w.map_or("", |w| w.namespace.as_str()),
                identity,
            }
        }
        access::request(
            &access::Common {
                direction: crate::metrics::Direction::Inbound.as_str(),
                protocol: "http",
                src: end(self.client.addr, src_w, &src_identity),
                dst: end(self.dst, dst_w, &dst_identity),
                dst_service: "",
            },
            &access::Request {
                method: self.method.as_str(),
                authority: self.authority,
                path: self.path,
                status,
                policy: &self.policy,
                jwt_principal: &self.principal,
            },
            self.started.elapsed(),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_forwarded_target_is_the_normalized_path_and_the_query_as_received() {
        for (raw, path, forwarded) in [
            ("/secret/../public/x", "/public/x", "/public/x"),
            ("/a/./b/%2e%2E/c?q=/../x&y", "/a/c", "/a/c?q=/../x&y"),
            ("/a\\..\\b?", "/b", "/b?"),
            ("/a/%2F/.//b", "/a/%2F//b", "/a/%2F//b"),
            ("/%41%5c", "/A%5c", "/A%5c"),
            ("http://h.example/x/../y?z", "/y", "/y?z"),
        ] {
            let t = target(&raw.parse().unwrap()).unwrap();
            assert_eq!(
                (t.path.as_str(), t.forwarded.as_str()),
                (path, forwarded),
                "{raw}"
            );
        }
        for raw in ["/a%00b", "/a%zz"] {
            assert!(target(&raw.parse().unwrap()).is_err(), "{raw}");
        }
    }

    proptest! {
        #[test]
        fn the_forwarded_path_is_the_path_policy_evaluates(
            pieces in proptest::collection::vec(proptest::sample::select(&[
                "/", "/", "a", "B", ".", "..", "%2e", "%2E%2e", "%2F", "%2f", "%5C", "\\", "%41",
                "%7e", "%25", "%", "%0", "%00", "~", "-", "?", "&", "=", "#", ";", "//",
            ][..]), 0..12)
        ) {
            let raw = format!("/{}", pieces.concat());
            let Ok(uri) = raw.parse::<Uri>() else { return Ok(()) };
            match target(&uri) {
                Ok(t) => {
                    // What `Authz::check_http` matches `paths` against for this request.
                    let evaluated = HttpRequest {
                        method: "GET",
                        host: "app",
                        path: &t.path,
                        headers: &HeaderMap::new(),
                        auth: None,
                    }
                    .normalized_path()
                    .unwrap();
                    prop_assert_eq!(t.forwarded.path(), evaluated.as_str());
                    prop_assert_eq!(t.forwarded.path(), t.path.as_str());
                    prop_assert_eq!(t.forwarded.query(), uri.query());
                    // And the app, parsing what it received, finds the same path again.
                    let received: Uri = t.forwarded.as_str().parse().unwrap();
                    prop_assert_eq!(normalize_path(received.path()).unwrap(), evaluated);
                }
                Err(_) => prop_assert!(normalize_path(uri.path_and_query().unwrap().as_str()).is_err()),
            }
        }
    }

    #[test]
    fn the_authority_is_the_targets_or_the_hosts_and_they_must_agree() {
        let uri = |u: &str| u.parse::<Uri>().unwrap();
        let ok = |u: &str, h: &[(&'static str, &'static str)]| {
            authority(&uri(u), &headers(h)).map(|a| a.map(|a| a.to_string()))
        };
        assert_eq!(ok("/x", &[("host", "app:80")]), Ok(Some("app:80".into())));
        assert_eq!(ok("http://app/x", &[]), Ok(Some("app".into())));
        assert_eq!(
            ok("http://App/x", &[("host", "aPP")]),
            Ok(Some("App".into()))
        );
        assert_eq!(ok("/x", &[]), Ok(None));
        assert!(ok("http://app/x", &[("host", "admin")]).is_err());
        assert!(ok("http://app/x", &[("host", "app:80")]).is_err());
        assert!(ok("/x", &[("host", "app"), ("host", "admin")]).is_err());
        assert!(ok("/x", &[("host", "a b")]).is_err());
    }

    #[test]
    fn only_a_single_websocket_upgrade_is_accepted() {
        assert_eq!(upgrade_of(&headers(&[])), Ok(false));
        assert_eq!(upgrade_of(&headers(&[("upgrade", "websocket")])), Ok(true));
        assert_eq!(
            upgrade_of(&headers(&[("upgrade", " WebSocket ")])),
            Ok(true)
        );
        for bad in [
            &[("upgrade", "h2c")][..],
            &[("upgrade", "websocket, h2c")],
            &[("upgrade", "h2c, websocket")],
            &[("upgrade", "websocket"), ("upgrade", "h2c")],
            &[("upgrade", "TLS/1.2")],
            &[("upgrade", "")],
        ] {
            assert_eq!(upgrade_of(&headers(bad)), Err(()), "{bad:?}");
        }
    }

    #[test]
    fn the_client_cert_header_names_the_server_and_the_verified_client() {
        let id = |sa: &str| Identity::new("cluster.local", "shop", sa).unwrap();
        assert_eq!(
            client_cert_header(Some(&id("web")), Some(&id("cart"))).unwrap(),
            "By=spiffe://cluster.local/ns/shop/sa/web;URI=spiffe://cluster.local/ns/shop/sa/cart"
        );
        assert_eq!(client_cert_header(Some(&id("web")), None), None);
    }
}
