//! In-pod capture (`redirect: inpod`) in network namespaces: node 1's weft takes its pods
//! from a stand-in for istio-cni's node agent over ZDS (`support::zds`), which also writes
//! istio-cni's in-pod iptables rules into the pods; node 2's weft captures with node-level
//! TPROXY. Proves: an added pod's outbound goes over HBONE to the other node, its inbound
//! (HBONE and plaintext) is policy-checked inside the pod; a deleted pod's listeners are
//! gone; a reconnection's snapshot forgets the pods it omits; a bad request is refused with
//! an error ack and nothing else changes. Needs root.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use support::mesh::*;
use support::zds::{capture_in_pod, info, NodeAgent};

/// Two nodes: node 1 in-pod (pods a and b, and x outside the mesh, istio-cni's rules in all
/// three), node 2 node-level (c in the mesh, y outside it).
fn inpod_env() -> Option<(MeshEnv, NodeAgent)> {
    inpod_env_with("")
}

/// [`inpod_env`] with more lines in node 1's config.
fn inpod_env_with(node1_extra: &str) -> Option<(MeshEnv, NodeAgent)> {
    let mut env = MeshEnv::build(
        2,
        &[("shop", true), ("legacy", false)],
        &[
            pod("a", 1, "shop"),
            pod("b", 1, "shop"),
            pod("x", 1, "legacy"),
            pod("c", 2, "shop"),
            pod("y", 2, "legacy"),
        ],
        &[],
    )?;
    let socket = env.bed.temp_dir().join("zds.sock");
    let agent = NodeAgent::listen(&socket).expect("ZDS stand-in");
    env.node_config_extra.insert(
        1,
        format!(
            "redirect: inpod\nzdsSocket: {}\n{node1_extra}",
            socket.display()
        ),
    );
    for p in ["a", "b", "x"] {
        capture_in_pod(&env.pod(p).ns).expect("istio-cni's in-pod rules");
    }
    env.start_all();
    Some((env, agent))
}

fn logs(env: &MeshEnv) -> String {
    format!("node-1:\n{}\nnode-2:\n{}", env.log(1), env.log(2))
}

/// One exchange from `from` to `to`'s `port`: bytes intact both ways, the app sees the
/// client pod's address.
fn check_path(env: &MeshEnv, from: &str, to: &str, port: u16, seed: u64) {
    let up = pattern(seed, 256 * 1024);
    let down = pattern(seed + 1, 256 * 1024);
    let server = serve_once(env.pod(to), port, down.clone());
    let back = exchange(env.pod(from), env.addr(to, port), up.clone())
        .unwrap_or_else(|e| panic!("{from} -> {to}:{port}: {e}\n{}", logs(env)));
    let served = server.join().unwrap();
    assert_eq!(
        (served.received_len, served.received_hash),
        (up.len(), hash(&up)),
        "{from} -> {to}: request bytes"
    );
    assert_eq!(
        (back.len(), hash(&back)),
        (down.len(), hash(&down)),
        "{from} -> {to}: response bytes"
    );
    assert_eq!(
        served.peer.ip(),
        IpAddr::V4(env.pod(from).ip),
        "{from} -> {to}: the app must see the client pod's address"
    );
}

/// One try: `Ok` when the app (answering "ok") answered.
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

/// Asserts that `from` reaches the app on `to`'s `port` (answering "ok").
fn allowed(env: &MeshEnv, from: &str, to: &str, port: u16) {
    if let Err(k) = attempt(env, from, env.addr(to, port)) {
        panic!(
            "{from} -> {to}:{port} should work, got {k:?}\n{}",
            logs(env)
        );
    }
}

/// `istio_tcp_connections_opened_total` on `node` by `reporter` from `src` to `dst` (service
/// accounts in `shop`) over mutual TLS.
fn mtls_opened(env: &MeshEnv, node: usize, reporter: &str, src: &str, dst: &str) -> u64 {
    let (_, m) = env
        .bed
        .node(node)
        .ns
        .http_get("127.0.0.1:15020".parse().unwrap(), "/metrics")
        .unwrap();
    m.lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains(&format!("reporter=\"{reporter}\""))
                && l.contains(&format!(
                    "source_principal=\"spiffe://cluster.local/ns/shop/sa/{src}\""
                ))
                && l.contains(&format!(
                    "destination_principal=\"spiffe://cluster.local/ns/shop/sa/{dst}\""
                ))
                && l.contains("connection_security_policy=\"mutual_tls\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The data-path ports listening inside pod `name`'s namespace.
fn listening(env: &MeshEnv, name: &str) -> Vec<u16> {
    let out = env.pod(name).ns.exec("ss", ["-Hltn"]).unwrap();
    let mut ports: Vec<u16> = out
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .filter(|p| [15001, 15006, 15008].contains(p))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Waits (at most 10 s) until pod `name`'s data-path listeners are `want`.
fn wait_listening(env: &MeshEnv, name: &str, want: &[u16]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = listening(env, name);
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pod {name} listens on {now:?}, expected {want:?}\n{}",
            logs(env)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const ALL: &[u16] = &[15001, 15006, 15008];

const DENY_C_TO_A: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a-deny-c, namespace: shop}
spec:
  selector: {matchLabels: {app: a}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/c]}}]
