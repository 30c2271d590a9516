//! Two nodes in network namespaces whose daemons learn the mesh only from the API server
//! (`mesh: {kubernetes: {kubeconfig}}`), here the stand-in of `support::apiserver` on the
//! underlay: enrollment by namespace label, opt-out, AuthorizationPolicy created and deleted,
//! a bad object skipped and named, RequestAuthentication and L7 policy enforced by the
//! in-binary waypoint, and the API server restarting while traffic flows. Needs root.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::apiserver::{self, FakeApiServer};
use support::l7::{es256, send};
use support::mesh::*;

/// The stand-in's address on the underlay, reachable from every node.
const API_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 253);
const ISSUER: &str = "https://issuer.test";

/// A mesh whose objects live in the API-server stand-in.
struct KubeMesh {
    env: MeshEnv,
    api: FakeApiServer,
    rt: tokio::runtime::Runtime,
}

impl KubeMesh {
    /// Builds the namespaces, puts the objects `MeshEnv` would write to a mesh file into the
    /// stand-in instead, and starts one weft per node configured only with its kubeconfig.
    fn start(namespaces: &[(&'static str, bool)], pods: &[PodSpec]) -> Option<KubeMesh> {
        let mut env = MeshEnv::build(2, namespaces, pods, &[])?;
        env.bed
            .underlay()
            .ip(["addr", "add", &format!("{API_IP}/24"), "dev", "br0"])
            .unwrap();
        let listener = env
            .bed
            .underlay()
            .tcp_listen(SocketAddr::new(IpAddr::V4(API_IP), 6443))
            .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let api = rt.block_on(FakeApiServer::start_on(listener));
        for obj in objects(&env.mesh_yaml()) {
            api.apply(obj);
        }
        env.mesh_config = Some(format!(
            "{{kubernetes: {{kubeconfig: {}}}}}",
            api.kubeconfig().display()
        ));
        env.start_all();
        Some(KubeMesh { env, api, rt })
    }

    /// Namespace `shop` enrolled, pod `a` on node-1 and `c` on node-2.
    fn enrolled_pair() -> Option<KubeMesh> {
        KubeMesh::start(
            &[("shop", true)],
            &[pod("a", 1, "shop"), pod("c", 2, "shop")],
        )
    }

    /// Waits until `done` holds, polling.
    fn wait_until(&self, what: &str, limit: Duration, mut done: impl FnMut(&MeshEnv) -> bool) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if done(&self.env) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{what}: not within {limit:?}\nnode-1:\n{}\nnode-2:\n{}",
            self.env.log(1),
            self.env.log(2)
        );
    }
}

/// Every object of a mesh file, as JSON.
fn objects(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(yaml)
        .filter_map(|doc| {
            let v = serde_yaml_ng::Value::deserialize(doc).unwrap();
            (!v.is_null()).then(|| serde_json::to_value(v).unwrap())
        })
        .collect()
}

/// Pod `to` answers every connection on 8080: it echoes what it reads until the client
/// closes.
fn echo(env: &MeshEnv, to: &str) {
    let l = env.pod(to).ns.tcp_listen(env.addr(to, 8080)).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// A connection from pod `from` to `to`:8080 that echoed one message.
fn connect(env: &MeshEnv, from: &str, to: &str) -> std::io::Result<TcpStream> {
    let mut s = env
        .pod(from)
        .ns
        .tcp_connect(env.addr(to, 8080), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"ping")?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    assert_eq!(&b, b"ping");
    Ok(s)
}

/// How a connection from `from` reaches `to`, as `to`'s node sees it while it is open:
/// `Some("hbone")`, `Some("plain")` (captured, plaintext), or `None` (not captured there).
fn path(env: &MeshEnv, from: &str, to: &str, to_node: usize) -> Option<String> {
    try_path(env, from, to, to_node).unwrap_or_else(|e| {
        panic!(
            "{from} -> {to}: {e}\nnode-1:\n{}\nnode-2:\n{}",
            env.log(1),
            env.log(2)
        )
    })
}

/// [`path`], or the connection's error (while capture changes, a connection may be reset).
fn try_path(
    env: &MeshEnv,
    from: &str,
    to: &str,
    to_node: usize,
) -> std::io::Result<Option<String>> {
    let s = connect(env, from, to)?;
    let src = s.local_addr().unwrap();
    let v = env.admin_json(to_node, "/connections");
    drop(s);
    Ok(v["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["direction"] == "inbound" && c["src"] == src.to_string())
        .map(|c| c["protocol"].as_str().unwrap_or_default().to_string()))
}

/// A DENY AuthorizationPolicy `name` on pod `c` for connections from `a`'s identity (to
/// `port` only, if given).
fn deny_a_to_c(name: &str, port: Option<u16>) -> Value {
    let mut rule = json!({"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/a"]}}]});
    if let Some(port) = port {
        rule["to"] = json!([{"operation": {"ports": [port.to_string()]}}]);
    }
    apiserver::istio(
        "AuthorizationPolicy",
        "shop",
        name,
        json!({"selector": {"matchLabels": {"app": "c"}}, "action": "DENY", "rules": [rule]}),
    )
}

