//! A weft mesh in network namespaces: the testbed's nodes and pods, a mesh file describing
//! them, one CA, and one weft daemon per node with real TPROXY capture.
#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use weft_testbed::{ChildGuard, Pod, Testbed};

/// A pod to create: name, node (1-based), namespace, service account, labels.
#[derive(Clone)]
pub struct PodSpec {
    pub name: &'static str,
    pub node: usize,
    pub namespace: &'static str,
    pub sa: &'static str,
    pub labels: Vec<(&'static str, &'static str)>,
}

pub fn pod(name: &'static str, node: usize, namespace: &'static str) -> PodSpec {
    PodSpec {
        name,
        node,
        namespace,
        sa: name,
        labels: vec![("app", name)],
    }
}

/// A Service: name, namespace, VIP, port → target port, selector app label.
#[derive(Clone)]
pub struct SvcSpec {
    pub name: &'static str,
    pub namespace: &'static str,
    pub vip: &'static str,
    pub port: u16,
    pub target_port: u16,
    pub app: &'static str,
}

pub struct MeshEnv {
    pub bed: Testbed,
    pub namespaces: Vec<(&'static str, bool)>,
    pub pods: Vec<PodSpec>,
    pub services: Vec<SvcSpec>,
    pub daemons: Vec<Option<ChildGuard>>,
    pub extra_yaml: String,
    /// Lines added to every node's daemon config (before [`MeshEnv::start_all`]).
    pub config_extra: String,
    /// Lines added to one node's daemon config (1-based node → lines), after `config_extra`.
    pub node_config_extra: std::collections::BTreeMap<usize, String>,
    /// IPv6 addresses given to pods (dual stack), listed in their `podIPs`.
    pub ipv6: std::collections::BTreeMap<&'static str, std::net::Ipv6Addr>,
    /// Each node's firewall and routing rules before any weft ran ([`MeshEnv::firewall`]).
    pub pristine: Vec<String>,
    /// The daemons' `mesh:` value instead of the mesh file (e.g. `{kubernetes: {...}}`).
    pub mesh_config: Option<String>,
}

impl MeshEnv {
    /// Builds the namespaces, writes CA, mesh and configs, starts one weft per node and
    /// waits until all are ready. `None` when mesh tests are skipped (not root, outside CI).
    pub fn start(
        nodes: usize,
        namespaces: &[(&'static str, bool)],
        pods: &[PodSpec],
        services: &[SvcSpec],
    ) -> Option<MeshEnv> {
        let mut env = MeshEnv::build(nodes, namespaces, pods, services)?;
        env.start_all();
        Some(env)
    }

    /// Builds the namespaces and the CA, and records each node's rules, without starting
    /// weft: the test adjusts the pods (`ipv6`) or the daemons' config (`config_extra`),
    /// then calls [`MeshEnv::start_all`].
    pub fn build(
        nodes: usize,
        namespaces: &[(&'static str, bool)],
        pods: &[PodSpec],
        services: &[SvcSpec],
    ) -> Option<MeshEnv> {
        weft_testbed::require()?;
        let mut bed = Testbed::new(nodes).expect("testbed");
        for p in pods {
            bed.add_pod(p.node, p.name).expect("pod");
        }
        weft::identity::ca::init_dir(&bed.temp_dir().join("ca"), "cluster.local").unwrap();
        let mut env = MeshEnv {
            bed,
            namespaces: namespaces.to_vec(),
            pods: pods.to_vec(),
            services: services.to_vec(),
            daemons: Vec::new(),
            extra_yaml: String::new(),
            config_extra: String::new(),
            node_config_extra: std::collections::BTreeMap::new(),
            ipv6: std::collections::BTreeMap::new(),
            pristine: Vec::new(),
            mesh_config: None,
        };
        for i in 1..=nodes {
            let before = env.firewall(i);
            env.pristine.push(before);
            env.daemons.push(None);
        }
        Some(env)
    }

    /// Gives pod `name` an IPv6 address too (listed in its `podIPs` from the next mesh write).
    pub fn add_ipv6(&mut self, name: &'static str) -> std::net::Ipv6Addr {
        let v6 = self.bed.add_ipv6(name).expect("IPv6 address");
        self.ipv6.insert(name, v6);
        v6
    }

    /// Writes the mesh and every node's config, starts one weft per node and waits until all
    /// are ready.
    pub fn start_all(&mut self) {
        std::fs::write(self.mesh_path(), self.mesh_yaml()).unwrap();
        let nodes = self.bed.nodes().len();
        let mesh = self
            .mesh_config
            .clone()
            .unwrap_or_else(|| format!("{{file: {}}}", self.mesh_path().display()));
        for i in 1..=nodes {
            std::fs::write(
                self.config_path(i),
                format!(
                    "nodeName: node-{i}\nmesh: {mesh}\nca: {{builtin: {{dir: {}}}}}\n{}{}",
                    self.bed.temp_dir().join("ca").display(),
                    self.config_extra,
                    self.node_config_extra
                        .get(&i)
                        .map(String::as_str)
                        .unwrap_or_default()
                ),
            )
            .unwrap();
        }
        for i in 1..=nodes {
            self.start_daemon(i);
        }
        for i in 1..=nodes {
            self.wait_ready(i);
        }
    }

    pub fn mesh_path(&self) -> PathBuf {
        self.bed.temp_dir().join("mesh.yaml")
    }

    pub fn config_path(&self, node: usize) -> PathBuf {
        self.bed.temp_dir().join(format!("weft-{node}.yaml"))
    }

    /// The mesh file for the current pods, namespaces and services.
    pub fn mesh_yaml(&self) -> String {
        let mut y = String::new();
        for (ns, enrolled) in &self.namespaces {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"
            ));
            if *enrolled {
                y.push_str("  labels: {istio.io/dataplane-mode: ambient}\n");
            }
        }
        for p in &self.pods {
            let ip = self.bed.pod(p.name).ip;
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let v6 = self
                .ipv6
                .get(p.name)
                .map(|v6| format!(", {{ip: \"{v6}\"}}"))
                .unwrap_or_default();
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  labels: {{{}}}\nspec:\n  nodeName: node-{}\n  serviceAccountName: {}\n  containers: [{{name: app, image: app, ports: [{{name: http, containerPort: 8080}}]}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n  podIPs: [{{ip: {ip}}}{v6}]\n",
                p.name, p.namespace, labels.join(", "), p.node, p.sa
            ));
        }
        for s in &self.services {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  clusterIP: {}\n  selector: {{app: {}}}\n  ports: [{{name: tcp, port: {}, targetPort: {}}}]\n",
                s.name, s.namespace, s.vip, s.app, s.port, s.target_port
            ));
        }
        y.push_str(&self.extra_yaml);
        y
    }

