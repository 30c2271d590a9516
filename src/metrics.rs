//! The Prometheus registry weft serves on `:15020/metrics`.
//!
//! Owns metric names and their encoding. Istio's names are used where Istio has one (the
//! data-path metrics); weft's own state is under `weft_`. Values that already live elsewhere
//! (the config load status, certificates, the process) are read at scrape time by
//! collectors instead of being copied into counters, so they cannot drift.

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::identity::manager::CertManager;
use crate::identity::Identity;
use crate::model::{ArcStr, Workload};
use crate::state::StateStore;

// === label values ===

/// Defines a metric label value: an enum whose variants encode as Istio's text.
macro_rules! label_value {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, serde::Serialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// The value as the label (and the access log) writes it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    };
}

label_value! {
    /// Which side of the mesh this weft handles a connection on.
    Direction {
        /// Leaving a local pod (the source side).
        Outbound => "outbound",
        /// Arriving at a local pod (the destination side).
        Inbound => "inbound",
    }
}

impl Direction {
    /// Istio's `reporter` for a connection seen in this direction.
    pub fn reporter(self) -> Reporter {
        match self {
            Direction::Outbound => Reporter::Source,
            Direction::Inbound => Reporter::Destination,
        }
    }
}

label_value! {
    /// Istio's `reporter`: which end's proxy counted the traffic.
    Reporter {
        /// The client's side.
        Source => "source",
        /// The server's side (the waypoint reports as this too).
        Destination => "destination",
    }
}

label_value! {
    /// Istio's `connection_security_policy`.
    SecurityPolicy {
        /// Mutual TLS (HBONE, or same-node traffic between enrolled pods).
        MutualTls => "mutual_tls",
        /// Plaintext or not known.
        Unknown => "unknown",
    }
}

label_value! {
    /// Istio's `request_protocol`.
    RequestProtocol {
        /// L4 connections.
        Tcp => "tcp",
        /// Requests through the waypoint.
        Http => "http",
    }
}

label_value! {
    /// How a denied connection arrived (`transport` of the denial counter).
    Transport {
        /// HTTP/2 CONNECT over mTLS.
        Hbone => "hbone",
        /// Plain TCP.
        Plaintext => "plaintext",
        /// Same-node mesh traffic.
        Local => "local",
    }
}

label_value! {
    /// Why a connection was denied (`reason` of the denial counter).
    DenialReason {
        /// An AuthorizationPolicy.
        Policy => "policy",
        /// PeerAuthentication STRICT refused plaintext.
        Mtls => "mtls",
    }
}

/// The registry and the handles the data path updates.
pub struct Metrics {
    registry: Registry,
    /// Istio's TCP metrics.
    pub tcp: TcpMetrics,
    /// Policy denials.
    pub denials: DenialMetrics,
    /// Request metrics of the waypoint.
    pub http: HttpMetrics,
    /// Capture programming.
    pub capture: CaptureMetrics,
    /// Connections refused over a listener's limits.
    pub limits: LimitMetrics,
    /// The xDS client's connection and message counters (ztunnel's families).
    pub xds: XdsMetrics,
    /// The Kubernetes source's skipped objects and watch errors.
    pub kube: KubeMetrics,
}

/// Labels of the Kubernetes source's families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeKindLabels {
    /// The object kind (`Pod`, `AuthorizationPolicy`, ...).
    pub kind: &'static str,
}

/// The Kubernetes source (`mesh.kubernetes`): `weft_kubernetes_invalid_objects{kind}`, objects
/// skipped for a bad field now, and `weft_kubernetes_watch_errors_total{kind}`, failed lists,
/// watches and discoveries (each retried).
#[derive(Clone, Debug, Default)]
pub struct KubeMetrics {
    /// Skipped objects, by kind.
    pub invalid: Family<KubeKindLabels, prometheus_client::metrics::gauge::Gauge>,
    /// Watch errors, by kind.
    pub watch_errors: Family<KubeKindLabels, Counter>,
}

