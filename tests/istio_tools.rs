//! Istio's operator tools on weft: what `istioctl ztunnel-config` reads from the admin port,
//! and the metric labels Istio's dashboards and Kiali query. A weft daemon on loopback (no
//! root), a test client tunnelling to it over real HBONE.
//!
//! The shapes asserted here were read from istioctl's `istioctl/pkg/writer/ztunnel/configdump`
//! (the Go structs it decodes `/config_dump` into: a field of the wrong JSON type fails the
//! whole command) and checked against a real ztunnel's dump of the same workloads:
//! `tests/data/ztunnel/config_dump.json` was written by ztunnel (built from istio/ztunnel,
//! `--features testing`, `FAKE_CA=true`, `LOCAL_XDS_PATH=tests/data/ztunnel/local.yaml` (the
//! same workloads, service and policy), `PROXY_MODE=dedicated`, alone in a network namespace),
//! and `tests/data/ztunnel/metrics.txt` is its `/metrics` after one HBONE connection from
//! weft's pool to the reviews pod, the L4 traffic the metrics test sends weft.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use support::*;
use weft::identity::{BuiltinCa, Identity, IssuedCert};
use weft::proxy::pool::{Pool, PoolKey, Tunnel};
use weft::proxy::socket::SocketMode;
use weft::tls::TlsConfigs;

struct Setup {
    node: NodeDir,
    daemon: weft::daemon::Daemon,
    server_ip: std::net::IpAddr,
    client_ip: std::net::IpAddr,
    pool: Arc<Pool>,
    cert: Arc<IssuedCert>,
}

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "shop", sa).unwrap()
}

/// A client pod on another node, a server pod here behind a Service (and behind weft's
/// waypoint when `waypoint`), and an ALLOW policy for the client.
fn mesh(server_ip: std::net::IpAddr, client_ip: std::net::IpAddr, waypoint: bool) -> String {
    let labels = if waypoint {
        "app: reviews, version: v2, istio.io/use-waypoint: weft"
    } else {
        "app: reviews, version: v2"
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews-v2-5b4c8f7d9-x2kqp, namespace: shop, labels: {{{labels}}}, \
         ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v2-5b4c8f7d9, uid: u1, controller: true}}]}}\n\
         spec: {{nodeName: node-b, serviceAccountName: reviews}}\nstatus: {{podIP: {server_ip}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: productpage-0, namespace: shop, labels: {{app: productpage}}}}\n\
         spec: {{nodeName: node-a, serviceAccountName: productpage}}\nstatus: {{podIP: {client_ip}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: shop}}\n\
         spec: {{clusterIP: 10.96.0.20, selector: {{app: reviews}}, ports: [{{port: 9080, targetPort: 8080}}]}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: reviews-from-productpage, namespace: shop}}\n\
         spec: {{selector: {{matchLabels: {{app: reviews}}}}, action: ALLOW, rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/productpage]}}}}], to: [{{operation: {{ports: ['8080']}}}}]}}]}}\n"
    )
}

async fn setup(waypoint: bool) -> Setup {
    let client_ip = unique_loopback();
    let node = NodeDir::new("");
    let server_ip = node.ip;
    std::fs::write(node.mesh_path(), mesh(server_ip, client_ip, waypoint)).unwrap();
    let config = node.config("node-b");
    let daemon = weft::daemon::Daemon::start(config, quiet_log())
        .await
        .unwrap();
    assert!(wait_ready(node.readiness(), Duration::from_secs(10)).await);
    let ca = BuiltinCa::load(&node.path("ca")).unwrap();
    let tls = Arc::new(TlsConfigs::new());
    let pool = Pool::new(
        tls,
        SocketMode::Plain,
        15008,
        weft::proxy::socket::Keepalive::default(),
    );
    let cert = Arc::new(
        ca.issue(&id("productpage"), Duration::from_secs(3600))
            .unwrap(),
    );
    Setup {
        node,
        daemon,
        server_ip,
        client_ip,
        pool,
        cert,
    }
}

impl Setup {
    /// A tunnel as the client workload to `dst` (a pod of service account `sa` on this node),
    /// through the daemon's HBONE listener.
    async fn open(&self, sa: &str, dst: SocketAddr) -> Tunnel {
        let key = PoolKey {
            src: id("productpage"),
            dst: id(sa),
            dst_ip: self.server_ip,
            dst_port: 15008,
        };
        let from = SocketAddr::new(self.client_ip, 40000);
        self.pool.tunnel(&key, &self.cert, dst, from).await.unwrap()
    }
}

