//! Policy enforced on real traffic in network namespaces: AuthorizationPolicy by principal,
//! namespace, IP block and port across nodes; PeerAuthentication STRICT vs PERMISSIVE for a
//! client outside the mesh; a live connection closed after a policy edit. Needs root.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use support::mesh::*;

fn env_with(policies: &str) -> Option<MeshEnv> {
    let mut env = MeshEnv::start(
        2,
        &[
            ("shop", true),
            ("other", true),
            ("legacy", false),
            ("istio-system", false),
        ],
        &[
            pod("a", 1, "shop"),
            pod("b", 1, "shop"),
            pod("c", 2, "shop"),
            pod("z", 1, "other"),
            pod("y", 1, "legacy"),
        ],
        &[],
    )?;
    if !policies.is_empty() {
        env.extra_yaml = policies.to_string();
        env.write_mesh();
        env.wait_generation(1, 2);
        env.wait_generation(2, 2);
    }
    Some(env)
}

fn addr(env: &MeshEnv, pod: &str, port: u16) -> SocketAddr {
    env.addr(pod, port)
}

/// Listens on `port` in pod `to` and answers every connection with "ok".
fn answer_ok(env: &MeshEnv, to: &str, port: u16) {
    env.answer_each(to, port, 5, b"ok");
}

/// Tries one exchange; `Ok(())` when the app answered, `Err(kind)` otherwise.
fn attempt(env: &MeshEnv, from: &str, dst: SocketAddr) -> Result<(), ErrorKind> {
    let mut s = env
        .pod(from)
        .ns
        .tcp_connect(dst, Duration::from_secs(5))
        .map_err(|e| e.kind())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"hello");
    let mut b = [0u8; 2];
    match s.read(&mut b) {
        Ok(2) if &b == b"ok" => Ok(()),
        Ok(0) => Err(ErrorKind::UnexpectedEof),
        Ok(_) => Err(ErrorKind::InvalidData),
        Err(e) => Err(e.kind()),
    }
}

fn assert_allowed(env: &MeshEnv, from: &str, dst: SocketAddr) {
    if let Err(k) = attempt(env, from, dst) {
        panic!(
            "{from} -> {dst} should be allowed, got {k:?}\nnode-1:\n{}\nnode-2:\n{}",
            env.log(1),
            env.log(2)
        );
    }
}

fn assert_refused(env: &MeshEnv, from: &str, dst: SocketAddr) {
    match attempt(env, from, dst) {
        Ok(()) => panic!("{from} -> {dst} should be refused"),
        Err(k) => assert!(
            matches!(
                k,
                ErrorKind::ConnectionReset
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionRefused
            ),
            "{from} -> {dst}: unexpected {k:?}"
        ),
    }
}