impl KubeMetrics {
    /// Sets the number of skipped objects of `kind`.
    pub fn set_invalid(&self, kind: &'static str, n: usize) {
        self.invalid
            .get_or_create(&KubeKindLabels { kind })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts one failed list, watch or discovery of `kind`.
    pub fn watch_error(&self, kind: &'static str) {
        self.watch_errors
            .get_or_create(&KubeKindLabels { kind })
            .inc();
    }
}

label_value! {
    /// Why an xDS stream ended (`reason` of `istio_xds_connection_terminations_total`, ztunnel's
    /// values).
    XdsTermination {
        /// istiod could not be reached.
        ConnectionError => "ConnectionError",
        /// The stream failed with a gRPC status.
        Error => "Error",
        /// istiod closed the stream (it asks proxies to reconnect this way).
        Reconnect => "Reconnect",
        /// weft shut the stream down.
        Complete => "Complete",
    }
}

/// Labels of `istio_xds_connection_terminations_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdsTerminationLabels {
    /// Why.
    pub reason: XdsTermination,
}

/// Labels of the xDS message counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdsTypeLabels {
    /// The resource type URL of the response.
    pub url: String,
}

/// ztunnel's xDS client families: `istio_xds_connection_terminations_total{reason}`,
/// `istio_xds_message_total{url}`, `istio_xds_message_bytes_total{url}`.
#[derive(Clone, Debug, Default)]
pub struct XdsMetrics {
    /// Streams ended, by reason.
    pub terminations: Family<XdsTerminationLabels, Counter>,
    /// Responses received, by type.
    pub messages: Family<XdsTypeLabels, Counter>,
    /// Bytes of the resources received, by type.
    pub bytes: Family<XdsTypeLabels, Counter>,
}

impl XdsMetrics {
    /// Counts one ended stream.
    pub fn terminated(&self, reason: XdsTermination) {
        self.terminations
            .get_or_create(&XdsTerminationLabels { reason })
            .inc();
    }

    /// Counts one response of `url` whose resources weigh `bytes`.
    pub fn received(&self, url: &str, bytes: u64) {
        let labels = XdsTypeLabels {
            url: url.to_string(),
        };
        self.messages.get_or_create(&labels).inc();
        self.bytes.get_or_create(&labels).inc_by(bytes);
    }
}

/// `istio_build{component, tag}`: ztunnel's build gauge, so Istio's dashboards count weft's
/// pods where they count ztunnel's. `component` is `ztunnel` (the role weft plays; the
/// dashboards select on it) and `tag` is weft's own version, `weft-<version>`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: String,
}

label_value! {
    /// How one programming of the capture rules went.
    RunResult {
        /// The kernel took the rules.
        Success => "success",
        /// The rules (or the routes they need) could not be programmed; the previous stay.
        Failure => "failure",
    }
}

/// Labels of capture programming runs.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaptureRunLabels {
    /// `success` or `failure`.
    pub result: RunResult,
}

/// `weft_capture_programming_runs_total`: rewrites of the capture rules, by result.
#[derive(Clone, Default)]
pub struct CaptureMetrics {
    /// The counter family.
    pub runs: Family<CaptureRunLabels, Counter>,
}

impl CaptureMetrics {
    /// Counts one run.
    pub fn run(&self, result: RunResult) {
        self.runs.get_or_create(&CaptureRunLabels { result }).inc();
    }
}

label_value! {
    /// Why a listener refused a connection.
    RefusalReason {
        /// The listener holds as many connections as it may.
        ListenerLimit => "listener_limit",
        /// The source address holds as many connections as it may.
        SourceLimit => "source_limit",
        /// As many HBONE TLS handshakes are in progress as may be.
        Handshakes => "handshakes",
    }
}

/// Labels of refused connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The listener: `outbound`, `inbound_plaintext`, `hbone`, `admin`, `metrics`, `readiness`.
    pub listener: &'static str,
    /// Why.
    pub reason: RefusalReason,
}

/// `weft_connections_refused_total`: connections a listener reset at once, over its limits.
#[derive(Clone, Debug, Default)]
pub struct LimitMetrics {
    /// The counter family.
    pub refused: Family<RefusalLabels, Counter>,
}

impl LimitMetrics {
    /// Counts one refusal.
    pub fn refused(&self, listener: &'static str, reason: RefusalReason) {
        self.refused
            .get_or_create(&RefusalLabels { listener, reason })
            .inc();
    }

    /// Refusals counted so far for `listener` and `reason`.
    pub fn count(&self, listener: &'static str, reason: RefusalReason) -> u64 {
        self.refused
            .get_or_create(&RefusalLabels { listener, reason })
            .get()
    }
}

