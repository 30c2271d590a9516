//! The testbed's own mesh tests: they build real namespaces, so they need root, `ip`,
//! `iptables` and `tcpdump` (skipped with a reason otherwise, failed with `CI=true`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use weft_testbed::{cleanup_stale, contains, require, Netns, Testbed};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Names listed by `ip netns list` (first word of each line).
fn ip_netns_list() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success(), "ip netns list: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn names_with_prefix(prefix: &str) -> Vec<String> {
    ip_netns_list()
        .into_iter()
        .filter(|name| name == prefix || name.starts_with(&format!("{prefix}-")))
        .collect()
}

/// Sends `payload` from `client` to the connection accepted on `listener`, echoes it back,
/// and returns the peer address the server saw.
fn exchange(listener: &TcpListener, mut client: TcpStream, payload: &[u8]) -> SocketAddr {
    let server = {
        let listener = listener.try_clone().unwrap();
        let len = payload.len();
        thread::spawn(move || {
            let (mut conn, peer) = listener.accept().unwrap();
            conn.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut buf = vec![0; len];
            conn.read_exact(&mut buf).unwrap();
            conn.write_all(&buf).unwrap();
            peer
        })
    };
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client.write_all(payload).unwrap();
    let mut echoed = vec![0; payload.len()];
    client.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, payload);
    server.join().unwrap()
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[test]
fn pods_talk_over_tcp_across_nodes_and_within_a_node_with_their_own_ips() {
    let Some(()) = require() else { return };
    let mut bed = Testbed::new(2).unwrap();
    let a = bed.add_pod(1, "a").unwrap();
    let b = bed.add_pod(1, "b").unwrap();
    let c = bed.add_pod(2, "c").unwrap();
    assert_eq!(a.ip, Ipv4Addr::new(10, 244, 1, 10));
    assert_eq!(b.ip, Ipv4Addr::new(10, 244, 1, 11));
    assert_eq!(c.ip, Ipv4Addr::new(10, 244, 2, 10));

    let on_c = c.ns.tcp_listen(addr(Ipv4Addr::UNSPECIFIED, 8080)).unwrap();
    let client = a.ns.tcp_connect(addr(c.ip, 8080), TIMEOUT).unwrap();
    let peer = exchange(&on_c, client, b"across nodes");
    assert_eq!(peer.ip(), a.ip);

    let on_b = b.ns.tcp_listen(addr(b.ip, 9090)).unwrap();
    let client = a.ns.tcp_connect(addr(b.ip, 9090), TIMEOUT).unwrap();
    let peer = exchange(&on_b, client, b"same node");
    assert_eq!(peer.ip(), a.ip);

    // And back the other way, from node 2 to node 1.
    let on_a = a.ns.tcp_listen(addr(a.ip, 7070)).unwrap();
    let client = c.ns.tcp_connect(addr(a.ip, 7070), TIMEOUT).unwrap();
    assert_eq!(exchange(&on_a, client, b"back").ip(), c.ip);
}

#[test]
fn a_node_reaches_its_own_and_remote_pods() {
    let Some(()) = require() else { return };
    let mut bed = Testbed::new(2).unwrap();
    let local = bed.add_pod(1, "local").unwrap();
    let remote = bed.add_pod(2, "remote").unwrap();
    for pod in [&local, &remote] {
        let listener = pod.ns.tcp_listen(addr(pod.ip, 8080)).unwrap();
        let client = bed
            .node(1)
            .ns
            .tcp_connect(addr(pod.ip, 8080), TIMEOUT)
            .unwrap();
        exchange(&listener, client, b"from the node");
    }
}