    /// Rewrites the mesh file (write aside, rename over) from the current description.
    pub fn write_mesh(&self) {
        let tmp = self.bed.temp_dir().join(".mesh.tmp");
        std::fs::write(&tmp, self.mesh_yaml()).unwrap();
        std::fs::rename(&tmp, self.mesh_path()).unwrap();
    }

    pub fn start_daemon(&mut self, node: usize) {
        let ns = &self.bed.node(node).ns;
        let mut cmd = ns.command(env!("CARGO_BIN_EXE_weft"), ["run", "--config"]);
        cmd.arg(self.config_path(node))
            .env("RUST_LOG", "info,access=info");
        let child = self
            .bed
            .spawn(&format!("weft-{node}"), cmd)
            .expect("spawn weft");
        self.daemons[node - 1] = Some(child);
    }

    pub fn daemon(&mut self, node: usize) -> &mut ChildGuard {
        self.daemons[node - 1].as_mut().expect("daemon running")
    }

    pub fn log(&self, node: usize) -> String {
        self.daemons[node - 1]
            .as_ref()
            .map(|d| d.log())
            .unwrap_or_default()
    }

    /// The node's log once `ready` holds for it (logs reach the file a moment after the event:
    /// weft writes them from a thread of its own), or after 5 s whatever it holds.
    pub fn log_until(&self, node: usize, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log(node);
            if ready(&log) || Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's log once it contains every one of `needles` (see [`MeshEnv::log_until`]).
    pub fn log_with(&self, node: usize, needles: &[&str]) -> String {
        self.log_until(node, |log| needles.iter().all(|n| log.contains(n)))
    }

    /// GET on a node's admin endpoint (127.0.0.1:15000 inside the node namespace).
    pub fn admin(&self, node: usize, path: &str) -> (u16, String) {
        self.bed
            .node(node)
            .ns
            .http_get("127.0.0.1:15000".parse().unwrap(), path)
            .unwrap_or((0, String::new()))
    }

    pub fn admin_json(&self, node: usize, path: &str) -> serde_json::Value {
        let (s, body) = self.admin(node, path);
        assert_eq!(s, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn wait_ready(&self, node: usize) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            let r = self
                .bed
                .node(node)
                .ns
                .http_get("127.0.0.1:15021".parse().unwrap(), "/healthz/ready");
            if matches!(r, Ok((200, _))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("weft on node-{node} not ready; log:\n{}", self.log(node));
    }

    /// Waits until the node's state is at least `generation`.
    pub fn wait_generation(&self, node: usize, generation: u64) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let (s, body) = self.admin(node, "/config_dump");
            if s == 200 {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                if v["generation"].as_u64().unwrap_or(0) >= generation {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "node-{node} never reached generation {generation}; log:\n{}",
            self.log(node)
        );
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.bed.pod(name)
    }

    /// Pod `pod`'s address at `port`.
    pub fn addr(&self, pod: &str, port: u16) -> SocketAddr {
        SocketAddr::new(std::net::IpAddr::V4(self.pod(pod).ip), port)
    }

    /// Listens on `port` in pod `pod` and answers every connection: reads `read` bytes, then
    /// writes `reply` and closes.
    pub fn answer_each(&self, pod: &str, port: u16, read: usize, reply: &'static [u8]) {
        let l = self.pod(pod).ns.tcp_listen(self.addr(pod, port)).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut b = vec![0u8; read];
                    if s.read_exact(&mut b).is_ok() {
                        let _ = s.write_all(reply);
                    }
                });
            }
        });
    }

    /// The node's rules as weft could change them: every rule and user chain of
    /// `iptables-save` and `ip6tables-save` (without comments and counters, and without the
    /// built-in chains, which a table shows once anything loaded it), `ip rule` and
    /// `ip -6 rule`, the routes of table 100 for both families, and the nftables tables other than the ones iptables itself keeps there
    /// (whose rules `iptables-save` shows).
    pub fn firewall(&self, node: usize) -> String {
        let ns = &self.bed.node(node).ns;
        let rules = |tool: &str| -> String {
            let out = ns.exec(tool, Vec::<String>::new()).unwrap();
            out.lines()
                .filter(|l| {
                    l.starts_with("-A")
                        || (l.starts_with(':')
                            && !l.starts_with(":PREROUTING ")
                            && !l.starts_with(":INPUT ")
                            && !l.starts_with(":FORWARD ")
                            && !l.starts_with(":OUTPUT ")
                            && !l.starts_with(":POSTROUTING "))
                })
                .map(|l| l.split(" [").next().unwrap_or(l))
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "iptables:\n{}\nip6tables:\n{}\nip rule:\n{}\nip -6 rule:\n{}\ntable 100:\n{}\nIPv6 table 100:\n{}\nnft:\n{}",
            rules("iptables-save"),
            rules("ip6tables-save"),
            ns.ip(["rule", "show"]).unwrap(),
            ns.ip(["-6", "rule", "show"]).unwrap(),
            ns.ip(["route", "show", "table", "100"]).unwrap_or_default(),
            ns.ip(["-6", "route", "show", "table", "100"]).unwrap_or_default(),
            ns.exec("nft", ["list", "tables"])
                .unwrap()
                .lines()
                .filter(|t| {
                    let mut words = t.split_whitespace().skip(1);
                    let (family, name) = (words.next(), words.next());
                    !(matches!(family, Some("ip" | "ip6"))
                        && matches!(name, Some("filter" | "mangle" | "nat" | "raw" | "security")))
                })
                .collect::<Vec<_>>()
                .join("\n")
        )
    }

    pub fn weft_rules(&self, node: usize) -> Vec<String> {
        let out = self
            .bed
            .node(node)
            .ns
            .exec("iptables-save", ["-t", "mangle"])
            .unwrap();
        out.lines()
            .filter(|l| l.contains("WEFT_PRE"))
            .map(str::to_string)
            .collect()
    }
}

// === traffic ===

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn hash(data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(data);
    h.finish()
}

/// What the server side of an exchange saw.
#[derive(Debug)]
pub struct Served {
    pub peer: SocketAddr,
    pub received_len: usize,
    pub received_hash: u64,
}

/// A server in `server` pod on `port`: accepts one connection, reads to EOF, then writes
/// `reply` and closes. Returns a join handle with what it saw.
pub fn serve_once(server: &Pod, port: u16, reply: Vec<u8>) -> std::thread::JoinHandle<Served> {
    let listener = server
        .ns
        .tcp_listen(SocketAddr::new(server.ip.into(), port))
        .unwrap();
    std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(&reply).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        Served {
            peer,
            received_len: got.len(),
            received_hash: hash(&got),
        }
    })
}

/// From `client` pod: connect to `dst`, send `data`, half-close, read the reply to EOF.
pub fn exchange(client: &Pod, dst: SocketAddr, data: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let s = client.ns.tcp_connect(dst, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&data)?;
        w.shutdown(Shutdown::Write)
    });
    let mut r = s;
    let mut back = Vec::new();
    r.read_to_end(&mut back)?;
    writer.join().unwrap()?;
    Ok(back)
}