/// Istio's labels on TCP metrics: the set ztunnel emits, in its order (values are `unknown`
/// when a side is outside the mesh, as in ztunnel). `*_app` and `*_version` carry the canonical
/// service and revision, as ztunnel's do.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (outbound side) or `destination` (inbound side).
    pub reporter: Reporter,
    /// Source workload name.
    pub source_workload: String,
    /// Source canonical service.
    pub source_canonical_service: String,
    /// Source canonical revision.
    pub source_canonical_revision: String,
    /// Source workload namespace.
    pub source_workload_namespace: String,
    /// Source SPIFFE principal.
    pub source_principal: String,
    /// Source app (the canonical service).
    pub source_app: String,
    /// Source version (the canonical revision).
    pub source_version: String,
    /// Source cluster.
    pub source_cluster: String,
    /// Destination service host (`name.namespace.svc.cluster.local`) when reached by VIP.
    pub destination_service: String,
    /// Destination service namespace.
    pub destination_service_namespace: String,
    /// Destination service name.
    pub destination_service_name: String,
    /// Destination workload name.
    pub destination_workload: String,
    /// Destination canonical service.
    pub destination_canonical_service: String,
    /// Destination canonical revision.
    pub destination_canonical_revision: String,
    /// Destination workload namespace.
    pub destination_workload_namespace: String,
    /// Destination SPIFFE principal.
    pub destination_principal: String,
    /// Destination app (the canonical service).
    pub destination_app: String,
    /// Destination version (the canonical revision).
    pub destination_version: String,
    /// Destination cluster.
    pub destination_cluster: String,
    /// Always `tcp` at L4.
    pub request_protocol: RequestProtocol,
    /// `-`, or ztunnel's flag when the connection failed (`CONNECT`), or `DC` when weft
    /// closed it (drain, a policy change).
    pub response_flags: &'static str,
    /// `mutual_tls` for HBONE, `unknown` for plaintext.
    pub connection_security_policy: SecurityPolicy,
    /// Source region (`unknown`: weft's model has no locality).
    pub source_region: &'static str,
    /// Source zone.
    pub source_zone: &'static str,
    /// Destination region.
    pub destination_region: &'static str,
    /// Destination zone.
    pub destination_zone: &'static str,
}

/// The value of a label weft does not know (ztunnel's word for it).
pub const UNKNOWN: &str = "unknown";

/// Labels of denied connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// Destination workload.
    pub destination_workload: String,
    /// Destination namespace.
    pub destination_workload_namespace: String,
    /// `hbone`, `plaintext` or `local`.
    pub transport: Transport,
    /// Why: `policy` (an AuthorizationPolicy), `mtls` (PeerAuthentication STRICT).
    pub reason: DenialReason,
    /// The deciding policy (`namespace/name`), or `default` (no ALLOW matched).
    pub policy: String,
}

/// `weft_tcp_connections_denied_total`.
#[derive(Clone, Default)]
pub struct DenialMetrics {
    /// The counter family.
    pub denied: Family<DenialLabels, Counter>,
}

/// Istio's labels on request metrics: the set Envoy's Istio stats emit (the waypoint reports
/// as `destination`: it runs on the destination's node).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Always `destination`.
    pub reporter: Reporter,
    /// Source workload name.
    pub source_workload: String,
    /// Source canonical service.
    pub source_canonical_service: String,
    /// Source canonical revision.
    pub source_canonical_revision: String,
    /// Source workload namespace.
    pub source_workload_namespace: String,
    /// Source SPIFFE principal.
    pub source_principal: String,
    /// Source app (the canonical service).
    pub source_app: String,
    /// Source version (the canonical revision).
    pub source_version: String,
    /// Source cluster.
    pub source_cluster: String,
    /// Destination service host.
    pub destination_service: String,
    /// Destination service namespace.
    pub destination_service_namespace: String,
    /// Destination service name.
    pub destination_service_name: String,
    /// Destination workload name.
    pub destination_workload: String,
    /// Destination canonical service.
    pub destination_canonical_service: String,
    /// Destination canonical revision.
    pub destination_canonical_revision: String,
    /// Destination workload namespace.
    pub destination_workload_namespace: String,
    /// Destination SPIFFE principal.
    pub destination_principal: String,
    /// Destination app (the canonical service).
    pub destination_app: String,
    /// Destination version (the canonical revision).
    pub destination_version: String,
    /// Destination cluster.
    pub destination_cluster: String,
    /// `http`.
    pub request_protocol: RequestProtocol,
    /// The HTTP status.
    pub response_code: u16,
    /// The gRPC status (`-`: weft does not read gRPC trailers).
    pub grpc_response_status: &'static str,
    /// `-`, or Envoy's flag for a response weft made itself (`RBAC_DENIED` -> `UAEX`...).
    pub response_flags: &'static str,
    /// `mutual_tls` or `unknown`.
    pub connection_security_policy: SecurityPolicy,
}

