//! The weft demo: a two-node mesh in network namespaces, one weft per node with real
//! TPROXY capture, and traffic on every kind of path, summarised in a table.
//!
//! Run through `scripts/demo` (as root). `--keep` leaves the mesh running until Ctrl-C and
//! prints how to look inside; `--weft PATH` names the weft binary (default
//! `target/debug/weft`).

use anyhow::{anyhow, bail, Context};
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use weft_testbed::{ChildGuard, Testbed};

struct PodDef {
    name: &'static str,
    node: usize,
    namespace: &'static str,
    sa: &'static str,
}

const PODS: &[PodDef] = &[
    PodDef {
        name: "frontend",
        node: 1,
        namespace: "shop",
        sa: "frontend",
    },
    PodDef {
        name: "cart",
        node: 1,
        namespace: "shop",
        sa: "cart",
    },
    PodDef {
        name: "payments",
        node: 2,
        namespace: "shop",
        sa: "payments",
    },
    PodDef {
        name: "billing",
        node: 2,
        namespace: "legacy",
        sa: "billing",
    },
    PodDef {
        name: "batch",
        node: 1,
        namespace: "legacy",
        sa: "batch",
    },
];
const VIP: &str = "10.96.0.20";

/// Dropped in field order: the daemons first, each stopped with SIGTERM (it drains and exits,
/// as on a node), then the testbed, which would SIGKILL any process still running in it.
struct Demo {
    daemons: Vec<ChildGuard>,
    bed: Testbed,
    dir: PathBuf,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("demo: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    // First: Ctrl-C must tear the namespaces down.
    weft_testbed::install_signal_cleanup()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let keep = args.iter().any(|a| a == "--keep");
    let weft = args
        .iter()
        .position(|a| a == "--weft")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/debug/weft"));
    let weft = weft
        .canonicalize()
        .with_context(|| weft.display().to_string())?;
    weft_testbed::Prereqs::check()
        .context("the demo needs root and iproute2/iptables/nftables/tcpdump")?;
    let _ = weft_testbed::cleanup_stale();

    let demo = build(&weft)?;
    println!(
        "mesh up: 2 nodes, namespaces shop (enrolled) and legacy (not enrolled), prefix {}\n",
        demo.bed.prefix()
    );
    let rows = vec![
        path(&demo, "same node", "frontend", "cart", None, 8080)?,
        path(&demo, "across nodes", "frontend", "payments", None, 8080)?,
        path(
            &demo,
            "Service VIP",
            "frontend",
            "payments",
            Some(SocketAddr::new(VIP.parse().unwrap(), 80)),
            8080,
        )?,
        path(&demo, "mesh -> outside", "frontend", "billing", None, 8081)?,
        path(&demo, "outside -> mesh", "billing", "cart", None, 8082)?,
        path(&demo, "outside -> outside", "batch", "billing", None, 8083)?,
    ];
    print_table(&rows);
    let ok = rows
        .iter()
        .all(|r| r.ok && r.expected_protocol == r.protocol);
    if keep {
        print_keep(&demo);
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    drop(demo);
    if ok {
        println!("\nall paths work; mesh traffic used HBONE where expected. Namespaces removed.");
        Ok(())
    } else {
        Err(anyhow!(
            "some path failed or used an unexpected protocol (see the table)"
        ))
    }
}

fn build(weft: &std::path::Path) -> anyhow::Result<Demo> {
    let mut bed = Testbed::new(2)?;
    for p in PODS {
        bed.add_pod(p.node, p.name)?;
    }
    let dir = bed.temp_dir().to_path_buf();
    let ca = dir.join("ca");
    let out = std::process::Command::new(weft)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()?;
    if !out.status.success() {
        bail!("weft ca init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut mesh = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n",
    );
    for p in PODS {
        let ip = bed.pod(p.name).ip;
        mesh.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, labels: {{app: {}}}}}\nspec: {{nodeName: node-{}, serviceAccountName: {}}}\nstatus: {{phase: Running, podIP: {ip}}}\n",
            p.name, p.namespace, p.name, p.node, p.sa
        ));
    }
    mesh.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: payments, namespace: shop}}\nspec: {{clusterIP: {VIP}, selector: {{app: payments}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
    ));
    std::fs::write(dir.join("mesh.yaml"), mesh)?;
    let mut daemons = Vec::new();
    for n in 1..=2 {
        let cfg = dir.join(format!("weft-{n}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "nodeName: node-{n}\nmesh: {{file: {}}}\nca: {{builtin: {{dir: {}}}}}\n",
                dir.join("mesh.yaml").display(),
                ca.display()
            ),
        )?;
        let mut cmd = bed.node(n).ns.command(weft, ["run", "--config"]);
        cmd.arg(&cfg);
        daemons.push(bed.spawn(&format!("weft-{n}"), cmd)?);
    }
    let demo = Demo { daemons, bed, dir };
    for n in 1..=2 {
        let start = Instant::now();
        loop {
            let r = demo
                .bed
                .node(n)
                .ns
                .http_get("127.0.0.1:15021".parse().unwrap(), "/healthz/ready");
            if matches!(r, Ok((200, _))) {
                break;
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("weft on node-{n} not ready:\n{}", demo.daemons[n - 1].log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(demo)
}

struct Row {
    name: &'static str,
    client: String,
    server: String,
    seen_identity: String,
    protocol: String,
    expected_protocol: String,
    bytes: usize,
    ok: bool,
    note: String,
}

fn pod_def(name: &str) -> &'static PodDef {
    PODS.iter()
        .find(|p| p.name == name)
        .expect("pod in the demo")
}

/// Sends 1 MiB each way from `client` to `server` (directly or through `via`), reading both
/// wefts' `/connections` while the connection is open.
fn path(
    demo: &Demo,
    name: &'static str,
    client: &str,
    server: &str,
    via: Option<SocketAddr>,
    port: u16,
) -> anyhow::Result<Row> {
    let len = 1024 * 1024;
    let s = demo.bed.pod(server);
    let c = demo.bed.pod(client);
    let listener = s.ns.tcp_listen(SocketAddr::new(IpAddr::V4(s.ip), port))?;
    let dst = via.unwrap_or(SocketAddr::new(IpAddr::V4(s.ip), port));
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let srv = std::thread::spawn(move || -> std::io::Result<(SocketAddr, usize)> {
        let (mut conn, peer) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut got = vec![0u8; len];
        conn.read_exact(&mut got)?;
        let _ = go_rx.recv_timeout(Duration::from_secs(10));
        conn.write_all(&got)?;
        conn.shutdown(Shutdown::Write)?;
        Ok((peer, got.len()))
    });
    let mut conn =
        c.ns.tcp_connect(dst, Duration::from_secs(5))
            .with_context(|| format!("{name}: connect"))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    conn.write_all(&data).with_context(|| {
        format!(
            "{name}: send\n--- weft on node-{} ---\n{}",
            c.node,
            demo.daemons[c.node - 1].log()
        )
    })?;
    std::thread::sleep(Duration::from_millis(100));
    let (protocol, seen) = observe(demo, c.node, s.node, s.ip);
    let _ = go_tx.send(());
    conn.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    let read = conn.read_to_end(&mut back);
    let served = srv.join().map_err(|_| anyhow!("server thread panicked"))?;
    let (ok, note) = match (&read, &served) {
        (Ok(_), Ok((peer, n))) if back == data && *n == len => {
            (true, format!("app saw {}", peer.ip()))
        }
        (Err(e), _) => (false, e.to_string()),
        (_, Err(e)) => (false, e.to_string()),
        _ => (false, "bytes differ".into()),
    };
    let (cd, sd) = (pod_def(client), pod_def(server));
    let expected = match (cd.namespace == "shop", sd.namespace == "shop") {
        (true, true) if cd.node == sd.node => "in-node",
        (true, true) => "HBONE",
        (false, false) => "not captured",
        _ => "plain",
    };
    Ok(Row {
        name,
        client: format!("{}/{} (node-{})", cd.namespace, cd.name, cd.node),
        server: format!("{}/{} (node-{})", sd.namespace, sd.name, sd.node),
        seen_identity: seen,
        protocol,
        expected_protocol: expected.into(),
        bytes: back.len() + len,
        ok,
        note,
    })
}

/// The protocol the source side used and the identity the destination side saw.
fn observe(
    demo: &Demo,
    client_node: usize,
    server_node: usize,
    server_ip: std::net::Ipv4Addr,
) -> (String, String) {
    let conns = |n: usize| -> Vec<serde_json::Value> {
        demo.bed
            .node(n)
            .ns
            .http_get("127.0.0.1:15000".parse().unwrap(), "/connections")
            .ok()
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .and_then(|v| v["connections"].as_array().cloned())
            .unwrap_or_default()
    };
    let to_server = |c: &serde_json::Value| {
        c["dst"]
            .as_str()
            .is_some_and(|d| d.starts_with(&format!("{server_ip}:")))
    };
    let outbound = conns(client_node)
        .into_iter()
        .find(|c| c["direction"] == "outbound" && to_server(c));
    let inbound = conns(server_node)
        .into_iter()
        .find(|c| c["direction"] == "inbound" && to_server(c));
    let protocol = match (&outbound, &inbound) {
        (Some(o), _) if o["protocol"] == "hbone" => "HBONE".to_string(),
        (Some(o), _) if o["protocol"] == "local" => "in-node".to_string(),
        (Some(_), _) | (None, Some(_)) => "plain".to_string(),
        (None, None) => "not captured".to_string(),
    };
    let seen = match inbound {
        Some(i) => i["srcIdentity"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| "none (plaintext)".into()),
        None => "- (no weft on the server side)".into(),
    };
    (protocol, seen)
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<19} {:<26} {:<26} {:<44} {:<13} {:>9}  result",
        "path", "client", "server", "identity the server side saw", "carried as", "bytes"
    );
    println!("{}", "-".repeat(160));
    for r in rows {
        let result = if r.ok && r.protocol == r.expected_protocol {
            format!("ok, {}", r.note)
        } else if r.ok {
            format!("UNEXPECTED: wanted {}", r.expected_protocol)
        } else {
            format!("FAILED: {}", r.note)
        };
        println!(
            "{:<19} {:<26} {:<26} {:<44} {:<13} {:>9}  {}",
            r.name, r.client, r.server, r.seen_identity, r.protocol, r.bytes, result
        );
    }
}

fn print_keep(demo: &Demo) {
    println!("\nThe mesh stays up until Ctrl-C (everything is removed then).");
    println!(
        "  files (CA, mesh.yaml, configs, logs): {}",
        demo.dir.display()
    );
    for n in demo.bed.nodes() {
        println!("  {}: ip netns exec {} curl -s 127.0.0.1:15000/config_dump | less   (also /connections, :15020/metrics)", n.name, n.ns.name());
    }
    for p in demo.bed.pods() {
        println!(
            "  pod {:<9} {:<13} ip netns exec {} bash",
            p.name,
            p.ip.to_string(),
            p.ns.name()
        );
    }
    println!(
        "  edit {}/mesh.yaml to change the mesh live",
        demo.dir.display()
    );
}
