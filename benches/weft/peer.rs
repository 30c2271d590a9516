//! The peer of `--peer PATH`: Istio's ztunnel, measured beside weft on the same namespace
//! mesh, in the same rounds (README "Performance"). Nothing of ztunnel is in the repository:
//! the binary is one the user built.
//!
//! Where it runs: two more nodes of the bench's mesh ([`NODES`]: 3 and 4), with the pods weft
//! has on nodes 1 and 2 (a client, a server, five cold clients), so that both tunnels stay up
//! and the rounds alternate between them without restarts. The capture is weft's own: weft runs
//! on those nodes first, programs its rules and is stopped; the rules outlive it
//! (ARCHITECTURE.md §3 "Capture") and ztunnel takes their connections on the same ports
//! (15001/15006/15008; its listeners are transparent when it may make them so, as root here).
//! ztunnel runs as the issue ran it: `PROXY_MODE=dedicated` in the node's namespace, its
//! workloads from a local file (`LOCAL_XDS_PATH`), certificates from its built-in test CA
//! (`FAKE_CA=true`, the same CA on both nodes, so they trust each other). weft's nodes get
//! their CA from the same test root ([`Ztunnel::write_ca_dir`]), so the two tunnels also
//! trust each other, and [`Running::interop`] proves, before anything is measured, that each
//! carries the other's connections (weft's client to ztunnel's server, ztunnel's client to
//! weft's server): the wire compatibility README.md claims, checked against a real ztunnel;
//! and that weft's AuthorizationPolicy sees the identity ztunnel presents ([`DENY_POLICY`],
//! on a server of weft's node that only `--peer` runs have).
//!
//! Dedicated mode proxies for one workload (`PROXY_WORKLOAD_INFO`), whatever the pods on the
//! node: outbound, every captured connection leaves with that workload's identity, whatever
//! its source address (ztunnel's `proxy/outbound.rs`, `proxy_to`: the source is
//! `local_workload_information`, not a lookup of the client's IP); inbound, it presents that
//! workload's certificate and delivers to the connection's original destination
//! (`proxy/inbound.rs`, `build_inbound_request`). So several pods per node work only where
//! the others need no identity of their own: here the cold clients on node 3 connect as
//! `zclient` (each still opens a connection of its own and pays a handshake: ztunnel's pool
//! is keyed on the source address too), and node 4 serves only `zserver`. A second server
//! with another service account on node 4 would fail its clients' check of the server's
//! identity.
//!
//! Owns: ztunnel's local config and environment, its processes (started through the testbed,
//! so they are stopped on drop, on panic and on Ctrl-C; for the state row, short-lived ones on
//! the mesh's spare node with extra workloads, [`state_rss`]), and the proof that the bench's
//! traffic to the peer went through ztunnel as HBONE: before measuring, a capture of the
//! underlay and ztunnel's metrics ([`Running::prove`]); while measuring, ztunnel's metrics
//! must count every connection the bench made over the peer's routes, or the bench stops
//! before printing the peer's figures ([`PeerSide::verify`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use weft_testbed::{ChildGuard, Netns, Testbed};

use super::*;

/// The peer's name in the table and the JSON.
pub(crate) const NAME: &str = "ztunnel";

/// The nodes the peer runs on (weft's are 1 and 2).
pub(crate) const NODES: [usize; 2] = [3, 4];

/// The peer's client and server pods (node 3 and node 4).
pub(crate) const CLIENT: &str = "zclient";
pub(crate) const SERVER: &str = "zserver";

/// The Kubernetes namespace of the peer's pods (ambient, as weft's bench pods).
const NAMESPACE: &str = "bench";

/// ztunnel's default cluster id, named in its workloads' uids.
const CLUSTER: &str = "Kubernetes";

/// ztunnel's metrics endpoint inside a node's namespace (readiness is on weft's port,
/// 15021: [`wait_ready`]).
const METRICS: &str = "127.0.0.1:15020";

/// A ztunnel binary that runs (`PATH version`).
pub(crate) struct Ztunnel {
    pub(crate) bin: PathBuf,
    /// The first line `ztunnel version` prints.
    pub(crate) version: String,
    /// The folder of ztunnel's test CA (its `src/tls/`): `root-cert.pem`, the self-signed root
    /// its `FAKE_CA` issues from, and `ca-key.pem`, that root's key ([`Ztunnel::write_ca_dir`]).
    pub(crate) ca: PathBuf,
}

/// ztunnel's test CA files (in its checkout's `src/tls/`) that weft's CA is made of.
const TEST_ROOT: &str = "root-cert.pem";
const TEST_ROOT_KEY: &str = "ca-key.pem";