/// Istio's request metrics.
#[derive(Clone)]
pub struct HttpMetrics {
    /// `istio_requests_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `istio_request_duration_milliseconds`.
    pub duration: Family<RequestLabels, Histogram>,
    /// The `*_cluster` labels' value for known workloads.
    pub cluster: Cluster,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([
                    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                    10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
                ])
            }),
            cluster: Cluster::default(),
        }
    }
}

impl HttpMetrics {
    /// Counts one request the waypoint answered with `status` after `ms` milliseconds.
    pub fn record(&self, req: &RequestSides<'_>, status: u16, ms: f64) {
        let (src, dst) = (req.src_workload, req.dst_workload);
        let field = |w: Option<&Workload>, f: fn(&Workload) -> &ArcStr| {
            w.map(|w| f(w).to_string())
                .unwrap_or_else(|| UNKNOWN.to_string())
        };
        let cluster = |w: Option<&Workload>| {
            w.map(|_| self.cluster.to_string())
                .unwrap_or_else(|| UNKNOWN.to_string())
        };
        let principal = |i: Option<&Identity>| {
            i.map(|i| i.to_string())
                .unwrap_or_else(|| UNKNOWN.to_string())
        };
        let service = |f: fn(&crate::model::Service) -> String| {
            req.dst_service
                .map(f)
                .unwrap_or_else(|| UNKNOWN.to_string())
        };
        let labels = RequestLabels {
            reporter: Reporter::Destination,
            source_workload: field(src, |w| &w.workload_name),
            source_canonical_service: field(src, |w| &w.canonical_name),
            source_canonical_revision: field(src, |w| &w.canonical_revision),
            source_workload_namespace: field(src, |w| &w.namespace),
            source_principal: principal(req.src_identity),
            source_app: field(src, |w| &w.canonical_name),
            source_version: field(src, |w| &w.canonical_revision),
            source_cluster: cluster(src),
            destination_service: service(|s| s.hostname()),
            destination_service_namespace: service(|s| s.namespace.clone()),
            destination_service_name: service(|s| s.name.clone()),
            destination_workload: field(dst, |w| &w.workload_name),
            destination_canonical_service: field(dst, |w| &w.canonical_name),
            destination_canonical_revision: field(dst, |w| &w.canonical_revision),
            destination_workload_namespace: field(dst, |w| &w.namespace),
            destination_principal: principal(req.dst_identity),
            destination_app: field(dst, |w| &w.canonical_name),
            destination_version: field(dst, |w| &w.canonical_revision),
            destination_cluster: cluster(dst),
            request_protocol: RequestProtocol::Http,
            response_code: status,
            grpc_response_status: "-",
            response_flags: req.response_flags,
            connection_security_policy: if req.src_identity.is_some() {
                SecurityPolicy::MutualTls
            } else {
                SecurityPolicy::Unknown
            },
        };
        self.requests.get_or_create(&labels).inc();
        self.duration.get_or_create(&labels).observe(ms);
    }
}

/// The two ends of one request, as the waypoint knows them.
#[derive(Clone, Copy, Debug)]
pub struct RequestSides<'a> {
    /// The client's verified identity (`None` for plaintext).
    pub src_identity: Option<&'a Identity>,
    /// The client's workload, when in the mesh state.
    pub src_workload: Option<&'a Workload>,
    /// The destination's workload, when in the mesh state.
    pub dst_workload: Option<&'a Workload>,
    /// The destination's identity.
    pub dst_identity: Option<&'a Identity>,
    /// The service the request was for (by its host, or the destination's only service).
    pub dst_service: Option<&'a crate::model::Service>,
    /// `-`, or Envoy's flag when weft answered itself (`RBAC` for a policy denial).
    pub response_flags: &'static str,
}