";

#[test]
fn an_added_pod_is_tunnelled_over_hbone_and_its_inbound_is_policy_checked() {
    let Some((mut env, agent)) = inpod_env() else {
        return;
    };
    let (zds, hello) = agent.accept().unwrap();
    assert_eq!(hello.version, 1, "ZdsHello version V1");
    assert_eq!(listening(&env, "a"), Vec::<u16>::new());
    let ack = zds.add("uid-a", info("a", "shop", "a"), &env.pod("a").ns);
    assert_eq!(ack.unwrap(), "", "{}", logs(&env));
    // Acknowledged only once the pod's listeners listen.
    assert_eq!(listening(&env, "a"), ALL);
    assert_eq!(zds.snapshot_sent().unwrap(), "");
    let dump = env.admin_json(1, "/config_dump");
    assert_eq!(dump["inpod"]["connected"], true, "{dump}");
    assert_eq!(
        dump["inpod"]["pods"]["uid-a"]["workload"], "Kubernetes//Pod/shop/a",
        "{dump}"
    );

    // Outbound: istio-cni's REDIRECT to 15001 in the pod, HBONE to node 2.
    check_path(&env, "a", "c", 8080, 1);
    assert_eq!(
        mtls_opened(&env, 1, "source", "a", "c"),
        1,
        "{}",
        logs(&env)
    );
    assert_eq!(
        mtls_opened(&env, 2, "destination", "a", "c"),
        1,
        "node 2 took a's connection over HBONE\n{}",
        logs(&env)
    );
    // Inbound over HBONE into the pod (15008), and plaintext (REDIRECT to 15006).
    check_path(&env, "c", "a", 8081, 3);
    assert_eq!(
        mtls_opened(&env, 1, "destination", "c", "a"),
        1,
        "{}",
        logs(&env)
    );
    check_path(&env, "y", "a", 8082, 5);

    // A DENY policy on a refuses c (over HBONE), not y.
    env.extra_yaml = DENY_C_TO_A.to_string();
    env.write_mesh();
    env.wait_generation(1, 2);
    env.wait_generation(2, 2);
    env.answer_each("a", 8083, 5, b"ok");
    match attempt(&env, "c", env.addr("a", 8083)) {
        Ok(()) => panic!("c -> a must be denied\n{}", logs(&env)),
        Err(k) => assert!(
            matches!(
                k,
                ErrorKind::ConnectionReset
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionRefused
            ),
            "c -> a: {k:?}"
        ),
    }
    allowed(&env, "y", "a", 8083);
    let log = env.log_with(1, &["a-deny-c"]);
    assert!(
        log.contains("a-deny-c"),
        "node 1 logs the denying policy:\n{log}"
    );

    // Deleted: its listeners are gone.
    assert_eq!(zds.del("uid-a").unwrap(), "");
    wait_listening(&env, "a", &[]);
    let dump = env.admin_json(1, "/config_dump");
    assert_eq!(dump["inpod"]["pods"], serde_json::json!({}), "{dump}");
    assert!(
        attempt(&env, "a", env.addr("c", 8084)).is_err(),
        "nothing carries a's traffic any more"
    );
}