/// Where ztunnel's test CA is: `WEFT_BENCH_PEER_CA` if set, else the `src/tls/` of the
/// checkout the binary was built in (its `out/rust/release/ztunnel`, or any folder above it
/// that holds `src/tls/root-cert.pem`).
fn find_test_ca(bin: &Path) -> Result<PathBuf, String> {
    let has_ca = |d: &Path| d.join(TEST_ROOT).is_file() && d.join(TEST_ROOT_KEY).is_file();
    if let Some(dir) = std::env::var_os("WEFT_BENCH_PEER_CA") {
        let dir = PathBuf::from(dir);
        return if has_ca(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "WEFT_BENCH_PEER_CA={}: no {TEST_ROOT} and {TEST_ROOT_KEY} there (ztunnel's src/tls/)",
                dir.display()
            ))
        };
    }
    let bin = bin
        .canonicalize()
        .map_err(|e| format!("--peer {}: {e}", bin.display()))?;
    bin.ancestors()
        .map(|a| a.join("src").join("tls"))
        .find(|d| has_ca(d))
        .ok_or_else(|| {
            format!(
                "--peer {}: ztunnel's test CA ({TEST_ROOT} and {TEST_ROOT_KEY} in src/tls/ of its checkout) is not in any folder above the binary; set WEFT_BENCH_PEER_CA to that src/tls/",
                bin.display()
            )
        })
}

impl Ztunnel {
    pub(crate) fn new(bin: PathBuf) -> Result<Ztunnel, String> {
        let out = std::process::Command::new(&bin)
            .arg("version")
            .output()
            .map_err(|e| format!("--peer {}: {e}", bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "--peer {}: `version` exited with {}: {}",
                bin.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or_default()
            .to_string();
        let ca = find_test_ca(&bin)?;
        Ok(Ztunnel { bin, version, ca })
    }

    /// Writes weft's plugin-CA folder `dir` from ztunnel's test CA, so that weft's nodes and
    /// ztunnel's (`FAKE_CA`, which signs with that root's key) trust each other: the root is
    /// `root-cert.pem` and also `ca-cert.pem` (weft's built-in CA signs with it directly, as
    /// ztunnel's does) and `cert-chain.pem`; its key is `ca-key.pem`. With the same root on
    /// every node, the two tunnels' chains are the same shape (leaf, then the root), so their
    /// handshakes cost the same checks.
    pub(crate) fn write_ca_dir(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let root = std::fs::read(self.ca.join(TEST_ROOT))?;
        for name in ["root-cert.pem", "ca-cert.pem", "cert-chain.pem"] {
            std::fs::write(dir.join(name), &root)?;
        }
        std::fs::copy(self.ca.join(TEST_ROOT_KEY), dir.join("ca-key.pem"))?;
        Ok(())
    }
}

/// The peer's pods and their nodes, as weft's (`client`, `server`, `cold0..4`).
pub(crate) fn pods() -> Vec<(String, usize)> {
    let mut pods = vec![
        (CLIENT.to_string(), NODES[0]),
        (SERVER.to_string(), NODES[1]),
    ];
    pods.extend((0..5).map(|i| (format!("zcold{i}"), NODES[0])));
    pods
}

/// weft's pods that ztunnel's nodes reach and are reached from ([`Running::interop`]): weft's
/// client (node 1), its server and [`DENY_SERVER`] (node 2), with the same identities as in
/// weft's mesh file (namespace `bench`, service account = pod name).
const WEFT_PODS: [(&str, usize); 3] = [("client", 1), ("server", 2), (DENY_SERVER, 2)];

/// A server pod on weft's server node (node 2) that [`DENY_POLICY`] guards: weft must refuse
/// ztunnel's client there by the identity ztunnel presented, and let weft's client through.
pub(crate) const DENY_SERVER: &str = "dserver";

/// [`DENY_SERVER`]'s labels in weft's mesh file (after its name and namespace).
pub(crate) const DENY_SERVER_LABELS: &str = ", labels: {app: interop-deny}";

/// weft's AuthorizationPolicy for [`DENY_SERVER`]: DENY from ztunnel's client's principal.
pub(crate) const DENY_POLICY: &str = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-zclient, namespace: bench}\nspec:\n  selector: {matchLabels: {app: interop-deny}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/bench/sa/zclient]}\n";

