//! The test mesh: nodes and pods as network namespaces, wired like a small routed
//! Kubernetes cluster (TESTING.md, "The test mesh").
//!
//! Owns: the topology (names, addresses, veths, routes, sysctls), the testbed's temporary
//! directory, and tearing all of it down on drop. Does not own what runs on the mesh.
//!
//! Topology, for `Testbed::new(n)` with prefix `P` (e.g. `wt12345a`):
//!
//! ```text
//!                       ns P-ul: bridge br0 (no addresses), ports n1 .. nN
//!                          │                          │
//!   ns P-n1 (node-1): veth ul 172.18.0.1/24    ns P-n2 (node-2): veth ul 172.18.0.2/24
//!   route 10.244.2.0/24 via 172.18.0.2 ...     route 10.244.1.0/24 via 172.18.0.1 ...
//!   veth p0 ── eth0 in ns P-n1-<pod> 10.244.1.10/32, default via 169.254.1.1
//! ```
//!
//! - The underlay is a bridge inside its own namespace (`P-ul`), so any number of nodes
//!   (1..=[`MAX_NODES`]) share one L2 segment and each node sees the same interface `ul`.
//!   The underlay namespace has no addresses and no routes; it only switches frames.
//! - Node `k` (1-based) has underlay address `172.18.0.k/24` and pod CIDR `10.244.k.0/24`,
//!   and routes every other node's pod CIDR via that node's underlay address. Nodes have
//!   `ip_forward=1` and loose reverse-path filtering (`rp_filter=0`, which TPROXY needs).
//! - Pods are routed, not bridged (Calico style): the host-side veth `p<i>` has proxy ARP
//!   and a `/32` route to the pod; the pod has its address as a `/32`, a link route to
//!   `169.254.1.1` and a default route via it, plus a permanent neighbour entry for
//!   `169.254.1.1` with the host veth's MAC (proxy ARP alone does not answer, because nodes
//!   have no default route).
//! - IPv6 on demand ([`Testbed::add_ipv6`]): a pod gets `fd00:10:244:<k>::<host>` beside its
//!   IPv4 address, and the underlay becomes dual-stack (`fd00:172:18::<k>/64` on `ul`, routes
//!   to the other nodes' `fd00:10:244:<j>::/64`), so IPv6 pods reach each other across nodes.
//! - Nothing is created in the root network namespace: every veth is created inside a
//!   testbed namespace with its peer moved straight into another one.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use tempfile::TempDir;

use crate::capture::Capture;
use crate::netns::Netns;
use crate::process::ChildGuard;
use crate::registry;

/// The most nodes a testbed can have (underlay addresses 172.18.0.1 ..).
pub const MAX_NODES: usize = 250;
/// The most pods one node can have (pod addresses 10.244.k.10 .. 10.244.k.254).
pub const MAX_PODS_PER_NODE: usize = 245;
/// The longest pod name accepted.
pub const MAX_POD_NAME: usize = 40;
/// The link-local gateway address every pod routes through.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The underlay interface's name inside every node namespace.
pub const UNDERLAY_IFACE: &str = "ul";

/// An IPv4 network: address and prefix length, e.g. `10.244.1.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    /// The network address.
    pub addr: Ipv4Addr,
    /// The prefix length, 0..=32.
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// Whether `ip` lies inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len.min(32)))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One node of the mesh: a network namespace with an underlay address and a pod CIDR.
#[derive(Clone, Debug)]
pub struct Node {
    /// 1-based index, as in `n1`, `172.18.0.1`, `10.244.1.0/24`.
    pub index: usize,
    /// The Kubernetes-style node name: `node-1`.
    pub name: String,
    /// The node's network namespace, `<prefix>-n<index>`.
    pub ns: Netns,
    /// The node's address on the underlay (interface [`UNDERLAY_IFACE`]).
    pub underlay_ip: Ipv4Addr,
    /// The addresses of the node's pods.
    pub pod_cidr: Ipv4Cidr,
}

/// One pod: a network namespace with one address, routed through its node.
#[derive(Clone, Debug)]
pub struct Pod {
    /// The name given to [`Testbed::add_pod`]; unique within the testbed.
    pub name: String,
    /// The pod's network namespace, `<prefix>-n<node>-<name>`.
    pub ns: Netns,
    /// The pod's address (on its `eth0`).
    pub ip: Ipv4Addr,
    /// The 1-based index of the node it runs on.
    pub node: usize,
    /// The host side of the pod's veth, inside the node namespace (`p0`, `p1`, ...).
    pub host_veth: String,
}

