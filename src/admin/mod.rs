//! The admin (`127.0.0.1:15000`), metrics (`:15020`) and readiness (`:15021`) HTTP servers.
//!
//! They run on their own single-threaded runtime in a dedicated thread, so a slow config
//! dump or scrape never takes a worker from the data path. They only read: the state store,
//! the certificates, the load status. Writes are limited to the log level and the request
//! to shut down, both through handles given to them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

mod dump;

use crate::config::Config;
use crate::identity::manager::CertManager;
use crate::logging::LogControl;
use crate::metrics::Metrics;
use crate::state::StateStore;

/// Errors starting the servers.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which server.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server thread could not be started.
    #[error("cannot start the admin thread: {0}")]
    Thread(std::io::Error),
}

/// What the admin servers read and the two things they may change.
pub struct AdminContext {
    /// The daemon config.
    pub config: Arc<Config>,
    /// The mesh state.
    pub store: Arc<StateStore>,
    /// Workload certificates.
    pub certs: Arc<CertManager>,
    /// The log filter.
    pub log: Arc<LogControl>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The data path (read-only use: connections, pool, compiled policies).
    pub proxy: Arc<crate::proxy::ProxyCtx>,
    /// The capture, when weft programs it (readiness waits for its rules).
    pub redirect: Option<Arc<crate::redirect::Redirector>>,
    /// In-pod capture's ZDS connection and served pods (`redirect: inpod`).
    pub inpod: Option<Arc<crate::inpod::Status>>,
    /// Set to `true` to shut the daemon down (`/quitquitquit`).
    pub shutdown: watch::Sender<bool>,
}

/// Why the daemon is not ready (`/healthz/ready` answers 503 with it).
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The first mesh load failed.
    #[error("mesh not loaded: {0}")]
    MeshFailed(String),
    /// The first mesh load has not finished.
    #[error("mesh not loaded yet from {0}")]
    MeshPending(String),
    /// The capture has not caught up with the mesh in force.
    #[error("capture rules not yet programmed for mesh generation {0}")]
    CaptureBehind(u64),
    /// Local enrolled identities without a valid certificate.
    #[error("waiting for certificates: {}", .0.join(", "))]
    Certificates(Vec<String>),
}