#[test]
fn a_reconnection_snapshot_that_omits_a_pod_forgets_it() {
    let Some((env, agent)) = inpod_env() else {
        return;
    };
    let (zds, _) = agent.accept().unwrap();
    assert_eq!(
        zds.add("uid-a", info("a", "shop", "a"), &env.pod("a").ns)
            .unwrap(),
        ""
    );
    assert_eq!(
        zds.add("uid-b", info("b", "shop", "b"), &env.pod("b").ns)
            .unwrap(),
        ""
    );
    assert_eq!(zds.snapshot_sent().unwrap(), "");
    env.answer_each("c", 8080, 5, b"ok");
    allowed(&env, "a", "c", 8080);
    allowed(&env, "b", "c", 8080);
    // Two in-pod pods of one node: over HBONE from one pod into the other.
    check_path(&env, "a", "b", 8085, 7);
    assert_eq!(
        mtls_opened(&env, 1, "destination", "a", "b"),
        1,
        "{}",
        logs(&env)
    );

    // The node agent restarts: the pods stay served while weft reconnects.
    drop(zds);
    allowed(&env, "a", "c", 8080);
    let (zds, hello) = agent.accept().unwrap();
    assert_eq!(hello.version, 1);
    assert_eq!(
        listening(&env, "b"),
        ALL,
        "b is kept until the snapshot is complete"
    );
    // The snapshot: a (its namespace fd kept by the agent, then one it lost: keep), not b.
    assert_eq!(
        zds.add("uid-a", info("a", "shop", "a"), &env.pod("a").ns)
            .unwrap(),
        ""
    );
    assert_eq!(zds.keep("uid-a").unwrap(), "");
    assert_eq!(zds.snapshot_sent().unwrap(), "");
    wait_listening(&env, "b", &[]);
    assert_eq!(listening(&env, "a"), ALL);
    allowed(&env, "a", "c", 8080);
    assert!(attempt(&env, "b", env.addr("c", 8080)).is_err());
    // keep is only for the snapshot.
    assert!(!zds.keep("uid-a").unwrap().is_empty());
}

#[test]
fn bad_requests_get_an_error_ack_and_other_pods_keep_working() {
    let Some((env, agent)) = inpod_env() else {
        return;
    };
    let (zds, _) = agent.accept().unwrap();
    assert_eq!(
        zds.add("uid-a", info("a", "shop", "a"), &env.pod("a").ns)
            .unwrap(),
        ""
    );
    assert_eq!(zds.snapshot_sent().unwrap(), "");

    // An add without its network namespace.
    let ack = zds.add_without_fd("uid-b", info("b", "shop", "b")).unwrap();
    assert!(ack.contains("no network namespace"), "{ack:?}");
    // A payload this version does not know (oneof field 9), and bytes that are no message.
    let ack = zds.raw(&[0x4a, 0x00], None).unwrap();
    assert!(ack.contains("no payload"), "{ack:?}");
    let ack = zds.raw(&[0xff, 0xff, 0xff], None).unwrap();
    assert!(ack.contains("undecodable"), "{ack:?}");
    // A workload whose service account contradicts the mesh.
    let ack = zds
        .add("uid-b", info("b", "shop", "not-b"), &env.pod("b").ns)
        .unwrap();
    assert!(ack.contains("service account"), "{ack:?}");

    assert_eq!(listening(&env, "b"), Vec::<u16>::new());
    assert_eq!(listening(&env, "a"), ALL);
    env.answer_each("c", 8080, 5, b"ok");
    allowed(&env, "a", "c", 8080);
    // Straight to a listener at the pod's address from inside the pod (istio-cni's rules
    // leave traffic on `lo` alone): nothing to relay, closed at once, never relayed to the
    // listener itself again (and again).
    for port in [15001, 15006] {
        let mut s = env
            .pod("a")
            .ns
            .tcp_connect(env.addr("a", port), Duration::from_secs(5))
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"hello");
        let mut b = [0u8; 4];
        let end = s.read(&mut b);
        assert!(
            matches!(&end, Ok(0))
                || matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "a direct connection to {port} must be closed: {end:?}"
        );
    }
    // A pod the mesh does not enroll, handed over anyway: its traffic is refused, not passed
    // through in plaintext.
    assert_eq!(
        zds.add("uid-x", info("x", "legacy", "x"), &env.pod("x").ns)
            .unwrap(),
        ""
    );
    assert_eq!(listening(&env, "x"), ALL);
    assert!(
        attempt(&env, "x", env.addr("c", 8080)).is_err(),
        "x's outbound must be refused\n{}",
        logs(&env)
    );
    // The connection is still good: the next request is served.
    assert_eq!(
        zds.add("uid-b", info("b", "shop", "b"), &env.pod("b").ns)
            .unwrap(),
        ""
    );
    allowed(&env, "b", "c", 8080);
}

const L7_ON_A: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a-only-ok, namespace: shop}
spec:
  selector: {matchLabels: {app: a}}
  action: ALLOW
  rules:
  - to: [{operation: {paths: [/ok]}}]
";

/// An HTTP app in pod `name` on `port`: answers every request `200` with the client's IP.
fn http_app(env: &MeshEnv, name: &str, port: u16) {
    let l = env.pod(name).ns.tcp_listen(env.addr(name, port)).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let peer = s
                    .peer_addr()
                    .map(|p| p.ip().to_string())
                    .unwrap_or_default();
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    match s.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{peer}",
                    peer.len()
                );
            });
        }
    });
}

