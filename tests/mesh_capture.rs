//! Capture fails closed: an enrolled pod under PeerAuthentication STRICT takes no plaintext
//! connection from a pod outside the mesh while weft runs, after it was stopped, while a new
//! weft starts on a broken mesh file, or while it starts and its control plane does not
//! answer; and no path goes around weft: connections kube-proxy would DNAT to a local
//! enrolled pod (a ClusterIP from the same node, a NodePort from another node) pass weft's
//! inbound decision. Real namespaces, real iptables/TPROXY, real daemons. Needs root.
//!
//! The DNAT rules stand in for kube-proxy's iptables mode, which writes the same shape of
//! rule (nat PREROUTING → `-j DNAT --to-destination <pod IP>:<target port>`; here without its
//! KUBE-SERVICES chains, probability splits or masquerading).

mod support;

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::mesh::*;

/// PeerAuthentication of namespace `shop` in `mode` (STRICT, PERMISSIVE).
fn shop_mtls(mode: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{name: shop-mtls, namespace: shop}}\nspec: {{mtls: {{mode: {mode}}}}}\n"
    )
}

/// A mesh of `nodes` nodes, namespace `shop` enrolled and `legacy` not, with `pods`.
fn shop_and_legacy(nodes: usize, pods: &[PodSpec]) -> Option<MeshEnv> {
    MeshEnv::start(nodes, &[("shop", true), ("legacy", false)], pods, &[])
}

/// Accepts every connection to `addr` in the listener's pod and records the peer, so a test
/// can tell whether anything reached the app.
fn record_accepts(listener: TcpListener) -> Arc<Mutex<Vec<SocketAddr>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            if let Ok(peer) = s.peer_addr() {
                record.lock().unwrap().push(peer);
            }
            // Answer one byte, so a client can tell the app took its connection.
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut b = [0u8; 5];
                if s.read_exact(&mut b).is_ok() {
                    let _ = s.write_all(b"k");
                }
            });
        }
    });
    seen
}

/// `y` (not enrolled, same node) tries a plaintext exchange with `a`; true when the app
/// answered. A refused, reset or unanswered connection is false.
fn plaintext_gets_through(env: &MeshEnv, dst: SocketAddr) -> bool {
    plaintext_from(env, "y", dst)
}

/// Pod `from` tries a plaintext exchange with `dst`; true when the app answered.
fn plaintext_from(env: &MeshEnv, from: &str, dst: SocketAddr) -> bool {
    exchange(&env.pod(from).ns, dst, Duration::from_secs(2)).is_ok()
}

/// One exchange with a [`record_accepts`] app from `ns`: connect, send 5 bytes, read its
/// one-byte answer, each step within `timeout`.
fn exchange(ns: &weft_testbed::Netns, dst: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut s = ns.tcp_connect(dst, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"hello")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
}