/// Why `/debug/explain` cannot answer (400, with the usage).
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// A required parameter is missing.
    #[error("missing {0}")]
    Missing(&'static str),
    /// `src` is no IP address.
    #[error("src {0:?} is not an IP address")]
    Src(String),
    /// `dst` is no IP address or IP:port.
    #[error("dst {0:?} is not an IP address or IP:port")]
    Dst(String),
    /// `dst` carries port 0.
    #[error("dst {0:?} has port 0 (1-65535)")]
    DstPortZero(String),
    /// `port` is no port.
    #[error("port {0:?} is not a port (1-65535)")]
    Port(String),
    /// The destination is not a workload.
    #[error("dst {0} is not a workload in the mesh")]
    NotAWorkload(std::net::IpAddr),
    /// `identity` with `plaintext=true`.
    #[error("identity and plaintext=true contradict each other")]
    Contradiction,
    /// `identity` is no SPIFFE id.
    #[error("identity {value:?}: {source}")]
    Identity {
        /// As given.
        value: String,
        /// Why.
        source: crate::identity::IdentityError,
    },
    /// A `header` is not `name:value`.
    #[error("header {0:?} is not name:value")]
    Header(String),
    /// The request cannot be built (a bad method, path or header).
    #[error("request: {0}")]
    Request(#[from] http::Error),
    /// The explanation cannot be written as JSON.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

impl AdminContext {
    /// `Ok` when the mesh is loaded and every local enrolled ServiceAccount has a cert;
    /// otherwise why not.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if !self.store.loaded() {
            let st = self.store.status();
            return Err(match &st.last_error {
                Some(e) => NotReady::MeshFailed(e.to_string()),
                None => NotReady::MeshPending(st.source.to_string()),
            });
        }
        let snap = self.store.snapshot();
        if let Some(r) = &self.redirect {
            if r.applied_generation() < snap.generation {
                return Err(NotReady::CaptureBehind(snap.generation));
            }
        }
        let missing: Vec<String> = self
            .proxy
            .missing_certificates(&snap)
            .iter()
            .map(|id| id.to_string())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(NotReady::Certificates(missing))
        }
    }

    /// The `/config_dump` document: ztunnel's keys in ztunnel's shape (so `istioctl
    /// ztunnel-config` reads it, see [`dump`]), and weft's own beside them.
    pub fn config_dump(&self) -> serde_json::Value {
        let snap = self.store.snapshot();
        let cfg = &self.config;
        let workloads: Vec<_> = snap
            .mesh
            .workloads
            .values()
            .map(|w| dump::workload(w, &snap, cfg))
            .collect();
        let services: Vec<_> = snap
            .mesh
            .services
            .values()
            .map(|s| dump::service(s, &snap))
            .collect();
        let conns = self.proxy.conns.list();
        json!({
            // ztunnel's keys.
            "workloads": workloads,
            "services": services,
            "policies": dump::policies(&snap, &cfg.root_namespace),
            "certificates": dump::certificates(&self.certs.certs()),
            "workloadState": dump::workload_state(&snap, cfg, &conns),
            // weft's.
            "node": cfg.node_name,
            "trustDomain": cfg.trust_domain,
            "rootNamespace": cfg.root_namespace,
            "clusterId": cfg.cluster_id(),
            "generation": snap.generation,
            "config": *self.store.status(),
            "namespaces": snap.mesh.namespaces.values().collect::<Vec<_>>(),
            "meshPolicies": snap.mesh.policies,
            "capture": self.redirect.as_ref().map(|r| r.status()),
            "inpod": self.inpod.as_ref().map(|s| s.view()),
        })
    }
}

type Body = Full<Bytes>;

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, v: &impl Serialize) -> Response<Body> {
    match serde_json::to_string_pretty(v) {
        Ok(s) => {
            let mut r = text(status, s + "\n");
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding failed: {e}\n"),
        ),
    }
}

const EXPLAIN_USAGE: &str =
    "usage: GET /debug/explain?src=IP&dst=IP&port=N  (dst=IP:PORT also works; \
optional identity=spiffe://... to set the client identity, or plaintext=true for a client \
without mTLS; by default a client that is an enrolled workload is taken as authenticated with \
its own identity)";

/// Who asks in a `/debug/explain` query: the client identity as the query sets it.
#[derive(Debug)]
enum ExplainClient {
    /// `identity=spiffe://...`.
    Identity(crate::identity::Identity),
    /// `plaintext=true`: a client without mTLS.
    Plaintext,
    /// Neither: an enrolled source workload is taken as authenticated with its own identity.
    Default,
}

/// The HTTP request of an L7 `/debug/explain` query (`method`, `path`, `host`, `header`,
/// `token`), built as the waypoint would receive it.
#[derive(Debug)]
struct ExplainHttp {
    method: String,
    path: String,
    host: String,
    parts: http::request::Parts,
}

/// A `/debug/explain` query string, read and checked before any state is looked at.
#[derive(Debug)]
struct ExplainQuery {
    src_ip: std::net::IpAddr,
    dst_ip: std::net::IpAddr,
    port: u16,
    client: ExplainClient,
    http: Option<ExplainHttp>,
}

