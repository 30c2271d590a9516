//! The daemon's own configuration (`weft run --config FILE`, ARCHITECTURE.md §6.2) and its environment
//! overrides.
//!
//! Owns reading, defaulting and validating the config; every problem is reported with its
//! path (`listen.hbone: port 0 is not allowed`), all of them at once. Relative paths in the
//! file are taken relative to the file's directory, so a config and its mesh file can travel
//! together. It does not read the mesh file or the CA: those belong to `source` and `identity`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors reading or validating the daemon config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid YAML for this schema.
    #[error("{file}:{line}: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Values that parse but make no sense; one line per problem.
    #[error("{file}: invalid config:\n  {}", problems.join("\n  "))]
    Invalid {
        /// The file.
        file: PathBuf,
        /// `path: problem` lines.
        problems: Vec<String>,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    root_namespace: Option<String>,
    mesh: RawMesh,
    ca: RawCa,
    #[serde(default)]
    listen: RawListen,
    #[serde(default)]
    redirect: Option<Redirect>,
    #[serde(default)]
    zds_socket: Option<String>,
    #[serde(default)]
    ipv6: Option<Ipv6>,
    #[serde(default)]
    waypoint: RawWaypoint,
    #[serde(default)]
    worker_threads: Option<i64>,
    #[serde(default)]
    drain_grace: Option<String>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    access_log: RawAccessLog,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAccessLog {
    #[serde(default)]
    otlp: Option<RawOtlp>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOtlp {
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    queue_size: Option<i64>,
    #[serde(default)]
    batch_size: Option<i64>,
    #[serde(default)]
    export_interval: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    connections_per_listener: Option<i64>,
    #[serde(default)]
    connections_per_source: Option<i64>,
    #[serde(default)]
    handshakes_in_progress: Option<i64>,
    #[serde(default)]
    tcp_keepalive: RawKeepalive,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawKeepalive {
    #[serde(default)]
    idle: Option<String>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    probes: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWaypoint {
    #[serde(default)]
    jwks_ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMesh {
    #[serde(default)]
    file: Option<PathBuf>,
    #[serde(default)]
    xds: Option<RawControlPlane>,
    #[serde(default)]
    kubernetes: Option<RawKubernetes>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawKubernetes {
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCa {
    #[serde(default)]
    builtin: Option<RawBuiltinCa>,
    #[serde(default)]
    istio: Option<RawControlPlane>,
    #[serde(default)]
    cert_ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawControlPlane {
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    root_cert_file: Option<PathBuf>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    cluster_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawBuiltinCa {
    dir: PathBuf,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawListen {
    outbound: Option<Listen>,
    inbound_plaintext: Option<Listen>,
    hbone: Option<Listen>,
    admin: Option<Listen>,
    metrics: Option<Listen>,
    readiness: Option<Listen>,
}

/// A listen value as written: a bare port or `address:port`.
#[derive(Clone, Debug)]
enum Listen {
    Port(u64),
    Addr(String),
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Listen;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port number or address:port")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Listen, E> {
                Ok(Listen::Port(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Listen, E> {
                u64::try_from(v)
                    .map(Listen::Port)
                    .map_err(|_| E::custom(format!("{v} is not a port")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Listen, E> {
                Ok(match v.parse::<u64>() {
                    Ok(p) => Listen::Port(p),
                    Err(_) => Listen::Addr(v.to_string()),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// How local pods' traffic reaches weft.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Redirect {
    /// iptables/TPROXY rules for local enrolled pods.
    Tproxy,
    /// istio-cni captures inside each pod and hands the pod's network namespace over ZDS
    /// (`zdsSocket`); weft listens inside it (`inpod`).
    Inpod,
    /// No capture: traffic is sent to the listeners directly (tests, benches).
    None,
}

/// What capture does with local enrolled pods' IPv6 connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ipv6 {
    /// Captured like IPv4 (refused where that cannot be programmed).
    #[default]
    Capture,
    /// Refused (TCP reset), never captured: for nodes whose IPv6 weft should not carry.
    Refuse,
}

/// Where the mesh comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshSource {
    /// A Kubernetes-style YAML file, watched for changes.
    File(PathBuf),
    /// Istio's control plane: delta ADS (`mesh.xds`).
    Xds(ControlPlane),
    /// The cluster's API server, watched (`mesh.kubernetes`).
    Kubernetes(KubeSettings),
}

/// How to reach the API server (`mesh.kubernetes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeSettings {
    /// A kubeconfig file (its current context: server, CA, token or client certificate);
    /// `None`: in-cluster, the pod's ServiceAccount and `KUBERNETES_SERVICE_HOST`.
    pub kubeconfig: Option<PathBuf>,
}

/// Where certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaSource {
    /// The built-in CA reading an Istio plugin-CA directory.
    Builtin {
        /// The directory with `root-cert.pem`, `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`.
        dir: PathBuf,
    },
    /// Istio's CA: a CSR per identity over gRPC (`ca.istio`).
    Istio(ControlPlane),
}

/// How to reach istiod (`mesh.xds`, `ca.istio`): its type lives with the connection that
/// uses it, validated here like every other section.
pub use crate::istiod::ControlPlane;

/// Istio's default cluster id (ztunnel's `CLUSTER_ID` default).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

impl ControlPlane {
    /// Validates a raw section; problems are pushed as `<path>.<field>: ...` lines.
    fn from_raw(
        raw: RawControlPlane,
        path: &str,
        base: &Path,
        problems: &mut Vec<String>,
    ) -> Option<ControlPlane> {
        let before = problems.len();
        let address = raw.address.unwrap_or_default();
        if address.is_empty() {
            problems.push(format!("{path}.address: required (https://host:port)"));
        } else {
            match address.parse::<http::Uri>() {
                Ok(uri) if uri.scheme_str() != Some("https") => problems.push(format!(
                    "{path}.address: {address:?} must start with https:// (istiod is always reached over TLS)"
                )),
                Ok(uri) if uri.host().is_none_or(str::is_empty) => {
                    problems.push(format!("{path}.address: {address:?} has no host"))
                }
                Ok(uri) if !matches!(uri.path(), "" | "/") || uri.query().is_some() => problems
                    .push(format!(
                        "{path}.address: {address:?} must be just https://host:port"
                    )),
                Ok(_) => {}
                Err(e) => problems.push(format!("{path}.address: {address:?} is not a URL ({e})")),
            }
        }
        let mut file = |name: &str, v: Option<PathBuf>| match v {
            Some(p) if !p.as_os_str().is_empty() => base.join(p),
            _ => {
                problems.push(format!("{path}.{name}: required"));
                PathBuf::new()
            }
        };
        let root_cert_file = file("rootCertFile", raw.root_cert_file);
        let token_file = file("tokenFile", raw.token_file);
        let cluster_id = raw
            .cluster_id
            .unwrap_or_else(|| DEFAULT_CLUSTER_ID.to_string());
        if cluster_id.is_empty() || http::HeaderValue::from_str(&cluster_id).is_err() {
            problems.push(format!(
                "{path}.clusterId: {cluster_id:?} must be non-empty printable ASCII"
            ));
        }
        (problems.len() == before).then(|| ControlPlane {
            address: address.trim_end_matches('/').to_string(),
            root_cert_file,
            token_file,
            cluster_id,
            keepalive: crate::istiod::KEEPALIVE_INTERVAL,
        })
    }
}

/// The addresses weft listens on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listeners {
    /// Outbound capture (15001).
    pub outbound: SocketAddr,
    /// Plaintext inbound (15006).
    pub inbound_plaintext: SocketAddr,
    /// HBONE inbound (15008).
    pub hbone: SocketAddr,
    /// Admin (127.0.0.1:15000).
    pub admin: SocketAddr,
    /// Prometheus metrics (15020).
    pub metrics: SocketAddr,
    /// Readiness (15021).
    pub readiness: SocketAddr,
}

/// Bounds on what peers can make weft hold (`limits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once on each data-path listener (each IP family's own).
    pub connections_per_listener: usize,
    /// Connections open at once from one source address on each data-path listener. On
    /// 15008 a source is a node (its pods' streams share pooled connections); behind a NodePort
    /// with SNAT, every outside client shares one.
    pub connections_per_source: usize,
    /// HBONE TLS handshakes in progress at once.
    pub handshakes_in_progress: usize,
    /// TCP keepalive on tunnel and app sockets.
    pub tcp_keepalive: Keepalive,
}

/// TCP keepalive settings (ztunnel's defaults: 180 s idle, 180 s between probes, 9 probes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub probes: u32,
}

/// `limits` defaults, sized for a node: tens of thousands of connections per listener, a few
/// thousand from one source.
pub const DEFAULT_LIMITS: Limits = Limits {
    connections_per_listener: 32_768,
    connections_per_source: 4_096,
    handshakes_in_progress: 256,
    tcp_keepalive: Keepalive {
        idle: Duration::from_secs(180),
        interval: Duration::from_secs(180),
        probes: 9,
    },
};

/// The validated daemon config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This node's name (env `NODE_NAME` overrides).
    pub node_name: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Namespace whose policies apply mesh-wide.
    pub root_namespace: String,
    /// The mesh source.
    pub mesh: MeshSource,
    /// The certificate source.
    pub ca: CaSource,
    /// Workload certificate lifetime.
    pub cert_ttl: Duration,
    /// Listen addresses.
    pub listen: Listeners,
    /// Capture mode.
    pub redirect: Redirect,
    /// istio-cni's node-agent socket (`zdsSocket`), read with `redirect: inpod`.
    pub zds_socket: PathBuf,
    /// IPv6 capture (`ipv6`).
    pub ipv6: Ipv6,
    /// The in-binary waypoint's settings.
    pub waypoint: WaypointConfig,
    /// Data-path worker threads.
    pub worker_threads: usize,
    /// How long a stopping weft lets live connections finish before closing them.
    pub drain_grace: Duration,
    /// Connection caps and keepalive.
    pub limits: Limits,
    /// Where the access log goes besides stderr.
    pub access_log: AccessLogConfig,
}

/// `accessLog`: where the access log goes besides stderr.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessLogConfig {
    /// Export to an OpenTelemetry collector over OTLP/gRPC (off when `None`).
    pub otlp: Option<OtlpSettings>,
}

/// `accessLog.otlp`: its type lives with the exporter that uses it, validated here.
pub use crate::logging::otlp::{OtlpSettings, DEFAULT_OTLP};

/// The environment variables the config honours, read by the caller (parsing never reads the
/// process environment, so tests set them explicitly).
#[derive(Clone, Debug, Default)]
pub struct Env {
    /// `NODE_NAME`: overrides `nodeName`.
    pub node_name: Option<String>,
    /// `TERMINATION_GRACE_PERIOD_SECONDS`: the pod's termination grace period (the
    /// DaemonSet passes it down); `drainGrace` defaults to it minus [`DRAIN_MARGIN`].
    pub termination_grace_period_seconds: Option<String>,
}

impl Env {
    /// The variables of this process.
    pub fn from_process() -> Env {
        Env {
            node_name: std::env::var("NODE_NAME").ok(),
            termination_grace_period_seconds: std::env::var("TERMINATION_GRACE_PERIOD_SECONDS")
                .ok(),
        }
    }
}

/// istio-cni's node-agent socket when `zdsSocket` is unset (ztunnel's path).
pub const DEFAULT_ZDS_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

/// `drainGrace` when neither the config nor `TERMINATION_GRACE_PERIOD_SECONDS` sets it.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(5);
/// What is kept of the pod's termination grace period for exiting after the drain (as
/// ztunnel does): the drain gets the rest.
pub const DRAIN_MARGIN: Duration = Duration::from_secs(5);
/// Longest `drainGrace` accepted.
pub const MAX_DRAIN_GRACE: Duration = Duration::from_secs(3600);

/// Most worker threads a config may ask for.
pub const MAX_WORKER_THREADS: usize = 256;

/// Worker threads when the config does not say: the CPUs this process may run on, which
/// honours its affinity mask and its cgroup CPU quota (a DaemonSet's `limits.cpu: 2` on a
/// 64-core node means 2), so the data path never runs more threads than it has CPUs for.
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(MAX_WORKER_THREADS)
}

/// Settings of the in-binary waypoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaypointConfig {
    /// Extra CA certificates (PEM) trusted when fetching `jwksUri`, besides the system roots.
    pub jwks_ca_file: Option<PathBuf>,
}

const ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

impl Config {
    /// The cluster this node is in, as istiod knows it: the `clusterId` of `mesh.xds` or
    /// `ca.istio`, else `Kubernetes` (Istio's default `CLUSTER_ID`).
    pub fn cluster_id(&self) -> &str {
        match (&self.mesh, &self.ca) {
            (MeshSource::Xds(cp), _) | (_, CaSource::Istio(cp)) => &cp.cluster_id,
            _ => "Kubernetes",
        }
    }

    /// Reads and validates `file`; `node_name_env` is the value of `NODE_NAME`, if set.
    pub fn load(file: &Path, env: &Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Config::parse(file, &text, env)
    }

    /// Parses and validates config text; `file` names it in errors and anchors relative paths.
    pub fn parse(file: &Path, text: &str, env: &Env) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_path_buf(),
            line: e.location().map(|l| l.line()).unwrap_or(0),
            message: crate::yaml::message(&e),
        })?;
        let base = file.parent().unwrap_or(Path::new("."));
        let mut problems = Vec::new();

        let node_name = env
            .node_name
            .clone()
            .filter(|n| !n.is_empty())
            .or(raw.node_name)
            .unwrap_or_default();
        if node_name.is_empty() {
            problems.push("nodeName: required (or set NODE_NAME)".to_string());
        }
        let trust_domain = raw
            .trust_domain
            .unwrap_or_else(|| "cluster.local".to_string());
        if crate::identity::Identity::new(&trust_domain, "ns", "sa").is_err() {
            problems.push(format!(
                "trustDomain: {trust_domain:?} is not a valid trust domain"
            ));
        }
        let root_namespace = raw
            .root_namespace
            .unwrap_or_else(|| "istio-system".to_string());
        if root_namespace.is_empty() {
            problems.push("rootNamespace: must not be empty".to_string());
        }
        let cert_ttl = match raw.ca.cert_ttl.as_deref() {
            None => Duration::from_secs(24 * 3600),
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if d >= Duration::from_secs(60) => d,
                Ok(_) => {
                    problems.push(format!("ca.certTtl: {s:?} is shorter than the 1m minimum"));
                    Duration::ZERO
                }
                Err(e) => {
                    problems.push(format!("ca.certTtl: {s:?} is not a duration ({e})"));
                    Duration::ZERO
                }
            },
        };
        let mut listen = |name: &str, v: Option<Listen>, default_ip: IpAddr, default_port: u16| {
            let addr = match v {
                None => SocketAddr::new(default_ip, default_port),
                Some(Listen::Port(p)) => match u16::try_from(p) {
                    Ok(p) => SocketAddr::new(default_ip, p),
                    Err(_) => {
                        problems.push(format!("listen.{name}: {p} is not a port (1-65535)"));
                        return SocketAddr::new(default_ip, default_port);
                    }
                },
                Some(Listen::Addr(s)) => match s.parse::<SocketAddr>() {
                    Ok(a) => a,
                    Err(_) => {
                        problems.push(format!(
                            "listen.{name}: {s:?} is neither a port nor an address:port"
                        ));
                        return SocketAddr::new(default_ip, default_port);
                    }
                },
            };
            if addr.port() == 0 {
                problems.push(format!("listen.{name}: port 0 is not allowed"));
            }
            addr
        };
        let l = raw.listen;
        let listen = Listeners {
            outbound: listen("outbound", l.outbound, ANY, 15001),
            inbound_plaintext: listen("inboundPlaintext", l.inbound_plaintext, ANY, 15006),
            hbone: listen("hbone", l.hbone, ANY, 15008),
            admin: listen("admin", l.admin, LOCALHOST, 15000),
            metrics: listen("metrics", l.metrics, ANY, 15020),
            readiness: listen("readiness", l.readiness, ANY, 15021),
        };
        let all = [
            ("outbound", listen.outbound),
            ("inboundPlaintext", listen.inbound_plaintext),
            ("hbone", listen.hbone),
            ("admin", listen.admin),
            ("metrics", listen.metrics),
            ("readiness", listen.readiness),
        ];
        for (i, (a, x)) in all.iter().enumerate() {
            for (b, y) in &all[i + 1..] {
                let overlap = x.port() == y.port()
                    && (x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified());
                if overlap {
                    problems.push(format!("listen.{b}: {y} collides with listen.{a} ({x})"));
                }
            }
        }
        let mesh = match (raw.mesh.file, raw.mesh.xds, raw.mesh.kubernetes) {
            (Some(f), None, None) => Some(MeshSource::File(base.join(f))),
            (None, Some(x), None) => {
                ControlPlane::from_raw(x, "mesh.xds", base, &mut problems).map(MeshSource::Xds)
            }
            (None, None, Some(k)) => Some(MeshSource::Kubernetes(KubeSettings {
                kubeconfig: k.kubeconfig.map(|p| base.join(p)),
            })),
            _ => {
                problems.push("mesh: exactly one of file, xds, kubernetes is required".to_string());
                None
            }
        };
        let ca = match (raw.ca.builtin, raw.ca.istio) {
            (Some(b), None) => Some(CaSource::Builtin {
                dir: base.join(b.dir),
            }),
            (None, Some(i)) => {
                ControlPlane::from_raw(i, "ca.istio", base, &mut problems).map(CaSource::Istio)
            }
            _ => {
                problems.push("ca: exactly one of builtin, istio is required".to_string());
                None
            }
        };
        let worker_threads = match raw.worker_threads {
            None => default_worker_threads(),
            Some(n) if (1..=MAX_WORKER_THREADS as i64).contains(&n) => n as usize,
            Some(n) => {
                problems.push(format!(
                    "workerThreads: {n} is not between 1 and {MAX_WORKER_THREADS}"
                ));
                1
            }
        };
        let drain_grace = drain_grace(raw.drain_grace.as_deref(), env, &mut problems);
        let redirect = raw.redirect.unwrap_or(Redirect::Tproxy);
        let zds_socket = zds_socket(redirect, raw.zds_socket, base, &mut problems);
        let limits = limits(raw.limits, &mut problems);
        let access_log = AccessLogConfig {
            otlp: raw.access_log.otlp.map(|o| otlp(o, &mut problems)),
        };
        let (Some(mesh), Some(ca), true) = (mesh, ca, problems.is_empty()) else {
            return Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                problems,
            });
        };
        Ok(Config {
            node_name,
            trust_domain,
            root_namespace,
            mesh,
            ca,
            cert_ttl,
            listen,
            redirect,
            zds_socket,
            ipv6: raw.ipv6.unwrap_or_default(),
            waypoint: WaypointConfig {
                jwks_ca_file: raw.waypoint.jwks_ca_file.map(|f| base.join(f)),
            },
            worker_threads,
            drain_grace,
            limits,
            access_log,
        })
    }
}

/// `zdsSocket`: istio-cni's node-agent socket, only meaningful with `redirect: inpod`
/// (ztunnel's default path when unset); relative paths are taken from the config's folder.
fn zds_socket(
    redirect: Redirect,
    raw: Option<String>,
    base: &Path,
    problems: &mut Vec<String>,
) -> PathBuf {
    match (redirect, raw) {
        (_, None) => PathBuf::from(DEFAULT_ZDS_SOCKET),
        (Redirect::Inpod, Some(p)) if p.is_empty() => {
            problems.push("zdsSocket: empty (a unix socket path is required)".to_string());
            PathBuf::from(DEFAULT_ZDS_SOCKET)
        }
        (Redirect::Inpod, Some(p)) => base.join(p),
        (other, Some(p)) => {
            problems.push(format!(
                "zdsSocket: {p:?} is only used with redirect: inpod (redirect is {})",
                match other {
                    Redirect::Tproxy => "tproxy",
                    Redirect::None => "none",
                    Redirect::Inpod => "inpod",
                }
            ));
            PathBuf::from(DEFAULT_ZDS_SOCKET)
        }
    }
}

/// `accessLog.otlp`, each value checked (`accessLog.otlp.queueSize: 0 is not between ...`).
fn otlp(raw: RawOtlp, problems: &mut Vec<String>) -> OtlpSettings {
    const PATH: &str = "accessLog.otlp";
    const MAX_QUEUE: i64 = 1 << 20;
    let d = DEFAULT_OTLP;
    let endpoint = raw.endpoint.unwrap_or_default();
    if endpoint.is_empty() {
        problems.push(format!("{PATH}.endpoint: required (http://host:port)"));
    } else {
        match endpoint.parse::<http::Uri>() {
            Ok(uri) if uri.scheme_str() != Some("http") => problems.push(format!(
                "{PATH}.endpoint: {endpoint:?} must start with http:// (OTLP/gRPC without TLS)"
            )),
            Ok(uri) if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() => problems
                .push(format!(
                    "{PATH}.endpoint: {endpoint:?} must name a host and a port (http://host:4317)"
                )),
            Ok(uri) if !matches!(uri.path(), "" | "/") || uri.query().is_some() => problems.push(
                format!("{PATH}.endpoint: {endpoint:?} must be just http://host:port"),
            ),
            Ok(_) => {}
            Err(e) => problems.push(format!("{PATH}.endpoint: {endpoint:?} is not a URL ({e})")),
        }
    }
    let mut count = |name: &str, v: Option<i64>, max: i64, default: usize| match v {
        None => default,
        Some(n) if (1..=max).contains(&n) => n as usize,
        Some(n) => {
            problems.push(format!("{PATH}.{name}: {n} is not between 1 and {max}"));
            default
        }
    };
    let queue_size = count("queueSize", raw.queue_size, MAX_QUEUE, d.queue_size);
    let batch_size = count(
        "batchSize",
        raw.batch_size,
        queue_size as i64,
        d.batch_size.min(queue_size),
    );
    let mut duration = |name: &str, v: Option<String>, default: Duration| match v {
        None => default,
        Some(s) => match humantime::parse_duration(&s) {
            Ok(t) if t >= Duration::from_millis(10) && t <= Duration::from_secs(60) => t,
            Ok(_) => {
                problems.push(format!("{PATH}.{name}: {s:?} is not between 10ms and 60s"));
                default
            }
            Err(e) => {
                problems.push(format!("{PATH}.{name}: {s:?} is not a duration ({e})"));
                default
            }
        },
    };
    let export_interval = duration("exportInterval", raw.export_interval, d.export_interval);
    let timeout = duration("timeout", raw.timeout, d.timeout);
    OtlpSettings {
        endpoint: endpoint.trim_end_matches('/').to_string(),
        queue_size,
        batch_size,
        export_interval,
        timeout,
    }
}

/// `limits`, each value checked (`limits.connectionsPerSource: 0 is not between 1 and ...`).
fn limits(raw: RawLimits, problems: &mut Vec<String>) -> Limits {
    const MAX: i64 = 1 << 24;
    let d = DEFAULT_LIMITS;
    let mut count = |name: &str, v: Option<i64>, default: usize| match v {
        None => default,
        Some(n) if (1..=MAX).contains(&n) => n as usize,
        Some(n) => {
            problems.push(format!("limits.{name}: {n} is not between 1 and {MAX}"));
            default
        }
    };
    let connections_per_listener = count(
        "connectionsPerListener",
        raw.connections_per_listener,
        d.connections_per_listener,
    );
    let connections_per_source = count(
        "connectionsPerSource",
        raw.connections_per_source,
        d.connections_per_source,
    );
    let handshakes_in_progress = count(
        "handshakesInProgress",
        raw.handshakes_in_progress,
        d.handshakes_in_progress,
    );
    let probes = count(
        "tcpKeepalive.probes",
        raw.tcp_keepalive.probes,
        d.tcp_keepalive.probes as usize,
    )
    .min(255) as u32;
    let mut duration = |name: &str, v: Option<String>, default: Duration| match v {
        None => default,
        Some(s) => match humantime::parse_duration(&s) {
            Ok(t) if t >= Duration::from_secs(1) && t <= Duration::from_secs(24 * 3600) => t,
            Ok(_) => {
                problems.push(format!(
                    "limits.tcpKeepalive.{name}: {s:?} is not between 1s and 24h"
                ));
                default
            }
            Err(e) => {
                problems.push(format!("limits.tcpKeepalive.{name}: {s:?}: {e}"));
                default
            }
        },
    };
    let idle = duration("idle", raw.tcp_keepalive.idle, d.tcp_keepalive.idle);
    let interval = duration(
        "interval",
        raw.tcp_keepalive.interval,
        d.tcp_keepalive.interval,
    );
    Limits {
        connections_per_listener,
        connections_per_source,
        handshakes_in_progress,
        tcp_keepalive: Keepalive {
            idle,
            interval,
            probes,
        },
    }
}

/// `drainGrace` as written, else the pod's termination grace period less [`DRAIN_MARGIN`],
/// else [`DEFAULT_DRAIN_GRACE`].
fn drain_grace(raw: Option<&str>, env: &Env, problems: &mut Vec<String>) -> Duration {
    if let Some(s) = raw {
        return match humantime::parse_duration(s) {
            Ok(d) if d <= MAX_DRAIN_GRACE => d,
            Ok(_) => {
                problems.push(format!("drainGrace: {s:?} is longer than the 1h maximum"));
                Duration::ZERO
            }
            Err(e) => {
                problems.push(format!("drainGrace: {s:?} is not a duration ({e})"));
                Duration::ZERO
            }
        };
    }
    match env.termination_grace_period_seconds.as_deref() {
        None | Some("") => DEFAULT_DRAIN_GRACE,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs)
                .saturating_sub(DRAIN_MARGIN)
                .min(MAX_DRAIN_GRACE),
            Err(_) => {
                problems.push(format!(
                    "TERMINATION_GRACE_PERIOD_SECONDS: {v:?} is not a number of seconds"
                ));
                Duration::ZERO
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/weft/weft.yaml"), text, &Env::default())
    }

    #[test]
    fn defaults_fill_what_the_file_leaves_out() {
        let c = parse("nodeName: n1\nmesh: {file: mesh.yaml}\nca: {builtin: {dir: ca}}\n").unwrap();
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.root_namespace, "istio-system");
        assert_eq!(c.mesh, MeshSource::File("/etc/weft/mesh.yaml".into()));
        assert_eq!(c.cert_ttl, Duration::from_secs(86400));
        assert_eq!(c.listen.admin, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.listen.hbone, "0.0.0.0:15008".parse().unwrap());
        assert_eq!(c.redirect, Redirect::Tproxy);
        assert_eq!(c.ipv6, Ipv6::Capture);
        assert_eq!(c.worker_threads, default_worker_threads());
        assert_eq!(c.drain_grace, DEFAULT_DRAIN_GRACE);
    }

    #[test]
    fn the_drain_grace_comes_from_the_config_else_the_pods_grace_period_less_five_seconds() {
        let base = "nodeName: n1\nmesh: {file: m}\nca: {builtin: {dir: c}}\n";
        let with = |extra: &str, tgps: Option<&str>| {
            Config::parse(
                Path::new("w.yaml"),
                &format!("{base}{extra}"),
                &Env {
                    termination_grace_period_seconds: tgps.map(str::to_string),
                    ..Env::default()
                },
            )
        };
        let grace = |extra: &str, tgps: Option<&str>| with(extra, tgps).unwrap().drain_grace;
        assert_eq!(grace("", Some("30")), Duration::from_secs(25));
        assert_eq!(grace("", Some("3")), Duration::ZERO);
        assert_eq!(grace("", None), DEFAULT_DRAIN_GRACE);
        assert_eq!(
            grace("drainGrace: 12s\n", Some("30")),
            Duration::from_secs(12)
        );
        assert_eq!(grace("drainGrace: 0s\n", None), Duration::ZERO);
        for (extra, tgps, want) in [
            (
                "drainGrace: soon\n",
                None,
                "drainGrace: \"soon\" is not a duration",
            ),
            (
                "drainGrace: 2h\n",
                None,
                "drainGrace: \"2h\" is longer than the 1h maximum",
            ),
            (
                "",
                Some("thirty"),
                "TERMINATION_GRACE_PERIOD_SECONDS: \"thirty\" is not a number",
            ),
        ] {
            let e = with(extra, tgps).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn worker_threads_default_to_the_usable_cpus_and_can_be_set() {
        // What the default reads: the CPUs this process may use, never zero.
        let usable = std::thread::available_parallelism().unwrap().get();
        assert_eq!(default_worker_threads(), usable.min(MAX_WORKER_THREADS));
        let c = parse("nodeName: n1\nmesh: {file: m}\nca: {builtin: {dir: c}}\nworkerThreads: 3\n")
            .unwrap();
        assert_eq!(c.worker_threads, 3);
        for bad in ["0", "-1", "257"] {
            let e = parse(&format!(
                "nodeName: n1\nmesh: {{file: m}}\nca: {{builtin: {{dir: c}}}}\nworkerThreads: {bad}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(&format!("workerThreads: {bad} is not between 1 and 256")),
                "{e}"
            );
        }
        let e =
            parse("nodeName: n1\nmesh: {file: m}\nca: {builtin: {dir: c}}\nworkerThreads: many\n")
                .unwrap_err()
                .to_string();
        assert!(e.starts_with("/etc/weft/weft.yaml:4: "), "{e}");
    }

    #[test]
    fn node_name_from_the_environment_wins() {
        let c = Config::parse(
            Path::new("w.yaml"),
            "nodeName: n1\nmesh: {file: m}\nca: {builtin: {dir: c}}\n",
            &Env {
                node_name: Some("n9".into()),
                ..Env::default()
            },
        )
        .unwrap();
        assert_eq!(c.node_name, "n9");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let e = parse(
            "mesh: {file: m}\nca: {builtin: {dir: c}, certTtl: banana}\nlisten: {hbone: 0, admin: 'x:y', metrics: 70000}\n",
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "nodeName: required",
            "ca.certTtl: \"banana\" is not a duration",
            "listen.hbone: port 0 is not allowed",
            "listen.admin: \"x:y\" is neither a port nor an address:port",
            "listen.metrics: 70000 is not a port",
        ] {
            assert!(e.contains(needle), "{needle:?} missing in:\n{e}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_with_their_line() {
        let e =
            parse("nodeName: n1\nmesh: {file: m}\nca: {builtin: {dir: c}}\nlisten:\n  hbon: 1\n")
                .unwrap_err()
                .to_string();
        assert!(e.starts_with("/etc/weft/weft.yaml:5: "), "{e}");
        assert!(e.contains("unknown field `hbon`"), "{e}");
    }

    #[test]
    fn limits_default_for_a_node_and_every_bad_value_is_named() {
        let base = "nodeName: n1\nmesh: {file: m}\nca: {builtin: {dir: c}}\n";
        assert_eq!(parse(base).unwrap().limits, DEFAULT_LIMITS);
        let c = parse(&format!(
            "{base}limits: {{connectionsPerListener: 10, connectionsPerSource: 2, handshakesInProgress: 3, tcpKeepalive: {{idle: 30s, interval: 5s, probes: 4}}}}\n"
        ))
        .unwrap();
        assert_eq!(
            c.limits,
            Limits {
                connections_per_listener: 10,
                connections_per_source: 2,
                handshakes_in_progress: 3,
                tcp_keepalive: Keepalive {
                    idle: Duration::from_secs(30),
                    interval: Duration::from_secs(5),
                    probes: 4
                }
            }
        );
        let e = parse(&format!(
            "{base}limits: {{connectionsPerSource: 0, handshakesInProgress: -1, tcpKeepalive: {{idle: 0s, interval: soon}}}}\n"
        ))
        .unwrap_err()
        .to_string();
        for want in [
            "limits.connectionsPerSource: 0 is not between 1 and",
            "limits.handshakesInProgress: -1 is not between 1 and",
            "limits.tcpKeepalive.idle: \"0s\" is not between 1s and 24h",
            "limits.tcpKeepalive.interval: \"soon\"",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
    }

    #[test]
    fn access_log_export_is_off_by_default_and_every_bad_value_is_named() {
        let base = "nodeName: n1\nmesh: {file: m}\nca: {builtin: {dir: c}}\n";
        assert_eq!(parse(base).unwrap().access_log.otlp, None);
        let c = parse(&format!(
            "{base}accessLog:\n  otlp: {{endpoint: 'http://collector:4317', queueSize: 100, batchSize: 10, exportInterval: 200ms, timeout: 2s}}\n"
        ))
        .unwrap();
        assert_eq!(
            c.access_log.otlp,
            Some(OtlpSettings {
                endpoint: "http://collector:4317".into(),
                queue_size: 100,
                batch_size: 10,
                export_interval: Duration::from_millis(200),
                timeout: Duration::from_secs(2),
            })
        );
        let c = parse(&format!(
            "{base}accessLog: {{otlp: {{endpoint: 'http://c:4317/'}}}}\n"
        ))
        .unwrap();
        assert_eq!(
            c.access_log.otlp,
            Some(OtlpSettings {
                endpoint: "http://c:4317".into(),
                ..DEFAULT_OTLP
            })
        );
        let e = parse(&format!(
            "{base}accessLog: {{otlp: {{endpoint: 'https://c:4317', queueSize: 0, batchSize: -2, exportInterval: 0s, timeout: soon}}}}\n"
        ))
        .unwrap_err()
        .to_string();
        for want in [
            "accessLog.otlp.endpoint: \"https://c:4317\" must start with http://",
            "accessLog.otlp.queueSize: 0 is not between 1 and 1048576",
            "accessLog.otlp.batchSize: -2 is not between 1 and 4096",
            "accessLog.otlp.exportInterval: \"0s\" is not between 10ms and 60s",
            "accessLog.otlp.timeout: \"soon\" is not a duration",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
        for (otlp, want) in [
            ("{}", "accessLog.otlp.endpoint: required"),
            (
                "{endpoint: 'http://c'}",
                "accessLog.otlp.endpoint: \"http://c\" must name a host and a port",
            ),
            (
                "{endpoint: 'http://c:4317/v1/logs'}",
                "must be just http://host:port",
            ),
            (
                "{endpoint: 'http://c:1', queueSize: 8, batchSize: 9}",
                "accessLog.otlp.batchSize: 9 is not between 1 and 8",
            ),
        ] {
            let e = parse(&format!("{base}accessLog: {{otlp: {otlp}}}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{want} missing from {e}");
        }
        let e = parse(&format!(
            "{base}accessLog: {{otlp: {{endpoint: 'http://c:1', batchsize: 9}}}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `batchsize`"), "{e}");
        assert!(e.starts_with("/etc/weft/weft.yaml:4"), "{e}");
    }

    #[test]
    fn ipv6_capture_can_be_turned_into_refusal_and_nothing_else() {
        let base = "nodeName: n1\nmesh: {file: m}\nca: {builtin: {dir: c}}\n";
        let c = parse(&format!("{base}ipv6: refuse\n")).unwrap();
        assert_eq!(c.ipv6, Ipv6::Refuse);
        let e = parse(&format!("{base}ipv6: pass\n"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/weft/weft.yaml:4: "), "{e}");
        assert!(e.contains("unknown variant `pass`"), "{e}");
    }

    #[test]
    fn istiod_sections_resolve_paths_and_default_the_cluster_id() {
        let c = parse(
            "nodeName: n1\n\
             mesh:\n  xds: {address: 'https://istiod.istio-system.svc:15012', rootCertFile: /var/run/secrets/istio/root-cert.pem, tokenFile: token}\n\
             ca:\n  istio: {address: 'https://istiod.istio-system.svc:15012/', rootCertFile: root.pem, tokenFile: token, clusterId: c1}\n",
        )
        .unwrap();
        assert_eq!(
            c.mesh,
            MeshSource::Xds(ControlPlane {
                address: "https://istiod.istio-system.svc:15012".into(),
                root_cert_file: "/var/run/secrets/istio/root-cert.pem".into(),
                token_file: "/etc/weft/token".into(),
                cluster_id: "Kubernetes".into(),
                keepalive: crate::istiod::KEEPALIVE_INTERVAL,
            })
        );
        let CaSource::Istio(ca) = c.ca else {
            panic!("not the Istio CA: {:?}", c.ca)
        };
        assert_eq!(ca.address, "https://istiod.istio-system.svc:15012");
        assert_eq!(ca.root_cert_file, Path::new("/etc/weft/root.pem"));
        assert_eq!(ca.cluster_id, "c1");
    }

    #[test]
    fn istiod_section_problems_are_reported_with_their_path() {
        let e = parse(
            "nodeName: n1\nmesh: {xds: {address: 'http://istiod:15012', tokenFile: t}}\n\
             ca: {istio: {address: 'https://:15012', rootCertFile: r, clusterId: ''}}\n",
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "mesh.xds.address: \"http://istiod:15012\" must start with https://",
            "mesh.xds.rootCertFile: required",
            "ca.istio.tokenFile: required",
            "ca.istio.clusterId: \"\" must be non-empty",
        ] {
            assert!(e.contains(needle), "{needle:?} missing in:\n{e}");
        }
        assert!(e.contains("ca.istio.address"), "{e}");
    }

    #[test]
    fn the_kubernetes_source_takes_an_optional_kubeconfig_relative_to_the_config() {
        let c = parse("nodeName: n1\nmesh: {kubernetes: {}}\nca: {builtin: {dir: c}}\n").unwrap();
        assert_eq!(
            c.mesh,
            MeshSource::Kubernetes(KubeSettings { kubeconfig: None })
        );
        let c =
            parse("nodeName: n1\nmesh: {kubernetes: {kubeconfig: kc}}\nca: {builtin: {dir: c}}\n")
                .unwrap();
        let MeshSource::Kubernetes(k) = c.mesh else {
            panic!("not kubernetes")
        };
        assert!(k.kubeconfig.unwrap().ends_with("kc"));
        let e =
            parse("nodeName: n1\nmesh: {kubernetes: {kubeconfg: kc}}\nca: {builtin: {dir: c}}\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("kubeconfg"), "{e}");
    }

    #[test]
    fn exactly_one_mesh_source_and_one_ca_are_required() {
        let e = parse(
            "nodeName: n1\nmesh: {file: m, xds: {address: 'https://i:1', rootCertFile: r, tokenFile: t}}\nca: {}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("mesh: exactly one of file, xds, kubernetes is required"),
            "{e}"
        );
        assert!(
            e.contains("ca: exactly one of builtin, istio is required"),
            "{e}"
        );
    }

    #[test]
    fn colliding_listeners_are_refused() {
        let e = parse(
            "nodeName: n1\nmesh: {file: m}\nca: {builtin: {dir: c}}\nlisten: {metrics: 15001}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("listen.metrics: 0.0.0.0:15001 collides with listen.outbound"),
            "{e}"
        );
    }

    #[test]
    fn inpod_reads_the_zds_socket_with_ztunnels_default() {
        let base = "nodeName: n1\nmesh: {file: m}\nca: {builtin: {dir: c}}\nredirect: inpod\n";
        let c = parse(base).unwrap();
        assert_eq!(c.redirect, Redirect::Inpod);
        assert_eq!(c.zds_socket, PathBuf::from("/var/run/ztunnel/ztunnel.sock"));
        let c = parse(&format!("{base}zdsSocket: /run/cni/zds.sock\n")).unwrap();
        assert_eq!(c.zds_socket, PathBuf::from("/run/cni/zds.sock"));
        let c = parse(&format!("{base}zdsSocket: zds.sock\n")).unwrap();
        assert_eq!(c.zds_socket, PathBuf::from("/etc/weft/zds.sock"));
    }

    #[test]
    fn a_zds_socket_without_inpod_or_empty_is_refused() {
        let e =
            parse("nodeName: n1\nmesh: {file: m}\nca: {builtin: {dir: c}}\nzdsSocket: /z.sock\n")
                .unwrap_err()
                .to_string();
        assert!(
            e.contains(
                "zdsSocket: \"/z.sock\" is only used with redirect: inpod (redirect is tproxy)"
            ),
            "{e}"
        );
        let e = parse(
            "nodeName: n1\nmesh: {file: m}\nca: {builtin: {dir: c}}\nredirect: inpod\nzdsSocket: \"\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("zdsSocket: empty"), "{e}");
        let e =
            parse("nodeName: n1\nmesh: {file: m}\nca: {builtin: {dir: c}}\nredirect: sidecar\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("inpod"), "{e}");
    }
}
