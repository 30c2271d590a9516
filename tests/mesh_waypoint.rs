//! The in-binary waypoint on real traffic in network namespaces: L7 AuthorizationPolicy per
//! request on a keep-alive connection, JWTs checked against a JWKS served over HTTPS from
//! another pod, and malformed or ambiguous requests refused. Needs root.

mod support;

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use support::l7::{es256, send};
use support::mesh::*;

const ISSUER: &str = "https://issuer.test";

/// An HTTP app in pod `c`: answers `<method> <path> from <peer ip> auth=<authorization>
/// <version> xfcc=<x-forwarded-client-cert>`; a WebSocket upgrade is accepted and echoes.
fn run_app(env: &MeshEnv, rt: &tokio::runtime::Runtime) {
    let c = env.pod("c");
    let l =
        c.ns.tcp_listen(SocketAddr::new(IpAddr::V4(c.ip), 8080))
            .unwrap();
    l.set_nonblocking(true).unwrap();
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        loop {
            let Ok((s, peer)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |mut req: hyper::Request<hyper::body::Incoming>| async move {
                        if req.headers().contains_key("upgrade") {
                            // An echo protocol behind an HTTP/1.1 upgrade.
                            let up = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(up) = up.await {
                                    let mut io = hyper_util::rt::TokioIo::new(up);
                                    let mut b = [0u8; 4];
                                    if tokio::io::AsyncReadExt::read_exact(&mut io, &mut b)
                                        .await
                                        .is_ok()
                                    {
                                        let _ =
                                            tokio::io::AsyncWriteExt::write_all(&mut io, &b).await;
                                    }
                                }
                            });
                            let mut r =
                                hyper::Response::new(http_body_util::Full::new(Bytes::new()));
                            *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                            r.headers_mut().insert(
                                "upgrade",
                                hyper::header::HeaderValue::from_static("websocket"),
                            );
                            r.headers_mut().insert(
                                "connection",
                                hyper::header::HeaderValue::from_static("upgrade"),
                            );
                            return Ok::<_, Infallible>(r);
                        }
                        let header = |name: &str| {
                            let values: Vec<&str> = req
                                .headers()
                                .get_all(name)
                                .iter()
                                .map(|v| v.to_str().unwrap_or("?"))
                                .collect();
                            values.join(" | ")
                        };
                        let body = format!(
                            "{} {} from {} auth={} {:?} xfcc={}",
                            req.method(),
                            req.uri().path(),
                            peer.ip(),
                            header("authorization"),
                            req.version(),
                            header("x-forwarded-client-cert"),
                        );
                        Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                            Bytes::from(body),
                        )))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(s), svc)
                .await;
            });
        }
    });
}

