//! Capture of local enrolled pods' traffic with iptables TPROXY (ARCHITECTURE.md §3 "Capture", §6.5).
//!
//! Owns the `WEFT_PRE` chain in the mangle table, the jump to it from `PREROUTING`, and the
//! policy-routing rule that delivers marked packets locally. The whole chain is rewritten in
//! one `iptables-restore --noflush` transaction whenever the set of local enrolled pods
//! changes: declaring the chain in the restore input flushes it first, so a restart never
//! duplicates rules.
//!
//! Fail closed: the capture outlives the process. Stopping weft (SIGTERM, `/quitquitquit`, a
//! crash) leaves the rules in force; while no weft listens, TPROXY finds no socket for a
//! captured SYN and drops it, so the connection is never carried in plaintext (and the
//! client's SYN retransmission reaches the next weft once it listens). A starting weft takes
//! the chain over unchanged and rewrites it only after its first complete mesh load; a load
//! that fails keeps the rules in force. Only `weft uninstall` ([`Redirector::uninstall`])
//! removes them.
//!
//! IPv6 is captured as IPv4 is: the same `WEFT_PRE` chain in ip6tables' mangle table, an
//! `ip6 weft` nftables table for DNATed connections, and `fwmark` routing in IPv6's table
//! 100, sending dual-stack pods' IPv6 connections to weft's IPv6 listeners (`[::]`, bound
//! beside the IPv4 ones). Behind it, the `WEFT_V6` chain of ip6tables' filter table refuses
//! (TCP reset) every new IPv6 TCP connection to or from a local enrolled pod's IPv6 address
//! that reaches FORWARD, that is, one the capture did not take. Captured connections are
//! delivered locally and never pass FORWARD, so the chain only ever sees the ones that would
//! have gone around weft: an address with no interface yet, or every address where IPv6
//! capture cannot be programmed (no IPv6 listener, no IPv6 TPROXY, `ipv6: refuse`). Then
//! the reason is logged, shown per address in `/config_dump` and by readiness.
//!
//! Only a connection's opening SYN is redirected (`--syn`): later packets of a captured
//! connection reach weft's socket through the `-m socket --transparent` rule, and connections
//! that were already open when a pod was enrolled keep flowing uncaptured instead of being
//! reset by a listener that never saw their handshake. (`--ctstate NEW` is not enough:
//! conntrack may not have been tracking the namespace before weft's rules needed it, and then
//! picks up a mid-stream packet as NEW.)
//!
//! Rule order matters: every pod's *outbound* rule (traffic coming from its veth) comes
//! before any *inbound* rule (traffic to its IP), so pod-to-pod traffic on one node is taken
//! by the sender's outbound rule, as it would be across nodes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::{CaptureMetrics, RunResult};
use crate::state::StateStore;

/// The mark TPROXY sets and the policy routing keys on.
pub const TPROXY_MARK: &str = "0x1/0x1";
/// The routing table holding the `local 0.0.0.0/0 dev lo` route.
pub const ROUTE_TABLE: &str = "100";
/// weft's chain in the mangle table.
pub const CHAIN: &str = "WEFT_PRE";
/// weft's IPv6 chain in the filter table: refuses the IPv6 TCP connections of local enrolled
/// pods that were not captured.
pub const CHAIN_V6: &str = "WEFT_V6";

/// Errors programming the capture.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// A tool is missing or could not be run.
    #[error("cannot run `{command}`: {source} (is iptables installed and is weft running with CAP_NET_ADMIN?)")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// A command failed; its stderr says why.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its error output.
        stderr: String,
    },
}

/// Where TPROXY sends captured packets.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    /// Outbound listener.
    pub outbound: SocketAddr,
    /// Plaintext inbound listener.
    pub inbound_plaintext: SocketAddr,
    /// HBONE listener (its port is also the HBONE port on the wire).
    pub hbone: SocketAddr,
}

/// One address of a local enrolled pod and the node-side interface its traffic enters by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRule {
    /// The pod's address (IPv4 rules for `iptables`, IPv6 ones for `ip6tables`).
    pub ip: IpAddr,
    /// The host-side interface (found from the route to the pod).
    pub veth: String,
}

/// An IP family: which tools, tables and listeners a rule is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `iptables`, `ip weft`, `ip -4`.
    V4,
    /// `ip6tables`, `ip6 weft`, `ip -6`.
    V6,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn tables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// `-4` / `-6` for `ip`.
    fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    /// The nftables family (and address keyword).
    fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    fn any(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// The TPROXY target's address: the listener's own when it is of the rules' family and not
/// unspecified, otherwise its port only (IPv6 rules reach the `[::]` listeners).
fn on(addr: SocketAddr, family: Family) -> String {
    match addr.ip() {
        ip if !ip.is_unspecified() && Family::of(ip) == family => {
            format!("--on-ip {ip} --on-port {}", addr.port())
        }
        _ => format!("--on-port {}", addr.port()),
    }
}

/// `ip/len` naming exactly `ip`.
fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    }
}