/// The JSON type of a value, as Go's decoder tells them apart.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The fields istioctl's structs read, per object kind, with the JSON type each must have
/// (`ZtunnelWorkload`, `ZtunnelService`, `ZtunnelEndpoint`, `ZtunnelPolicy`, `CertsDump`,
/// `Cert`, `WorkloadState`, `InboundConnection`/`OutboundConnection`, `WorkloadInfo`).
const WORKLOAD_FIELDS: &[(&str, &str)] = &[
    ("uid", "string"),
    ("workloadIps", "array"),
    ("protocol", "string"),
    ("name", "string"),
    ("namespace", "string"),
    ("serviceAccount", "string"),
    ("workloadName", "string"),
    ("workloadType", "string"),
    ("canonicalName", "string"),
    ("canonicalRevision", "string"),
    ("clusterId", "string"),
    ("trustDomain", "string"),
    ("node", "string"),
    ("status", "string"),
    ("networkMode", "string"),
    ("capacity", "number"),
];
const SERVICE_FIELDS: &[(&str, &str)] = &[
    ("name", "string"),
    ("namespace", "string"),
    ("hostname", "string"),
    ("vips", "array"),
    ("ports", "object"),
    ("endpoints", "object"),
    ("subjectAltNames", "array"),
    ("ipFamilies", "string"),
];
const ENDPOINT_FIELDS: &[(&str, &str)] = &[
    ("workloadUid", "string"),
    ("service", "string"),
    ("port", "object"),
];
const POLICY_FIELDS: &[(&str, &str)] = &[
    ("name", "string"),
    ("namespace", "string"),
    ("scope", "string"),
    ("action", "string"),
    ("rules", "array"),
];
const CERTS_FIELDS: &[(&str, &str)] = &[
    ("identity", "string"),
    ("state", "string"),
    ("certChain", "array"),
    ("rootCerts", "array"),
];
const CERT_FIELDS: &[(&str, &str)] = &[
    ("pem", "string"),
    ("serialNumber", "string"),
    ("validFrom", "string"),
    ("expirationTime", "string"),
];
const CONNECTION_FIELDS: &[(&str, &str)] = &[
    ("src", "string"),
    ("actualDst", "string"),
    ("protocol", "string"),
];
const INFO_FIELDS: &[(&str, &str)] = &[
    ("name", "string"),
    ("namespace", "string"),
    ("serviceAccount", "string"),
];

fn check_fields(what: &str, v: &Value, fields: &[(&str, &str)]) {
    for (name, want) in fields {
        assert_eq!(
            kind(&v[*name]),
            *want,
            "{what}.{name} has the wrong JSON type for istioctl: {}",
            serde_json::to_string_pretty(v).unwrap()
        );
    }
}