/// ztunnel's local config (`LOCAL_XDS_PATH`): the peer's pods and weft's [`WEFT_PODS`] as
/// HBONE workloads, no services, no policies (weft's bench mesh has one, [`DENY_POLICY`], for
/// a pod of its own that no measured route reaches), and `extra` more workloads ([`extra_workloads`], the same weft's mesh file gets for the state row).
fn local_config(bed: &Testbed, extra: usize) -> String {
    let mut out = String::from("workloads:\n");
    let weft_pods = WEFT_PODS
        .iter()
        .map(|(name, node)| (name.to_string(), *node));
    let pods = pods()
        .into_iter()
        .chain(weft_pods)
        .map(|(name, node)| (bed.pod(&name).ip, bed.node(node).name.clone(), name));
    let extras = extra_workloads(extra).map(|(name, ip)| (ip, EXTRA_NODE.to_string(), name));
    for (ip, node, name) in pods.chain(extras) {
        out.push_str(&format!(
            "- uid: {CLUSTER}//v1/Pod/{NAMESPACE}/{name}\n  name: {name}\n  namespace: {NAMESPACE}\n  serviceAccount: {name}\n  trustDomain: cluster.local\n  clusterId: {CLUSTER}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n  services: {{}}\n",
        ));
    }
    out
}

/// Starts ztunnel in node `n`'s namespace as the dedicated proxy of `pod`, its workloads from
/// `config`. Not waited for: [`wait_ready`].
fn spawn(bed: &Testbed, zt: &Ztunnel, n: usize, pod: &str, config: &Path) -> ChildGuard {
    let node = bed.node(n);
    let mut cmd = node.ns.command(&zt.bin, ["proxy"]);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // As weft's daemons in the bench: warnings only, no access log.
        .env("RUST_LOG", "warn")
        .env("FAKE_CA", "true")
        .env("LOCAL_XDS_PATH", config)
        // No istiod: an empty address turns the xDS client off.
        .env("XDS_ADDRESS", "")
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", format!("{NAMESPACE}/{pod}/{pod}"))
        .env("NODE_NAME", &node.name)
        .env("CLUSTER_ID", CLUSTER)
        .env("POD_NAME", format!("ztunnel-{}", node.name))
        .env("POD_NAMESPACE", "istio-system")
        .env("INSTANCE_IP", node.underlay_ip.to_string())
        // Its drain on SIGTERM, so that the bench ends within the testbed's grace.
        .env("CONNECTION_TERMINATION_DEADLINE", "1s");
    bed.spawn(&format!("ztunnel-{n}"), cmd)
        .expect("spawn ztunnel")
}

/// The RSS of a ztunnel started on the spare node `n` (no pods, no capture, no traffic) with
/// its local config plus `extra` workloads, early and settled after ready
/// ([`state_rss_readings`]); the process is stopped before this returns. The same procedure
/// as weft's in [`mesh`].
pub(crate) fn state_rss(bed: &Testbed, zt: &Ztunnel, n: usize, extra: usize) -> [u64; 2] {
    let config = bed.temp_dir().join(format!("ztunnel-state-{extra}.yaml"));
    std::fs::write(&config, local_config(bed, extra)).expect("write ztunnel's local config");
    let mut proc = spawn(bed, zt, n, CLIENT, &config);
    wait_ready(&bed.node(n).ns, proc.name(), || proc.log());
    let rss = state_rss_readings(proc.pid());
    let _ = proc.stop(Duration::from_secs(5));
    rss
}

/// The peer's ztunnels, running on [`NODES`] behind weft's capture rules.
pub(crate) struct Running {
    procs: Vec<ChildGuard>,
    nodes: [Netns; 2],
    /// Connections the bench made over the peer's routes (every socket they hand out).
    made: Arc<AtomicU64>,
    /// ztunnel's mTLS connection counters (node 3 outbound, node 4 inbound) when `made` was 0.
    at_start: [f64; 2],
}