impl ExplainQuery {
    /// Parses the query string of a `/debug/explain` request (without the `?`).
    fn parse(query: &str) -> Result<ExplainQuery, ExplainError> {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let headers_in: Vec<&str> = pairs
            .iter()
            .filter(|(k, _)| k == "header")
            .map(|(_, v)| v.as_str())
            .collect();
        let q: BTreeMap<&str, &str> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let get = |k: &str| q.get(k).copied().filter(|v| !v.is_empty());
        let src_ip: std::net::IpAddr = match get("src") {
            None => return Err(ExplainError::Missing("src")),
            Some(s) => s
                .parse::<std::net::IpAddr>()
                .or_else(|_| s.parse::<SocketAddr>().map(|a| a.ip()))
                .map_err(|_| ExplainError::Src(s.to_string()))?,
        };
        let dst_raw = get("dst").ok_or(ExplainError::Missing("dst"))?;
        let (dst_ip, port_in_dst) = match dst_raw.parse::<SocketAddr>() {
            Ok(a) => (a.ip(), Some(a.port())),
            Err(_) => (
                dst_raw
                    .parse::<std::net::IpAddr>()
                    .map_err(|_| ExplainError::Dst(dst_raw.to_string()))?,
                None,
            ),
        };
        let port = match (get("port"), port_in_dst) {
            (Some(p), _) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| ExplainError::Port(p.to_string()))?,
            (None, Some(0)) => return Err(ExplainError::DstPortZero(dst_raw.to_string())),
            (None, Some(p)) => p,
            (None, None) => return Err(ExplainError::Missing("port")),
        };
        let plaintext = matches!(get("plaintext"), Some("true" | "1" | "yes"));
        let client = match (get("identity"), plaintext) {
            (Some(_), true) => return Err(ExplainError::Contradiction),
            (Some(id), false) => {
                ExplainClient::Identity(id.parse().map_err(|source| ExplainError::Identity {
                    value: id.to_string(),
                    source,
                })?)
            }
            (None, true) => ExplainClient::Plaintext,
            (None, false) => ExplainClient::Default,
        };
        let l7 = get("method").is_some() || get("path").is_some() || get("token").is_some();
        let http = if l7 {
            let method = get("method").unwrap_or("GET").to_string();
            let path = get("path").unwrap_or("/").to_string();
            let host = get("host")
                .map(str::to_string)
                .unwrap_or_else(|| format!("{dst_ip}:{port}"));
            let mut builder = http::Request::builder()
                .method(method.as_str())
                .uri(path.as_str());
            for h in &headers_in {
                let (name, value) = h
                    .split_once(':')
                    .ok_or_else(|| ExplainError::Header(h.to_string()))?;
                builder = builder.header(name.trim(), value.trim());
            }
            if let Some(t) = get("token") {
                builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let (parts, ()) = builder.body(())?.into_parts();
            Some(ExplainHttp {
                method,
                path,
                host,
                parts,
            })
        } else {
            None
        };
        Ok(ExplainQuery {
            src_ip,
            dst_ip,
            port,
            client,
            http,
        })
    }
}

/// `/debug/explain` and `/logging` read their query strings as the admin server does, for the
/// fuzz targets (`crate::fuzzing`): `Ok` when the explain query is well-formed; the level
/// given to `/logging` checked by `log` (as [`LogControl::set`] does).
pub(crate) fn read_queries(query: &str, log: &LogControl) -> (bool, bool) {
    let explain = ExplainQuery::parse(query).is_ok();
    let level = match logging_level(query) {
        Some(level) => log.set(&level).is_ok(),
        None => false,
    };
    (explain, level)
}

/// The `level` of a `/logging` query string.
/// The filter a `/logging` query asks for: `level=L`, as ztunnel's admin reads it (and
/// `istioctl ztunnel-config log` sends it): an empty `level` alone only reads the filter, and
/// `reset` goes back to the default, `info`, before `level` applies.
fn logging_level(query: &str) -> Option<String> {
    let mut q = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect::<BTreeMap<String, String>>();
    let level = q.remove("level").filter(|l| !l.is_empty());
    match (level, q.contains_key("reset")) {
        (Some(l), _) => Some(l),
        (None, true) => Some("info".to_string()),
        (None, false) => None,
    }
}

