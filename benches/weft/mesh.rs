//! The namespace mesh cases: two weft processes with real TPROXY capture between network
//! namespaces (needs root; skipped without it), measured from inside a pod's namespace. With
//! `--peer`, two more nodes carry the peer (ztunnel, [`peer`]) behind the same capture. Beside
//! [`measure`]'s rows: each node proxy's RSS idle, CPU and RSS per node proxy under paced HTTP
//! ([`http_load`]: L4, and through weft's in-binary waypoint on the server's node), and state
//! per workload ([`state_per_workload`]: fresh proxies on a spare node without pods).
//!
//! Owns the mesh setup through `weft_testbed`; measurements are [`measure`]'s.

use super::*;

pub(crate) struct PodRoute {
    pub(crate) ns: weft_testbed::Netns,
    pub(crate) dst: SocketAddr,
}

impl Route for PodRoute {
    fn sockets(&self, n: usize) -> std::io::Result<Vec<socket2::Socket>> {
        // Made inside the pod's namespace (one thread entering it for all `n`); a socket
        // stays in the namespace it was made in wherever it is used later.
        self.ns
            .run(move || (0..n).map(|_| new_socket(None)).collect())?
    }
    fn dst(&self) -> SocketAddr {
        self.dst
    }
}

/// The apps' port in the server pods.
const APP_PORT: u16 = 18080;
/// The port of the HTTP app in the same pods (`--app` serves it beside the bench's protocol).
const HTTP_PORT: u16 = APP_PORT + 1;

/// The node named in the extra workloads of the state row: none of the mesh's.
pub(crate) const EXTRA_NODE: &str = "node-extra";

/// `n` workloads for the state row, the same for weft and the peer: names `extra{i}`, each its
/// own service account, addresses from 100.64.0.0/10 (no node's pod CIDR).
pub(crate) fn extra_workloads(n: usize) -> impl Iterator<Item = (String, Ipv4Addr)> {
    (0..n).map(|i| {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i as u32);
        (format!("extra{i}"), ip)
    })
}

/// A pod of the mesh file.
fn pod_yaml(name: &str, ns: &str, labels: &str, node: &str, ip: Ipv4Addr) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}{labels}}}\nspec: {{nodeName: {node}, serviceAccountName: {name}}}\nstatus: {{podIP: {ip}}}\n"
    )
}

/// How long after ready the state row's first reading is taken.
const STATE_EARLY: Duration = Duration::from_millis(500);
/// How long after ready its second one is: longer than either allocator's decay (jemalloc's
/// `dirty_decay_ms`: 5 s for both), so that memory freed after loading the
/// workloads has been given back by the allocator's background threads.
const STATE_SETTLED: Duration = Duration::from_secs(12);

/// The RSS of process `pid` at [`STATE_EARLY`] and at [`STATE_SETTLED`] after it was ready.
pub(crate) fn state_rss_readings(pid: u32) -> [u64; 2] {
    std::thread::sleep(STATE_EARLY);
    let early = process_rss(pid);
    std::thread::sleep(STATE_SETTLED - STATE_EARLY);
    [early, process_rss(pid)]
}

/// Starts weft in node `n`'s namespace with the mesh file `mesh`. Not waited for:
/// [`wait_ready`]. The idle-connection case holds 10,000 connections from one client pod:
/// above weft's default cap per source (4,096, `limits`), which would reset the rest.
fn spawn_weft(
    bed: &weft_testbed::Testbed,
    weft_bin: &Path,
    n: usize,
    mesh: &Path,
    tag: &str,
) -> weft_testbed::ChildGuard {
    let dir = bed.temp_dir();
    let cfg = dir.join(format!("w{n}{tag}.yaml"));
    // `WEFT_BENCH_CONFIG`: more lines of the daemons' config (`workerThreads: 1`, say), for
    // trying a setting on the mesh without editing the bench.
    let extra = std::env::var("WEFT_BENCH_CONFIG").unwrap_or_default();
    std::fs::write(
        &cfg,
        format!(
            "nodeName: {}\nmesh: {{file: {}}}\nca: {{builtin: {{dir: {}}}}}\nlimits: {{connectionsPerSource: 16384}}\n{extra}\n",
            bed.node(n).name,
            mesh.display(),
            dir.join("ca").display()
        ),
    )
    .unwrap();
    let mut cmd = bed.node(n).ns.command(weft_bin, ["run", "--config"]);
    cmd.arg(&cfg).env("RUST_LOG", "warn");
    bed.spawn(&format!("weft-{n}{tag}"), cmd).unwrap()
}

