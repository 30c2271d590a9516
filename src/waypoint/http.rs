//! The waypoint's HTTP side: terminates HTTP/1.1 and HTTP/2 (prior knowledge) on an inbound
//! connection that already passed mTLS and PeerAuthentication, makes one decision per request
//! (RequestAuthentication, then L7 AuthorizationPolicy), and forwards allowed requests to the
//! app over pooled connections that keep the client's address.
//!
//! Denied requests get `403 RBAC: access denied` and the connection stays usable; an invalid
//! token gets `401`; a path that cannot be normalised safely, or a request whose framing is
//! ambiguous (both `Content-Length` and `Transfer-Encoding`), gets `400` and the connection is
//! closed without anything reaching the app. HTTP/1.1 upgrades (WebSocket) are passed through
//! once the app accepts them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Waypoint;
use crate::authz::{Connection, Decision, DenyReason, HttpRequest};
use crate::identity::Identity;
use crate::metrics::RequestSides;
use crate::proxy::conntrack::{ConnGuard, Outcome};
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

/// Serves HTTP on `io` until the client closes, an error, or the connection is closed from
/// outside. Returns true when it ended in failure.
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
    let io = super::framing::Watched::new(
        super::counting::Counting::new(io, conn.clone()),
        verdicts.clone(),
    );
    let svc = {
        let (wp, client) = (wp.clone(), client.clone());
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let (wp, client) = (wp.clone(), client.clone());
            // HTTP/1 requests are served one at a time, in order: this is this request's.
            let ambiguous = req.version() != Version::HTTP_2 && verdicts.next_is_ambiguous();
            async move { Ok::<_, Infallible>(handle(wp, client, dst, req, ambiguous).await) }
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
    let failed = tokio::select! {
        r = served.as_mut() => match r {
            Ok(()) => false,
            Err(e) => {
                tracing::debug!(error = %e, "waypoint connection ended with an error");
                guard.set_outcome(Outcome::Failed(e.to_string()));
                true
            }
        },
        _ = conn.close.cancelled() => {
            guard.set_outcome(Outcome::Killed);
            true
        }
    };
    if !failed {
        guard.set_outcome(Outcome::Closed);
    }
    failed
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

async fn handle(
    wp: Arc<Waypoint>,
    client: Downstream,
    dst: SocketAddr,
    req: Request<Incoming>,
    ambiguous_framing: bool,
) -> Response<Body> {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let method = parts.method.clone();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let raw_path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let mut log = RequestLog {
        wp: &wp,
        client: &client,
        dst,
        method: &method,
        authority: &authority,
        path: &raw_path,
        policy: String::new(),
        principal: String::new(),
        started,
    };

    // Ambiguous framing is a smuggling attempt: never forward it. Only the framing watch can
    // tell (hyper drops one of the conflicting headers before this point).
    if ambiguous_framing {
        return log.done(full_and_close(
            StatusCode::BAD_REQUEST,
            "bad request: ambiguous message framing (Content-Length with Transfer-Encoding)\n",
        ));
    }
    let path = match crate::authz::normalize_path(&raw_path) {
        Ok(p) => p,
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

    // AuthorizationPolicy, L4 and L7 together.
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
            host: &authority,
            path: &path,
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
            return log.done(full(StatusCode::FORBIDDEN, "RBAC: access denied"))
        }
    }
    drop(snap);

    // Forward.
    if let Ok(a) = authn.as_ref() {
        a.rewrite(&mut parts, &result);
    }
    let upgrade = parts.version == Version::HTTP_11 && parts.headers.contains_key(header::UPGRADE);
    let mut downstream_upgrade = None;
    let mut req = Request::from_parts(parts, body);
    if upgrade {
        downstream_upgrade = Some(hyper::upgrade::on(&mut req));
    }
    let (mut parts, body) = req.into_parts();
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
    if parts.headers.get(header::HOST).is_none() && !authority.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&authority) {
            parts.headers.insert(header::HOST, v);
        }
    }
    let h2 = parts.version == Version::HTTP_2;
    parts.uri = match format!("http://{dst}{}", path_and_query(&raw_path)).parse() {
        Ok(u) => u,
        Err(_) => return log.done(full_and_close(StatusCode::BAD_REQUEST, "bad request\n")),
    };
    let forwarded = Request::from_parts(parts, body);
    let upstream = wp.upstream.client(client.addr.ip(), dst, h2, wp.ctx.mode);
    let mut resp = match upstream.request(forwarded).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(dst = %dst, error = %e, "waypoint: app unreachable");
            return log.done(full(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error\n",
            ));
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(down) = downstream_upgrade {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(down), Ok(up)) = (down.await, up.await) {
                    let mut down = TokioIo::new(down);
                    let mut up = TokioIo::new(up);
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    }
    let (parts, body) = resp.into_parts();
    let mut resp = Response::from_parts(parts, body.boxed());
    for h in HOP_BY_HOP {
        if h != "connection" || resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            resp.headers_mut().remove(h);
        }
    }
    log.done(resp)
}

/// The request target without its scheme and authority.
fn path_and_query(raw: &str) -> &str {
    if raw.starts_with('/') {
        raw
    } else {
        "/"
    }
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
        let sides = RequestSides {
            src_identity: self.client.identity.as_ref(),
            src_workload: src_w,
            dst_workload: dst_w,
            dst_identity: dst_identity.as_ref(),
        };
        self.wp.metrics.record(&sides, status, ms);
        tracing::info!(
            target: "access",
            kind = "http",
            method = %self.method,
            authority = %self.authority,
            path = %self.path,
            status,
            src = %self.client.addr,
            src_identity = %self.client.identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
            dst = %self.dst,
            policy = %self.policy,
            jwt_principal = %self.principal,
            duration_ms = ms,
            "request"
        );
        resp
    }
}
