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
//! IPv6 is not captured; instead, the `WEFT_V6` chain of ip6tables' filter table refuses (TCP
//! reset) every new IPv6 TCP connection to or from a local enrolled pod's IPv6 address, so
//! that traffic never bypasses mTLS and policy; a warning names them here, `/config_dump`
//! shows them pending with the reason, and `weft check` warns per pod.
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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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
/// pods, which are not captured.
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

/// One local enrolled pod: its address and the node-side interface its traffic enters by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRule {
    /// The pod's IPv4 address.
    pub ip: Ipv4Addr,
    /// The host-side interface (found from the route to the pod).
    pub veth: String,
}

fn on(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) if !ip.is_unspecified() => {
            format!("--on-ip {ip} --on-port {}", addr.port())
        }
        _ => format!("--on-port {}", addr.port()),
    }
}

/// The `iptables-restore` input for exactly these pods.
pub fn rules(pods: &[PodRule], ports: &Ports) -> String {
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
    for p in pods {
        out.push_str(&format!(
            "-A {CHAIN} -p tcp -i {} -m tcp --syn -m conntrack --ctdir ORIGINAL -j TPROXY {} --tproxy-mark {TPROXY_MARK}\n",
            p.veth,
            on(ports.outbound)
        ));
    }
    for p in pods {
        out.push_str(&format!(
            "-A {CHAIN} -p tcp -d {}/32 --dport {} ! -i {} -m tcp --syn -m conntrack --ctdir ORIGINAL -j TPROXY {} --tproxy-mark {TPROXY_MARK}\n",
            p.ip,
            ports.hbone.port(),
            p.veth,
            on(ports.hbone)
        ));
        out.push_str(&format!(
            "-A {CHAIN} -p tcp -d {}/32 ! -i {} -m tcp --syn -m conntrack --ctdir ORIGINAL -j TPROXY {} --tproxy-mark {TPROXY_MARK}\n",
            p.ip,
            p.veth,
            on(ports.inbound_plaintext)
        ));
    }
    out.push_str("COMMIT\n");
    out
}

/// The `ip6tables-restore` input refusing every new IPv6 TCP connection to or from these
/// addresses (local enrolled pods' IPv6 addresses): IPv6 is not captured, so its traffic
/// would otherwise bypass mTLS and policy. The node's own connections (kubelet probes) leave
/// through OUTPUT and stay exempt, as for IPv4.
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