/// A JWKS over HTTPS in pod `keys` (its certificate is written for the weft config).
fn run_jwks(env: &MeshEnv, rt: &tokio::runtime::Runtime, jwks: String) -> std::path::PathBuf {
    let k = env.pod("keys");
    let ca = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![k.ip.to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let ca_file = env.bed.temp_dir().join("jwks-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let l =
        k.ns.tcp_listen(SocketAddr::new(IpAddr::V4(k.ip), 8443))
            .unwrap();
    l.set_nonblocking(true).unwrap();
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let (acceptor, jwks) = (acceptor.clone(), jwks.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| {
                    let jwks = jwks.clone();
                    async move {
                        Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                            Bytes::from(jwks),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    ca_file
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: c.shop\r\n{extra}\r\n")
}

#[test]
fn the_waypoint_enforces_l7_policy_and_jwt_per_request() {
    let Some(mut env) = MeshEnv::start(
        2,
        &[("shop", true), ("infra", false)],
        &[
            pod("a", 1, "shop"),
            pod("c", 2, "shop"),
            pod("keys", 1, "infra"),
        ],
        &[],
    ) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    run_app(&env, &rt);
    let good = es256("k1");
    let stranger = es256("k1"); // same kid, another key: signature must fail
    let jwks = serde_json::json!({"keys": [good.jwk]}).to_string();
    let ca_file = run_jwks(&env, &rt, jwks);
    // Trust the JWKS server and restart node-2's weft with it.
    let cfg = std::fs::read_to_string(env.config_path(2)).unwrap()
        + &format!("waypoint: {{jwksCaFile: {}}}\n", ca_file.display());
    std::fs::write(env.config_path(2), cfg).unwrap();
    env.daemon(2).stop(Duration::from_secs(10)).unwrap();
    env.start_daemon(2);
    env.wait_ready(2);
    let keys_ip = env.pod("keys").ip;
    env.extra_yaml = format!(
        "---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: c-jwt, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: c}}}}
  jwtRules:
  - issuer: {ISSUER}
    jwksUri: https://{keys_ip}:8443/jwks.json
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: c-l7, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: c}}}}
  action: ALLOW
  rules:
  - to: [{{operation: {{methods: [GET], paths: [\"/public*\"]}}}}]
  - from: [{{source: {{requestPrincipals: [\"{ISSUER}/*\"]}}}}]
    to: [{{operation: {{methods: [GET], paths: [\"/secure*\"]}}}}]
"
    );
    env.write_mesh();
    env.wait_generation(2, 2);

    let c = SocketAddr::new(IpAddr::V4(env.pod("c").ip), 8080);
    let connect = || {
        let s = env
            .pod("a")
            .ns
            .tcp_connect(c, Duration::from_secs(5))
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let mut s = connect();
    // GET allowed, POST denied, on one keep-alive connection.
    let (st, body, kept) = send(&mut s, &get("/public/x", ""));
    assert_eq!(st, 200, "{body}\n{}", env.log(2));
    assert!(
        body.starts_with(&format!("GET /public/x from {}", env.pod("a").ip)),
        "the app sees the client pod: {body}"
    );
    assert!(kept);
    let (st, body, kept) = send(
        &mut s,
        "POST /public/x HTTP/1.1\r\nHost: c.shop\r\nContent-Length: 2\r\n\r\nhi",
    );
    assert_eq!((st, body.as_str()), (403, "RBAC: access denied"));
    assert!(kept, "a denied request leaves the connection usable");
    let (st, _, _) = send(&mut s, &get("/public/y", ""));
    assert_eq!(st, 200);
    // JWT.
    let (st, _, _) = send(&mut s, &get("/secure/1", ""));
    assert_eq!(st, 403, "requestPrincipals makes the token mandatory");
    let bearer = |t: &str| format!("Authorization: Bearer {t}\r\n");
    let (st, body, _) = send(
        &mut s,
        &get("/secure/1", &bearer(&good.token(ISSUER, "k1", 300))),
    );
    assert_eq!(st, 200, "{body}\n{}", env.log(2));
    assert!(
        body.contains("auth= "),
        "the token is not forwarded by default: {body}"
    );
    let (st, _, _) = send(
        &mut s,
        &get("/secure/1", &bearer(&good.token(ISSUER, "k1", -600))),
    );
    assert_eq!(st, 401, "expired");
    let (st, _, _) = send(
        &mut s,
        &get("/secure/1", &bearer(&stranger.token(ISSUER, "k1", 300))),
    );
    assert_eq!(st, 401, "signed by an unknown key");
    let (st, _, _) = send(&mut s, &get("/public/z", &bearer("not.a.jwt")));
    assert_eq!(
        st, 401,
        "a present but invalid token is refused even where not required"
    );

    // Metrics and per-request access log.
    let (_, metrics) = env
        .bed
        .node(2)
        .ns
        .http_get("127.0.0.1:15020".parse().unwrap(), "/metrics")
        .unwrap();
    for code in ["200", "403", "401"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_requests_total{")
                    && l.contains(&format!("response_code=\"{code}\""))),
            "{code}: {metrics}"
        );
    }
    assert!(
        metrics.contains("istio_request_duration_milliseconds_bucket{"),
        "{metrics}"
    );
    let log = env.log_with(
        2,
        &[
            "method=POST",
            "status=403",
            "policy=default",
            "jwt_principal=https://issuer.test/alice",
        ],
    );
    assert!(
        log.contains("method=POST") && log.contains("status=403") && log.contains("policy=default"),
        "{log}"
    );
    assert!(
        log.contains("jwt_principal=https://issuer.test/alice"),
        "{log}"
    );

    // x-forwarded-client-cert is the waypoint's, from the verified peer, never the client's;
    // a plaintext client (pod keys is not in the mesh) has none.
    let forged = "x-forwarded-client-cert: By=spiffe://cluster.local/ns/shop/sa/c;URI=spiffe://cluster.local/ns/shop/sa/admin\r\n";
    let mut s = connect();
    let (st, body, _) = send(&mut s, &get("/public/xfcc", forged));
    assert_eq!(st, 200, "{body}");
    assert!(
        body.ends_with(
            " xfcc=By=spiffe://cluster.local/ns/shop/sa/c;URI=spiffe://cluster.local/ns/shop/sa/a"
        ),
        "{body}"
    );
    let mut plain = env
        .pod("keys")
        .ns
        .tcp_connect(c, Duration::from_secs(5))
        .unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (st, body, _) = send(&mut plain, &get("/public/xfcc", forged));
    assert_eq!(st, 200, "{body}");
    assert!(body.ends_with(" xfcc="), "{body}");

    // Ambiguous framing: 400, connection closed, nothing reaches the app.
    let mut s = connect();
    let (st, _, kept) = send(&mut s, "POST /public/x HTTP/1.1\r\nHost: c.shop\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert_eq!(st, 400);
    assert!(!kept);
    // Malformed request line.
    let mut s = connect();
    let (st, _, _) = send(&mut s, "GET\r\n\r\n");
    assert_eq!(st, 400);
    // A lower-case method cannot be matched against policy safely: 400 and closed, not 403.
    let mut s = connect();
    let (st, _, kept) = send(&mut s, "get /public/x HTTP/1.1\r\nHost: c.shop\r\n\r\n");
    assert_eq!(st, 400);
    assert!(!kept);
    // Oversized headers.
    let mut s = connect();
    let big = format!("X-Big: {}\r\n", "a".repeat(100 * 1024));
    s.write_all(get("/public/x", &big).as_bytes()).unwrap_or(());
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    assert!(
        buf.starts_with("HTTP/1.1 431") || buf.starts_with("HTTP/1.1 400"),
        "{buf}"
    );
    // A WebSocket upgrade passed through once the app accepts it; any other upgrade (h2c
    // would let the client speak HTTP/2 to the app past the per-request decisions) is refused.
    let mut s = connect();
    let (st, _, kept) = send(
        &mut s,
        "GET /public/h2c HTTP/1.1\r\nHost: c.shop\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    );
    assert_eq!(st, 400);
    assert!(!kept);
    let mut s = connect();
    let (st, body, _) = send(
        &mut s,
        "GET /public/ws HTTP/1.1\r\nHost: c.shop\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    assert_eq!(st, 101, "{body}");
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");

    // HTTP/2 with prior knowledge: one decision per request, forwarded as HTTP/2.
    let s = env
        .pod("a")
        .ns
        .tcp_connect(c, Duration::from_secs(5))
        .unwrap();
    s.set_nonblocking(true).unwrap();
    let statuses = rt.block_on(async move {
        let s = tokio::net::TcpStream::from_std(s).unwrap();
        let (mut h2, conn) = h2::client::handshake(s).await.unwrap();
        tokio::spawn(conn);
        let mut out = Vec::new();
        for (method, path) in [
            ("GET", "/public/h2"),
            ("POST", "/public/h2"),
            ("GET", "/public/again"),
        ] {
            let req = http::Request::builder()
                .method(method)
                .uri(format!("http://c.shop{path}"))
                .body(())
                .unwrap();
            let (resp, _) = h2.send_request(req, true).unwrap();
            let resp = resp.await.unwrap();
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let mut text = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
                text.extend_from_slice(&chunk);
            }
            out.push((status, String::from_utf8_lossy(&text).into_owned()));
        }
        out
    });
    assert_eq!(statuses[0].0, 200, "{statuses:?}");
    assert!(
        statuses[0].1.contains("HTTP/2"),
        "forwarded as HTTP/2: {statuses:?}"
    );
    assert_eq!(statuses[1], (403, "RBAC: access denied".to_string()));
    assert_eq!(
        statuses[2].0, 200,
        "the connection stays usable: {statuses:?}"
    );

    // L7 what-ifs without traffic: the admin endpoint and `weft ctl explain`.
    let (a_ip, c_ip) = (env.pod("a").ip, env.pod("c").ip);
    let (st, body) = env.admin(
        2,
        &format!("/debug/explain?src={a_ip}&dst={c_ip}&port=8080&method=POST&path=/public/x"),
    );
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["decision"].to_string().to_lowercase().contains("deny"),
        "{v:#}"
    );
    assert_eq!(v["decision"]["result"], "deny", "{v:#}");
    assert_eq!(v["waypoint"], true);
    let out = env
        .bed
        .node(2)
        .ns
        .exec(
            env!("CARGO_BIN_EXE_weft"),
            [
                "ctl",
                "explain",
                "--src",
                &a_ip.to_string(),
                "--dst",
                &c_ip.to_string(),
                "--port",
                "8080",
                "--method",
                "GET",
                "--path",
                "/secure/1",
                "--token",
                &good.token(ISSUER, "k1", 300),
            ],
        )
        .unwrap();
    assert!(
        out.contains("JWT:") && out.contains("https://issuer.test/alice"),
        "{out}"
    );
    assert!(out.to_lowercase().contains("allow"), "{out}");
    // The summary line, not just any line naming an ALLOW policy.
    assert!(out.starts_with("allowed"), "{out}");
    drop(rt);
}