/// Polls readiness for `wait`; the last status seen.
fn readiness_after(env: &MeshEnv, wait: Duration) -> (u16, String) {
    let deadline = Instant::now() + wait;
    loop {
        let r = env.admin(1, "/healthz/ready");
        if Instant::now() >= deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_enrolled_pod_takes_no_plaintext_while_weft_is_stopped_or_starting_without_a_mesh() {
    let Some(mut env) = shop_and_legacy(1, &[pod("a", 1, "shop"), pod("y", 1, "legacy")]) else {
        return;
    };
    env.extra_yaml = shop_mtls("STRICT");
    env.write_mesh();
    env.wait_generation(1, 2);
    let dst = env.addr("a", 8080);
    let listener = env.pod("a").ns.tcp_listen(dst).unwrap();
    let seen = record_accepts(listener);
    let rules = env.weft_rules(1);
    assert!(!rules.is_empty());

    // The capture is visible: the pod's address programmed on its interface, and counted.
    let capture = &env.admin_json(1, "/config_dump")["capture"];
    assert_eq!(capture["waitingForMesh"], false, "{capture}");
    let a_ip = env.pod("a").ip.to_string();
    let a = capture["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["ip"] == a_ip.as_str())
        .unwrap_or_else(|| panic!("{capture}"));
    assert_eq!(a["state"], "programmed", "{capture}");
    assert_eq!(a["interface"], env.pod("a").host_veth.as_str(), "{capture}");
    let (_, metrics) = env
        .bed
        .node(1)
        .ns
        .http_get("127.0.0.1:15020".parse().unwrap(), "/metrics")
        .unwrap();
    assert!(
        metrics.contains("weft_capture_programming_runs_total{result=\"success\"}"),
        "{metrics}"
    );

    // (a) weft runs: STRICT refuses the plaintext client.
    assert!(!plaintext_gets_through(&env, dst), "{}", env.log(1));
    assert!(seen.lock().unwrap().is_empty());

    // (b) weft stopped with SIGTERM: the rules stay and the SYN finds no listener.
    let status = env.daemon(1).stop(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!plaintext_gets_through(&env, dst));
    assert!(
        seen.lock().unwrap().is_empty(),
        "a plaintext connection reached the app while no weft ran: {:?}",
        seen.lock().unwrap()
    );
    assert_eq!(env.weft_rules(1), rules, "the stopped weft's rules stay");

    // (c) a new weft starts on a truncated mesh file: unready, rules unchanged, refused.
    let good = env.mesh_yaml();
    std::fs::write(env.mesh_path(), &good[..good.len() / 2]).unwrap();
    env.start_daemon(1);
    let (status, body) = readiness_after(&env, Duration::from_secs(3));
    assert_eq!(status, 503, "{body}\n{}", env.log(1));
    assert!(body.contains("mesh not loaded"), "{body}");
    let capture = &env.admin_json(1, "/config_dump")["capture"];
    assert_eq!(capture["waitingForMesh"], true, "{capture}");
    assert!(!plaintext_gets_through(&env, dst));
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );
    assert_eq!(
        env.weft_rules(1),
        rules,
        "the starting weft rewrote the rules"
    );
    env.daemon(1).stop(Duration::from_secs(10)).unwrap();

    // (d) a new weft whose control plane does not answer: the same.
    let ca = env.bed.temp_dir().join("ca");
    let token = env.bed.temp_dir().join("token");
    std::fs::write(&token, "not-a-real-token").unwrap();
    std::fs::write(
        env.config_path(1),
        format!(
            "nodeName: node-1\nmesh: {{xds: {{address: \"https://127.0.0.1:15999\", rootCertFile: {}, tokenFile: {}}}}}\nca: {{builtin: {{dir: {}}}}}\n",
            ca.join("root-cert.pem").display(),
            token.display(),
            ca.display()
        ),
    )
    .unwrap();
    env.start_daemon(1);
    let (status, body) = readiness_after(&env, Duration::from_secs(3));
    assert_eq!(status, 503, "{body}\n{}", env.log(1));
    assert!(!plaintext_gets_through(&env, dst));
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );
    assert_eq!(
        env.weft_rules(1),
        rules,
        "the starting weft rewrote the rules"
    );
}

#[test]
fn connections_dnated_to_a_local_enrolled_pod_pass_weft_inbound_decision() {
    let Some(mut env) = shop_and_legacy(
        2,
        &[
            pod("a", 1, "shop"),
            pod("y", 1, "legacy"),
            pod("z", 2, "legacy"),
        ],
    ) else {
        return;
    };
    env.extra_yaml = shop_mtls("STRICT");
    env.write_mesh();
    env.wait_generation(1, 2);
    let a = env.addr("a", 8080);
    let seen = record_accepts(env.pod("a").ns.tcp_listen(a).unwrap());
    // kube-proxy on node 1: a ClusterIP and a NodePort, both served by a.
    let node1 = env.bed.node(1);
    let vip: SocketAddr = "10.96.0.50:80".parse().unwrap();
    let node_port = SocketAddr::new(std::net::IpAddr::V4(node1.underlay_ip), 30080);
    for (dst, port) in [
        (vip.ip().to_string(), "80"),
        (node_port.ip().to_string(), "30080"),
    ] {
        node1
            .ns
            .exec(
                "iptables",
                [
                    "-w",
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-p",
                    "tcp",
                    "-d",
                    &dst,
                    "--dport",
                    port,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &a.to_string(),
                ],
            )
            .unwrap();
    }

    // STRICT: refused on both paths, nothing reaches the app.
    assert!(
        !plaintext_from(&env, "y", vip),
        "ClusterIP from the same node"
    );
    assert!(
        !plaintext_from(&env, "z", node_port),
        "NodePort from node 2"
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "DNATed plaintext reached the app around weft: {:?}\n{}",
        seen.lock().unwrap(),
        env.log(1)
    );

    // PERMISSIVE: both allowed through weft, the app seeing the real clients, and logged.
    env.extra_yaml = shop_mtls("PERMISSIVE");
    env.write_mesh();
    env.wait_generation(1, 3);
    assert!(plaintext_from(&env, "y", vip), "{}", env.log(1));
    assert!(plaintext_from(&env, "z", node_port), "{}", env.log(1));
    let peers: Vec<std::net::IpAddr> = seen.lock().unwrap().iter().map(|p| p.ip()).collect();
    assert_eq!(
        peers,
        [
            std::net::IpAddr::V4(env.pod("y").ip),
            std::net::IpAddr::V4(env.pod("z").ip)
        ]
    );
    let logged = |log: &str, client: &str| {
        let ip = env.pod(client).ip.to_string();
        log.lines()
            .any(|l| l.contains("access") && l.contains(&ip) && l.contains(&a.to_string()))
    };
    let log = env.log_until(1, |log| logged(log, "y") && logged(log, "z"));
    for client in ["y", "z"] {
        let ip = env.pod(client).ip.to_string();
        assert!(
            log.lines()
                .any(|l| l.contains("access") && l.contains(&ip) && l.contains(&a.to_string())),
            "no access log for {client}:\n{log}"
        );
    }
}

/// Waits until node `node`'s capture has caught up with mesh generation `generation`.
fn wait_capture(env: &MeshEnv, node: usize, generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.admin_json(node, "/config_dump")["capture"]["generation"] != generation {
        assert!(
            Instant::now() < deadline,
            "capture never caught up on node {node}:\n{}",
            env.log(node)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `/config_dump` capture entry of address `ip` on node `node`.
fn capture_entry(env: &MeshEnv, node: usize, ip: &str) -> serde_json::Value {
    let capture = env.admin_json(node, "/config_dump")["capture"].clone();
    capture["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["ip"] == ip)
        .cloned()
        .unwrap_or_else(|| panic!("no capture entry for {ip}: {capture}"))
}

/// A shop/legacy mesh of `nodes` nodes whose `pods` all have an IPv6 address too, weft not
/// started yet (the test may still set `config_extra`).
fn dual_stack(nodes: usize, pods: &[PodSpec]) -> Option<MeshEnv> {
    let mut env = MeshEnv::build(nodes, &[("shop", true), ("legacy", false)], pods, &[])?;
    for p in pods {
        env.add_ipv6(p.name);
    }
    Some(env)
}

#[test]
fn ipv6_is_captured_like_ipv4_across_nodes_with_identity_and_ip_blocks() {
    let Some(mut env) = dual_stack(
        2,
        &[
            pod("a", 1, "shop"),
            pod("b", 2, "shop"),
            pod("y", 1, "legacy"),
            pod("z", 2, "legacy"),
        ],
    ) else {
        return;
    };
    env.start_all();
    for node in [1, 2] {
        wait_capture(&env, node, 1);
    }
    let v6 = |p: &str, port: u16| SocketAddr::new(std::net::IpAddr::V6(env.ipv6[p]), port);
    let a6 = env.ipv6["a"].to_string();
    // Visible: the pod's IPv6 address is programmed on its interface like its IPv4 one.
    let entry = capture_entry(&env, 1, &a6);
    assert_eq!(entry["state"], "programmed", "{entry}");
    assert_eq!(entry["interface"], env.pod("a").host_veth.as_str());
    assert_eq!(env.admin(1, "/healthz/ready"), (200, "ready\n".to_string()));

    // Bytes intact over HBONE between IPv6 pod addresses on two nodes, the app seeing the
    // real IPv6 client; nothing of it in plaintext on the underlay, while plain IPv6 to a
    // pod outside the mesh is visible there (the check can fail).
    let capture = env.bed.capture_underlay(1, "underlay6.pcap").unwrap();
    let secret = b"MESH6-SECRET-0123456789-do-not-leak".repeat(64);
    let open = b"PLAIN6-MARKER-9876543210-visible".repeat(64);
    for (to, port, data) in [("b", 9000, &secret), ("z", 9001, &open)] {
        let listener = env.pod(to).ns.tcp_listen(v6(to, port)).unwrap();
        let reply = data.clone();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut s, peer) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(&reply).unwrap();
            (peer, got)
        });
        let back = support::mesh::exchange(env.pod("a"), v6(to, port), data.clone())
            .unwrap_or_else(|e| panic!("a -> {to} over IPv6: {e}\n{}\n{}", env.log(1), env.log(2)));
        let (peer, got) = server.join().unwrap();
        assert_eq!(hash(&got), hash(data), "bytes a -> {to}");
        assert_eq!(hash(&back), hash(data), "bytes {to} -> a");
        assert_eq!(peer.ip(), std::net::IpAddr::V6(env.ipv6["a"]), "{to} saw");
    }
    let pcap = capture.stop().unwrap();
    assert!(
        weft_testbed::contains(&pcap, b"PLAIN6-MARKER-9876543210"),
        "the check can fail: plain IPv6 traffic is visible"
    );
    assert!(
        !weft_testbed::contains(&pcap, b"MESH6-SECRET-0123456789"),
        "plaintext of IPv6 mesh traffic on the underlay"
    );
    // The destination's weft saw the source's identity on the IPv6 connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    let identity = "spiffe://cluster.local/ns/shop/sa/a";
    while !env.log(2).lines().any(|l| {
        l.contains("connection closed") && l.contains(identity) && l.contains(&format!("[{a6}]"))
    }) {
        assert!(
            Instant::now() < deadline,
            "no access log of a's IPv6 connection with its identity:\n{}",
            env.log(2)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // An IPv6 ipBlocks policy on real traffic: only a's IPv6 address may reach b on 8080.
    env.extra_yaml = format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: b-from-a6, namespace: shop}}\n\
         spec:\n  selector: {{matchLabels: {{app: b}}}}\n  action: ALLOW\n\
         \x20 rules: [{{from: [{{source: {{ipBlocks: [\"{a6}/128\"]}}}}]}}]\n"
    );
    env.write_mesh();
    env.wait_generation(2, 2);
    let seen_b6 = record_accepts(env.pod("b").ns.tcp_listen(v6("b", 8080)).unwrap());
    let seen_b4 = record_accepts(env.pod("b").ns.tcp_listen(env.addr("b", 8080)).unwrap());
    assert!(
        plaintext_from(&env, "a", v6("b", 8080)),
        "a over IPv6 (HBONE) is in the block:\n{}",
        env.log(2)
    );
    assert!(
        !plaintext_from(&env, "y", v6("b", 8080)),
        "y's IPv6 address is not in the block"
    );
    assert!(
        !plaintext_from(&env, "a", env.addr("b", 8080)),
        "a's IPv4 address is not in the block"
    );
    let peers: Vec<std::net::IpAddr> = seen_b6.lock().unwrap().iter().map(|p| p.ip()).collect();
    assert_eq!(peers, [v6("a", 0).ip()]);
    assert!(seen_b4.lock().unwrap().is_empty());
}

#[test]
fn ipv6_is_refused_not_passed_where_it_is_not_captured() {
    let Some(mut env) = dual_stack(
        1,
        &[
            pod("a", 1, "shop"),
            pod("y", 1, "legacy"),
            pod("z", 1, "legacy"),
        ],
    ) else {
        return;
    };
    // The node's operator turned IPv6 capture off: it stands for every case where it cannot
    // be programmed (no IPv6 listener, no IPv6 TPROXY), which take the same path.
    env.config_extra = "ipv6: refuse\n".into();
    env.start_all();
    wait_capture(&env, 1, 1);
    let v6 = |p: &str| SocketAddr::new(std::net::IpAddr::V6(env.ipv6[p]), 8080);
    let seen_a = record_accepts(env.pod("a").ns.tcp_listen(v6("a")).unwrap());
    let seen_y = record_accepts(env.pod("y").ns.tcp_listen(v6("y")).unwrap());
    let seen_z = record_accepts(env.pod("z").ns.tcp_listen(v6("z")).unwrap());
    // The IPv6 path itself works: between two pods outside the mesh.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !plaintext_from(&env, "y", v6("z")) {
        assert!(Instant::now() < deadline, "no IPv6 between y and z");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seen_z.lock().unwrap().len(), 1);
    // To and from the enrolled pod: refused.
    assert!(
        !plaintext_from(&env, "y", v6("a")),
        "IPv6 into the enrolled pod"
    );
    assert!(
        !plaintext_from(&env, "a", v6("y")),
        "IPv6 out of the enrolled pod"
    );
    assert!(
        seen_a.lock().unwrap().is_empty(),
        "{:?}",
        seen_a.lock().unwrap()
    );
    assert!(
        seen_y.lock().unwrap().is_empty(),
        "{:?}",
        seen_y.lock().unwrap()
    );
    // Visible: the address is pending with the reason, and readiness says it.
    let entry = capture_entry(&env, 1, &env.ipv6["a"].to_string());
    assert_eq!(entry["state"], "pending", "{entry}");
    let reason = entry["reason"].as_str().unwrap();
    assert!(
        reason.contains("refused") && reason.contains("ipv6: refuse"),
        "{reason}"
    );
    let (status, body) = env.admin(1, "/healthz/ready");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("IPv6 of local enrolled pods is refused") && body.contains("ipv6: refuse"),
        "{body}"
    );
}

/// `TCPSynRetrans` of a namespace: SYNs sent again (the first was dropped, for instance by
/// TPROXY finding no listener).
fn syn_retransmits(ns: &weft_testbed::Netns) -> u64 {
    let netstat = ns.exec("cat", ["/proc/net/netstat"]).unwrap();
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        panic!("no TcpExt in /proc/net/netstat:\n{netstat}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "TCPSynRetrans")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no TCPSynRetrans:\n{netstat}"))
}

/// A weft command for node `node` with `config`, as [`MeshEnv::start_daemon`] runs it.
fn weft_command(env: &MeshEnv, node: usize, config: &std::path::Path) -> std::process::Command {
    let mut cmd = env
        .bed
        .node(node)
        .ns
        .command(env!("CARGO_BIN_EXE_weft"), ["run", "--config"]);
    cmd.arg(config).env("RUST_LOG", "info,access=info");
    cmd
}

#[test]
fn a_weft_restarted_beside_the_old_one_loses_no_connection_under_load() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let Some(mut env) = shop_and_legacy(
        2,
        &[
            pod("a", 1, "shop"),
            pod("c", 2, "shop"),
            pod("z", 2, "legacy"),
        ],
    ) else {
        return;
    };
    // Node 1's weft with room for the long transfer to finish during its drain.
    let config = std::fs::read_to_string(env.config_path(1)).unwrap();
    std::fs::write(env.config_path(1), format!("{config}drainGrace: 20s\n")).unwrap();
    env.daemon(1).stop(Duration::from_secs(10)).unwrap();
    env.start_daemon(1);
    env.wait_ready(1);
    let short = env.addr("a", 8080);
    let long = env.addr("a", 8081);
    let _seen = record_accepts(env.pod("a").ns.tcp_listen(short).unwrap());
    // The long transfer's server: reads to the end, answers the byte count.
    let sink = env.pod("a").ns.tcp_listen(long).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = sink.accept() {
            let mut n = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            let _ = s.write_all(&n.to_be_bytes());
        }
    });

    // The client pod and node 2 (whose weft opens the HBONE connections to node 1).
    let retransmits =
        |env: &MeshEnv| syn_retransmits(&env.pod("c").ns) + syn_retransmits(&env.bed.node(2).ns);
    let retransmits_before = retransmits(&env);
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    // Short connections: through HBONE from c (mostly on pooled tunnels), and in plaintext
    // from z outside the mesh (each one a new connection to node 1's listeners).
    let load: Vec<_> = ["c", "z"]
        .into_iter()
        .map(|from| {
            let ns = env.pod(from).ns.clone();
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match exchange(&ns, short, Duration::from_secs(5)) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            failed.lock().unwrap().push(format!("{from}: {e}"));
                            0
                        }
                    };
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    const LONG: u64 = 48 << 20;
    const RESTART_MARKER: &[u8] = b"RESTART-MESH-SECRET-0123456789ab";
    let transfer = {
        let c = env.pod("c").ns.clone();
        std::thread::spawn(move || -> std::io::Result<u64> {
            let mut s = c.tcp_connect(long, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let chunk = RESTART_MARKER.repeat(256 * 1024 / RESTART_MARKER.len());
            for _ in 0..LONG / (256 * 1024) {
                s.write_all(&chunk)?;
                // About 4 s in all: the restart happens in the middle.
                std::thread::sleep(Duration::from_millis(20));
            }
            s.shutdown(std::net::Shutdown::Write)?;
            let mut n = [0u8; 8];
            s.read_exact(&mut n)?;
            Ok(u64::from_be_bytes(n))
        })
    };
    std::thread::sleep(Duration::from_millis(800));

    // A new weft beside the old one, first unable to serve: its mesh file (a copy) is
    // truncated, so it has bound its ports but must not listen; every connection still goes
    // to the old one. Then its mesh loads, it serves, and the old one is stopped.
    let underlay = env.bed.capture_underlay(1, "restart.pcap").unwrap();
    let next_mesh = env.bed.temp_dir().join("mesh-next.yaml");
    let good_mesh = std::fs::read_to_string(env.mesh_path()).unwrap();
    std::fs::write(&next_mesh, &good_mesh[..good_mesh.len() / 3]).unwrap();
    let next_config = env.bed.temp_dir().join("weft-1-next.yaml");
    std::fs::write(
        &next_config,
        std::fs::read_to_string(env.config_path(1))
            .unwrap()
            .replace(
                &env.mesh_path().display().to_string(),
                &next_mesh.display().to_string(),
            ),
    )
    .unwrap();
    let mut new = env
        .bed
        .spawn("weft-1-next", weft_command(&env, 1, &next_config))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !new.log().contains("mesh rejected") {
        assert!(
            Instant::now() < deadline,
            "the new weft never tried its mesh:\n{}",
            new.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let tmp = env.bed.temp_dir().join(".mesh-next.tmp");
    std::fs::write(&tmp, &good_mesh).unwrap();
    std::fs::rename(&tmp, &next_mesh).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !new.log().contains("capture rules updated") {
        assert!(
            Instant::now() < deadline,
            "the new weft never came up:\n{}",
            new.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    // The old weft's accept loop lags behind (frozen for a moment): connections pile up in
    // its listeners' queues, and it is told to stop before it takes them. Handed to the new
    // weft's listeners (`tcp_migrate_req`), none is reset.
    env.daemon(1).pause().unwrap();
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let ns = env.pod("z").ns.clone();
            let (done, failed) = (done.clone(), failed.clone());
            std::thread::spawn(move || match exchange(&ns, short, Duration::from_secs(5)) {
                Ok(()) => {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => failed.lock().unwrap().push(format!("z (burst): {e}")),
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    env.daemon(1).terminate().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    env.daemon(1).resume().unwrap();
    let status = env.daemon(1).stop(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status:?}\n{}", env.log(1));
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for l in load.into_iter().chain(burst) {
        l.join().unwrap();
    }
    let pcap = underlay.stop().unwrap();
    assert!(
        weft_testbed::contains(&pcap, b"hello"),
        "the check can fail: z's plaintext is on the underlay"
    );
    assert!(
        !weft_testbed::contains(&pcap, RESTART_MARKER),
        "mesh traffic in plaintext on the underlay during the restart"
    );

    let carried = transfer.join().unwrap();
    assert_eq!(
        carried.ok(),
        Some(LONG),
        "the long transfer\n{}",
        env.log(1)
    );
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} short connections failed: {failed:?}\nold:\n{}\nnew:\n{}",
        failed.len(),
        failed.len() + done.load(Ordering::Relaxed),
        env.log(1),
        new.log()
    );
    assert!(done.load(Ordering::Relaxed) > 100);
    // Not even delayed: no SYN had to be sent again (a gap between the two wefts drops SYNs,
    // which the client then retransmits a second later).
    assert_eq!(
        retransmits(&env),
        retransmits_before,
        "SYNs were dropped during the restart"
    );
    new.stop(Duration::from_secs(10)).unwrap();
}