fn find<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v[key] == value)
        .unwrap_or_else(|| panic!("no {key}={value} in {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_answers_istioctl_ztunnel_config_in_ztunnels_shape() {
    let s = setup(false).await;
    echo_app(
        TcpListener::bind(SocketAddr::new(s.server_ip, 8080))
            .await
            .unwrap(),
    );
    let mut t = s.open("reviews", SocketAddr::new(s.server_ip, 8080)).await;
    t.io.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    t.io.read_exact(&mut buf).await.unwrap();

    let admin = s.node.admin();
    let dump = tokio::task::spawn_blocking(move || get_json(admin, "/config_dump"))
        .await
        .unwrap();

    // Workloads: every field istioctl reads, with values for the one behind the Service.
    for w in dump["workloads"].as_array().unwrap() {
        check_fields("workload", w, WORKLOAD_FIELDS);
    }
    let reviews = find(&dump["workloads"], "name", "reviews-v2-5b4c8f7d9-x2kqp");
    assert_eq!(
        reviews["uid"],
        "Kubernetes//Pod/shop/reviews-v2-5b4c8f7d9-x2kqp"
    );
    assert_eq!(reviews["workloadIps"][0], s.server_ip.to_string());
    assert_eq!(reviews["protocol"], "HBONE");
    assert_eq!(reviews["workloadName"], "reviews-v2");
    assert_eq!(reviews["workloadType"], "deployment");
    assert_eq!(reviews["canonicalName"], "reviews");
    assert_eq!(reviews["canonicalRevision"], "v2");
    assert_eq!(reviews["clusterId"], "Kubernetes");
    assert_eq!(reviews["node"], "node-b");
    assert_eq!(reviews["status"], "Healthy");
    assert_eq!(reviews["serviceAccount"], "reviews");

    // Services: `vips` as `<network>/<ip>`, ports and endpoints as maps.
    for svc in dump["services"].as_array().unwrap() {
        check_fields("service", svc, SERVICE_FIELDS);
        for ep in svc["endpoints"].as_object().unwrap().values() {
            check_fields("endpoint", ep, ENDPOINT_FIELDS);
        }
    }
    let svc = find(&dump["services"], "name", "reviews");
    assert_eq!(svc["hostname"], "reviews.shop.svc.cluster.local");
    assert_eq!(svc["vips"][0], "/10.96.0.20");
    assert_eq!(svc["ports"]["9080"], 8080);
    let ep = &svc["endpoints"][reviews["uid"].as_str().unwrap()];
    assert_eq!(ep["workloadUid"], reviews["uid"]);
    assert_eq!(ep["service"], "shop/reviews.shop.svc.cluster.local");
    assert_eq!(ep["port"]["9080"], 8080);

    // Policies: rules are rules of clauses of matches; string matches as `{"Exact": ...}`.
    for p in dump["policies"].as_array().unwrap() {
        check_fields("policy", p, POLICY_FIELDS);
    }
    let p = find(&dump["policies"], "name", "reviews-from-productpage");
    assert_eq!(p["scope"], "WorkloadSelector");
    assert_eq!(p["action"], "Allow");
    assert_eq!(
        p["rules"][0][0][0]["principals"][0]["Exact"],
        "cluster.local/ns/shop/sa/productpage"
    );
    assert_eq!(p["rules"][0][1][0]["destinationPorts"][0], 8080);

    // Certificates: the chain and the roots apart, PEM base64-encoded, serials in decimal.
    let certs = dump["certificates"].as_array().unwrap();
    assert!(!certs.is_empty());
    for c in certs {
        check_fields("certificate", c, CERTS_FIELDS);
        for cert in c["certChain"]
            .as_array()
            .unwrap()
            .iter()
            .chain(c["rootCerts"].as_array().unwrap())
        {
            check_fields("cert", cert, CERT_FIELDS);
            let serial = cert["serialNumber"].as_str().unwrap();
            assert!(
                !serial.is_empty() && serial.bytes().all(|b| b.is_ascii_digit()),
                "istioctl parses the serial as decimal: {serial}"
            );
            use base64::Engine as _;
            let pem = base64::engine::general_purpose::STANDARD
                .decode(cert["pem"].as_str().unwrap())
                .unwrap();
            assert!(pem.starts_with(b"-----BEGIN CERTIFICATE-----"));
            humantime::parse_rfc3339(cert["expirationTime"].as_str().unwrap()).unwrap();
        }
    }
    let reviews_cert = find(
        &dump["certificates"],
        "identity",
        "spiffe://cluster.local/ns/shop/sa/reviews",
    );
    assert_eq!(reviews_cert["state"], "Available");
    assert_eq!(
        reviews_cert["certChain"].as_array().unwrap().len(),
        2,
        "leaf and intermediate"
    );
    assert_eq!(reviews_cert["rootCerts"].as_array().unwrap().len(), 1);

    // Connections (`istioctl zc connections`): the live tunnel, on the server's side.
    let state = &dump["workloadState"][reviews["uid"].as_str().unwrap()];
    check_fields("workloadState.info", &state["info"], INFO_FIELDS);
    assert_eq!(state["info"]["name"], "reviews-v2-5b4c8f7d9-x2kqp");
    let inbound = state["connections"]["inbound"].as_array().unwrap();
    assert_eq!(inbound.len(), 1, "{state}");
    check_fields("connection", &inbound[0], CONNECTION_FIELDS);
    assert_eq!(inbound[0]["actualDst"], format!("{}:8080", s.server_ip));
    assert_eq!(inbound[0]["protocol"], "HBONE");
    assert!(
        inbound[0]["src"]
            .as_str()
            .unwrap()
            .starts_with(&s.client_ip.to_string()),
        "{state}"
    );

    // The same fields have the same JSON types in a real ztunnel's dump (where ztunnel
    // writes them at all: it leaves out some that istioctl's structs have, e.g. a service's
    // `ipFamilies` and an endpoint's `service`).
    let z: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/ztunnel/config_dump.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let same = |what: &str, theirs: &Value, ours: &Value, fields: &[(&str, &str)]| {
        let mut compared = 0;
        for (name, _) in fields {
            if theirs[*name].is_null() {
                continue;
            }
            compared += 1;
            assert_eq!(
                kind(&theirs[*name]),
                kind(&ours[*name]),
                "{what}.{name}: ztunnel wrote {theirs}"
            );
        }
        assert!(compared > 0, "{what}: nothing to compare in {theirs}");
    };
    let zw = find(&z["workloads"], "name", "reviews-v2-5b4c8f7d9-x2kqp");
    same("workload", zw, reviews, WORKLOAD_FIELDS);
    for name in [
        "protocol",
        "workloadName",
        "workloadType",
        "canonicalName",
        "canonicalRevision",
        "clusterId",
        "status",
        "networkMode",
        "capacity",
    ] {
        assert_eq!(zw[name], reviews[name], "workload.{name}");
    }
    let zs = find(&z["services"], "name", "reviews");
    same("service", zs, svc, SERVICE_FIELDS);
    for name in ["hostname", "vips", "ports", "subjectAltNames"] {
        assert_eq!(zs[name], svc[name], "service.{name}");
    }
    let zep = zs["endpoints"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap();
    same("endpoint", zep, ep, ENDPOINT_FIELDS);
    assert_eq!(zep["port"], ep["port"]);
    let zp = &z["policies"][0];
    same("policy", zp, p, POLICY_FIELDS);
    assert_eq!(
        zp["rules"], p["rules"],
        "the same policy, in the same shape"
    );
    assert_eq!((&zp["scope"], &zp["action"]), (&p["scope"], &p["action"]));
    let zc = &z["certificates"][0];
    same("certificate", zc, reviews_cert, CERTS_FIELDS);
    same(
        "cert",
        &zc["certChain"][0],
        &reviews_cert["certChain"][0],
        CERT_FIELDS,
    );
    same(
        "root",
        &zc["rootCerts"][0],
        &reviews_cert["rootCerts"][0],
        CERT_FIELDS,
    );

    // `istioctl ztunnel-config log` POSTs the level, and `--reset` adds `&reset`.
    let (status, body) =
        tokio::task::spawn_blocking(move || http(admin, "POST", "/logging?level=debug"))
            .await
            .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        tokio::task::spawn_blocking(move || http(admin, "POST", "/logging?level=info&reset"))
            .await
            .unwrap();
    assert_eq!(status, 200, "{body}");
    drop(t);
    s.daemon.stop().await;
}

/// ztunnel's labels on `istio_tcp_*` (its `CommonTrafficLabels`, locality included).
const TCP_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "source_region",
    "source_zone",
    "destination_region",
    "destination_zone",
];

/// Envoy's (Istio stats) labels on `istio_requests_total`.
const REQUEST_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// The labels of the first series of `family` whose labels contain every `want` pair.
fn series(metrics: &str, family: &str, want: &[(&str, &str)]) -> Vec<(String, String)> {
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(family).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, _)) = rest.rsplit_once('}') else {
            continue;
        };
        let pairs: Vec<(String, String)> = labels
            .split("\",")
            .filter_map(|kv| kv.split_once("=\""))
            .map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
            .collect();
        if want
            .iter()
            .all(|(k, v)| pairs.iter().any(|(pk, pv)| pk == k && pv == v))
        {
            return pairs;
        }
    }
    panic!("no {family} series with {want:?}:\n{metrics}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_and_waypoint_traffic_carry_every_label_istios_dashboards_query() {
    // L4. First with no app listening (the connection cannot be established), then a port
    // policy refuses, then an echo.
    let s = setup(false).await;
    let key = PoolKey {
        src: id("productpage"),
        dst: id("reviews"),
        dst_ip: s.server_ip,
        dst_port: 15008,
    };
    for port in [8080, 8099] {
        let failed = s
            .pool
            .tunnel(
                &key,
                &s.cert,
                SocketAddr::new(s.server_ip, port),
                SocketAddr::new(s.client_ip, 40001),
            )
            .await;
        assert!(failed.is_err(), "port {port}");
    }
    echo_app(
        TcpListener::bind(SocketAddr::new(s.server_ip, 8080))
            .await
            .unwrap(),
    );
    let mut t = s.open("reviews", SocketAddr::new(s.server_ip, 8080)).await;
    let mut buf = [0u8; 4];
    t.io.write_all(b"ping").await.unwrap();
    t.io.read_exact(&mut buf).await.unwrap();
    t.io.shutdown().await.unwrap();
    let mut rest = Vec::new();
    t.io.read_to_end(&mut rest).await.unwrap();
    drop(t);
    // Through the waypoint.
    let w = setup(true).await;
    http_app(
        TcpListener::bind(SocketAddr::new(w.server_ip, 8080))
            .await
            .unwrap(),
    );
    let mut t = w.open("reviews", SocketAddr::new(w.server_ip, 8080)).await;
    t.io.write_all(b"GET /reviews/1 HTTP/1.1\r\nHost: reviews.shop.svc.cluster.local:9080\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\r\n\r\nok") {
        let n = tokio::time::timeout(Duration::from_secs(5), t.io.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(t);
    let waddr = w.node.metrics();
    let wmetrics = eventually(Duration::from_secs(5), || {
        let (_, m) = http(waddr, "GET", "/metrics");
        m.contains("istio_requests_total{").then_some(m)
    })
    .await
    .expect("no request series");

    let addr = s.node.metrics();
    let metrics = eventually(Duration::from_secs(5), || {
        let (_, m) = http(addr, "GET", "/metrics");
        m.contains("istio_tcp_connections_closed_total{")
            .then_some(m)
    })
    .await
    .expect("no TCP series");

    let tcp = series(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[("destination_workload", "reviews-v2")],
    );
    let names: Vec<&str> = tcp.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, TCP_LABELS, "ztunnel's label set, in its order");
    let value = |pairs: &[(String, String)], k: &str| {
        pairs
            .iter()
            .find(|(pk, _)| pk == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    for (k, v) in [
        ("reporter", "destination"),
        ("source_workload", "productpage-0"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/shop/sa/productpage",
        ),
        ("source_app", "productpage"),
        ("source_version", "latest"),
        ("source_cluster", "Kubernetes"),
        ("destination_workload_namespace", "shop"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/shop/sa/reviews",
        ),
        ("destination_canonical_service", "reviews"),
        ("destination_canonical_revision", "v2"),
        ("destination_app", "reviews"),
        ("destination_version", "v2"),
        ("destination_cluster", "Kubernetes"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ] {
        assert_eq!(value(&tcp, k), v, "{k}");
    }
    for family in [
        "istio_tcp_connections_closed_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ] {
        let pairs = series(&metrics, family, &[("destination_workload", "reviews-v2")]);
        let names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, TCP_LABELS, "{family}");
    }

    let req = series(
        &wmetrics,
        "istio_requests_total",
        &[("destination_workload", "reviews-v2")],
    );
    let names: Vec<&str> = req.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, REQUEST_LABELS, "Envoy's label set, in its order");
    for (k, v) in [
        ("reporter", "destination"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/shop/sa/productpage",
        ),
        ("destination_service", "reviews.shop.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "shop"),
        ("destination_app", "reviews"),
        ("destination_version", "v2"),
        ("destination_cluster", "Kubernetes"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ] {
        assert_eq!(value(&req, k), v, "{k}");
    }

    // The two that failed, with ztunnel's flags.
    for flag in ["CONNECT", "DENY"] {
        let failed = series(
            &metrics,
            "istio_tcp_connections_failed_total",
            &[
                ("destination_workload", "reviews-v2"),
                ("response_flags", flag),
            ],
        );
        let names: Vec<&str> = failed.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, TCP_LABELS, "istio_tcp_connections_failed_total");
    }

    // ztunnel's own families weft has the same facts for.
    assert!(
        metrics.contains("istio_build{component=\"ztunnel\",tag=\"weft-"),
        "{metrics}"
    );

    // A real ztunnel's series for the same L4 traffic have the same label names.
    let z = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/ztunnel/metrics.txt"
    ))
    .unwrap();
    let zt = series(
        &z,
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination")],
    );
    let znames: Vec<&str> = zt.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(znames, TCP_LABELS, "the recorded ztunnel series");
    s.daemon.stop().await;
    w.daemon.stop().await;
}