/// The `iptables-restore` (`family` V4) or `ip6tables-restore` (V6) input for exactly these
/// pods' addresses of that family (others are left out).
pub fn rules(pods: &[PodRule], ports: &Ports, family: Family) -> String {
    let pods: Vec<&PodRule> = pods.iter().filter(|p| Family::of(p.ip) == family).collect();
    let mut out = String::new();
    out.push_str("*mangle\n");
    out.push_str(&format!(":{CHAIN} - [0:0]\n"));
    // Packets of weft's own transparent sockets' connections: never re-captured, delivered
    // locally. Opening SYNs excepted: a SYN whose addresses match a connection weft closed
    // moments ago (its socket in TIME_WAIT) must reach TPROXY, which retires the old socket
    // and hands the SYN to the listener. Delivered to the TIME_WAIT socket instead, it is
    // answered with a stale ACK, the client resets and retries later, and under churn (with
    // thousands of such sockets) the rate of new connections collapsed.
    out.push_str(&format!(
        "-A {CHAIN} -p tcp -m tcp ! --syn -m socket --transparent -j MARK --set-mark {TPROXY_MARK}\n"
    ));
    out.push_str(&format!(
        "-A {CHAIN} -m mark --mark {TPROXY_MARK} -j RETURN\n"
    ));
    // One pod may have several addresses of a family on one interface: one outbound rule.
    let mut seen = std::collections::BTreeSet::new();
    for veth in pods.iter().map(|p| &p.veth).filter(|v| seen.insert(*v)) {
        out.push_str(&format!(
            "-A {CHAIN} -p tcp -i {veth} -m tcp --syn -m conntrack --ctdir ORIGINAL -j TPROXY {} --tproxy-mark {TPROXY_MARK}\n",
            on(ports.outbound, family)
        ));
    }
    for p in &pods {
        out.push_str(&format!(
            "-A {CHAIN} -p tcp -d {} --dport {} ! -i {} -m tcp --syn -m conntrack --ctdir ORIGINAL -j TPROXY {} --tproxy-mark {TPROXY_MARK}\n",
            host(p.ip),
            ports.hbone.port(),
            p.veth,
            on(ports.hbone, family)
        ));
        out.push_str(&format!(
            "-A {CHAIN} -p tcp -d {} ! -i {} -m tcp --syn -m conntrack --ctdir ORIGINAL -j TPROXY {} --tproxy-mark {TPROXY_MARK}\n",
            host(p.ip),
            p.veth,
            on(ports.inbound_plaintext, family)
        ));
    }
    out.push_str("COMMIT\n");
    out
}