/// A mesh of node and pod namespaces. Dropping it (also while unwinding from a panic) stops
/// the processes still running in it and deletes every namespace it created, then its
/// temporary directory. See the module docs for the topology.
#[derive(Debug)]
pub struct Testbed {
    prefix: String,
    underlay: Netns,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    /// Number of pod veths created per node (index = node - 1); never reused.
    veths: Vec<usize>,
    /// Numbers log files so that restarts do not overwrite earlier logs.
    logs: AtomicU64,
    dir: TempDir,
}

// === impl Testbed ===

impl Testbed {
    /// Creates `nodes` node namespaces (1..=[`MAX_NODES`]) joined by the underlay. On error,
    /// whatever was created is removed again.
    pub fn new(nodes: usize) -> io::Result<Testbed> {
        if !(1..=MAX_NODES).contains(&nodes) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a testbed has 1..={MAX_NODES} nodes, not {nodes}"),
            ));
        }
        let dir = tempfile::Builder::new().prefix("weft-testbed-").tempdir()?;
        let prefix = registry::register_bed(Some(dir.path().to_owned()))?;
        // From here on, dropping `bed` removes whatever exists, so `?` is safe.
        let mut bed = Testbed {
            underlay: Netns::named(format!("{prefix}-ul")),
            prefix,
            nodes: Vec::new(),
            pods: Vec::new(),
            veths: vec![0; nodes],
            logs: AtomicU64::new(0),
            dir,
        };
        bed.underlay = bed.create_ns(&format!("{}-ul", bed.prefix))?;
        bed.underlay.ip(["link", "set", "lo", "up"])?;
        bed.underlay.ip(["link", "add", "br0", "type", "bridge"])?;
        bed.underlay.ip(["link", "set", "br0", "up"])?;
        for index in 1..=nodes {
            let node = bed.create_node(index)?;
            bed.nodes.push(node);
        }
        for node in &bed.nodes {
            for other in bed.nodes.iter().filter(|o| o.index != node.index) {
                node.ns.ip([
                    "route",
                    "add",
                    &other.pod_cidr.to_string(),
                    "via",
                    &other.underlay_ip.to_string(),
                    "dev",
                    UNDERLAY_IFACE,
                ])?;
            }
        }
        Ok(bed)
    }

    fn create_ns(&self, name: &str) -> io::Result<Netns> {
        registry::create_namespace(&self.prefix, name)
    }

    fn create_node(&self, index: usize) -> io::Result<Node> {
        let octet = u8::try_from(index).map_err(|_| io::Error::other("node index > 255"))?;
        let ns = self.create_ns(&format!("{}-n{index}", self.prefix))?;
        ns.ip(["link", "set", "lo", "up"])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        let port = format!("n{index}");
        let underlay_ip = Ipv4Addr::new(172, 18, 0, octet);
        self.underlay.ip([
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            UNDERLAY_IFACE,
            "netns",
            ns.name(),
        ])?;
        self.underlay
            .ip(["link", "set", &port, "master", "br0", "up"])?;
        ns.ip([
            "addr",
            "add",
            &format!("{underlay_ip}/24"),
            "dev",
            UNDERLAY_IFACE,
        ])?;
        ns.ip(["link", "set", UNDERLAY_IFACE, "up"])?;
        Ok(Node {
            index,
            name: format!("node-{index}"),
            ns,
            underlay_ip,
            pod_cidr: Ipv4Cidr {
                addr: Ipv4Addr::new(10, 244, octet, 0),
                prefix_len: 24,
            },
        })
    }

    /// Adds a pod named `name` (lowercase letters, digits and `-`, at most [`MAX_POD_NAME`]
    /// characters, unique in the testbed) on node `node` (1-based), with the next free
    /// address `10.244.<node>.<10 + n>`.
    pub fn add_pod(&mut self, node: usize, name: &str) -> io::Result<Pod> {
        let n = self.pods.iter().filter(|p| p.node == node).count();
        let ip = u8::try_from(node)
            .ok()
            .zip(u8::try_from(10 + n).ok())
            .map(|(k, host)| Ipv4Addr::new(10, 244, k, host))
            .filter(|_| n < MAX_PODS_PER_NODE)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("node {node} has no free pod address"),
                )
            })?;
        self.add_pod_with_ip(node, name, ip)
    }

    /// Adds a pod like [`add_pod`](Self::add_pod) but with address `ip`. Pods of other nodes
    /// reach it only if `ip` lies in this node's pod CIDR (that is what the underlay routes).
    pub fn add_pod_with_ip(&mut self, node: usize, name: &str, ip: Ipv4Addr) -> io::Result<Pod> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        let node_ns = self
            .nodes
            .get(node.wrapping_sub(1))
            .ok_or_else(|| {
                invalid(format!(
                    "no node {node} (nodes are 1..={})",
                    self.nodes.len()
                ))
            })?
            .ns
            .clone();
        let name_ok = !name.is_empty()
            && name.len() <= MAX_POD_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(invalid(format!(
                "pod name {name:?}: want 1..={MAX_POD_NAME} of [a-z0-9-]"
            )));
        }
        if self.pods.iter().any(|p| p.name == name) {
            return Err(invalid(format!("pod {name:?} exists already")));
        }
        if self.pods.iter().any(|p| p.ip == ip) {
            return Err(invalid(format!("pod address {ip} is taken")));
        }
        let host_veth = format!("p{}", self.veths[node - 1]);
        self.veths[node - 1] += 1;

        let pod_ns = self.create_ns(&format!("{}-n{node}-{name}", self.prefix))?;
        pod_ns.ip(["link", "set", "lo", "up"])?;
        node_ns.ip([
            "link",
            "add",
            &host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod_ns.name(),
        ])?;
        node_ns.ip(["link", "set", &host_veth, "up"])?;
        node_ns.sysctl(&format!("net.ipv4.conf.{host_veth}.proxy_arp"), "1")?;
        node_ns.ip(["route", "add", &format!("{ip}/32"), "dev", &host_veth])?;
        let mac = link_mac(&node_ns, &host_veth)?;
        let gateway = POD_GATEWAY.to_string();
        pod_ns.ip(["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        pod_ns.ip(["link", "set", "eth0", "up"])?;
        pod_ns.ip(["route", "add", &gateway, "dev", "eth0", "scope", "link"])?;
        pod_ns.ip(["route", "add", "default", "via", &gateway, "dev", "eth0"])?;
        pod_ns.ip([
            "neigh",
            "replace",
            &gateway,
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        let pod = Pod {
            name: name.to_owned(),
            ns: pod_ns,
            ip,
            node,
            host_veth,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Gives pod `name` an IPv6 address beside its IPv4 one (dual stack):
    /// `fd00:10:244:<node>::<host>` from its IPv4 `10.244.<node>.<host>`, routed by the node
    /// to the pod's veth, the pod's default route via `fe80::1` on the host side. The first
    /// call makes the underlay dual-stack too (see [`Testbed::underlay_ipv6`]), so IPv6 pods
    /// reach each other across nodes. Returns the address.
    pub fn add_ipv6(&self, name: &str) -> io::Result<std::net::Ipv6Addr> {
        self.ipv6_underlay()?;
        let pod =
            self.pods.iter().find(|p| p.name == name).ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("no pod {name:?}"))
            })?;
        let [_, _, node, host] = pod.ip.octets();
        let v6 = std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, node.into(), 0, 0, 0, host.into());
        let node_ns = &self.node(pod.node).ns;
        node_ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        node_ns.ip([
            "-6",
            "addr",
            "replace",
            "fe80::1/64",
            "dev",
            &pod.host_veth,
            "nodad",
        ])?;
        node_ns.ip([
            "-6",
            "route",
            "replace",
            &format!("{v6}/128"),
            "dev",
            &pod.host_veth,
        ])?;
        pod.ns.ip([
            "-6",
            "addr",
            "add",
            &format!("{v6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        pod.ns.ip([
            "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ])?;
        Ok(v6)
    }

    /// Node `index`'s IPv6 underlay address, `fd00:172:18::<index>` (present once a pod has an
    /// IPv6 address); its pods' IPv6 addresses are in `fd00:10:244:<index>::/64`.
    pub fn underlay_ipv6(&self, index: usize) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(0xfd00, 0x172, 0x18, 0, 0, 0, 0, index as u16)
    }

    /// Gives every node its IPv6 underlay address and routes to the other nodes' IPv6 pod
    /// networks (idempotent).
    fn ipv6_underlay(&self) -> io::Result<()> {
        for node in &self.nodes {
            node.ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            node.ns.ip([
                "-6",
                "addr",
                "replace",
                &format!("{}/64", self.underlay_ipv6(node.index)),
                "dev",
                UNDERLAY_IFACE,
                "nodad",
            ])?;
        }
        for node in &self.nodes {
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                node.ns.ip([
                    "-6",
                    "route",
                    "replace",
                    &format!("fd00:10:244:{:x}::/64", other.index),
                    "via",
                    &self.underlay_ipv6(other.index).to_string(),
                    "dev",
                    UNDERLAY_IFACE,
                ])?;
            }
        }
        Ok(())
    }

    /// The per-run name prefix of every namespace of this testbed, e.g. `wt12345a`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The nodes, in index order (`nodes()[0]` is node 1).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `index` (1-based).
    ///
    /// Panics if there is no such node, like slice indexing.
    pub fn node(&self, index: usize) -> &Node {
        match self.nodes.get(index.wrapping_sub(1)) {
            Some(node) => node,
            None => panic!("no node {index} (nodes are 1..={})", self.nodes.len()),
        }
    }

    /// The pods, in creation order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod called `name`.
    ///
    /// Panics if there is no such pod, like map indexing.
    pub fn pod(&self, name: &str) -> &Pod {
        match self.pods.iter().find(|p| p.name == name) {
            Some(pod) => pod,
            None => panic!("no pod {name:?} in testbed {}", self.prefix),
        }
    }

    /// The underlay namespace (holds the bridge `br0`; ports `n1`, `n2`, ...).
    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// Every namespace of this testbed, underlay first, then nodes, then pods.
    pub fn namespaces(&self) -> Vec<&Netns> {
        std::iter::once(&self.underlay)
            .chain(self.nodes.iter().map(|n| &n.ns))
            .chain(self.pods.iter().map(|p| &p.ns))
            .collect()
    }

    /// The testbed's temporary directory (config files, logs, captures); removed on drop.
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts a long-running process, typically built with [`Netns::command`] (e.g.
    /// `node.ns.command("weft", ["run", "--config", cfg])`). Its stdout and stderr go to
    /// `<temp_dir>/<nn>-<name>.log`. The guard stops it on drop; the testbed's drop kills it
    /// if the guard is still alive then.
    pub fn spawn(&self, name: &str, cmd: Command) -> io::Result<ChildGuard> {
        let seq = self.logs.fetch_add(1, Ordering::Relaxed);
        let log = self.dir.path().join(format!("{seq:02}-{name}.log"));
        ChildGuard::spawn(&self.prefix, name, cmd, log)
    }

    /// Starts a capture of node `node`'s underlay interface into `<temp_dir>/<file>`.
    pub fn capture_underlay(&self, node: usize, file: &str) -> io::Result<Capture> {
        Capture::start(
            &self.node(node).ns,
            UNDERLAY_IFACE,
            self.dir.path().join(file),
        )
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for error in registry::remove_bed(&self.prefix) {
            eprintln!("weft-testbed: removing {}: {error}", self.prefix);
        }
    }
}

/// The MAC address of `link` inside `ns`, from `ip -o link show`.
fn link_mac(ns: &Netns, link: &str) -> io::Result<String> {
    let out = ns.ip(["-o", "link", "show", "dev", link])?;
    out.split_whitespace()
        .skip_while(|word| *word != "link/ether")
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| io::Error::other(format!("no MAC for {link} in {}: {out}", ns.name())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains_its_addresses_only() {
        let cidr = Ipv4Cidr {
            addr: Ipv4Addr::new(10, 244, 1, 0),
            prefix_len: 24,
        };
        assert!(cidr.contains(Ipv4Addr::new(10, 244, 1, 10)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 244, 2, 10)));
        assert_eq!(cidr.to_string(), "10.244.1.0/24");
        let all = Ipv4Cidr {
            addr: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
        };
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }
}