pub(crate) async fn run_mesh(
    weft_bin: &Path,
    peer: Option<&peer::Ztunnel>,
    sz: Sizes,
    report: &mut Report,
) {
    if weft_testbed::require().is_none() {
        assert!(
            peer.is_none(),
            "--peer runs on the namespace mesh, whose prerequisites are missing"
        );
        println!("(mesh cases skipped: prerequisites missing)");
        return;
    }
    // The last node is the spare one of the state row: no pods, nothing running until then.
    let nodes = if peer.is_some() { 5 } else { 3 };
    let spare = nodes;
    let mut bed = weft_testbed::Testbed::new(nodes).expect("testbed");
    let pods = [
        ("client", 1, "bench"),
        ("server", 2, "bench"),
        ("pclient", 1, "plain"),
        ("pserver", 2, "plain"),
        // Served through weft's in-binary waypoint (labelled below).
        ("wserver", 2, "bench"),
    ];
    for (name, node, _) in pods {
        bed.add_pod(node, name).unwrap();
    }
    let colds: Vec<String> = (0..5).map(|i| format!("cold{i}")).collect();
    for c in &colds {
        bed.add_pod(1, c).unwrap();
    }
    let peer_pods = if peer.is_some() {
        peer::pods()
    } else {
        Vec::new()
    };
    for (name, node) in &peer_pods {
        bed.add_pod(*node, name).unwrap();
    }
    // With the peer, a server on weft's server node whose policy denies ztunnel's client
    // ([`peer::Running::interop`]); only in `--peer` runs.
    let deny_server = peer.map(|_| (peer::DENY_SERVER.to_string(), 2));
    if let Some((name, node)) = &deny_server {
        bed.add_pod(*node, name).unwrap();
    }
    let dir = bed.temp_dir().to_path_buf();
    // With the peer, weft's CA is ztunnel's test CA (its `FAKE_CA`): both tunnels trust each
    // other, and [`peer::Running::interop`] proves they carry each other's connections.
    match peer {
        Some(zt) => zt
            .write_ca_dir(&dir.join("ca"))
            .expect("weft's CA folder from ztunnel's test CA"),
        None => weft::identity::ca::init_dir(&dir.join("ca"), "cluster.local").unwrap(),
    }
    let mut mesh = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n");
    let mut all: Vec<(String, usize, &str)> = pods
        .iter()
        .map(|(n, node, ns)| (n.to_string(), *node, *ns))
        .collect();
    all.extend(colds.iter().map(|c| (c.clone(), 1, "bench")));
    all.extend(
        peer_pods
            .iter()
            .chain(&deny_server)
            .map(|(p, node)| (p.clone(), *node, "bench")),
    );
    for (name, node, ns) in &all {
        let labels = if name == "wserver" {
            ", labels: {istio.io/use-waypoint: weft}"
        } else if name == peer::DENY_SERVER {
            peer::DENY_SERVER_LABELS
        } else {
            ""
        };
        let node = &bed.node(*node).name;
        mesh.push_str(&pod_yaml(name, ns, labels, node, bed.pod(name).ip));
    }
    if peer.is_some() {
        mesh.push_str(peer::DENY_POLICY);
    }
    let mesh_path = dir.join("mesh.yaml");
    std::fs::write(&mesh_path, &mesh).unwrap();
    let weft = |n: usize| spawn_weft(&bed, weft_bin, n, &mesh_path, "");
    let daemons: Vec<_> = (1..=2).map(weft).collect();
    // On the peer's nodes weft runs only to program the capture, and is stopped once ready.
    let programmers: Vec<_> = match peer {
        Some(_) => peer::NODES.into_iter().map(weft).collect(),
        None => Vec::new(),
    };
    let nodes_up = (1..=2).chain(peer.map_or(Vec::new(), |_| peer::NODES.to_vec()));
    for (n, d) in nodes_up.zip(daemons.iter().chain(&programmers)) {
        wait_ready(&bed.node(n).ns, d.name(), || d.log());
    }
    let mut ztunnels = peer.map(|zt| peer::start(&bed, zt, programmers));
    // The apps run as separate processes (this bench binary with `--app`), so 10,000 idle
    // connections do not put 20,000 sockets into one process's descriptor limit.
    let mut servers = vec!["server", "pserver", "wserver"];
    if peer.is_some() {
        servers.extend([peer::SERVER, peer::DENY_SERVER]);
    }
    let mut apps = Vec::new();
    for server in &servers {
        let p = bed.pod(server);
        let exe = std::env::current_exe().unwrap();
        let mut cmd = p.ns.command(exe, ["--app"]);
        cmd.arg(SocketAddr::new(IpAddr::V4(p.ip), APP_PORT).to_string());
        apps.push(bed.spawn(&format!("app-{server}"), cmd).unwrap());
    }
    for server in &servers {
        let p = bed.pod(server);
        let deadline = Instant::now() + Duration::from_secs(10);
        while p
            .ns
            .tcp_connect(
                SocketAddr::new(IpAddr::V4(p.ip), APP_PORT),
                Duration::from_secs(1),
            )
            .is_err()
        {
            assert!(Instant::now() < deadline, "app in {server} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let route = |from: &str, to: &str| -> Arc<dyn Route> {
        Arc::new(PodRoute {
            ns: bed.pod(from).ns.clone(),
            dst: SocketAddr::new(IpAddr::V4(bed.pod(to).ip), APP_PORT),
        })
    };
    let pids: Vec<u32> = daemons.iter().map(|d| d.pid()).collect();
    let (p1, p2) = (pids[0], pids[1]);
    // Each node proxy's RSS after the mesh is up and before any load.
    let zpids = ztunnels.as_ref().map(|z| z.pids());
    for (i, node) in ["client", "server"].into_iter().enumerate() {
        report.add_vs(
            format!("node proxy RSS idle, {node} node"),
            "netns",
            process_rss(pids[i]) as f64 / 1024.0,
            None,
            zpids.map(|z| process_rss(z[i]) as f64 / 1024.0),
            "KiB",
            "ready, before any load",
        );
    }
    let cold_routes: Vec<Arc<dyn Route>> = colds.iter().map(|c| route(c, "server")).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let place = Place {
        name: "netns",
        weft: route("client", "server"),
        plain: route("pclient", "pserver"),
        cpu: Box::new(move || process_cpu(p1) + process_cpu(p2)),
        app_cpu: None,
        rss: Some(Box::new(move || process_rss(p1) + process_rss(p2))),
        pids: vec![p1, p2],
        cold: Box::new(move || {
            cold_routes[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 5].clone()
        }),
        peer: ztunnels.as_mut().map(|z| {
            z.prove(&bed, APP_PORT, ("pclient", "pserver"));
            z.interop(&bed, APP_PORT);
            z.side(&bed, APP_PORT, HTTP_PORT)
        }),
    };
    // First, so that each proxy's RSS under this load is not what the heavier cases below
    // (2 GiB streams, 10,000 idle connections) left behind.
    let http_route = |to: &str| -> Arc<dyn Route> {
        Arc::new(PodRoute {
            ns: bed.pod("client").ns.clone(),
            dst: SocketAddr::new(IpAddr::V4(bed.pod(to).ip), HTTP_PORT),
        })
    };
    let sides = HttpSides {
        l4: http_route("server"),
        waypoint: http_route("wserver"),
        pids: [p1, p2],
        server_node: bed.node(2).ns.clone(),
        peer: place.peer.as_ref(),
    };
    http_load(&sides, sz, report).await;
    // Nothing more when the daemons were profiled (`profile`).
    if let Some((costs, peer_costs)) = measure(&place, sz, report).await {
        report_costs(report, "netns", &costs, None, peer_costs.as_ref());
        state_per_workload(&bed, weft_bin, peer, &mesh, spare, sz, report);
    }
    drop(place);
    drop(apps);
    drop(ztunnels);
    drop(daemons);
    drop(bed);
}

/// Waits until the node proxy in `ns` (weft, or the peer on the same port) answers `GET
/// /healthz/ready` on `127.0.0.1:15021` with 200; panics with `log()` after 30 s.
pub(crate) fn wait_ready(ns: &weft_testbed::Netns, what: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(
        ns.http_get("127.0.0.1:15021".parse().unwrap(), "/healthz/ready"),
        Ok((200, _))
    ) {
        assert!(Instant::now() < deadline, "{what} not ready:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

// === paced HTTP ===

/// The routes and processes of the paced HTTP rows.
struct HttpSides<'a> {
    /// Client pod to the HTTP app of `server`: weft at L4 on both nodes.
    l4: Arc<dyn Route>,
    /// Client pod to the HTTP app of `wserver` (labelled `istio.io/use-waypoint: weft`):
    /// weft's in-binary waypoint on the server's node.
    waypoint: Arc<dyn Route>,
    /// weft's processes: the client's node, the server's node.
    pids: [u32; 2],
    /// The server's node, whose weft counts the waypoint's requests.
    server_node: weft_testbed::Netns,
    peer: Option<&'a PeerSide>,
}

/// Requests per second of the paced HTTP rows, in total over [`HTTP_CONNS`] connections.
const HTTP_RATE: f64 = 1000.0;
const HTTP_CONNS: usize = 4;

/// Istio's published workload, 1,000 requests/s of 1 KiB HTTP on 4 keep-alive connections
/// (`GET /` answered with a 1 KiB body), for `sz.http_secs`, over weft at L4, weft with its
/// waypoint, and the peer, in alternating rounds. Per node proxy: vCPU (its CPU seconds ÷ the
/// run's wall seconds) and RSS at the end of the run; medians of the rounds.
async fn http_load(sides: &HttpSides<'_>, sz: Sizes, report: &mut Report) {
    let meters = |pids: [u32; 2]| -> Arc<dyn Fn() -> Meters + Send + Sync> {
        Arc::new(move || Meters {
            cpu: pids.map(process_cpu),
            rss: pids.map(process_rss),
        })
    };
    let mut routes = vec![
        (sides.l4.clone(), sides.pids),
        (sides.waypoint.clone(), sides.pids),
    ];
    if let Some(z) = sides.peer {
        routes.push((z.http.clone(), z.pids));
    }
    let served0 = waypoint_requests(&sides.server_node);
    let mut runs: Vec<Vec<Paced>> = routes.iter().map(|_| Vec::new()).collect();
    // Each route's profile (`profile`): its case and its tunnel.
    let tunnels = [
        ("http-l4", "weft"),
        ("http-waypoint", "weft"),
        ("http-l4", peer::NAME),
    ];
    for round in 0..ROUNDS {
        for (i, (route, pids)) in routes.iter().enumerate() {
            let rec = profile::record(round, tunnels[i].0, tunnels[i].1, pids);
            let run = paced_http(
                route.clone(),
                HTTP_CONNS,
                HTTP_RATE,
                sz.http_secs,
                meters(*pids),
            )
            .await;
            drop(rec);
            runs[i].push(run);
        }
    }
    // The waypoint must have answered every request sent to `wserver` (and the warm-up one
    // per connection); the metric may lag a moment behind.
    let sent: u64 = runs[1].iter().map(|r| r.requests).sum::<u64>() + (ROUNDS * HTTP_CONNS) as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let served = waypoint_requests(&sides.server_node) - served0;
        if served >= sent as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{sent} requests sent to wserver, but weft's waypoint counted {served}: not through the waypoint"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(z) = sides.peer {
        (z.verify)();
    }
    let med = |runs: &[Paced], f: &dyn Fn(&Paced) -> f64| {
        median(&mut runs.iter().map(f).collect::<Vec<_>>())
    };
    let rate = |runs: &[Paced]| med(runs, &|r| r.rate());
    let (l4, wp) = (&runs[0], &runs[1]);
    let zt = runs.get(2);
    let how = format!(
        "GET, 1 KiB response, {HTTP_CONNS} keep-alive conns, {} s, median of {ROUNDS}",
        sz.http_secs
    );
    let achieved = |what: &str, runs: &[Paced]| format!("{what} {:.0} req/s", rate(runs));
    let peer_rate = zt
        .map(|z| format!(", {}", achieved("ztunnel", z)))
        .unwrap_or_default();
    for (i, node) in ["client", "server"].into_iter().enumerate() {
        report.add_vs(
            format!("HTTP 1000 req/s 1 KiB, vCPU {node} node"),
            "netns",
            med(l4, &|r| r.vcpu(i)),
            None,
            zt.map(|z| med(z, &|r| r.vcpu(i))),
            "vCPU",
            format!("L4; {}{peer_rate}; {how}", achieved("achieved: weft", l4)),
        );
    }
    for (i, node) in ["client", "server"].into_iter().enumerate() {
        report.add_vs(
            format!("HTTP 1000 req/s 1 KiB, RSS {node} node"),
            "netns",
            med(l4, &|r| r.rss[i] as f64 / 1024.0),
            None,
            zt.map(|z| med(z, &|r| r.rss[i] as f64 / 1024.0)),
            "KiB",
            "L4; at the end of each run, load connections open",
        );
    }
    for (i, node) in ["client", "server"].into_iter().enumerate() {
        report.add(
            format!("HTTP 1000 req/s waypoint, vCPU {node} node"),
            "netns",
            med(wp, &|r| r.vcpu(i)),
            Some(med(l4, &|r| r.vcpu(i))),
            "vCPU",
            format!(
                "in-binary waypoint on the server's node (L4 + L7); baseline: L4; {}; {how}",
                achieved("achieved", wp)
            ),
        );
    }
    report.add(
        "HTTP 1000 req/s waypoint, RSS server node",
        "netns",
        med(wp, &|r| r.rss[1] as f64 / 1024.0),
        Some(med(l4, &|r| r.rss[1] as f64 / 1024.0)),
        "KiB",
        "baseline: L4; at the end of each run; the same process as L4's runs, which alternate with these: only what the waypoint adds above L4's high-water",
    );
}

/// Requests weft's waypoint in `node` has answered (`istio_requests_total`, all series).
fn waypoint_requests(node: &weft_testbed::Netns) -> f64 {
    let (status, body) = node
        .http_get("127.0.0.1:15020".parse().unwrap(), "/metrics")
        .expect("weft's metrics");
    assert_eq!(status, 200, "weft's metrics");
    body.lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// === state per workload ===

/// State bytes per workload of each node proxy, the same way for both: a fresh proxy on the
/// spare node (no pods, no traffic) started with the bench's own workloads, then with
/// `sz.extra_workloads` more ([`extra_workloads`]: weft's through its mesh file, the peer's
/// through its local config): (RSS with N − RSS without) / N, read twice in each process
/// ([`state_rss_readings`]: soon after ready, and settled once the allocator has given back
/// what loading freed), the medians of `sz.state_rounds` rounds alternating weft and the peer.
fn state_per_workload(
    bed: &weft_testbed::Testbed,
    weft_bin: &Path,
    peer: Option<&peer::Ztunnel>,
    mesh: &str,
    spare: usize,
    sz: Sizes,
    report: &mut Report,
) {
    let n = sz.extra_workloads;
    let node = bed.node(spare);
    let write = |extra: usize| {
        let mut m = mesh.to_string();
        for (name, ip) in extra_workloads(extra) {
            m.push_str(&pod_yaml(&name, "bench", "", EXTRA_NODE, ip));
        }
        let path = bed.temp_dir().join(format!("mesh-state-{extra}.yaml"));
        std::fs::write(&path, m).unwrap();
        path
    };
    let files = [write(0), write(n)];
    let weft_rss = |i: usize| {
        let mut d = spawn_weft(bed, weft_bin, spare, &files[i], &format!("-state-{i}"));
        wait_ready(&node.ns, d.name(), || d.log());
        let rss = state_rss_readings(d.pid());
        let _ = d.stop(Duration::from_secs(5));
        rss
    };
    // Per reading (early, settled): that round's bytes per workload.
    let per = |without: [u64; 2], with: [u64; 2]| {
        [0, 1].map(|r| with[r].saturating_sub(without[r]) as f64 / n as f64)
    };
    let (mut ours, mut theirs) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for _ in 0..sz.state_rounds {
        for (r, v) in per(weft_rss(0), weft_rss(1)).into_iter().enumerate() {
            ours[r].push(v);
        }
        if let Some(zt) = peer {
            let round = per(
                peer::state_rss(bed, zt, spare, 0),
                peer::state_rss(bed, zt, spare, n),
            );
            for (r, v) in round.into_iter().enumerate() {
                theirs[r].push(v);
            }
        }
    }
    let when = [
        format!("ready + {:.1} s", STATE_EARLY.as_secs_f64()),
        format!("settled, ready + {} s", STATE_SETTLED.as_secs()),
    ];
    for (r, case) in [
        format!("node proxy state per workload, {n}"),
        format!("node proxy state per workload settled, {n}"),
    ]
    .into_iter()
    .enumerate()
    {
        report.add_vs(
            case,
            "netns",
            median(&mut ours[r]),
            None,
            (!theirs[r].is_empty()).then(|| median(&mut theirs[r])),
            "bytes",
            format!(
                "(RSS with {n} more workloads - without) / {n}, fresh proxy on a node without pods, {}; median of {}",
                when[r], sz.state_rounds
            ),
        );
    }
}