fn shop(ambient: bool) -> Value {
    let labels: &[(&str, &str)] = if ambient {
        &[("istio.io/dataplane-mode", "ambient")]
    } else {
        &[]
    };
    apiserver::namespace("shop", labels)
}

#[test]
fn enrollment_and_policies_follow_the_api_server() {
    let mut x = pod("x", 1, "shop");
    x.labels.push(("istio.io/dataplane-mode", "none"));
    let Some(k) = KubeMesh::start(
        &[("shop", false)],
        &[pod("a", 1, "shop"), pod("c", 2, "shop"), x],
    ) else {
        return;
    };
    let env = &k.env;
    echo(env, "c");
    assert_eq!(path(env, "a", "c", 2), None, "shop is not enrolled yet");

    // Labelling the namespace: HBONE within 1 s.
    k.api.apply(shop(true));
    let labelled = Instant::now();
    k.wait_until(
        "a -> c over HBONE after the label",
        Duration::from_secs(1),
        |env| path(env, "a", "c", 2).as_deref() == Some("hbone"),
    );
    eprintln!("HBONE {:?} after the label", labelled.elapsed());
    // The opted-out pod is not captured: it reaches c in plaintext (c's node captures c's
    // inbound side) and never as HBONE.
    assert_eq!(path(env, "x", "c", 2).as_deref(), Some("plain"));
    // An AuthorizationPolicy created through the API server is enforced; deleting it lifts it.
    k.api.apply(deny_a_to_c("deny-a", None));
    k.wait_until("the DENY policy enforced", Duration::from_secs(5), |env| {
        connect(env, "a", "c").is_err()
    });
    k.api.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        Some("shop"),
        "deny-a",
    );
    k.wait_until("the DENY policy lifted", Duration::from_secs(5), |env| {
        connect(env, "a", "c").is_ok()
    });

    // A bad object is skipped and named; one written just after it applies.
    k.api.apply(apiserver::istio(
        "AuthorizationPolicy",
        "shop",
        "bad",
        json!({"action": "ALOW"}),
    ));
    k.api.apply(deny_a_to_c("deny-x", None));
    k.wait_until(
        "deny-x enforced beside the bad one",
        Duration::from_secs(5),
        |env| connect(env, "a", "c").is_err(),
    );
    for node in 1..=2 {
        let dump = env.admin_json(node, "/config_dump");
        let warnings = dump["config"]["warnings"].to_string();
        assert!(
            warnings.contains("AuthorizationPolicy shop/bad: spec.action: unknown variant `ALOW`"),
            "node-{node}: {warnings}"
        );
        let policies = dump["meshPolicies"].to_string();
        assert!(
            !policies.contains("\"bad\"") && policies.contains("\"deny-x\""),
            "node-{node}: {policies}"
        );
        let (_, metrics) = env
            .bed
            .node(node)
            .ns
            .http_get("127.0.0.1:15020".parse().unwrap(), "/metrics")
            .unwrap();
        assert!(
            metrics.contains("weft_kubernetes_invalid_objects{kind=\"AuthorizationPolicy\"} 1"),
            "node-{node}: {}",
            metrics
                .lines()
                .filter(|l| l.contains("weft_kubernetes"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    k.api.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        Some("shop"),
        "deny-x",
    );

    // Removing the label: plain again.
    k.api.apply(shop(false));
    k.wait_until("a -> c no longer captured", Duration::from_secs(5), |env| {
        matches!(try_path(env, "a", "c", 2), Ok(None))
    });
}

#[test]
fn request_authentication_and_l7_policy_from_the_api_server_reach_the_waypoint() {
    let Some(k) = KubeMesh::enrolled_pair() else {
        return;
    };
    let env = &k.env;
    http_app(env, &k.rt);
    let good = es256("k1");
    let jwks = json!({"keys": [good.jwk]}).to_string();
    k.api.apply(apiserver::istio(
        "RequestAuthentication",
        "shop",
        "c-jwt",
        json!({"selector": {"matchLabels": {"app": "c"}},
               "jwtRules": [{"issuer": ISSUER, "jwks": jwks}]}),
    ));
    k.api.apply(apiserver::istio(
        "AuthorizationPolicy",
        "shop",
        "c-l7",
        json!({"selector": {"matchLabels": {"app": "c"}}, "action": "ALLOW",
               "rules": [
                   {"to": [{"operation": {"methods": ["GET"], "paths": ["/public*"]}}]},
                   {"from": [{"source": {"requestPrincipals": [format!("{ISSUER}/*")]}}],
                    "to": [{"operation": {"methods": ["GET"], "paths": ["/secure*"]}}]}]}),
    ));
    let get =
        |path: &str, extra: &str| format!("GET {path} HTTP/1.1\r\nHost: c.shop\r\n{extra}\r\n");
    let request = |raw: &str| {
        let mut s = env
            .pod("a")
            .ns
            .tcp_connect(env.addr("c", 8080), Duration::from_secs(3))
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        send(&mut s, raw)
    };
    // Once node-2 has both policies, a POST is denied per request.
    k.wait_until("the L7 policy in force", Duration::from_secs(5), |_| {
        request("POST /public/x HTTP/1.1\r\nHost: c.shop\r\nContent-Length: 0\r\n\r\n").0 == 403
    });
    let (st, body, _) = request(&get("/public/x", ""));
    assert_eq!(st, 200, "{body}");
    assert!(body.starts_with("GET /public/x"), "{body}");
    assert_eq!(request(&get("/secure/1", "")).0, 403, "a token is required");
    let bearer = format!(
        "Authorization: Bearer {}\r\n",
        good.token(ISSUER, "k1", 300)
    );
    let (st, body, _) = request(&get("/secure/1", &bearer));
    assert_eq!(st, 200, "{body}\n{}", env.log(2));
    let expired = format!(
        "Authorization: Bearer {}\r\n",
        good.token(ISSUER, "k1", -600)
    );
    assert_eq!(request(&get("/secure/1", &expired)).0, 401);
}

#[test]
fn the_api_server_restarting_while_traffic_flows_refuses_nothing_and_the_state_converges() {
    let Some(k) = KubeMesh::enrolled_pair() else {
        return;
    };
    let env = &k.env;
    echo(env, "c");
    assert_eq!(path(env, "a", "c", 2).as_deref(), Some("hbone"));
    let lists_before = k
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="))
        .count();

    // Connections in a loop while the API server goes away, comes back with its history
    // compacted (every watch must relist), and a policy is written meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                // Each connection must be answered, and still be HBONE: the state in force
                // stays while the API server is away.
                match connect(env, "a", "c") {
                    Ok(s) => {
                        let src = s.local_addr().unwrap().to_string();
                        let conns = env.admin_json(2, "/connections");
                        let hbone = conns["connections"].as_array().unwrap().iter().any(|c| {
                            c["direction"] == "inbound"
                                && c["src"] == src
                                && c["protocol"] == "hbone"
                        });
                        if hbone {
                            ok += 1;
                        } else {
                            failed.push(format!("{src}: not HBONE: {conns}"));
                        }
                    }
                    Err(e) => failed.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        });
        std::thread::sleep(Duration::from_millis(300));
        k.rt.block_on(k.api.restart(Duration::from_secs(2)));
        std::thread::sleep(Duration::from_millis(500));
        // Written while down: in the state it comes back with, not in its history, so every
        // watch must relist to see them.
        k.api.apply(deny_a_to_c("deny-a", Some(9999)));
        let mut d = apiserver::pod("shop", "d", "d", "node-2");
        d["status"]["podIP"] = json!("10.244.2.200");
        k.api.apply(d);
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::SeqCst);
        traffic.join().unwrap()
    });
    assert!(
        failed.is_empty(),
        "{} refused of {}: {failed:?}",
        failed.len(),
        ok + failed.len() as u32
    );
    assert!(ok > 20, "{ok} connections");
    for node in 1..=2 {
        let (s, body) = env
            .bed
            .node(node)
            .ns
            .http_get("127.0.0.1:15021".parse().unwrap(), "/healthz/ready")
            .unwrap();
        assert_eq!(s, 200, "node-{node} stays ready: {body}");
    }
    // The state converges: what was written while it was down reaches both nodes (by
    // relists: the history before the restart is gone).
    k.wait_until(
        "the policy and the pod written while down reach both nodes",
        Duration::from_secs(30),
        |env| {
            (1..=2).all(|n| {
                let dump = env.admin_json(n, "/config_dump");
                dump["meshPolicies"].to_string().contains("deny-a")
                    && dump["workloads"].to_string().contains("10.244.2.200")
            })
        },
    );
    let relists = k
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="))
        .count();
    assert!(
        relists > lists_before,
        "the pods were relisted after the restart ({lists_before} lists before, {relists} after)"
    );
}

/// An HTTP app in pod `c` on 8080: answers `<method> <path>`.
fn http_app(env: &MeshEnv, rt: &tokio::runtime::Runtime) {
    let l = env.pod("c").ns.tcp_listen(env.addr("c", 8080)).unwrap();
    l.set_nonblocking(true).unwrap();
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        loop {
            let Ok((s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("{} {}", req.method(), req.uri().path());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
            });
        }
    });
}