/// `/debug/explain`: what the policies in force would decide, without sending traffic. With
/// `method` or `path` (and optionally `host`, repeated `header=name:value`, `token`) it
/// explains one HTTP request as the waypoint would decide it.
async fn explain(
    ctx: &AdminContext,
    req: &Request<Incoming>,
) -> Result<serde_json::Value, ExplainError> {
    let ExplainQuery {
        src_ip,
        dst_ip,
        port,
        client,
        http,
    } = ExplainQuery::parse(req.uri().query().unwrap_or(""))?;
    let snap = ctx.store.snapshot();
    let dst = snap
        .workload_by_ip(dst_ip)
        .ok_or(ExplainError::NotAWorkload(dst_ip))?;
    let identity: Option<crate::identity::Identity> = match client {
        ExplainClient::Identity(id) => Some(id),
        ExplainClient::Plaintext => None,
        ExplainClient::Default => snap
            .workload_by_ip(src_ip)
            .filter(|w| w.enrollment.is_enrolled())
            .and_then(|w| ctx.proxy.identity_of(w)),
    };
    let authz = ctx.proxy.authz(&snap);
    let conn = crate::authz::Connection {
        src_ip,
        src_identity: identity.as_ref(),
        dst,
        dst_ip,
        dst_port: port,
    };
    let (explanation, jwt) = if let Some(ExplainHttp {
        method,
        path,
        host,
        parts,
    }) = http
    {
        let authn = ctx.proxy.waypoint.authenticator(&snap, dst);
        let result = match authn.as_ref() {
            Ok(a) => a.authenticate(&parts).await,
            Err(e) => crate::waypoint::jwt::AuthnResult::Invalid(e.to_string()),
        };
        let jwt = match &result {
            crate::waypoint::jwt::AuthnResult::NoToken => json!("no token"),
            crate::waypoint::jwt::AuthnResult::Valid(c) => {
                json!({"valid": true, "principal": c.principal})
            }
            crate::waypoint::jwt::AuthnResult::Invalid(r) => {
                json!({"valid": false, "reason": r, "answer": 401})
            }
        };
        let auth = result.claims().map(|c| c.request_auth());
        let e = authz.explain_http(
            &conn,
            &crate::authz::HttpRequest {
                method: &method,
                host: &host,
                path: &path,
                headers: &parts.headers,
                auth: auth.as_ref(),
            },
        );
        (e, Some(jwt))
    } else {
        (authz.explain(&conn), None)
    };
    let mut v = serde_json::to_value(&explanation)?;
    if let (Some(obj), Some(jwt)) = (v.as_object_mut(), jwt) {
        obj.insert("jwt".into(), jwt);
        obj.insert(
            "waypoint".into(),
            json!(crate::waypoint::applies(&snap, &authz, dst)),
        );
    }
    if let Some(obj) = v.as_object_mut() {
        obj.insert("source".into(), json!({
            "ip": src_ip,
            "identity": identity.as_ref().map(|i| i.to_string()),
            "workload": snap.workload_by_ip(src_ip).map(|w| format!("{}/{}", w.namespace, w.name)),
        }));
        obj.insert(
            "destination".into(),
            json!({
                "ip": dst_ip, "port": port, "workload": format!("{}/{}", dst.namespace, dst.name),
            }),
        );
        obj.insert("generation".into(), json!(snap.generation));
    }
    Ok(v)
}

const ADMIN_INDEX: &str = "weft admin endpoints:\n  GET  /config_dump\n  GET  /connections\n  GET  /debug/explain?src=IP&dst=IP&port=N\n  GET  /healthz/ready\n  GET  /logging            show the log filter\n  POST /logging?level=L    set it (GET with level= also sets)\n  POST /quitquitquit       drain and exit\n";

fn method_not_allowed(allowed: &str) -> Response<Body> {
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allowed}\n"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(allowed) {
        r.headers_mut().insert(hyper::header::ALLOW, v);
    }
    r
}