/// The `nft -f` input for exactly these pods: one transaction that replaces the table.
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
pub fn nft_rules(pods: &[PodRule], ports: &Ports) -> String {
    let to = |addr: SocketAddr| match addr.ip() {
        IpAddr::V4(ip) if !ip.is_unspecified() => format!("{ip}:{}", addr.port()),
        _ => format!(":{}", addr.port()),
    };
    let mut out = String::new();
    // Declaring then deleting makes the replacement work whether or not the table exists.
    out.push_str(&format!(
        "table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n"
    ));
    out.push_str(&format!("table ip {NFT_TABLE} {{\n  chain after_dnat {{\n"));
    out.push_str("    type filter hook prerouting priority dstnat + 10; policy accept;\n");
    out.push_str("    meta mark & 0x1 == 0x1 return\n");
    out.push_str("    ct status & dnat != dnat return\n");
    out.push_str(
        "    meta l4proto tcp tcp flags & (syn | ack) != syn socket transparent 1 meta mark set meta mark | 0x1 return\n",
    );
    for p in pods {
        out.push_str(&format!(
            "    ip daddr {} iifname != \"{}\" tcp dport {} tcp flags & (syn | ack) == syn tproxy to {} meta mark set meta mark | 0x1 return\n",
            p.ip,
            p.veth,
            ports.hbone.port(),
            to(ports.hbone)
        ));
        out.push_str(&format!(
            "    ip daddr {} iifname != \"{}\" tcp flags & (syn | ack) == syn tproxy to {} meta mark set meta mark | 0x1 return\n",
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
pub fn interfaces_to(ips: &[Ipv4Addr]) -> Result<BTreeMap<Ipv4Addr, String>, RedirectError> {
    let mut ip = Command::new("ip");
    ip.args(["-o", "-force", "-batch", "-"]);
    route_lookup(ip, "ip -o -force -batch - (route get per pod)", ips)
}

/// [`interfaces_to`] with `cmd` standing for `ip -o -force -batch -`.
fn route_lookup(
    mut cmd: Command,
    command: &str,
    ips: &[Ipv4Addr],
) -> Result<BTreeMap<Ipv4Addr, String>, RedirectError> {
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
    let distinct: std::collections::BTreeSet<&Ipv4Addr> = ips.iter().collect();
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
fn parse_routes(out: &str) -> BTreeMap<Ipv4Addr, Option<String>> {
    let mut found = BTreeMap::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        // A route type (`local`, `broadcast`...) may come before the destination.
        let Some(dst) = words.by_ref().find_map(|w| w.parse::<Ipv4Addr>().ok()) else {
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
    /// The last failure to program the rules, while it lasts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Programs and removes the capture rules.
pub struct Redirector {
    ports: Ports,
    /// The state generation whose local enrolled pods the rules in force capture.
    applied: std::sync::atomic::AtomicU64,
    status: std::sync::Mutex<CaptureStatus>,
    metrics: CaptureMetrics,
}

impl Redirector {
    /// A redirector sending captured traffic to `ports`, counting its runs in `metrics`.
    pub fn new(ports: Ports, metrics: CaptureMetrics) -> Redirector {
        Redirector {
            ports,
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

    /// The state generation the rules in force were computed from (0: none yet). Readiness
    /// waits for it, so a node never reports ready while its pods' traffic bypasses weft.
    pub fn applied_generation(&self) -> u64 {
        self.applied.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Takes over the capture: the chain in force is left exactly as it is (a previous
    /// weft's rules keep capturing until this weft's first complete mesh load, see
    /// [`Redirector::follow`]); only a node with no chain yet gets an empty one. Then the jump
    /// to it and the policy routing are added where missing. Checks on the way that the tools
    /// exist and the kernel takes the rules.
    pub fn install(&self) -> Result<(), RedirectError> {
        // Each piece is created empty only where it is missing (a node weft has not run on,
        // or after `weft uninstall`); one in force is never rewritten here.
        unless_present("iptables", &["-w", "-t", "mangle", "-S", CHAIN], || {
            run(
                "iptables-restore",
                &["-w", "5", "--noflush"],
                Some(&rules(&[], &self.ports)),
            )
        })?;
        unless_present("nft", &["list", "table", "ip", NFT_TABLE], || {
            run("nft", &["-f", "-"], Some(&nft_rules(&[], &self.ports)))
        })?;
        if kernel_has_ipv6() {
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
        }
        if run(
            "iptables",
            &["-w", "-t", "mangle", "-C", "PREROUTING", "-j", CHAIN],
            None,
        )
        .is_err()
        {
            run(
                "iptables",
                &["-w", "-t", "mangle", "-I", "PREROUTING", "1", "-j", CHAIN],
                None,
            )?;
        }
        let rules = run("ip", &["-4", "rule", "show"], None)?;
        if !rules.contains(&format!("fwmark {TPROXY_MARK} lookup {ROUTE_TABLE}")) {
            run(
                "ip",
                &[
                    "-4",
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
                "-4",
                "route",
                "replace",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                ROUTE_TABLE,
            ],
            None,
        )?;
        Ok(())
    }

    /// Rewrites the chains for exactly `pods` (and the refusal of `v6`, their IPv6
    /// addresses), one transaction per tool.
    pub fn apply(&self, pods: &[PodRule], v6: &[Ipv6Addr]) -> Result<(), RedirectError> {
        run(
            "iptables-restore",
            &["-w", "5", "--noflush"],
            Some(&rules(pods, &self.ports)),
        )?;
        if kernel_has_ipv6() {
            run(
                "ip6tables-restore",
                &["-w", "5", "--noflush"],
                Some(&rules_v6(v6)),
            )?;
        }
        run("nft", &["-f", "-"], Some(&nft_rules(pods, &self.ports)))?;
        Ok(())
    }

    /// Removes everything [`Redirector::install`] and [`Redirector::apply`] added (the jump,
    /// the chain, the policy-routing rule and its table): `weft uninstall`, for taking weft
    /// off a node. Nothing else ever removes them: a stopped weft leaves its capture in force
    /// (fail closed). Missing pieces are not an error; tools that cannot be run are.
    pub fn uninstall() -> Result<(), RedirectError> {
        run("iptables", &["--version"], None)?;
        run("ip", &["-V"], None)?;
        run("nft", &["--version"], None)?;
        while run(
            "iptables",
            &["-w", "-t", "mangle", "-D", "PREROUTING", "-j", CHAIN],
            None,
        )
        .is_ok()
        {}
        let _ = run("iptables", &["-w", "-t", "mangle", "-F", CHAIN], None);
        let _ = run("iptables", &["-w", "-t", "mangle", "-X", CHAIN], None);
        while run(
            "ip",
            &[
                "-4",
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
        let _ = run("ip", &["-4", "route", "flush", "table", ROUTE_TABLE], None);
        let _ = run("nft", &["delete", "table", "ip", NFT_TABLE], None);
        if kernel_has_ipv6() {
            while run("ip6tables", &["-w", "-D", "FORWARD", "-j", CHAIN_V6], None).is_ok() {}
            let _ = run("ip6tables", &["-w", "-F", CHAIN_V6], None);
            let _ = run("ip6tables", &["-w", "-X", CHAIN_V6], None);
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
            let mut applied: Option<(Vec<PodRule>, Vec<Ipv6Addr>)> = None;
            let mut uncaptured: Vec<Ipv6Addr> = Vec::new();
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
                let (mut ips, mut v6): (Vec<Ipv4Addr>, Vec<Ipv6Addr>) = (Vec::new(), Vec::new());
                for ip in snap.local_enrolled(&node).flat_map(|w| w.ips.iter()) {
                    match ip {
                        IpAddr::V4(ip) => ips.push(*ip),
                        IpAddr::V6(ip) => v6.push(*ip),
                    }
                }
                drop(snap);
                if v6 != uncaptured {
                    if !v6.is_empty() {
                        tracing::warn!(addresses = ?v6, "IPv6 addresses of local enrolled pods are not captured (IPv4 only): their IPv6 TCP connections are refused");
                    }
                    uncaptured = v6.clone();
                }
                let me = self.clone();
                let routes = tokio::task::spawn_blocking(move || {
                    let found = interfaces_to(&ips)?;
                    let missing: Vec<Ipv4Addr> = ips
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
                let (desired, missing) = match routes {
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
                let wanted = desired.clone();
                let desired = (desired, v6.clone());
                if applied.as_ref() != Some(&desired) {
                    let (rules, refused) = desired.clone();
                    let result =
                        tokio::task::spawn_blocking(move || me.apply(&rules, &refused)).await;
                    match result {
                        Ok(Ok(())) => {
                            tracing::info!(pods = desired.0.len(), "capture rules updated");
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
                self.set_status(CaptureStatus {
                    waiting_for_mesh: false,
                    generation,
                    pods: pod_captures(
                        applied.as_ref().map(|a| &a.0[..]).unwrap_or(&[]),
                        &wanted,
                        &missing,
                        &v6,
                        last_error.as_deref(),
                    ),
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
/// no interface yet, and IPv6 addresses.
fn pod_captures(
    programmed: &[PodRule],
    wanted: &[PodRule],
    missing: &[Ipv4Addr],
    v6: &[Ipv6Addr],
    failed: Option<&str>,
) -> Vec<PodCapture> {
    let mut out: Vec<PodCapture> = programmed
        .iter()
        .map(|p| PodCapture::Programmed {
            ip: IpAddr::V4(p.ip),
            interface: p.veth.clone(),
        })
        .collect();
    if let Some(why) = failed {
        out.extend(wanted.iter().filter(|w| !programmed.contains(w)).map(|w| {
            PodCapture::Pending {
                ip: IpAddr::V4(w.ip),
                reason: why.to_string(),
            }
        }));
    }
    out.extend(missing.iter().map(|ip| PodCapture::Pending {
        ip: IpAddr::V4(*ip),
        reason: "no local interface for the pod yet".to_string(),
    }));
    out.extend(v6.iter().map(|ip| PodCapture::Pending {
        ip: IpAddr::V6(*ip),
        reason: "IPv6 is not captured: its TCP connections are refused".to_string(),
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_after_dnat_table_is_replaced_whole_and_takes_only_new_connections_to_the_pods() {
        let ports = Ports {
            outbound: "0.0.0.0:15001".parse().unwrap(),
            inbound_plaintext: "0.0.0.0:15006".parse().unwrap(),
            hbone: "0.0.0.0:15008".parse().unwrap(),
        };
        let pod = PodRule {
            ip: Ipv4Addr::new(10, 244, 1, 10),
            veth: "va".into(),
        };
        let text = nft_rules(&[pod], &ports);
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
        assert!(!nft_rules(&[], &ports).contains("tproxy"));
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
            ip: Ipv4Addr::new(10, 0, 0, last),
            veth: veth.into(),
        };
        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        let pods = pod_captures(
            &[rule(1, "va")],
            &[rule(1, "va"), rule(2, "vb")],
            &[Ipv4Addr::new(10, 0, 0, 3)],
            &[v6],
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
                    IpAddr::V6(v6),
                    "IPv6 is not captured: its TCP connections are refused"
                ),
            ]
        );
        // Without a failure, wanted rules not yet in force are not reported twice.
        assert_eq!(
            pod_captures(&[rule(1, "va")], &[rule(1, "va")], &[], &[], None).len(),
            1
        );
    }

    #[test]
    fn route_lines_give_the_interface_of_directly_reached_destinations() {
        let out = "10.244.1.5 dev veth0a1b src 10.244.1.1 uid 0 \\    cache \n\
                   10.244.2.7 via 192.0.2.1 dev eth0 src 192.0.2.2 uid 0 \\    cache \n\
                   local 127.0.0.1 dev lo src 127.0.0.1 uid 0 \\    cache <local> \n\
                   10.244.1.9 dev cali12345 src 10.244.1.1 uid 0 \\    cache \n\
                   RTNETLINK answers: Network is unreachable\n";
        let found = parse_routes(out);
        let want: BTreeMap<Ipv4Addr, Option<String>> = [
            ([10, 244, 1, 5], Some("veth0a1b")),
            ([10, 244, 2, 7], None),
            ([127, 0, 0, 1], Some("lo")),
            ([10, 244, 1, 9], Some("cali12345")),
        ]
        .into_iter()
        .map(|(ip, d)| (Ipv4Addr::from(ip), d.map(str::to_string)))
        .collect();
        assert_eq!(found, want);
    }

    #[test]
    fn one_ip_process_resolves_every_pod_even_thousands() {
        // Loopback addresses are routed `local ... dev lo` on any host; nothing is sent. 5,000
        // answers (~400 KiB) overflow the output pipe long before the input is written: the
        // input must be written while the output is read.
        let ips: Vec<Ipv4Addr> = (0..5_000u32)
            .map(|i| Ipv4Addr::from(0x7f00_0000 | (i + 1)))
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
        let ips = [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)];
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
        let text = rules(&pods, &ports);
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
}
