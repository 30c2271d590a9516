//! The namespace mesh cases: two weft processes with real TPROXY capture between network
//! namespaces (needs root; skipped without it), measured from inside a pod's namespace.
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

pub(crate) async fn run_mesh(weft_bin: &Path, sz: Sizes, report: &mut Report) {
    if weft_testbed::require().is_none() {
        println!("(mesh cases skipped: prerequisites missing)");
        return;
    }
    let mut bed = weft_testbed::Testbed::new(2).expect("testbed");
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
    let dir = bed.temp_dir().to_path_buf();
    weft::identity::ca::init_dir(&dir.join("ca"), "cluster.local").unwrap();
    let mut mesh = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n");
    let mut all: Vec<(String, usize, &str)> = pods
        .iter()
        .map(|(n, node, ns)| (n.to_string(), *node, *ns))
        .collect();
    all.extend(colds.iter().map(|c| (c.clone(), 1, "bench")));
    for (name, node, ns) in &all {
        mesh.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{nodeName: node-{node}, serviceAccountName: {name}}}\nstatus: {{podIP: {}}}\n",
            bed.pod(name).ip
        ));
    }
    std::fs::write(dir.join("mesh.yaml"), mesh).unwrap();
    let mut daemons = Vec::new();
    for n in 1..=2 {
        let cfg = dir.join(format!("w{n}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "nodeName: node-{n}\nmesh: {{file: {}}}\nca: {{builtin: {{dir: {}}}}}\n",
                dir.join("mesh.yaml").display(),
                dir.join("ca").display()
            ),
        )
        .unwrap();
        let mut cmd = bed.node(n).ns.command(weft_bin, ["run", "--config"]);
        cmd.arg(&cfg).env("RUST_LOG", "warn");
        daemons.push(bed.spawn(&format!("weft-{n}"), cmd).unwrap());
    }
    for n in 1..=2 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(
            bed.node(n)
                .ns
                .http_get("127.0.0.1:15021".parse().unwrap(), "/healthz/ready"),
            Ok((200, _))
        ) {
            assert!(
                Instant::now() < deadline,
                "weft-{n} not ready:\n{}",
                daemons[n - 1].log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The apps run as separate processes (this bench binary with `--app`), so 10,000 idle
    // connections do not put 20,000 sockets into one process's descriptor limit.
    let mut apps = Vec::new();
    for server in ["server", "pserver"] {
        let p = bed.pod(server);
        let exe = std::env::current_exe().unwrap();
        let mut cmd = p.ns.command(exe, ["--app"]);
        cmd.arg(SocketAddr::new(IpAddr::V4(p.ip), 18080).to_string());
        apps.push(bed.spawn(&format!("app-{server}"), cmd).unwrap());
    }
    for server in ["server", "pserver"] {
        let p = bed.pod(server);
        let deadline = Instant::now() + Duration::from_secs(10);
        while p
            .ns
            .tcp_connect(
                SocketAddr::new(IpAddr::V4(p.ip), 18080),
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
            dst: SocketAddr::new(IpAddr::V4(bed.pod(to).ip), 18080),
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
    };
    let costs = measure(&place, sz, report).await;
    report_costs(report, "netns", &costs, None);
    drop(apps);
    drop(daemons);
    drop(bed);
}
