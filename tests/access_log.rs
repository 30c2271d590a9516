//! The access log out of the node: a weft daemon running as its own process on loopback
//! (`--log-format json`), traffic through it as a mesh client over real HBONE, and
//!
//! - the contract: every access-log event (connection closed, connection denied, live
//!   connection closed, waypoint request) carries the fields README.md documents for it, on
//!   stderr;
//! - OTLP export: the same events reach an OTLP collector stand-in with those fields as
//!   attributes, the message as body, and the resource naming weft and the node;
//! - a collector that never answers: traffic keeps flowing at normal latency and the records
//!   the full queue could not take are counted on `/metrics`.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use support::*;
use weft::identity::Identity;
use weft::logging::access::{fields_of, message};
use weft::proxy::pool::{Pool, PoolKey, Tunnel};
use weft::proxy::socket::SocketMode;
use weft::tls::TlsConfigs;

const ECHO_PORT: u16 = 7070;
const DENIED_PORT: u16 = 7071;
const HTTP_PORT: u16 = 7072;

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "mesh", sa).unwrap()
}

// === the OTLP collector stand-in ===

/// An OpenTelemetry Collector's OTLP/gRPC logs receiver, as far as weft's exporter sees it.
///
/// Emulates: the unary `opentelemetry.proto.collector.logs.v1.LogsService/Export` over
/// plaintext HTTP/2 (the collector's `otlp` receiver, `grpc` protocol, port 4317 by
/// default), answering every request with an empty `ExportLogsServiceResponse` (full
/// success, no `partial_success`), as the collector does once it has queued the records.
/// Keeps every request it took.
///
/// Does not emulate: TLS, authentication, compression, partial success, throttling
/// (`RESOURCE_EXHAUSTED` with retry info), the HTTP transport, or any other signal.
#[derive(Clone, Default)]
struct Collector {
    requests: Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
}

#[tonic::async_trait]
impl LogsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves on a free loopback port; returns the stand-in and its address.
    async fn start() -> (Collector, SocketAddr) {
        let listener = TcpListener::bind((unique_loopback(), 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let c = Collector::default();
        let service = LogsServiceServer::new(c.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        (c, addr)
    }

    /// Every record received so far: (resource attributes, body, attributes).
    fn records(&self) -> Vec<Record> {
        let mut out = Vec::new();
        for req in self.requests.lock().unwrap().iter() {
            for rl in &req.resource_logs {
                let resource = rl
                    .resource
                    .as_ref()
                    .map(|r| attributes(&r.attributes))
                    .unwrap_or_default();
                for sl in &rl.scope_logs {
                    for lr in &sl.log_records {
                        out.push(Record {
                            resource: resource.clone(),
                            body: lr.body.as_ref().map(text).unwrap_or_default(),
                            attributes: attributes(&lr.attributes),
                        });
                    }
                }
            }
        }
        out
    }
}

/// One OTLP log record, its values as text.
#[derive(Debug)]
struct Record {
    resource: BTreeMap<String, String>,
    body: String,
    attributes: BTreeMap<String, String>,
}

fn text(v: &opentelemetry_proto::tonic::common::v1::AnyValue) -> String {
    match &v.value {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(text).unwrap_or_default(),
            )
        })
        .collect()
}

// === a weft process and the traffic through it ===

use support::process::WeftProcess as Weft;