/// The cluster weft's workloads are in, for the `*_cluster` labels (ztunnel's `CLUSTER_ID`,
/// `Kubernetes` unless the config names another).
#[derive(Clone, Debug)]
pub struct Cluster(pub Arc<str>);

impl Default for Cluster {
    fn default() -> Self {
        Cluster(Arc::from("Kubernetes"))
    }
}

impl fmt::Display for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The counters of Istio's TCP telemetry.
#[derive(Clone, Default)]
pub struct TcpMetrics {
    /// `istio_tcp_connections_opened_total`.
    pub opened: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes_total`: bytes sent towards the client (the response direction).
    pub sent_bytes: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total`: bytes received from the client.
    pub received_bytes: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_failed_total`: connections that could not be established
    /// (labels as the others, with the failure's response flag).
    pub failed: Family<TcpLabels, Counter>,
    /// The `*_cluster` labels' value for known workloads.
    pub cluster: Cluster,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A registry with process, config and certificate metrics.
    pub fn new(
        store: Arc<StateStore>,
        certs: Arc<CertManager>,
        log: Arc<crate::logging::LogControl>,
        cluster: Cluster,
    ) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        registry.register_collector(Box::new(LogCollector(log.clone())));
        registry.register_collector(Box::new(AccessLogExportCollector(log)));
        registry.register_collector(Box::new(StateCollector { store, certs }));
        let tcp = TcpMetrics {
            cluster: cluster.clone(),
            ..TcpMetrics::default()
        };
        let xds = XdsMetrics::default();
        let build = Family::<BuildLabels, prometheus_client::metrics::gauge::Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "ztunnel",
                tag: format!("weft-{}", env!("CARGO_PKG_VERSION")),
            })
            .set(1);
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("build", "Istio component build info", build);
        istio.register(
            "tcp_connections_failed",
            "The total number of TCP connections that failed to establish",
            tcp.failed.clone(),
        );
        istio.register(
            "xds_connection_terminations",
            "The total number of completed connections to xds server",
            xds.terminations.clone(),
        );
        istio.register(
            "xds_message",
            "Total number of messages received",
            xds.messages.clone(),
        );
        istio.register_with_unit(
            "xds_message",
            "Total number of bytes received",
            prometheus_client::registry::Unit::Bytes,
            xds.bytes.clone(),
        );
        istio.register(
            "tcp_connections_opened",
            "Total TCP connections opened",
            tcp.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "Total TCP connections closed",
            tcp.closed.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "Total bytes sent during response in case of a TCP connection",
            tcp.sent_bytes.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Total bytes received during request in case of a TCP connection",
            tcp.received_bytes.clone(),
        );
        let denials = DenialMetrics::default();
        registry.register(
            "weft_tcp_connections_denied",
            "Connections refused by policy (AuthorizationPolicy or PeerAuthentication)",
            denials.denied.clone(),
        );
        let capture = CaptureMetrics::default();
        registry.register(
            "weft_capture_programming_runs",
            "Programmings of the capture rules (iptables and the routes to pods), by result",
            capture.runs.clone(),
        );
        let kube = KubeMetrics::default();
        registry.register(
            "weft_kubernetes_invalid_objects",
            "Kubernetes objects skipped for a bad field (their last good version stays in force), by kind",
            kube.invalid.clone(),
        );
        registry.register(
            "weft_kubernetes_watch_errors",
            "Failed lists, watches and CRD discoveries of the Kubernetes source (each retried), by kind",
            kube.watch_errors.clone(),
        );
        let limits = LimitMetrics::default();
        registry.register(
            "weft_connections_refused",
            "Connections reset at once because a listener's limits were reached, by listener and reason",
            limits.refused.clone(),
        );
        let http = HttpMetrics {
            cluster,
            ..HttpMetrics::default()
        };
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("requests", "Total requests", http.requests.clone());
        istio.register(
            "request_duration_milliseconds",
            "Request duration in milliseconds",
            http.duration.clone(),
        );
        Metrics {
            registry,
            tcp,
            denials,
            http,
            capture,
            limits,
            xds,
            kube,
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// `weft_log_lines_dropped_total`: log lines the queue to stderr had no room for.
struct LogCollector(Arc<crate::logging::LogControl>);

impl fmt::Debug for LogCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LogCollector")
    }
}

impl Collector for LogCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        counter(
            &mut encoder,
            "weft_log_lines_dropped",
            "Log lines dropped because the queue to stderr was full",
            self.0.dropped_lines() as f64,
        )
    }
}

/// `process_*` metrics from `/proc/self`, the names Prometheus client libraries use.
#[derive(Debug)]
struct ProcessCollector;

fn gauge<
    T: prometheus_client::encoding::EncodeGaugeValue + Default + fmt::Debug + Send + Sync + 'static,
>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: T,
) -> Result<(), fmt::Error>
where
    ConstGauge<T>: EncodeMetric,
{
    let g = ConstGauge::new(v);
    let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), fmt::Error> {
    let c = ConstCounter::new(v);
    let m = encoder.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let Ok(me) = procfs::process::Process::myself() else {
            return Ok(());
        };
        let tps = procfs::ticks_per_second() as f64;
        if let Ok(stat) = me.stat() {
            let page = procfs::page_size();
            let cpu = (stat.utime + stat.stime) as f64 / tps;
            counter(
                &mut encoder,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                cpu,
            )?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                (stat.rss * page) as i64,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                stat.vsize as i64,
            )?;
            gauge(
                &mut encoder,
                "process_threads",
                "Number of OS threads in the process.",
                stat.num_threads,
            )?;
            if let Ok(boot) = procfs::boot_time_secs() {
                let start = boot as f64 + stat.starttime as f64 / tps;
                gauge(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    start,
                )?;
            }
        }
        if let Ok(n) = me.fd_count() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors.",
                n as i64,
            )?;
        }
        if let Ok(limits) = me.limits() {
            if let procfs::process::LimitValue::Value(v) = limits.max_open_files.soft_limit {
                gauge(
                    &mut encoder,
                    "process_max_fds",
                    "Maximum number of open file descriptors.",
                    v as i64,
                )?;
            }
        }
        Ok(())
    }
}

/// Config-load and certificate metrics, read from the store and the cert manager.
struct StateCollector {
    store: Arc<StateStore>,
    certs: Arc<CertManager>,
}

impl fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StateCollector")
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let st = self.store.status();
        gauge(
            &mut encoder,
            "weft_config_generation",
            "Generation of the mesh config in force (0: none loaded).",
            st.generation as i64,
        )?;
        gauge(
            &mut encoder,
            "weft_config_last_load_success",
            "1 when the most recent attempt to load the mesh config succeeded, 0 when it was rejected.",
            i64::from(st.last_attempt_ok),
        )?;
        {
            let mut m = encoder.encode_descriptor(
                "weft_config_loads",
                "Attempts to load the mesh config, by result.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(st.loads_ok).encode(m.encode_family(&[("result", "success")])?)?;
            ConstCounter::new(st.loads_failed)
                .encode(m.encode_family(&[("result", "failure")])?)?;
        }
        let certs = self.certs.certs();
        gauge(
            &mut encoder,
            "weft_workload_certificates",
            "Workload certificates held.",
            certs.len() as i64,
        )?;
        let mut m = encoder.encode_descriptor(
            "weft_workload_certificate_expiry_seconds",
            "Expiry time of each workload certificate, in seconds since the epoch.",
            None,
            MetricType::Gauge,
        )?;
        for c in certs {
            let expiry = c
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let id = c.identity.to_string();
            ConstGauge::new(expiry).encode(m.encode_family(&[("identity", id.as_str())])?)?;
        }
        Ok(())
    }
}

// === access-log export (`logging::otlp`) ===

/// `weft_access_log_records_{dropped,exported,failed}_total`: the access log's OTLP export,
/// read from its counters at scrape time (all zero while export is off).
struct AccessLogExportCollector(Arc<crate::logging::LogControl>);

impl fmt::Debug for AccessLogExportCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessLogExportCollector")
    }
}

impl Collector for AccessLogExportCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let c = self.0.access_export();
        counter(
            &mut encoder,
            "weft_access_log_records_dropped",
            "Access-log records not exported because the export queue was full",
            c.dropped() as f64,
        )?;
        counter(
            &mut encoder,
            "weft_access_log_records_exported",
            "Access-log records the OTLP collector accepted",
            c.exported() as f64,
        )?;
        counter(
            &mut encoder,
            "weft_access_log_records_failed",
            "Access-log records lost in failed OTLP exports (collector unreachable, refusing or too slow)",
            c.failed() as f64,
        )
    }
}