/// Stops the weft daemons that programmed the capture on [`NODES`] (`programmers`, ready),
/// checks that their rules stayed, and starts ztunnel in their place. Panics, with the logs,
/// if any step fails.
pub(crate) fn start(bed: &Testbed, zt: &Ztunnel, programmers: Vec<ChildGuard>) -> Running {
    for mut weft in programmers {
        // SIGTERM: weft drains and exits, and leaves the capture in force (only `weft
        // uninstall` removes it).
        let status = weft.stop(Duration::from_secs(10)).expect("stop weft");
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            weft.name(),
            weft.log()
        );
    }
    for n in NODES {
        let node = bed.node(n);
        let rules = node
            .ns
            .exec("iptables-save", ["-t", "mangle"])
            .expect("iptables-save");
        let routing = node.ns.ip(["rule", "show"]).expect("ip rule");
        for (name, _) in pods().iter().filter(|(_, at)| *at == n) {
            let ip = bed.pod(name).ip;
            assert!(
                rules.contains(&format!("-A WEFT_PRE -d {ip}/32 ")) && rules.contains("TPROXY"),
                "weft's capture of {name} ({ip}) did not outlive weft on {}:\n{rules}",
                node.name
            );
        }
        assert!(
            routing.contains("lookup 100"),
            "weft's policy-routing rule did not outlive weft on {}:\n{routing}",
            node.name
        );
    }
    let config = bed.temp_dir().join("ztunnel-local.yaml");
    std::fs::write(&config, local_config(bed, 0)).expect("write ztunnel's local config");
    let procs: Vec<ChildGuard> = NODES
        .into_iter()
        .zip([CLIENT, SERVER])
        .map(|(n, pod)| spawn(bed, zt, n, pod, &config))
        .collect();
    for (i, n) in NODES.into_iter().enumerate() {
        wait_ready(&bed.node(n).ns, &format!("ztunnel-{n}"), || procs[i].log());
    }
    let nodes = [bed.node(NODES[0]).ns.clone(), bed.node(NODES[1]).ns.clone()];
    Running {
        procs,
        at_start: mtls_counters(&nodes).expect("ztunnel's metrics"),
        nodes,
        made: Arc::new(AtomicU64::new(0)),
    }
}

impl Running {
    /// The node proxies' processes: the client's node, the server's node.
    pub(crate) fn pids(&self) -> [u32; 2] {
        [self.procs[0].pid(), self.procs[1].pid()]
    }

    /// Proves, before anything is measured, that a connection from the peer's client to its
    /// server goes through ztunnel as HBONE: on the underlay, the message is nowhere in clear
    /// text and the only connection is to the server's port 15008 (none to the app's port);
    /// ztunnel counts one more mTLS connection at each end. The same message between
    /// the plain pods `plain` must be visible in the same kind of capture (the check can
    /// fail). Panics otherwise.
    pub(crate) fn prove(&mut self, bed: &Testbed, app_port: u16, plain: (&str, &str)) {
        const PEER_MARK: &[u8] = b"WEFT-BENCH-PEER-PROOF-must-not-be-seen-";
        const PLAIN_MARK: &[u8] = b"WEFT-BENCH-PLAIN-CONTROL-is-seen-";
        let (client, server) = (bed.pod(CLIENT), bed.pod(SERVER));
        let peer_cap = bed
            .capture_underlay(NODES[0], "peer-proof.pcap")
            .expect("capture node 3's underlay");
        let plain_cap = bed
            .capture_underlay(bed.pod(plain.0).node, "plain-control.pcap")
            .expect("capture the plain pods' underlay");
        let before = mtls_counters(&self.nodes).expect("ztunnel's metrics");
        echo(
            &client.ns,
            SocketAddr::new(IpAddr::V4(server.ip), app_port),
            PEER_MARK,
        )
        .expect("a connection through ztunnel");
        self.made.fetch_add(1, Ordering::Relaxed);
        let dst = SocketAddr::new(IpAddr::V4(bed.pod(plain.1).ip), app_port);
        echo(&bed.pod(plain.0).ns, dst, PLAIN_MARK).expect("a plain connection");
        let peer_pcap = peer_cap.stop().expect("capture");
        let plain_pcap = plain_cap.stop().expect("capture");
        assert!(
            weft_testbed::contains(&plain_pcap, PLAIN_MARK),
            "the underlay capture does not show a plain connection's bytes: it cannot prove anything"
        );
        assert!(
            !weft_testbed::contains(&peer_pcap, PEER_MARK),
            "a connection to {SERVER} crossed the underlay in clear text: it went around ztunnel"
        );
        let segments = tcp_segments(&peer_pcap);
        let to_server = |port: u16| segments_at(&segments, server.ip, port);
        assert!(
            to_server(15008) > 0 && to_server(app_port) == 0,
            "on the underlay, {} segments to {SERVER}:15008 (HBONE) and {} to its app port {app_port}: not through ztunnel's tunnel",
            to_server(15008),
            to_server(app_port)
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = mtls_counters(&self.nodes).expect("ztunnel's metrics");
            if now[0] >= before[0] + 1.0 && now[1] >= before[1] + 1.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ztunnel did not count the connection as mTLS at both ends (outbound {} -> {}, inbound {} -> {})",
                before[0],
                now[0],
                before[1],
                now[1]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "(peer: {NAME} on nodes {}, {}: proven to carry the bench's traffic as HBONE, mTLS at both ends)",
            NODES[0], NODES[1]
        );
    }

