//! The namespace mesh cases: two weft processes with real TPROXY capture between network
//! namespaces (needs root; skipped without it), measured from inside a pod's namespace. With
//! `--peer`, two more nodes carry the peer (ztunnel, [`peer`]) behind the same capture.
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
    let nodes = if peer.is_some() { 4 } else { 2 };
    let mut bed = weft_testbed::Testbed::new(nodes).expect("testbed");
    let pods = [
        ("client", 1, "bench"),
        ("server", 2, "bench"),
        ("pclient", 1, "plain"),
        ("pserver", 2, "plain"),
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
    let dir = bed.temp_dir().to_path_buf();
    weft::identity::ca::init_dir(&dir.join("ca"), "cluster.local").unwrap();
    let mut mesh = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n");
    let mut all: Vec<(String, usize, &str)> = pods
        .iter()
        .map(|(n, node, ns)| (n.to_string(), *node, *ns))
        .collect();
    all.extend(colds.iter().map(|c| (c.clone(), 1, "bench")));
    all.extend(
        peer_pods
            .iter()
            .map(|(p, node)| (p.clone(), *node, "bench")),
    );
    for (name, node, ns) in &all {
        mesh.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{nodeName: node-{node}, serviceAccountName: {name}}}\nstatus: {{podIP: {}}}\n",
            bed.pod(name).ip
        ));
    }
    std::fs::write(dir.join("mesh.yaml"), mesh).unwrap();
    // The idle-connection case holds 10,000 connections from one client pod: above weft's
    // default cap per source (4,096, `limits`), which would reset the rest.
    let weft = |n: usize| {
        let cfg = dir.join(format!("w{n}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "nodeName: node-{n}\nmesh: {{file: {}}}\nca: {{builtin: {{dir: {}}}}}\nlimits: {{connectionsPerSource: 16384}}\n",
                dir.join("mesh.yaml").display(),
                dir.join("ca").display()
            ),
        )
        .unwrap();
        let mut cmd = bed.node(n).ns.command(weft_bin, ["run", "--config"]);
        cmd.arg(&cfg).env("RUST_LOG", "warn");
        bed.spawn(&format!("weft-{n}"), cmd).unwrap()
    };
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
    let mut servers = vec!["server", "pserver"];
    if peer.is_some() {
        servers.push(peer::SERVER);
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
    let cold_routes: Vec<Arc<dyn Route>> = colds.iter().map(|c| route(c, "server")).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let place = Place {
        name: "netns",
        weft: route("client", "server"),
        plain: route("pclient", "pserver"),
        cpu: Box::new(move || process_cpu(p1) + process_cpu(p2)),
        app_cpu: None,
        rss: Some(Box::new(move || process_rss(p1) + process_rss(p2))),
        cold: Box::new(move || {
            cold_routes[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 5].clone()
        }),
        peer: ztunnels.as_mut().map(|z| {
            z.prove(&bed, APP_PORT, ("pclient", "pserver"));
            z.side(&bed, APP_PORT)
        }),
    };
    let (costs, peer_costs) = measure(&place, sz, report).await;
    report_costs(report, "netns", &costs, None, peer_costs.as_ref());
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