/// `GET path` from pod `from` to `dst`: (status, body).
fn get(env: &MeshEnv, from: &str, dst: SocketAddr, path: &str) -> (u16, String) {
    let mut s = env
        .pod(from)
        .ns
        .tcp_connect(dst, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{from} -> {dst}: {e}\n{}", logs(env)));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: a.shop\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn l7_policy_on_an_in_pod_pod_is_decided_by_the_waypoint_which_reaches_the_app_from_inside_the_pod()
{
    let Some((mut env, agent)) = inpod_env() else {
        return;
    };
    let (zds, _) = agent.accept().unwrap();
    assert_eq!(
        zds.add("uid-a", info("a", "shop", "a"), &env.pod("a").ns)
            .unwrap(),
        ""
    );
    assert_eq!(zds.snapshot_sent().unwrap(), "");
    env.extra_yaml = L7_ON_A.to_string();
    env.write_mesh();
    env.wait_generation(1, 2);
    env.wait_generation(2, 2);
    http_app(&env, "a", 8086);
    let c_ip = env.pod("c").ip.to_string();
    let y_ip = env.pod("y").ip.to_string();
    // Over HBONE from c, and in plaintext from y: allowed paths reach the app, from the
    // client's own address; others are refused by the waypoint.
    for (from, ip) in [("c", &c_ip), ("y", &y_ip)] {
        let (status, body) = get(&env, from, env.addr("a", 8086), "/ok");
        assert_eq!(
            (status, body.as_str()),
            (200, ip.as_str()),
            "{from}\n{}",
            logs(&env)
        );
        let (status, _) = get(&env, from, env.addr("a", 8086), "/no");
        assert_eq!(status, 403, "{from}\n{}", logs(&env));
    }
}

/// An echo server in pod `name` on `port`: every connection gets its bytes back.
fn echo(env: &MeshEnv, name: &str, port: u16) {
    let l = env.pod(name).ns.tcp_listen(env.addr(name, port)).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let _ = std::io::copy(&mut s, &mut w);
            });
        }
    });
}

#[test]
fn a_deleted_pods_live_connections_get_the_drain_grace_then_are_closed() {
    let Some((env, agent)) = inpod_env_with("drainGrace: 2s\n") else {
        return;
    };
    let (zds, _) = agent.accept().unwrap();
    assert_eq!(
        zds.add("uid-a", info("a", "shop", "a"), &env.pod("a").ns)
            .unwrap(),
        ""
    );
    assert_eq!(zds.snapshot_sent().unwrap(), "");
    echo(&env, "c", 8087);
    let mut s = env
        .pod("a")
        .ns
        .tcp_connect(env.addr("c", 8087), Duration::from_secs(5))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let roundtrip = |s: &mut std::net::TcpStream| -> std::io::Result<()> {
        s.write_all(b"ping")?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b)?;
        assert_eq!(&b, b"ping");
        Ok(())
    };
    roundtrip(&mut s).unwrap_or_else(|e| panic!("a -> c: {e}\n{}", logs(&env)));
    let pid = env.daemons[0].as_ref().unwrap().pid();
    assert_eq!(netns_threads(pid), 1, "one thread in a's namespace");

    let deleted = Instant::now();
    assert_eq!(zds.del("uid-a").unwrap(), "");
    wait_listening(&env, "a", &[]);
    // Within the grace period the live connection still carries bytes...
    roundtrip(&mut s).unwrap_or_else(|e| panic!("during the drain: {e}\n{}", logs(&env)));
    // ...and after it, it is closed.
    let mut b = [0u8; 4];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let end = s.read(&mut b);
    assert!(
        matches!(&end, Ok(0)) || matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "closed after the grace period: {end:?}"
    );
    let after = deleted.elapsed();
    // The pod's socket thread left its network namespace once the drain was over.
    let pid = env.daemons[0].as_ref().unwrap().pid();
    let deadline = Instant::now() + Duration::from_secs(5);
    while netns_threads(pid) > 0 {
        assert!(
            Instant::now() < deadline,
            "the netns thread of shop/a outlived the drain"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        after >= Duration::from_millis(1500) && after < Duration::from_secs(8),
        "closed {after:?} after the delete, grace 2s\n{}",
        logs(&env)
    );
}

/// How many threads of process `pid` are pod namespace threads of `shop/a` (`netns shop/a`).
fn netns_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim() == "netns shop/a")
                .count()
        })
        .unwrap_or(0)
}