#[test]
fn nodes_forward_with_loose_rp_filter_and_accept_tproxy_rules() {
    let Some(()) = require() else { return };
    let mut bed = Testbed::new(3).unwrap();
    let pod = bed.add_pod(3, "x").unwrap();
    let node = &bed.node(3);
    assert_eq!(node.name, "node-3");
    assert_eq!(node.underlay_ip, Ipv4Addr::new(172, 18, 0, 3));
    assert_eq!(node.pod_cidr.to_string(), "10.244.3.0/24");
    let read = |ns: &Netns, key: &str| ns.exec("cat", [format!("/proc/sys/{key}")]).unwrap();
    assert_eq!(read(&node.ns, "net/ipv4/ip_forward").trim(), "1");
    assert_eq!(read(&node.ns, "net/ipv4/conf/all/rp_filter").trim(), "0");
    assert_eq!(
        read(
            &node.ns,
            &format!("net/ipv4/conf/{}/proxy_arp", pod.host_veth)
        )
        .trim(),
        "1"
    );
    node.ns
        .exec(
            "iptables",
            [
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                "15008",
                "-j",
                "TPROXY",
                "--on-port",
                "15008",
                "--tproxy-mark",
                "0x1/0x1",
            ],
        )
        .unwrap();
    assert!(node
        .ns
        .exec("iptables-save", Vec::<String>::new())
        .unwrap()
        .contains("TPROXY"));

    // Three nodes on the underlay bridge: node 3's pod reaches node 1 and node 2.
    for other in [1, 2] {
        let target = bed.node(other).underlay_ip;
        let listener = bed.node(other).ns.tcp_listen(addr(target, 8080)).unwrap();
        let client = pod.ns.tcp_connect(addr(target, 8080), TIMEOUT).unwrap();
        assert_eq!(exchange(&listener, client, b"3 nodes").ip(), pod.ip);
    }
}

#[test]
fn an_underlay_capture_sees_a_marker_sent_across_nodes() {
    let Some(()) = require() else { return };
    let mut bed = Testbed::new(2).unwrap();
    let a = bed.add_pod(1, "a").unwrap();
    let b = bed.add_pod(2, "b").unwrap();
    let capture = bed.capture_underlay(1, "underlay.pcap").unwrap();
    let marker = b"weft-testbed-plaintext-marker-5f3a";
    let listener = b.ns.tcp_listen(addr(b.ip, 8080)).unwrap();
    let client = a.ns.tcp_connect(addr(b.ip, 8080), TIMEOUT).unwrap();
    exchange(&listener, client, marker);
    let pcap = capture.stop().unwrap();
    assert!(pcap.len() > 24, "pcap has only {} bytes", pcap.len());
    assert!(contains(&pcap, marker), "marker not in the capture");
    assert!(!contains(&pcap, b"a-marker-that-was-never-sent"));
}

#[test]
fn dropping_a_testbed_removes_every_namespace_it_created() {
    let Some(()) = require() else { return };
    let mut bed = Testbed::new(2).unwrap();
    bed.add_pod(1, "a").unwrap();
    bed.add_pod(2, "b").unwrap();
    let prefix = bed.prefix().to_owned();
    let mut expected: Vec<String> = bed
        .namespaces()
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
    expected.sort();
    let mut listed = names_with_prefix(&prefix);
    listed.sort();
    assert_eq!(listed, expected);
    let dir = bed.temp_dir().to_owned();
    drop(bed);
    assert_eq!(names_with_prefix(&prefix), Vec::<String>::new());
    assert!(!dir.exists());
}

#[test]
fn a_panic_while_a_testbed_is_alive_still_removes_its_namespaces() {
    let Some(()) = require() else { return };
    let mut prefix = String::new();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut bed = Testbed::new(2).unwrap();
        bed.add_pod(2, "doomed").unwrap();
        let _daemon = bed
            .spawn("sleeper", bed.node(1).ns.command("sleep", ["30"]))
            .unwrap();
        prefix = bed.prefix().to_owned();
        assert!(!names_with_prefix(&prefix).is_empty());
        panic!("a test body fails while the mesh is up");
    }));
    assert!(result.is_err());
    assert!(!prefix.is_empty());
    assert_eq!(names_with_prefix(&prefix), Vec::<String>::new());
}