const ALLOW_A_ON_8080: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c-allow-a, namespace: shop}
spec:
  selector: {matchLabels: {app: c}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/a]}}]
    to: [{operation: {ports: [\"8080\"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c-deny-other, namespace: shop}
spec:
  selector: {matchLabels: {app: c}}
  action: DENY
  rules:
  - from: [{source: {namespaces: [other]}}]
";

#[test]
fn allow_by_principal_and_port_and_deny_by_namespace_across_nodes() {
    let Some(env) = env_with(ALLOW_A_ON_8080) else {
        return;
    };
    answer_ok(&env, "c", 8080);
    answer_ok(&env, "c", 9090);
    assert_allowed(&env, "a", addr(&env, "c", 8080));
    assert_refused(&env, "a", addr(&env, "c", 9090)); // port not in the ALLOW rule
    assert_refused(&env, "b", addr(&env, "c", 8080)); // another principal: default deny
    assert_refused(&env, "z", addr(&env, "c", 8080)); // namespace other: DENY wins
    let log = env.log_with(
        2,
        &[
            "connection denied",
            "policy=shop/c-deny-other",
            "policy=default",
        ],
    );
    assert!(log.contains("connection denied"), "{log}");
    assert!(
        log.contains("policy=shop/c-deny-other"),
        "the DENY is named: {log}"
    );
    assert!(
        log.contains("policy=default"),
        "the default deny is named: {log}"
    );
    let (_, metrics) = env
        .bed
        .node(2)
        .ns
        .http_get("127.0.0.1:15020".parse().unwrap(), "/metrics")
        .unwrap();
    assert!(
        metrics.contains("weft_tcp_connections_denied_total{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("policy=\"shop/c-deny-other\""),
        "{metrics}"
    );

    // explain agrees, without traffic.
    let (status, body) = env.admin(
        2,
        &format!(
            "/debug/explain?src={}&dst={}&port=8080",
            env.pod("z").ip,
            env.pod("c").ip
        ),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("c-deny-other"), "{body}");
    let (status, body) = env.admin(2, "/debug/explain?src=banana&dst=10.244.2.10&port=8080");
    assert_eq!(status, 400);
    assert!(
        body.contains("src \"banana\" is not an IP address"),
        "{body}"
    );
}

#[test]
fn ip_blocks_select_sources_across_nodes() {
    let Some(env) = env_with("") else { return };
    let mut env = env;
    let a_ip = env.pod("a").ip;
    env.extra_yaml = format!(
        "---\napiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {{name: c-from-a-ip, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: c}}}}\n  rules:\n  - from: [{{source: {{ipBlocks: [\"{a_ip}/32\"]}}}}]\n"
    );
    env.write_mesh();
    env.wait_generation(2, 2);
    answer_ok(&env, "c", 8080);
    assert_allowed(&env, "a", addr(&env, "c", 8080));
    assert_refused(&env, "b", addr(&env, "c", 8080));
}

#[test]
fn strict_refuses_plaintext_from_outside_the_mesh_while_permissive_accepts_it() {
    let Some(mut env) = env_with("") else { return };
    answer_ok(&env, "c", 8080);
    // Default PERMISSIVE: y (legacy, not enrolled) reaches c in plaintext.
    assert_allowed(&env, "y", addr(&env, "c", 8080));
    env.extra_yaml = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n".into();
    env.write_mesh();
    env.wait_generation(2, 2);
    assert_refused(&env, "y", addr(&env, "c", 8080));
    // Mesh clients still get through (HBONE).
    assert_allowed(&env, "a", addr(&env, "c", 8080));
    let log = env.log_with(2, &["PeerAuthentication istio-system/default is STRICT"]);
    assert!(
        log.contains("PeerAuthentication istio-system/default is STRICT"),
        "{log}"
    );
    // A namespace-level PERMISSIVE overrides the mesh's STRICT.
    env.extra_yaml.push_str("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec: {mtls: {mode: PERMISSIVE}}\n");
    env.write_mesh();
    env.wait_generation(2, 3);
    assert_allowed(&env, "y", addr(&env, "c", 8080));
}

#[test]
fn a_live_connection_is_closed_within_a_second_of_a_policy_edit() {
    let Some(mut env) = env_with("") else { return };
    let c = env.pod("c");
    let l =
        c.ns.tcp_listen(SocketAddr::new(IpAddr::V4(c.ip), 8080))
            .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 1024];
        // Echo until the connection goes away.
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut s = env
        .pod("a")
        .ns
        .tcp_connect(addr(&env, "c", 8080), Duration::from_secs(5))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    // Now deny a -> c.
    env.extra_yaml = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: c-deny-a, namespace: shop}\nspec:\n  selector: {matchLabels: {app: c}}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/a]}}]}]\n".into();
    let edited = Instant::now();
    env.write_mesh();
    let mut buf = [0u8; 64];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break edited.elapsed(),
            Ok(_) => {}
        }
        assert!(
            edited.elapsed() < Duration::from_secs(5),
            "connection still open 5 s after the edit"
        );
    };
    eprintln!("closed {closed:?} after the edit");
    assert!(closed < Duration::from_secs(1), "took {closed:?}");
    server.join().unwrap();
    let log = env.log_with(2, &["live connection closed: no longer allowed"]);
    assert!(
        log.contains("live connection closed: no longer allowed"),
        "{log}"
    );
    // New connections are refused too.
    answer_ok(&env, "c", 8081);
    assert_refused(&env, "a", addr(&env, "c", 8081));
}