const DENY_PORT_POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
     metadata: {name: no-7071, namespace: mesh}\n\
     spec: {selector: {matchLabels: {app: server}}, action: DENY, rules: [{to: [{operation: {ports: [\"7071\"]}}]}]}\n";

const DENY_ALL_TO_SERVER: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
     metadata: {name: server-closed, namespace: mesh}\n\
     spec: {selector: {matchLabels: {app: server}}, action: DENY, rules: [{}]}\n";

/// The mesh: `server-0` (labelled `server_labels`) at the node's own address and
/// `client-0` (on another node) at theirs, and the `extra` documents.
fn mesh((server_ip, client_ip): (IpAddr, IpAddr), server_labels: &str, extra: &[&str]) -> String {
    let mut docs = vec![
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}\n".to_string(),
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: server-0, namespace: mesh, labels: {{{server_labels}}}}}\nspec: {{nodeName: node-b, serviceAccountName: server}}\nstatus: {{podIP: {server_ip}}}\n"),
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: client-0, namespace: mesh}}\nspec: {{nodeName: node-a, serviceAccountName: client}}\nstatus: {{podIP: {client_ip}}}\n"),
    ];
    docs.extend(extra.iter().map(|s| s.to_string()));
    docs.join("---\n")
}

const L4: &str = "app: server";
const BEHIND_WAYPOINT: &str = "app: server, istio.io/use-waypoint: weft";

impl Weft {
    /// Starts weft with `config_extra` added to its config, and its apps; waits until ready.
    async fn with_apps(config_extra: &str) -> Weft {
        let node = NodeDir::new("");
        let client_ip = unique_loopback();
        std::fs::write(
            node.mesh_path(),
            mesh((node.ip, client_ip), L4, &[DENY_PORT_POLICY]),
        )
        .unwrap();
        let json = ["--log-format", "json"];
        let w = Weft::start(node, client_ip, &id("client"), &json, config_extra).await;
        echo_app(TcpListener::bind((w.node.ip, ECHO_PORT)).await.unwrap());
        echo_app(TcpListener::bind((w.node.ip, DENIED_PORT)).await.unwrap());
        http_app(TcpListener::bind((w.node.ip, HTTP_PORT)).await.unwrap());
        w
    }

    /// The access-log lines on stderr so far, parsed.
    fn access_lines(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect()
    }

    /// A counter's value on `/metrics`.
    fn metric(&self, name: &str) -> f64 {
        let (_, text) = http(self.node.metrics(), "GET", "/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }

    fn pool(&self) -> Arc<Pool> {
        let tls = Arc::new(TlsConfigs::new());
        Pool::new(
            tls,
            SocketMode::Plain,
            15008,
            weft::proxy::socket::Keepalive::default(),
        )
    }

    /// A tunnel from the client to `dst`, a pod of this node. Every tunnel goes to the
    /// node's one HBONE address (`server-0`'s, on loopback), which proves `server-0`'s
    /// identity; the CONNECT names the pod.
    async fn tunnel(
        &self,
        pool: &Arc<Pool>,
        dst: SocketAddr,
    ) -> Result<Tunnel, weft::proxy::pool::TunnelError> {
        let key = PoolKey {
            src: id("client"),
            dst: id("server"),
            dst_ip: self.node.ip,
            dst_port: 15008,
        };
        pool.tunnel(
            &key,
            &self.cert,
            dst,
            SocketAddr::new(self.client_ip, 40000),
        )
        .await
    }

    /// One exchange with the echo app, through weft.
    async fn echo(&self, pool: &Arc<Pool>) -> Tunnel {
        let mut t = self
            .tunnel(pool, SocketAddr::new(self.node.ip, ECHO_PORT))
            .await
            .unwrap();
        t.io.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        t.io.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
        t
    }

    /// One connection of each access-log event: an echo (closed), a denied port, a live
    /// connection that a new policy closes, then, with `server-0` behind the waypoint, a
    /// request.
    async fn every_event(&self) {
        let pool = self.pool();
        let ips = (self.node.ip, self.client_ip);
        // A clean close: half-close, the echo app closes too.
        let mut t = self.echo(&pool).await;
        t.io.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), t.io.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        drop(t);
        // Denied: the stream is refused.
        let denied = self
            .tunnel(&pool, SocketAddr::new(self.node.ip, DENIED_PORT))
            .await;
        assert!(denied.is_err(), "port {DENIED_PORT} was not denied");
        // A live connection, then a policy that denies it.
        let mut live = self.echo(&pool).await;
        self.node
            .write_mesh(&mesh(ips, L4, &[DENY_PORT_POLICY, DENY_ALL_TO_SERVER]));
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(10), live.io.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "the live connection was not closed: {closed:?}"
        );
        // Behind the waypoint (once the new mesh is in force), a request.
        self.node
            .write_mesh(&mesh(ips, BEHIND_WAYPOINT, &[DENY_PORT_POLICY]));
        let started = Instant::now();
        loop {
            match self.request(&pool).await {
                Some(answer) if answer.starts_with("HTTP/1.1 200") => break,
                answer => assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "no request through the waypoint: {answer:?}\n{}",
                    self.log()
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /hello` to the HTTP app; the answer's text, or `None` if the tunnel was refused.
    async fn request(&self, pool: &Arc<Pool>) -> Option<String> {
        let mut t = self
            .tunnel(pool, SocketAddr::new(self.node.ip, HTTP_PORT))
            .await
            .ok()?;
        t.io.write_all(b"GET /hello HTTP/1.1\r\nHost: server.mesh\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), t.io.read_to_end(&mut answer))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&answer).into_owned())
    }
}

/// Waits until `f` finds what it looks for in the daemon's output, or fails with the log.
async fn until<T>(w: &Weft, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    match eventually(Duration::from_secs(15), &mut f).await {
        Some(v) => v,
        None => panic!("{what} never seen; weft's log:\n{}", w.log()),
    }
}

const EVENTS: [&str; 4] = [
    message::CONNECTION_CLOSED,
    message::CONNECTION_DENIED,
    message::LIVE_CONNECTION_CLOSED,
    message::REQUEST,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_access_log_event_carries_its_documented_fields() {
    let w = Weft::with_apps("").await;
    w.every_event().await;
    let lines = until(&w, "every access-log event", || {
        let lines = w.access_lines();
        EVENTS
            .iter()
            .all(|m| lines.iter().any(|l| l["message"] == *m))
            .then_some(lines)
    })
    .await;
    let client = id("client").to_string();
    for m in EVENTS {
        let fields = fields_of(m).unwrap();
        for line in lines.iter().filter(|l| l["message"] == m) {
            for f in &fields {
                assert!(line.get(f).is_some(), "{m:?} lacks {f:?}: {line}");
            }
            // The facts every event states.
            assert_eq!(line["direction"], "inbound", "{line}");
            assert_eq!(line["src.identity"], client.as_str(), "{line}");
            let src = line["src.addr"].as_str().unwrap();
            assert!(src.starts_with(&format!("{}:", w.client_ip)), "{line}");
            assert_eq!(line["src.workload"], "client-0", "{line}");
            assert_eq!(line["src.namespace"], "mesh", "{line}");
            assert_eq!(line["dst.namespace"], "mesh", "{line}");
        }
    }
    let closed = lines
        .iter()
        .find(|l| l["message"] == message::CONNECTION_CLOSED && l["dst.workload"] == "server-0")
        .unwrap();
    assert_eq!(closed["protocol"], "hbone", "{closed}");
    assert_eq!(closed["bytes_recv"], 4, "{closed}");
    assert_eq!(closed["bytes_sent"], 4, "{closed}");
    assert_eq!(closed["error"], "", "{closed}");
    assert_eq!(
        closed["dst.identity"],
        id("server").to_string().as_str(),
        "{closed}"
    );
    assert!(closed["duration_ms"].as_f64().is_some(), "{closed}");
    let denied = lines
        .iter()
        .find(|l| l["message"] == message::CONNECTION_DENIED)
        .unwrap();
    assert_eq!(denied["policy"], "mesh/no-7071", "{denied}");
    assert_eq!(denied["reason"], "policy", "{denied}");
    let live = lines
        .iter()
        .find(|l| l["message"] == message::LIVE_CONNECTION_CLOSED)
        .unwrap();
    assert_eq!(live["policy"], "mesh/server-closed", "{live}");
    assert_eq!(live["bytes_recv"], 4, "{live}");
    let request = lines
        .iter()
        .find(|l| l["message"] == message::REQUEST)
        .unwrap();
    assert_eq!(request["status"], 200, "{request}");
    assert_eq!(request["path"], "/hello", "{request}");
    assert_eq!(request["dst.workload"], "server-0", "{request}");
    assert_eq!(request["protocol"], "http", "{request}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_records_reach_an_otlp_collector_with_the_documented_fields() {
    let (collector, addr) = Collector::start().await;
    let w = Weft::with_apps(&format!(
        "accessLog:\n  otlp: {{endpoint: 'http://{addr}', exportInterval: 100ms}}\n"
    ))
    .await;
    w.every_event().await;
    let records = until(&w, "every event at the collector", || {
        let records = collector.records();
        EVENTS
            .iter()
            .all(|m| records.iter().any(|r| r.body == *m))
            .then_some(records)
    })
    .await;
    for r in &records {
        assert_eq!(r.resource["service.name"], "weft", "{r:?}");
        assert_eq!(r.resource["k8s.node.name"], "node-b", "{r:?}");
        let fields = fields_of(&r.body).unwrap_or_else(|| panic!("not an access event: {r:?}"));
        for f in fields {
            assert!(
                r.attributes.contains_key(f),
                "{:?} lacks {f:?}: {r:?}",
                r.body
            );
        }
        assert_eq!(r.attributes["src.identity"], id("client").to_string());
    }
    let closed = records
        .iter()
        .find(|r| {
            r.body == message::CONNECTION_CLOSED && r.attributes["dst.workload"] == "server-0"
        })
        .unwrap();
    assert_eq!(closed.attributes["bytes_recv"], "4", "{closed:?}");
    // The stderr access log goes on as before.
    let stderr = w.access_lines();
    assert!(
        EVENTS
            .iter()
            .all(|m| stderr.iter().any(|l| l["message"] == *m)),
        "{}",
        w.log()
    );
    let exported = until(&w, "the exported counter", || {
        let n = w.metric("weft_access_log_records_exported_total");
        (n >= records.len() as f64).then_some(n)
    })
    .await;
    assert!(exported >= 4.0);
    assert_eq!(w.metric("weft_access_log_records_dropped_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_costs_the_data_path_nothing_and_drops_are_counted() {
    // Accepts connections and never reads or answers: every export waits for its timeout.
    // A connection that waited on an export would wait its 5 s timeout; normal ones take
    // milliseconds, so 2 s tells them apart even on a loaded machine.
    let hang = std::net::TcpListener::bind((unique_loopback(), 0)).unwrap();
    let addr = hang.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    {
        let held = held.clone();
        std::thread::spawn(move || {
            for s in hang.incoming().flatten() {
                held.lock().unwrap().push(s);
            }
        });
    }
    let w = Weft::with_apps(&format!(
        "accessLog:\n  otlp: {{endpoint: 'http://{addr}', queueSize: 8, batchSize: 4, exportInterval: 50ms, timeout: 5s}}\n"
    ))
    .await;
    let pool = w.pool();
    // Warm the pool: the handshake is not what is measured.
    drop(w.echo(&pool).await);
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    for _ in 0..200 {
        let t0 = Instant::now();
        drop(w.echo(&pool).await);
        slowest = slowest.max(t0.elapsed());
    }
    let total = started.elapsed();
    eprintln!("200 connections in {total:?}, slowest {slowest:?}");
    assert!(
        slowest < Duration::from_secs(2),
        "a connection waited on the collector: {slowest:?}"
    );
    assert!(total < Duration::from_secs(20), "{total:?}");
    // 200 records, a queue of 8 and exports that each wait 5 s: most were dropped.
    let dropped = until(&w, "drops on /metrics", || {
        let n = w.metric("weft_access_log_records_dropped_total");
        (n >= 100.0).then_some(n)
    })
    .await;
    eprintln!("dropped {dropped}");
    assert_eq!(w.metric("weft_access_log_records_exported_total"), 0.0);
    // stderr still has every line.
    let closed = w
        .access_lines()
        .iter()
        .filter(|l| l["message"] == message::CONNECTION_CLOSED)
        .count();
    assert!(closed >= 200, "{closed} connection-closed lines");
}