/// Routes one admin request.
fn admin(ctx: &AdminContext, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let method = req.method();
    match path {
        "/" => text(StatusCode::OK, ADMIN_INDEX),
        "/config_dump" => match *method {
            Method::GET => json_response(StatusCode::OK, &ctx.config_dump()),
            _ => method_not_allowed("GET"),
        },
        "/healthz/ready" => ready(ctx, method),
        "/connections" => match *method {
            Method::GET => {
                let conns = ctx.proxy.conns.list();
                let views: Vec<_> = conns.iter().map(|c| c.view()).collect();
                json_response(
                    StatusCode::OK,
                    &json!({ "connections": views, "pool": ctx.proxy.pool.view() }),
                )
            }
            _ => method_not_allowed("GET"),
        },
        "/logging" => {
            let level = logging_level(req.uri().query().unwrap_or(""));
            match (method, level) {
                (&Method::GET, None) => {
                    text(StatusCode::OK, format!("level: {}\n", ctx.log.current()))
                }
                (&Method::GET | &Method::POST, Some(level)) => match ctx.log.set(&level) {
                    Ok(()) => {
                        tracing::info!(level = %level, "log level changed");
                        text(StatusCode::OK, format!("level: {level}\n"))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
                // Reads the filter, as ztunnel's `POST /logging` does (`istioctl zc log`).
                (&Method::POST, None) => {
                    text(StatusCode::OK, format!("level: {}\n", ctx.log.current()))
                }
                _ => method_not_allowed("GET, POST"),
            }
        }
        // GET is answered asynchronously (it may verify a token): see `serve`.
        "/debug/explain" => method_not_allowed("GET"),
        "/quitquitquit" => match *method {
            Method::POST => {
                tracing::info!("shutdown requested through /quitquitquit");
                ctx.shutdown.send_replace(true);
                text(StatusCode::OK, "OK\n")
            }
            _ => method_not_allowed("POST"),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            format!("no such endpoint {path}\n\n{ADMIN_INDEX}"),
        ),
    }
}

fn ready(ctx: &AdminContext, method: &Method) -> Response<Body> {
    if method != Method::GET && method != Method::HEAD {
        return method_not_allowed("GET");
    }
    match ctx.readiness() {
        // Ready, but say it when local enrolled pods' IPv6 is refused rather than captured.
        Ok(()) => match ctx.redirect.as_ref().map(|r| r.status()) {
            Some(status) => match (status.ipv6_refused, refused_ipv6(&status.pods)) {
                (Some(why), n) if n > 0 => text(
                    StatusCode::OK,
                    format!("ready; IPv6 of local enrolled pods is refused, not captured ({n} addresses): {why}\n"),
                ),
                _ => text(StatusCode::OK, "ready\n"),
            },
            None => text(StatusCode::OK, "ready\n"),
        },
        Err(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// How many IPv6 addresses of local enrolled pods the capture refuses.
fn refused_ipv6(pods: &[crate::redirect::PodCapture]) -> usize {
    pods.iter()
        .filter(|p| {
            matches!(
                p,
                crate::redirect::PodCapture::Pending {
                    ip: std::net::IpAddr::V6(_),
                    ..
                }
            )
        })
        .count()
}

fn metrics(ctx: &AdminContext, req: &Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") | (&Method::GET, "/stats/prometheus") => {
            match ctx.metrics.encode() {
                Ok(body) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding failed: {e}\n"),
                ),
            }
        }
        (_, "/metrics") => method_not_allowed("GET"),
        (_, p) => text(
            StatusCode::NOT_FOUND,
            format!("no such endpoint {p}; try /metrics\n"),
        ),
    }
}

fn readiness(ctx: &AdminContext, req: &Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/healthz/ready" => ready(ctx, req.method()),
        p => text(
            StatusCode::NOT_FOUND,
            format!("no such endpoint {p}; try /healthz/ready\n"),
        ),
    }
}

type Route = fn(&AdminContext, &Request<Incoming>) -> Response<Body>;

/// Running admin servers; dropping it does not stop them, [`AdminServers::join`] after
/// shutdown does.
pub struct AdminServers {
    thread: std::thread::JoinHandle<()>,
    /// The addresses actually bound (admin, metrics, readiness).
    pub addrs: [SocketAddr; 3],
}

impl AdminServers {
    /// Waits for the server thread to finish (after shutdown was signalled).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Binds the three listeners now (so a taken port fails start-up) and serves them on a
/// dedicated thread until `shutdown` turns true.
pub fn start(
    ctx: Arc<AdminContext>,
    shutdown: watch::Receiver<bool>,
) -> Result<AdminServers, AdminError> {
    let l = &ctx.config.listen;
    // Capturing, the ports are shared (`SO_REUSEPORT`) like the data path's, so a new weft
    // starts beside a draining one.
    let shared = ctx.config.redirect == crate::config::Redirect::Tproxy;
    let bind = |what: &'static str, addr: SocketAddr| {
        crate::proxy::socket::listen_plain(addr, shared).map_err(|source| AdminError::Bind {
            what,
            addr,
            source,
        })
    };
    let admin_l = bind("admin", l.admin)?;
    let metrics_l = bind("metrics", l.metrics)?;
    let ready_l = bind("readiness", l.readiness)?;
    let addrs = [
        admin_l.local_addr().unwrap_or(l.admin),
        metrics_l.local_addr().unwrap_or(l.metrics),
        ready_l.local_addr().unwrap_or(l.readiness),
    ];
    let thread = std::thread::Builder::new()
        .name("weft-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the admin runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let servers: [(std::net::TcpListener, Route, &'static str); 3] = [
                    (admin_l, admin, "admin"),
                    (metrics_l, metrics, "metrics"),
                    (ready_l, readiness, "readiness"),
                ];
                let mut tasks = Vec::new();
                for (listener, route, name) in servers {
                    let limiter = crate::proxy::limit::Limiter::new(
                        name,
                        ADMIN_LIMITS,
                        ctx.metrics.limits.clone(),
                    );
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => tasks.push(tokio::spawn(serve(
                            l,
                            limiter,
                            ctx.clone(),
                            route,
                            name == "admin",
                            shutdown.clone(),
                        ))),
                        Err(e) => tracing::error!(error = %e, "cannot register admin listener"),
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        })
        .map_err(AdminError::Thread)?;
    Ok(AdminServers { thread, addrs })
}