/// The `ip6tables-restore` input refusing every new IPv6 TCP connection to or from these
/// addresses (local enrolled pods' IPv6 addresses) that reaches FORWARD: one the capture did
/// not take (captured ones are delivered locally), which would otherwise bypass mTLS and
/// policy. The node's own connections (kubelet probes) leave through OUTPUT and stay exempt,
/// as for IPv4.
pub fn rules_v6(v6: &[Ipv6Addr]) -> String {
    let mut out = format!("*filter\n:{CHAIN_V6} - [0:0]\n");
    for ip in v6 {
        for side in ["-d", "-s"] {
            out.push_str(&format!(
                "-A {CHAIN_V6} -p tcp {side} {ip}/128 -m tcp --syn -j REJECT --reject-with tcp-reset\n"
            ));
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// Runs `create` when `program args` (a listing) answers that the object is missing; a
/// listing that cannot be run at all is an error (a missing tool must fail start-up).
fn unless_present(
    program: &str,
    args: &[&str],
    create: impl FnOnce() -> Result<String, RedirectError>,
) -> Result<(), RedirectError> {
    match run(program, args, None) {
        Ok(_) => Ok(()),
        Err(RedirectError::Failed { .. }) => create().map(drop),
        Err(e) => Err(e),
    }
}

/// Whether the kernel has IPv6 at all (without it there is no IPv6 traffic to refuse).
fn kernel_has_ipv6() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6").exists()
}

/// The nftables table holding the capture of connections DNATed to a pod (ClusterIPs and
/// NodePorts served by a local endpoint).
pub const NFT_TABLE: &str = "weft";

/// The `nft -f` input for exactly these pods' addresses of `family` (the table `ip weft` or
/// `ip6 weft`): one transaction that replaces the table.
///
/// Why a second tool: kube-proxy DNATs a Service or NodePort connection in the nat table's
/// PREROUTING (priority -100), after mangle's (-150) where `WEFT_PRE` looked at its
/// destination, then still a VIP or the node's address. When the endpoint it picks is a
/// local enrolled pod, the connection would reach the pod around weft. iptables' mangle
/// chains run at a fixed priority; an nftables chain on the prerouting hook at priority
/// `dstnat + 10` sees the connection after the DNAT, with the pod as its destination, and
/// TPROXYs it to the inbound listeners like any other connection to the pod. Only DNATed
/// connections (`ct status dnat`) are taken here, and only those not already captured
/// (mark bit 0 unset: a pod's own outbound connections are taken by `WEFT_PRE`). Later
/// packets of such a connection reach weft's socket through `socket transparent`, as in
/// `WEFT_PRE`, so connections DNATed before the pod was enrolled keep flowing.
pub fn nft_rules(pods: &[PodRule], ports: &Ports, family: Family) -> String {
    let to = |addr: SocketAddr| match addr.ip() {
        IpAddr::V4(ip) if !ip.is_unspecified() && family == Family::V4 => {
            format!("{ip}:{}", addr.port())
        }
        IpAddr::V6(ip) if !ip.is_unspecified() && family == Family::V6 => {
            format!("[{ip}]:{}", addr.port())
        }
        _ => format!(":{}", addr.port()),
    };
    let nft = family.nft();
    let mut out = String::new();
    // Declaring then deleting makes the replacement work whether or not the table exists.
    out.push_str(&format!(
        "table {nft} {NFT_TABLE} {{}}\ndelete table {nft} {NFT_TABLE}\n"
    ));
    out.push_str(&format!(
        "table {nft} {NFT_TABLE} {{\n  chain after_dnat {{\n"
    ));
    out.push_str("    type filter hook prerouting priority dstnat + 10; policy accept;\n");
    out.push_str("    meta mark & 0x1 == 0x1 return\n");
    out.push_str("    ct status & dnat != dnat return\n");
    out.push_str(
        "    meta l4proto tcp tcp flags & (syn | ack) != syn socket transparent 1 meta mark set meta mark | 0x1 return\n",
    );
    for p in pods.iter().filter(|p| Family::of(p.ip) == family) {
        out.push_str(&format!(
            "    {nft} daddr {} iifname != \"{}\" tcp dport {} tcp flags & (syn | ack) == syn tproxy to {} meta mark set meta mark | 0x1 return\n",
            p.ip,
            p.veth,
            ports.hbone.port(),
            to(ports.hbone)
        ));
        out.push_str(&format!(
            "    {nft} daddr {} iifname != \"{}\" tcp flags & (syn | ack) == syn tproxy to {} meta mark set meta mark | 0x1 return\n",
            p.ip,
            p.veth,
            to(ports.inbound_plaintext)
        ));
    }
    out.push_str("  }\n}\n");
    out
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, RedirectError> {
    use std::io::Write;
    let command = format!("{program} {}", args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
    let mut child = cmd.spawn().map_err(|source| RedirectError::Spawn {
        command: command.clone(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| RedirectError::Spawn {
                command: command.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| RedirectError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(RedirectError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The host-side interface towards each of `ips`, from the routing table (`ip route get`,
/// so policy routing counts as the kernel applies it); the CNI names interfaces, so no naming
/// scheme is assumed. One `ip -batch` process for all of them: a pass used to run one `ip`
/// per pod, after every change to the mesh and every 30 s. An IP routed via a gateway (not a
/// pod on this node) or not routed at all is left out.
pub fn interfaces_to(ips: &[IpAddr]) -> Result<BTreeMap<IpAddr, String>, RedirectError> {
    let mut ip = Command::new("ip");
    ip.args(["-o", "-force", "-batch", "-"]);
    route_lookup(ip, "ip -o -force -batch - (route get per pod)", ips)
}

/// [`interfaces_to`] with `cmd` standing for `ip -o -force -batch -`.
fn route_lookup(
    mut cmd: Command,
    command: &str,
    ips: &[IpAddr],
) -> Result<BTreeMap<IpAddr, String>, RedirectError> {
    use std::io::Write;
    if ips.is_empty() {
        return Ok(BTreeMap::new());
    }
    let command = command.to_string();
    let spawn_error = |source| RedirectError::Spawn {
        command: command.clone(),
        source,
    };
    // One question per distinct IP, so answers and failures add up to exactly that many.
    let distinct: std::collections::BTreeSet<&IpAddr> = ips.iter().collect();
    let input: String = distinct
        .iter()
        .map(|ip| format!("route get {ip}\n"))
        .collect();
    // `-force`: an unroutable IP fails its own line only (and makes the exit status 1).
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    // Written from another thread: with many pods, `ip` fills its output pipe before it has
    // read all of its input.
    let writer = child.stdin.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        })
    });
    let out = child.wait_with_output().map_err(spawn_error);
    if let Some(w) = writer {
        let _ = w.join();
    }
    let out = out?;
    let answered = parse_routes(&String::from_utf8_lossy(&out.stdout));
    // Each IP gets an answer line (routed via a gateway or not) or a `Command failed -:N`
    // line; fewer means `ip` itself failed (not installed right, no permission, killed),
    // which must not read as "every pod is gone" and remove their capture.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed_lines = stderr.matches("Command failed").count();
    if answered.len() + failed_lines < distinct.len() {
        return Err(RedirectError::Failed {
            command,
            stderr: format!("{} ({})", stderr.trim(), out.status),
        });
    }
    Ok(answered
        .into_iter()
        .filter_map(|(ip, dev)| Some((ip, dev?)))
        .collect())
}

/// `ip -o route get` lines (`[type] DST [via GW] dev IFACE ...`): every destination answered,
/// with its interface when it is reached directly (`None` when routed via a gateway: not a
/// pod on this node).
fn parse_routes(out: &str) -> BTreeMap<IpAddr, Option<String>> {
    let mut found = BTreeMap::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        // A route type (`local`, `broadcast`...) may come before the destination.
        let Some(dst) = words.by_ref().find_map(|w| w.parse::<IpAddr>().ok()) else {
            continue;
        };
        let rest: Vec<&str> = words.collect();
        let dev = match rest.iter().position(|w| *w == "dev") {
            Some(i) if !rest.contains(&"via") => rest.get(i + 1).map(|d| d.to_string()),
            _ => None,
        };
        found.insert(dst, dev);
    }
    found
}

/// What the capture does for one address of a local enrolled pod (`/config_dump`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum PodCapture {
    /// Its rules are in force.
    Programmed {
        /// The pod's address.
        ip: IpAddr,
        /// The host-side interface its traffic enters by.
        interface: String,
    },
    /// Not captured (yet): why.
    Pending {
        /// The pod's address.
        ip: IpAddr,
        /// Why not.
        reason: String,
    },
}

/// The capture's state, as the last pass of [`Redirector::follow`] left it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureStatus {
    /// Until the first complete mesh load the rules in force (a previous weft's, or none)
    /// are kept untouched.
    pub waiting_for_mesh: bool,
    /// The state generation of the last pass.
    pub generation: u64,
    /// Every address of every local enrolled pod.
    pub pods: Vec<PodCapture>,
    /// Why IPv6 is refused instead of captured, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6_refused: Option<String>,
    /// The last failure to program the rules, while it lasts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Programs and removes the capture rules.
pub struct Redirector {
    ports: Ports,
    /// Why IPv6 is not captured (its connections refused instead), or `None` when it is.
    ipv6_refused: std::sync::Mutex<Option<String>>,
    /// The state generation whose local enrolled pods the rules in force capture.
    applied: std::sync::atomic::AtomicU64,
    status: std::sync::Mutex<CaptureStatus>,
    metrics: CaptureMetrics,
}

/// The rules one pass wants in force: each family's captured addresses, and the IPv6
/// addresses refused at FORWARD (every local enrolled pod's: only what the capture did not
/// take ever gets there).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Captured addresses, IPv4 and IPv6.
    pub pods: Vec<PodRule>,
    /// IPv6 addresses whose uncaptured connections are refused.
    pub refused: Vec<Ipv6Addr>,
}

impl Redirector {
    /// A redirector sending captured traffic to `ports`, counting its runs in `metrics`.
    /// `ipv6_refused` says why IPv6 cannot be captured (no IPv6 listeners, `ipv6: refuse`);
    /// `None` captures it.
    pub fn new(ports: Ports, metrics: CaptureMetrics, ipv6_refused: Option<String>) -> Redirector {
        Redirector {
            ports,
            ipv6_refused: std::sync::Mutex::new(ipv6_refused),
            applied: std::sync::atomic::AtomicU64::new(0),
            status: std::sync::Mutex::new(CaptureStatus {
                waiting_for_mesh: true,
                ..CaptureStatus::default()
            }),
            metrics,
        }
    }

    /// The capture's state per local enrolled pod.
    pub fn status(&self) -> CaptureStatus {
        crate::sync::lock(&self.status).clone()
    }

    fn set_status(&self, status: CaptureStatus) {
        *crate::sync::lock(&self.status) = status;
    }

    /// Why IPv6 is refused rather than captured, when it is.
    pub fn ipv6_refused(&self) -> Option<String> {
        crate::sync::lock(&self.ipv6_refused).clone()
    }

    /// The state generation the rules in force were computed from (0: none yet). Readiness
    /// waits for it, so a node never reports ready while its pods' traffic bypasses weft.
    pub fn applied_generation(&self) -> u64 {
        self.applied.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Takes over the capture: the chains in force are left exactly as they are (a previous
    /// weft's rules keep capturing until this weft's first complete mesh load, see
    /// [`Redirector::follow`]); only a node with no chain yet gets an empty one. Then the
    /// jumps to them and the policy routing are added where missing. Checks on the way that
    /// the tools exist and the kernel takes the rules. IPv6 capture that cannot be set up
    /// (no IPv6 TPROXY in this kernel or ip6tables) is not fatal: IPv6 is then refused, and
    /// [`Redirector::ipv6_refused`] says why.
    pub fn install(&self) -> Result<(), RedirectError> {
        self.install_family(Family::V4)?;
        if kernel_has_ipv6() {
            // The refusal first: it is what holds when the capture cannot.
            unless_present("ip6tables", &["-w", "-S", CHAIN_V6], || {
                run(
                    "ip6tables-restore",
                    &["-w", "5", "--noflush"],
                    Some(&rules_v6(&[])),
                )
            })?;
            if run("ip6tables", &["-w", "-C", "FORWARD", "-j", CHAIN_V6], None).is_err() {
                run(
                    "ip6tables",
                    &["-w", "-I", "FORWARD", "1", "-j", CHAIN_V6],
                    None,
                )?;
            }
            if self.ipv6_refused().is_none() {
                if let Err(e) = self.install_family(Family::V6) {
                    let why = format!("IPv6 capture cannot be programmed: {e}");
                    tracing::warn!(reason = %why, "IPv6 connections of local enrolled pods are refused, not captured");
                    *crate::sync::lock(&self.ipv6_refused) = Some(why);
                }
            }
        } else {
            *crate::sync::lock(&self.ipv6_refused) = Some("the kernel has no IPv6".into());
        }
        Ok(())
    }

    /// One family's chain, DNAT table, jump and policy routing, each created where missing.
    fn install_family(&self, family: Family) -> Result<(), RedirectError> {
        let tables = family.tables();
        unless_present(tables, &["-w", "-t", "mangle", "-S", CHAIN], || {
            run(
                family.restore(),
                &["-w", "5", "--noflush"],
                Some(&rules(&[], &self.ports, family)),
            )
        })?;
        unless_present("nft", &["list", "table", family.nft(), NFT_TABLE], || {
            run(
                "nft",
                &["-f", "-"],
                Some(&nft_rules(&[], &self.ports, family)),
            )
        })?;
        if run(
            tables,
            &["-w", "-t", "mangle", "-C", "PREROUTING", "-j", CHAIN],
            None,
        )
        .is_err()
        {
            run(
                tables,
                &["-w", "-t", "mangle", "-I", "PREROUTING", "1", "-j", CHAIN],
                None,
            )?;
        }
        let flag = family.ip_flag();
        let rules = run("ip", &[flag, "rule", "show"], None)?;
        if !rules.contains(&format!("fwmark {TPROXY_MARK} lookup {ROUTE_TABLE}")) {
            run(
                "ip",
                &[
                    flag,
                    "rule",
                    "add",
                    "fwmark",
                    TPROXY_MARK,
                    "lookup",
                    ROUTE_TABLE,
                ],
                None,
            )?;
        }
        run(
            "ip",
            &[
                flag,
                "route",
                "replace",
                "local",
                family.any(),
                "dev",
                "lo",
                "table",
                ROUTE_TABLE,
            ],
            None,
        )?;
        Ok(())
    }

    /// Rewrites the chains for exactly `desired`, one transaction per tool and family.
    pub fn apply(&self, desired: &Desired) -> Result<(), RedirectError> {
        run(
            "iptables-restore",
            &["-w", "5", "--noflush"],
            Some(&rules(&desired.pods, &self.ports, Family::V4)),
        )?;
        if kernel_has_ipv6() {
            run(
                "ip6tables-restore",
                &["-w", "5", "--noflush"],
                Some(&rules_v6(&desired.refused)),
            )?;
            if self.ipv6_refused().is_none() {
                run(
                    "ip6tables-restore",
                    &["-w", "5", "--noflush"],
                    Some(&rules(&desired.pods, &self.ports, Family::V6)),
                )?;
                run(
                    "nft",
                    &["-f", "-"],
                    Some(&nft_rules(&desired.pods, &self.ports, Family::V6)),
                )?;
            } else if run("ip6tables", &["-w", "-t", "mangle", "-S", CHAIN], None).is_ok() {
                // A previous weft captured IPv6 and this one cannot: its rules would send
                // connections to listeners that are not there (dropped, and retried until the
                // client gives up); emptied, the refusal answers them at once.
                run(
                    "ip6tables-restore",
                    &["-w", "5", "--noflush"],
                    Some(&rules(&[], &self.ports, Family::V6)),
                )?;
                let _ = run("nft", &["delete", "table", "ip6", NFT_TABLE], None);
            }
        }
        run(
            "nft",
            &["-f", "-"],
            Some(&nft_rules(&desired.pods, &self.ports, Family::V4)),
        )?;
        Ok(())
    }

    /// Removes everything [`Redirector::install`] and [`Redirector::apply`] added (the jumps,
    /// the chains, the nftables tables, the policy-routing rules and their table), for both
    /// families: `weft uninstall`, for taking weft off a node. Nothing else ever removes them:
    /// a stopped weft leaves its capture in force (fail closed). Missing pieces are not an
    /// error; tools that cannot be run are.
    pub fn uninstall() -> Result<(), RedirectError> {
        run("iptables", &["--version"], None)?;
        run("ip", &["-V"], None)?;
        run("nft", &["--version"], None)?;
        let mut families = vec![Family::V4];
        if kernel_has_ipv6() {
            run("ip6tables", &["--version"], None)?;
            families.push(Family::V6);
        }
        for family in families {
            let tables = family.tables();
            while run(
                tables,
                &["-w", "-t", "mangle", "-D", "PREROUTING", "-j", CHAIN],
                None,
            )
            .is_ok()
            {}
            let _ = run(tables, &["-w", "-t", "mangle", "-F", CHAIN], None);
            let _ = run(tables, &["-w", "-t", "mangle", "-X", CHAIN], None);
            let flag = family.ip_flag();
            while run(
                "ip",
                &[
                    flag,
                    "rule",
                    "del",
                    "fwmark",
                    TPROXY_MARK,
                    "lookup",
                    ROUTE_TABLE,
                ],
                None,
            )
            .is_ok()
            {}
            let _ = run("ip", &[flag, "route", "flush", "table", ROUTE_TABLE], None);
            let _ = run("nft", &["delete", "table", family.nft(), NFT_TABLE], None);
            if family == Family::V6 {
                while run("ip6tables", &["-w", "-D", "FORWARD", "-j", CHAIN_V6], None).is_ok() {}
                let _ = run("ip6tables", &["-w", "-F", CHAIN_V6], None);
                let _ = run("ip6tables", &["-w", "-X", CHAIN_V6], None);
            }
        }
        Ok(())
    }

    /// Keeps the rules equal to the local enrolled pods of the state in force, until
    /// `shutdown`. Pods whose interface is not there yet are retried.
    pub fn follow(
        self: Arc<Self>,
        store: Arc<StateStore>,
        node: String,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let mut changes = store.subscribe();
        tokio::spawn(async move {
            let mut applied: Option<Desired> = None;
            let mut warned: Option<(Vec<Ipv6Addr>, Option<String>)> = None;
            loop {
                if !store.loaded() {
                    // Until the first complete mesh load the chain in force (a previous
                    // weft's) stays as it is: rewritten from an empty mesh it would let the
                    // pods it captures take connections nobody decided on.
                    tokio::select! {
                        r = changes.changed() => if r.is_err() { return },
                        _ = crate::sync::shut_down(&mut shutdown) => return,
                    }
                    continue;
                }
                let snap = store.snapshot();
                let generation = snap.generation;
                let ipv6_refused = self.ipv6_refused();
                let mut ips: Vec<IpAddr> = Vec::new();
                let mut v6: Vec<Ipv6Addr> = Vec::new();
                for ip in snap.local_enrolled(&node).flat_map(|w| w.ips.iter()) {
                    match ip {
                        IpAddr::V4(_) => ips.push(*ip),
                        IpAddr::V6(v) => {
                            v6.push(*v);
                            if ipv6_refused.is_none() {
                                ips.push(*ip);
                            }
                        }
                    }
                }
                drop(snap);
                let now = (v6.clone(), ipv6_refused.clone());
                if warned.as_ref() != Some(&now) {
                    if let (false, Some(why)) = (v6.is_empty(), &ipv6_refused) {
                        tracing::warn!(addresses = ?v6, reason = %why, "IPv6 addresses of local enrolled pods are not captured: their IPv6 TCP connections are refused");
                    }
                    warned = Some(now);
                }
                let me = self.clone();
                let routes = tokio::task::spawn_blocking(move || {
                    let found = interfaces_to(&ips)?;
                    let missing: Vec<IpAddr> = ips
                        .into_iter()
                        .filter(|ip| !found.contains_key(ip))
                        .collect();
                    let desired: Vec<PodRule> = found
                        .into_iter()
                        .map(|(ip, veth)| PodRule { ip, veth })
                        .collect();
                    Ok::<_, RedirectError>((desired, missing))
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
                let (wanted, missing) = match routes {
                    Ok(r) => r,
                    Err(e) => {
                        // Nothing learnt about the pods: the rules in force stay.
                        tracing::error!(error = %e, "cannot read the routes to the pods; capture rules unchanged, retrying");
                        self.metrics.run(RunResult::Failure);
                        let mut status = self.status();
                        status.last_error =
                            Some(format!("cannot read the routes to the pods: {e}"));
                        self.set_status(status);
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            _ = crate::sync::shut_down(&mut shutdown) => return,
                        }
                    }
                };
                if !missing.is_empty() {
                    tracing::warn!(pods = ?missing, "no local interface for these enrolled pods yet; retrying");
                }
                let mut last_error = None;
                let desired = Desired {
                    pods: wanted.clone(),
                    refused: v6.clone(),
                };
                if applied.as_ref() != Some(&desired) {
                    let d = desired.clone();
                    let result = tokio::task::spawn_blocking(move || me.apply(&d)).await;
                    match result {
                        Ok(Ok(())) => {
                            tracing::info!(addresses = desired.pods.len(), "capture rules updated");
                            self.metrics.run(RunResult::Success);
                            applied = Some(desired);
                            self.applied
                                .store(generation, std::sync::atomic::Ordering::Release);
                        }
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "capture rules rejected; previous rules stay");
                            self.metrics.run(RunResult::Failure);
                            last_error = Some(format!("capture rules rejected: {e}"));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "capture rule task failed");
                            self.metrics.run(RunResult::Failure);
                            last_error = Some(format!("capture rule task failed: {e}"));
                        }
                    }
                } else {
                    self.applied
                        .store(generation, std::sync::atomic::Ordering::Release);
                }
                let refused: &[Ipv6Addr] = if ipv6_refused.is_some() { &v6 } else { &[] };
                self.set_status(CaptureStatus {
                    waiting_for_mesh: false,
                    generation,
                    pods: pod_captures(
                        applied.as_ref().map(|a| &a.pods[..]).unwrap_or(&[]),
                        &wanted,
                        &missing,
                        refused,
                        ipv6_refused.as_deref(),
                        last_error.as_deref(),
                    ),
                    ipv6_refused: ipv6_refused.clone(),
                    last_error,
                });
                let retry = if missing.is_empty() {
                    Duration::from_secs(30)
                } else {
                    Duration::from_secs(1)
                };
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(retry) => {}
                    _ = crate::sync::shut_down(&mut shutdown) => return,
                }
            }
        })
    }
}

/// Each address of the local enrolled pods as the capture stands: the rules in force
/// (`programmed`), then the `wanted` ones a failed rewrite (`failed`) left out, addresses with
/// no interface yet (their IPv6 connections refused meanwhile), and the IPv6 addresses
/// refused because IPv6 is not captured (`why`).
fn pod_captures(
    programmed: &[PodRule],
    wanted: &[PodRule],
    missing: &[IpAddr],
    refused: &[Ipv6Addr],
    why: Option<&str>,
    failed: Option<&str>,
) -> Vec<PodCapture> {
    let mut out: Vec<PodCapture> = programmed
        .iter()
        .map(|p| PodCapture::Programmed {
            ip: p.ip,
            interface: p.veth.clone(),
        })
        .collect();
    if let Some(failed) = failed {
        out.extend(wanted.iter().filter(|w| !programmed.contains(w)).map(|w| {
            PodCapture::Pending {
                ip: w.ip,
                reason: failed.to_string(),
            }
        }));
    }
    out.extend(missing.iter().map(|ip| {
        PodCapture::Pending {
            ip: *ip,
            reason: match ip {
                IpAddr::V4(_) => "no local interface for the pod yet".to_string(),
                IpAddr::V6(_) => {
                    "no local interface for the pod yet: its IPv6 TCP connections are refused"
                        .to_string()
                }
            },
        }
    }));
    out.extend(refused.iter().map(|ip| PodCapture::Pending {
        ip: IpAddr::V6(*ip),
        reason: format!(
            "IPv6 is not captured ({}): its TCP connections are refused",
            why.unwrap_or("unavailable")
        ),
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn the_after_dnat_table_is_replaced_whole_and_takes_only_new_connections_to_the_pods() {
        let ports = Ports {
            outbound: "0.0.0.0:15001".parse().unwrap(),
            inbound_plaintext: "0.0.0.0:15006".parse().unwrap(),
            hbone: "0.0.0.0:15008".parse().unwrap(),
        };
        let pod = PodRule {
            ip: Ipv4Addr::new(10, 244, 1, 10).into(),
            veth: "va".into(),
        };
        let pod6 = PodRule {
            ip: "fd00:10:244:1::a".parse().unwrap(),
            veth: "va".into(),
        };
        let text = nft_rules(&[pod.clone(), pod6.clone()], &ports, Family::V4);
        assert!(!text.contains("fd00"), "{text}");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(
            lines[..3],
            [
                "table ip weft {}",
                "delete table ip weft",
                "table ip weft {"
            ]
        );
        assert!(lines.contains(&"type filter hook prerouting priority dstnat + 10; policy accept;"));
        assert!(lines.contains(&"ct status & dnat != dnat return"));
        assert!(lines.contains(&"ip daddr 10.244.1.10 iifname != \"va\" tcp flags & (syn | ack) == syn tproxy to :15006 meta mark set meta mark | 0x1 return"), "{text}");
        assert!(lines.contains(&"ip daddr 10.244.1.10 iifname != \"va\" tcp dport 15008 tcp flags & (syn | ack) == syn tproxy to :15008 meta mark set meta mark | 0x1 return"), "{text}");
        // No pods: the chain and its pass-through rules only.
        assert!(!nft_rules(&[], &ports, Family::V4).contains("tproxy"));
        // The IPv6 table: the pod's IPv6 address only, to the `[::]` listeners' ports.
        let text = nft_rules(&[pod, pod6], &ports, Family::V6);
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(lines[0], "table ip6 weft {}");
        assert!(!text.contains("10.244"), "{text}");
        assert!(lines.contains(&"ip6 daddr fd00:10:244:1::a iifname != \"va\" tcp flags & (syn | ack) == syn tproxy to :15006 meta mark set meta mark | 0x1 return"), "{text}");
    }

    #[test]
    fn ipv6_refusal_resets_new_tcp_connections_both_ways_and_nothing_else() {
        let ip: Ipv6Addr = "fd00:10:244:1::a".parse().unwrap();
        assert_eq!(
            rules_v6(&[ip]),
            "*filter\n:WEFT_V6 - [0:0]\n\
             -A WEFT_V6 -p tcp -d fd00:10:244:1::a/128 -m tcp --syn -j REJECT --reject-with tcp-reset\n\
             -A WEFT_V6 -p tcp -s fd00:10:244:1::a/128 -m tcp --syn -j REJECT --reject-with tcp-reset\n\
             COMMIT\n"
        );
        assert_eq!(rules_v6(&[]), "*filter\n:WEFT_V6 - [0:0]\nCOMMIT\n");
    }

    #[test]
    fn each_pod_address_is_programmed_or_pending_with_its_reason() {
        let rule = |last: u8, veth: &str| PodRule {
            ip: Ipv4Addr::new(10, 0, 0, last).into(),
            veth: veth.into(),
        };
        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        let v6_missing: IpAddr = "fd00::3".parse().unwrap();
        let pods = pod_captures(
            &[rule(1, "va")],
            &[rule(1, "va"), rule(2, "vb")],
            &["10.0.0.3".parse().unwrap(), v6_missing],
            &[v6],
            Some("ipv6: refuse"),
            Some("capture rules rejected: boom"),
        );
        let pending = |ip: IpAddr, reason: &str| PodCapture::Pending {
            ip,
            reason: reason.into(),
        };
        assert_eq!(
            pods,
            [
                PodCapture::Programmed {
                    ip: "10.0.0.1".parse().unwrap(),
                    interface: "va".into()
                },
                pending("10.0.0.2".parse().unwrap(), "capture rules rejected: boom"),
                pending(
                    "10.0.0.3".parse().unwrap(),
                    "no local interface for the pod yet"
                ),
                pending(
                    v6_missing,
                    "no local interface for the pod yet: its IPv6 TCP connections are refused"
                ),
                pending(
                    IpAddr::V6(v6),
                    "IPv6 is not captured (ipv6: refuse): its TCP connections are refused"
                ),
            ]
        );
        // Without a failure, wanted rules not yet in force are not reported twice.
        assert_eq!(
            pod_captures(&[rule(1, "va")], &[rule(1, "va")], &[], &[], None, None).len(),
            1
        );
    }

    #[test]
    fn route_lines_give_the_interface_of_directly_reached_destinations() {
        let out = "10.244.1.5 dev veth0a1b src 10.244.1.1 uid 0 \\    cache \n\
                   10.244.2.7 via 192.0.2.1 dev eth0 src 192.0.2.2 uid 0 \\    cache \n\
                   local 127.0.0.1 dev lo src 127.0.0.1 uid 0 \\    cache <local> \n\
                   10.244.1.9 dev cali12345 src 10.244.1.1 uid 0 \\    cache \n\
                   RTNETLINK answers: Network is unreachable\n\
                   fd00:10:244:1::a from :: dev p0 proto kernel src fe80::1 metric 1024 pref medium\n\
                   fd00:10:244:2::a from :: via fd00:172:18::2 dev ul src fd00:172:18::1 metric 1024 pref medium\n\
                   local ::1 dev lo table local proto kernel src ::1 metric 0 pref medium\n";
        let found = parse_routes(out);
        let want: BTreeMap<IpAddr, Option<String>> = [
            ("10.244.1.5", Some("veth0a1b")),
            ("10.244.2.7", None),
            ("127.0.0.1", Some("lo")),
            ("10.244.1.9", Some("cali12345")),
            ("fd00:10:244:1::a", Some("p0")),
            ("fd00:10:244:2::a", None),
            ("::1", Some("lo")),
        ]
        .into_iter()
        .map(|(ip, d)| (ip.parse::<IpAddr>().unwrap(), d.map(str::to_string)))
        .collect();
        assert_eq!(found, want);
    }

    #[test]
    fn one_ip_process_resolves_every_pod_even_thousands() {
        // Loopback addresses are routed `local ... dev lo` on any host; nothing is sent. 5,000
        // answers (~400 KiB) overflow the output pipe long before the input is written: the
        // input must be written while the output is read.
        let ips: Vec<IpAddr> = (0..5_000u32)
            .map(|i| IpAddr::from(Ipv4Addr::from(0x7f00_0000 | (i + 1))))
            .collect();
        let found = interfaces_to(&ips).unwrap();
        assert_eq!(found.len(), ips.len());
        assert!(found.values().all(|d| d == "lo"), "{found:?}");
        assert!(interfaces_to(&[]).unwrap().is_empty());
    }

    #[test]
    fn ip_failing_as_a_whole_is_an_error_not_a_node_without_pods() {
        let fake = |script: &str| {
            let mut c = Command::new("sh");
            c.args(["-c", script]);
            c
        };
        let ips: [IpAddr; 2] = [[10, 0, 0, 1].into(), [10, 0, 0, 2].into()];
        // Every pod unroutable (each line failed on its own): a valid answer, no interfaces.
        let each_failed = "cat >/dev/null; for i in 1 2; do echo 'RTNETLINK answers: Network is unreachable' >&2; echo \"Command failed -:$i\" >&2; done; exit 1";
        assert!(route_lookup(fake(each_failed), "fake", &ips)
            .unwrap()
            .is_empty());
        // One answered, one failed: the answer counts.
        let one_each = "cat >/dev/null; echo '10.0.0.1 dev veth1 src 10.0.0.254 uid 0'; echo 'Command failed -:2' >&2; exit 1";
        let found = route_lookup(fake(one_each), "fake", &ips).unwrap();
        assert_eq!(found.get(&ips[0]).map(String::as_str), Some("veth1"));
        // One reached via a gateway (not local), and an IP asked twice: a whole answer, not a
        // failure of `ip` (which would freeze the rules in force).
        let via = "cat >/dev/null; echo '10.0.0.1 dev veth1 src 10.0.0.254 uid 0'; echo '10.0.0.2 via 192.0.2.1 dev eth0 src 192.0.2.2 uid 0'";
        let found = route_lookup(fake(via), "fake", &[ips[0], ips[1], ips[0]]).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found.get(&ips[0]).map(String::as_str), Some("veth1"));
        // `ip` itself failed: an error with its reason, so the rules in force stay.
        let broken = "cat >/dev/null; echo 'Object \"route\" is unknown' >&2; exit 255";
        let err = route_lookup(fake(broken), "fake", &ips)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is unknown") && err.contains("255"), "{err}");
        // Not even started.
        let err = route_lookup(Command::new("/nonexistent/ip"), "ip", &ips).unwrap_err();
        assert!(matches!(err, RedirectError::Spawn { .. }), "{err}");
    }

    #[test]
    fn outbound_rules_come_before_inbound_rules_and_target_the_listeners() {
        let ports = Ports {
            outbound: "0.0.0.0:15001".parse().unwrap(),
            inbound_plaintext: "0.0.0.0:15006".parse().unwrap(),
            hbone: "127.0.0.1:15008".parse().unwrap(),
        };
        let pods = [
            PodRule {
                ip: "10.0.0.1".parse().unwrap(),
                veth: "va".into(),
            },
            PodRule {
                ip: "10.0.0.2".parse().unwrap(),
                veth: "vb".into(),
            },
        ];
        let text = rules(&pods, &ports, Family::V4);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "*mangle");
        assert_eq!(lines[1], ":WEFT_PRE - [0:0]");
        assert_eq!(
            lines[2],
            "-A WEFT_PRE -p tcp -m tcp ! --syn -m socket --transparent -j MARK --set-mark 0x1/0x1"
        );
        assert!(lines[3].contains("--mark 0x1/0x1 -j RETURN"));
        assert_eq!(lines[4], "-A WEFT_PRE -p tcp -i va -m tcp --syn -m conntrack --ctdir ORIGINAL -j TPROXY --on-port 15001 --tproxy-mark 0x1/0x1");
        assert!(lines[5].contains("-i vb "));
        assert_eq!(lines[6], "-A WEFT_PRE -p tcp -d 10.0.0.1/32 --dport 15008 ! -i va -m tcp --syn -m conntrack --ctdir ORIGINAL -j TPROXY --on-ip 127.0.0.1 --on-port 15008 --tproxy-mark 0x1/0x1");
        assert_eq!(lines[7], "-A WEFT_PRE -p tcp -d 10.0.0.1/32 ! -i va -m tcp --syn -m conntrack --ctdir ORIGINAL -j TPROXY --on-port 15006 --tproxy-mark 0x1/0x1");
        assert_eq!(*lines.last().unwrap(), "COMMIT");
        assert_eq!(lines.len(), 11);
    }

    #[test]
    fn ipv6_rules_take_the_ipv6_addresses_only_to_the_listeners_ports() {
        let ports = Ports {
            outbound: "0.0.0.0:15001".parse().unwrap(),
            inbound_plaintext: "0.0.0.0:15006".parse().unwrap(),
            hbone: "127.0.0.1:15008".parse().unwrap(),
        };
        let rule = |ip: &str| PodRule {
            ip: ip.parse().unwrap(),
            veth: "va".into(),
        };
        // A dual-stack pod: one address of each family on one interface.
        let pods = [rule("10.0.0.1"), rule("fd00::1"), rule("fd00::2")];
        let v4 = rules(&pods, &ports, Family::V4);
        assert!(!v4.contains("fd00"), "{v4}");
        let v6 = rules(&pods, &ports, Family::V6);
        let lines: Vec<&str> = v6.lines().collect();
        assert!(!v6.contains("10.0.0.1"), "{v6}");
        // One outbound rule for the interface, however many addresses it has.
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains(" -p tcp -i va "))
                .count(),
            1,
            "{v6}"
        );
        assert_eq!(lines[4], "-A WEFT_PRE -p tcp -i va -m tcp --syn -m conntrack --ctdir ORIGINAL -j TPROXY --on-port 15001 --tproxy-mark 0x1/0x1");
        // An IPv4 listener address is never written into IPv6 rules: the port only.
        assert_eq!(lines[5], "-A WEFT_PRE -p tcp -d fd00::1/128 --dport 15008 ! -i va -m tcp --syn -m conntrack --ctdir ORIGINAL -j TPROXY --on-port 15008 --tproxy-mark 0x1/0x1");
        assert_eq!(lines[6], "-A WEFT_PRE -p tcp -d fd00::1/128 ! -i va -m tcp --syn -m conntrack --ctdir ORIGINAL -j TPROXY --on-port 15006 --tproxy-mark 0x1/0x1");
        assert_eq!(lines.len(), 10, "{v6}");
    }
}