#[test]
fn two_testbeds_alive_in_one_process_do_not_collide() {
    let Some(()) = require() else { return };
    let mut one = Testbed::new(2).unwrap();
    let mut two = Testbed::new(2).unwrap();
    assert_ne!(one.prefix(), two.prefix());
    let pid = std::process::id().to_string();
    assert!(one.prefix().starts_with(&format!("wt{pid}")));
    // Same pod names and addresses in both; each mesh only sees its own.
    for bed in [&mut one, &mut two] {
        bed.add_pod(1, "a").unwrap();
        bed.add_pod(2, "b").unwrap();
    }
    let listener_one = one
        .pod("b")
        .ns
        .tcp_listen(addr(one.pod("b").ip, 8080))
        .unwrap();
    // Only `one` listens: a connection inside `two` to the same address is refused.
    let refused = two
        .pod("a")
        .ns
        .tcp_connect(addr(two.pod("b").ip, 8080), TIMEOUT)
        .unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    let client = one
        .pod("a")
        .ns
        .tcp_connect(addr(one.pod("b").ip, 8080), TIMEOUT)
        .unwrap();
    assert_eq!(
        exchange(&listener_one, client, b"one").ip(),
        one.pod("a").ip
    );
}

#[test]
fn a_spawned_process_logs_to_a_file_and_can_be_killed_and_restarted() {
    let Some(()) = require() else { return };
    let bed = Testbed::new(1).unwrap();
    let ns = &bed.node(1).ns;
    let script = "echo started in $(ip -o addr show dev ul | grep -o '172.18.0.1'); exec sleep 30";
    let mut first = bed
        .spawn("daemon", ns.command("sh", ["-c", script]))
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !first.log().contains("started in 172.18.0.1") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        first.log().contains("started in 172.18.0.1"),
        "log: {}",
        first.log()
    );
    assert!(first.log_path().starts_with(bed.temp_dir()));
    assert_eq!(first.try_wait().unwrap(), None);
    first.kill().unwrap();
    let status = first
        .wait_timeout(TIMEOUT)
        .unwrap()
        .expect("exited after SIGKILL");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9));

    let mut second = bed.spawn("daemon", ns.command("sleep", ["30"])).unwrap();
    assert_ne!(second.log_path(), first.log_path());
    let started = Instant::now();
    let status = second.stop(TIMEOUT).unwrap();
    assert_eq!(status.signal(), Some(15));
    assert!(started.elapsed() < TIMEOUT);
}