/// Connections each of the admin, metrics and readiness servers holds at once, in all and
/// from one address (Prometheus, the kubelet and an operator need a handful).
pub const ADMIN_LIMITS: crate::proxy::limit::Limits = crate::proxy::limit::Limits {
    total: 64,
    per_source: 16,
};

/// How long a client may take to send a request's head, and how long an idle keep-alive
/// connection stays open: a slow or silent client is closed after this.
pub const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The most a request's head (request line and headers) may take; no admin endpoint reads a
/// body.
pub const ADMIN_MAX_HEAD: usize = 16 * 1024;

async fn serve(
    listener: tokio::net::TcpListener,
    limiter: Arc<crate::proxy::limit::Limiter>,
    ctx: Arc<AdminContext>,
    route: Route,
    is_admin: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, permit) = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => match limiter.admit(peer.ip()) {
                    Ok(permit) => (s, permit),
                    Err(_) => {
                        crate::proxy::socket::reset_on_close(&s);
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::sync::shut_down(&mut shutdown) => return,
        };
        let ctx = ctx.clone();
        let mut conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let ctx = ctx.clone();
                async move {
                    let explain_here = is_admin
                        && req.uri().path() == "/debug/explain"
                        && req.method() == Method::GET;
                    let resp = if explain_here {
                        match explain(&ctx, &req).await {
                            Ok(v) => json_response(StatusCode::OK, &v),
                            Err(e) => {
                                text(StatusCode::BAD_REQUEST, format!("{e}\n\n{EXPLAIN_USAGE}"))
                            }
                        }
                    } else {
                        route(&ctx, &req)
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            // The header timeout also closes a keep-alive connection idle for as long: hyper
            // starts it whenever it waits for a request's head.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .max_buf_size(ADMIN_MAX_HEAD)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "admin connection error");
                    }
                }
                _ = crate::sync::shut_down(&mut conn_shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn).await;
                }
            }
        });
    }
}