    /// Proves that weft and ztunnel carry each other's connections, both ways, before anything
    /// is measured: weft's client (node 1) to ztunnel's server (node 4), then ztunnel's client
    /// (node 3) to weft's server (node 2). In each direction: a 1 KiB echo that must come back
    /// whole, whose bytes are nowhere in clear text on the sender's underlay and whose only
    /// connection there is to the server's port 15008 (HBONE), none to the app's port; then
    /// [`INTEROP_STREAMS`] connections open at once, echoing in turn (several CONNECT streams
    /// on the pooled connection); then [`INTEROP_BULK`] bytes and a half-close, answered with
    /// the server app's count of what it received (flow control far past the windows, and
    /// END_STREAM each way); then a connection to a port where no app listens, which the
    /// receiving side refuses and the client must see reset, with no bytes ([`refused`]). The
    /// sending node proxy must count each connection that reached the app as mTLS to the
    /// server's identity (`destination_principal`) and the receiving one as mTLS from the
    /// client's (`source_principal`): each side authenticated the other with the other's
    /// certificate. Both kinds of node proxy are scraped on the same port with the
    /// same metric (`istio_tcp_connections_opened_total`, Istio's labels). Panics, naming the
    /// direction and the failed check, otherwise.
    pub(crate) fn interop(&self, bed: &Testbed, app_port: u16) {
        let cases = [
            ("weft", WEFT_PODS[0].0, NAME, SERVER),
            (NAME, CLIENT, "weft", WEFT_PODS[1].0),
        ];
        for (sender, from, receiver, to) in cases {
            let (from, to) = (bed.pod(from), bed.pod(to));
            let what = format!(
                "{sender} -> {receiver} ({} on {} to {} on {})",
                from.name,
                bed.node(from.node).name,
                to.name,
                bed.node(to.node).name
            );
            let mark = format!("WEFT-BENCH-INTEROP-{sender}-to-{receiver}-must-not-be-seen-");
            let (src_id, dst_id) = (spiffe(&from.name), spiffe(&to.name));
            let (out_ns, in_ns) = (&bed.node(from.node).ns, &bed.node(to.node).ns);
            let counts = || -> [f64; 2] {
                let out = opened(out_ns, "source", Some(("destination_principal", &dst_id)));
                let inb = opened(in_ns, "destination", Some(("source_principal", &src_id)));
                match (out, inb) {
                    (Ok(o), Ok(i)) => [o, i],
                    (Err(e), _) | (_, Err(e)) => panic!("interop {what}: {e}"),
                }
            };
            let dst = SocketAddr::new(IpAddr::V4(to.ip), app_port);
            let before = counts();
            let cap = bed
                .capture_underlay(from.node, &format!("interop-{sender}.pcap"))
                .expect("capture the sender's underlay");
            let sent = echo(&from.ns, dst, mark.as_bytes());
            let pcap = cap.stop().expect("capture");
            if let Err(e) = sent {
                panic!("interop {what}: the echo failed: {e}");
            }
            assert!(
                !weft_testbed::contains(&pcap, mark.as_bytes()),
                "interop {what}: the echo crossed the underlay in clear text"
            );
            let segments = tcp_segments(&pcap);
            let to_server = |port: u16| segments_at(&segments, to.ip, port);
            assert!(
                to_server(15008) > 0 && to_server(app_port) == 0,
                "interop {what}: on the underlay, {} segments to port 15008 (HBONE) and {} to the app's port {app_port}",
                to_server(15008),
                to_server(app_port)
            );
            if let Err(e) = echo_at_once(&from.ns, dst, INTEROP_STREAMS, mark.as_bytes()) {
                panic!("interop {what}: {INTEROP_STREAMS} echo connections at once: {e}");
            }
            match sink(&from.ns, dst, INTEROP_BULK) {
                Ok(n) if n == INTEROP_BULK => {}
                Ok(n) => panic!(
                    "interop {what}: the server counted {n} bytes of the {INTEROP_BULK} sent"
                ),
                Err(e) => panic!("interop {what}: {INTEROP_BULK} bytes and a half-close: {e}"),
            }
            // A CONNECT the receiving side cannot serve (no app listens on the port): its
            // refusal must cross back as a reset of the client's connection, with no bytes.
            let no_app = SocketAddr::new(IpAddr::V4(to.ip), NO_APP_PORT);
            if let Err(e) = refused(&from.ns, no_app) {
                panic!("interop {what}: to port {NO_APP_PORT}, where no app listens: {e}");
            }
            let made = (2 + INTEROP_STREAMS) as f64;
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let now = counts();
                if now[0] >= before[0] + made && now[1] >= before[1] + made {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "interop {what}: of {made} connections, {sender} counted {} mTLS connections to {dst_id} (was {}), {receiver} {} from {src_id} (was {})",
                    now[0],
                    before[0],
                    now[1],
                    before[1]
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            println!(
                "(interop: {what}: a 1 KiB echo, {INTEROP_STREAMS} echo connections at once and {} MiB with a half-close carried over HBONE; {sender} counted {made} mTLS connections to {dst_id}, {receiver} {made} from {src_id}; to a port with no app the client's connection was reset)",
                INTEROP_BULK >> 20
            );
        }
        self.interop_policy(bed, app_port);
    }

    /// weft's policy on ztunnel's identity: [`DENY_POLICY`] denies ztunnel's client at
    /// [`DENY_SERVER`] (weft's node 2). Its connection there must be reset with no bytes and
    /// weft must count it denied from ztunnel client's principal
    /// (`istio_tcp_connections_failed_total`, `response_flags="DENY"`), while weft's own
    /// client reaches the same app (the principal decided, not the path). Panics otherwise.
    fn interop_policy(&self, bed: &Testbed, app_port: u16) {
        let server = bed.pod(DENY_SERVER);
        let dst = SocketAddr::new(IpAddr::V4(server.ip), app_port);
        let weft_node = &bed.node(server.node).ns;
        let zclient = spiffe(CLIENT);
        let denied = || {
            failed(weft_node, "DENY", &zclient).unwrap_or_else(|e| panic!("interop policy: {e}"))
        };
        let before = denied();
        if let Err(e) = refused(&bed.pod(CLIENT).ns, dst) {
            panic!("interop policy: {CLIENT} (ztunnel) to {DENY_SERVER}, which denies it: {e}");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while denied() < before + 1.0 {
            assert!(
                Instant::now() < deadline,
                "interop policy: weft did not count a connection from {zclient} denied"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let weft_client = &bed.pod(WEFT_PODS[0].0).ns;
        if let Err(e) = echo(weft_client, dst, b"WEFT-BENCH-INTEROP-POLICY-") {
            panic!("interop policy: weft's client to {DENY_SERVER}, which allows it: {e}");
        }
        println!(
            "(interop policy: weft denied {zclient}, as ztunnel presented it, at {DENY_SERVER} with an AuthorizationPolicy: reset, counted DENY; weft's own client got through)"
        );
    }

    /// The peer's side of the measurement: its routes (counted; to the server's app on
    /// `app_port`, and to its HTTP app on `http_port`), its processes' meters, and the check
    /// of its counters.
    pub(crate) fn side(&self, bed: &Testbed, app_port: u16, http_port: u16) -> PeerSide {
        let to = |from: &str, port: u16| -> Arc<dyn Route> {
            Arc::new(Counted {
                inner: PodRoute {
                    ns: bed.pod(from).ns.clone(),
                    dst: SocketAddr::new(IpAddr::V4(bed.pod(SERVER).ip), port),
                },
                made: self.made.clone(),
            })
        };
        let route = |from: &str| to(from, app_port);
        let pids: Vec<u32> = self.procs.iter().map(|p| p.pid()).collect();
        let (p3, p4) = (pids[0], pids[1]);
        let colds: Vec<Arc<dyn Route>> = pods()
            .iter()
            .filter(|(name, _)| name.starts_with("zcold"))
            .map(|(name, _)| route(name))
            .collect();
        let next = AtomicUsize::new(0);
        let (nodes, made, at_start) = (self.nodes.clone(), self.made.clone(), self.at_start);
        PeerSide {
            route: route(CLIENT),
            http: to(CLIENT, http_port),
            pids: [p3, p4],
            cpu: Box::new(move || process_cpu(p3) + process_cpu(p4)),
            rss: Box::new(move || process_rss(p3) + process_rss(p4)),
            cold: Box::new(move || {
                colds[next.fetch_add(1, Ordering::Relaxed) % colds.len()].clone()
            }),
            verify: Box::new(move || verify(&nodes, &made, at_start)),
        }
    }
}

/// Panics unless ztunnel counted, at both ends, at least the connections the bench made over
/// the peer's routes since `at_start` (it may take a moment to count the last ones).
fn verify(nodes: &[Netns; 2], made: &AtomicU64, at_start: [f64; 2]) {
    let made = made.load(Ordering::Relaxed) as f64;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = mtls_counters(nodes).unwrap_or_else(|e| panic!("{e}: is ztunnel still running?"));
        let (out, inb) = (now[0] - at_start[0], now[1] - at_start[1]);
        if out >= made && inb >= made {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the bench made {made} connections over ztunnel's routes, but ztunnel counted {out} outbound mTLS connections on node {} and {inb} inbound on node {}: some went around it; its figures are not printed",
            NODES[0],
            NODES[1]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A route whose sockets are counted into `made`: the bench connects every socket a route
/// hands out, so the count is the connections ztunnel must have seen.
struct Counted {
    inner: PodRoute,
    made: Arc<AtomicU64>,
}

impl Route for Counted {
    fn sockets(&self, n: usize) -> std::io::Result<Vec<socket2::Socket>> {
        self.made.fetch_add(n as u64, Ordering::Relaxed);
        self.inner.sockets(n)
    }
    fn dst(&self) -> SocketAddr {
        self.inner.dst()
    }
}

/// ztunnel's count of mTLS (HBONE) connections opened: outbound on the first node, inbound on
/// the second (`istio_tcp_connections_opened_total`, reporter `source` / `destination`).
fn mtls_counters(nodes: &[Netns; 2]) -> Result<[f64; 2], String> {
    Ok([
        mtls_opened(&nodes[0], "source")?,
        mtls_opened(&nodes[1], "destination")?,
    ])
}

fn mtls_opened(ns: &Netns, reporter: &str) -> Result<f64, String> {
    opened(ns, reporter, None)
}

/// The mTLS connections the node proxy in `ns` (ztunnel, or weft on the same port) counts as
/// opened with `reporter`, only those whose label `label` (name, value) matches if given.
fn opened(ns: &Netns, reporter: &str, label: Option<(&str, &str)>) -> Result<f64, String> {
    let body = metrics(ns)?;
    let reporter = format!("reporter=\"{reporter}\"");
    let label = label.map(|(k, v)| format!("{k}=\"{v}\""));
    Ok(body
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .filter(|l| l.contains(&reporter))
        .filter(|l| l.contains("connection_security_policy=\"mutual_tls\""))
        .filter(|l| label.as_ref().is_none_or(|x| l.contains(x.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The Prometheus page of the node proxy in `ns` (ztunnel, or weft on the same port).
fn metrics(ns: &Netns) -> Result<String, String> {
    let addr: SocketAddr = METRICS.parse().expect("metrics address");
    let (status, body) = ns
        .http_get(addr, "/metrics")
        .map_err(|e| format!("the node proxy's metrics in {}: {e}", ns.name()))?;
    if status != 200 {
        return Err(format!(
            "the node proxy's metrics in {}: HTTP {status}",
            ns.name()
        ));
    }
    Ok(body)
}

/// The connections the node proxy in `ns` counts as failed with `flags` from `principal`
/// (`istio_tcp_connections_failed_total`, reporter `destination`).
fn failed(ns: &Netns, flags: &str, principal: &str) -> Result<f64, String> {
    let body = metrics(ns)?;
    let (flags, principal) = (
        format!("response_flags=\"{flags}\""),
        format!("source_principal=\"{principal}\""),
    );
    Ok(body
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_failed_total{"))
        .filter(|l| l.contains("reporter=\"destination\""))
        .filter(|l| l.contains(&flags) && l.contains(&principal))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The SPIFFE identity of bench pod `pod` (namespace `bench`, service account = pod name) in
/// both tunnels' trust domain.
fn spiffe(pod: &str) -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{pod}")
}

/// Connections at once in each direction of [`Running::interop`].
const INTEROP_STREAMS: usize = 8;

/// Bytes sent before the half-close in each direction of [`Running::interop`]: 16 times the
/// 4 MiB stream window of both tunnels.
const INTEROP_BULK: u64 = 64 << 20;

/// A port of the server pod where no app listens ([`refused`]).
const NO_APP_PORT: u16 = 9;

/// Connects from inside `from` to `to`, which the far side refuses (no app listens there, or
/// a policy denies the client), and sends 1 KiB: the tunnel accepts the connection locally
/// (capture), so the far side's refusal can only show as the connection's end, and both tunnels end it with a reset (README "How traffic flows": never
/// a clean close, which would look like a normal end). Fails with what happened instead (a
/// clean close, bytes, or nothing within 10 s).
fn refused(from: &Netns, to: SocketAddr) -> Result<(), String> {
    let mut s = from
        .tcp_connect(to, Duration::from_secs(5))
        .map_err(|e| format!("the local connect failed ({e}): it should be captured"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
    // The write may already meet the reset (a peer's clean close fails no write).
    match s.write_all(&[b'E'; 1025]) {
        Err(e) if matches!(e.kind(), ConnectionReset | BrokenPipe) => return Ok(()),
        Err(e) => return Err(format!("the write failed: {e}")),
        Ok(()) => {}
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => Err("closed cleanly, not reset: the refusal looks like a normal end".into()),
        Ok(n) => Err(format!("{n} bytes came back")),
        Err(e) if e.kind() == ConnectionReset => Ok(()),
        Err(e) => Err(format!("no end within 10 s: {e}")),
    }
}

/// `n` connections from inside `from` to `to`, all open before any is used, each then echoing
/// 1 KiB of `mark` (the app's `E` mode) in turn, four rounds.
fn echo_at_once(from: &Netns, to: SocketAddr, n: usize, mark: &[u8]) -> std::io::Result<()> {
    let msg: Vec<u8> = mark.iter().copied().cycle().take(1024).collect();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = from.tcp_connect(to, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"E")?;
        conns.push(s);
    }
    let mut back = vec![0u8; msg.len()];
    for _ in 0..4 {
        for s in &mut conns {
            s.write_all(&msg)?;
            s.read_exact(&mut back)?;
            if back != msg {
                return Err(std::io::Error::other("an echo differs from its message"));
            }
        }
    }
    Ok(())
}

/// Sends `n` bytes from inside `from` to the app at `to` (its `S` mode), half-closes, and
/// returns the count the app answers once it read to the end.
fn sink(from: &Netns, to: SocketAddr, n: u64) -> std::io::Result<u64> {
    let mut s = from.tcp_connect(to, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"S")?;
    let chunk: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..k])?;
        left -= k as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)?;
    Ok(u64::from_be_bytes(count))
}

/// One 1 KiB echo (the app's `E` mode) of `mark` repeated, from inside `from` to `to`.
fn echo(from: &Netns, to: SocketAddr, mark: &[u8]) -> std::io::Result<()> {
    let msg: Vec<u8> = mark.iter().copied().cycle().take(1024).collect();
    let mut s = from.tcp_connect(to, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"E")?;
    s.write_all(&msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::other("the echo differs from the message"));
    }
    Ok(())
}

/// How many of `segments` (source, destination) are to or from `ip:port`.
fn segments_at(
    segments: &[(std::net::SocketAddrV4, std::net::SocketAddrV4)],
    ip: Ipv4Addr,
    port: u16,
) -> usize {
    segments
        .iter()
        .filter(|(src, dst)| {
            (*dst.ip() == ip && dst.port() == port) || (*src.ip() == ip && src.port() == port)
        })
        .count()
}

/// The IPv4 TCP segments of a pcap file of Ethernet frames: (source, destination).
fn tcp_segments(pcap: &[u8]) -> Vec<(std::net::SocketAddrV4, std::net::SocketAddrV4)> {
    let mut out = Vec::new();
    let Some(magic) = pcap.get(..4) else {
        return out;
    };
    // tcpdump writes the file in its host's byte order; microsecond or nanosecond stamps.
    let le = matches!(magic, [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1]);
    let u32_at = |b: &[u8], at: usize| -> Option<u32> {
        let x: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(x)
        } else {
            u32::from_be_bytes(x)
        })
    };
    if u32_at(pcap, 20) != Some(1) {
        return out; // not Ethernet
    }
    let mut at = 24;
    while let Some(len) = u32_at(pcap, at + 8) {
        let start = at + 16;
        let Some(frame) = pcap.get(start..start + len as usize) else {
            break;
        };
        at = start + len as usize;
        let Some(ip) = frame
            .get(14..)
            .filter(|_| frame.get(12..14) == Some(&[0x08, 0x00]))
        else {
            continue;
        };
        let ihl = usize::from(ip.first().copied().unwrap_or(0) & 0x0f) * 4;
        if ip.get(9) != Some(&6) || ihl < 20 || ip.len() < ihl + 4 {
            continue;
        }
        let addr = |a: usize, p: usize| {
            std::net::SocketAddrV4::new(
                Ipv4Addr::new(ip[a], ip[a + 1], ip[a + 2], ip[a + 3]),
                u16::from_be_bytes([ip[ihl + p], ip[ihl + p + 1]]),
            )
        };
        out.push((addr(12, 0), addr(16, 2)));
    }
    out
}