#[test]
fn http_get_reads_a_server_inside_a_node_namespace() {
    let Some(()) = require() else { return };
    let bed = Testbed::new(1).unwrap();
    let ns = &bed.node(1).ns;
    let listener = ns.tcp_listen(addr(Ipv4Addr::LOCALHOST, 15000)).unwrap();
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut request = Vec::new();
        let mut buf = [0; 1024];
        while !contains(&request, b"\r\n\r\n") {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0);
            request.extend_from_slice(&buf[..n]);
        }
        conn.write_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nready \r\n2\r\nok\r\n0\r\n\r\n",
        )
        .unwrap();
        // Keep the connection open (ignoring `Connection: close`) until the client is done:
        // the client must stop at the end of the chunked body, not wait for EOF.
        let _ = conn.read(&mut buf);
        String::from_utf8(request).unwrap()
    });
    let started = Instant::now();
    let (status, body) = ns
        .http_get(addr(Ipv4Addr::LOCALHOST, 15000), "/healthz/ready")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!((status, body.as_str()), (200, "ready ok"));
    let request = server.join().unwrap();
    assert!(
        request.starts_with("GET /healthz/ready HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(request.contains("Connection: close"));
    // The root namespace has no such server: the socket really was in the node namespace.
    assert!(bed
        .node(1)
        .ns
        .http_get(addr(Ipv4Addr::LOCALHOST, 15001), "/")
        .is_err());
}

/// Deletes the namespaces it names on drop, so the stale-cleanup test leaves nothing behind
/// even when it fails.
struct RemoveOnDrop(Vec<String>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

#[test]
fn cleanup_stale_removes_namespaces_of_dead_pids_only() {
    let Some(()) = require() else { return };
    // A pid that just died, and one that is alive (not ours).
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let mut alive = Command::new("sleep").arg("30").spawn().unwrap();
    let stale = format!("wt{dead_pid}zq-n1");
    let live = format!("wt{}zq-n1", alive.id());
    let other_shape = format!("wt{dead_pid}-n1");
    let _guard = RemoveOnDrop(vec![stale.clone(), live.clone(), other_shape.clone()]);
    for name in [&stale, &live, &other_shape] {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
    }
    let removed = cleanup_stale().unwrap();
    let listed = ip_netns_list();
    let _ = alive.kill();
    let _ = alive.wait();
    assert!(removed.contains(&stale), "removed: {removed:?}");
    assert!(!listed.contains(&stale));
    assert!(listed.contains(&live));
    assert!(listed.contains(&other_shape));
    assert!(!removed.contains(&live) && !removed.contains(&other_shape));
}

#[test]
fn sigint_to_a_binary_with_the_signal_handler_removes_its_testbed() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;

    let Some(()) = require() else { return };
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft-testbed"))
        .args(["hold", "2", "1", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Whatever happens below, the child does not outlive the test.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = cleanup_stale();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let (sleeper_tx, sleeper_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(prefix) = line.strip_prefix("ready ") {
                let _ = tx.send(prefix.to_owned());
            } else if let Some(pid) = line.strip_prefix("sleeper ") {
                let _ = sleeper_tx.send(pid.to_owned());
            }
        }
    });
    let prefix = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("mesh ready");
    assert!(prefix.starts_with(&format!("wt{pid}")));
    assert_eq!(names_with_prefix(&prefix).len(), 1 + 2 + 2);
    // A process started in the testbed after the handler was installed blocks no signal
    // and catches none: the SIGTERM of the cleanup (or of anyone) reaches it.
    let sleeper = sleeper_rx.recv().expect("sleeper pid");
    let status = std::fs::read_to_string(format!("/proc/{sleeper}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .to_owned()
    };
    assert_eq!(field("SigBlk:"), "0000000000000000", "{status}");
    assert_eq!(field("SigCgt:"), "0000000000000000", "{status}");

    let kill = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGINT");
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.code(),
        Some(130),
        "{status:?} (signal {:?})",
        status.signal()
    );
    assert_eq!(names_with_prefix(&prefix), Vec::<String>::new());
}

#[test]
fn invalid_requests_fail_with_a_reason_and_leave_nothing_behind() {
    let Some(()) = require() else { return };
    assert!(Testbed::new(0).is_err());
    let mut bed = Testbed::new(1).unwrap();
    let prefix = bed.prefix().to_owned();
    assert!(bed.add_pod(2, "a").is_err());
    assert!(bed.add_pod(1, "Not_A_Name").is_err());
    bed.add_pod(1, "a").unwrap();
    assert!(bed.add_pod(1, "a").is_err());
    let err = bed
        .node(1)
        .ns
        .ip(["link", "set", "nosuchlink", "up"])
        .unwrap_err();
    assert!(err.to_string().contains("nosuchlink"), "{err}");
    // A capture dropped without `stop` kills its tcpdump.
    drop(bed.capture_underlay(1, "x.pcap").unwrap());
    let err =
        weft_testbed::Capture::start(&bed.node(1).ns, "nosuchif", bed.temp_dir().join("y.pcap"))
            .unwrap_err();
    assert!(err.to_string().contains("nosuchif"), "{err}");
    drop(bed);
    assert_eq!(names_with_prefix(&prefix), Vec::<String>::new());
}
