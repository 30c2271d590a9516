//! Envoy waypoints istiod announces (`Service.waypoint`, `Workload.waypoint`), end to end on
//! loopback (no root): a weft daemon configured over xDS by the istiod stand-in, real TLS 1.3
//! and h2 CONNECT, real sockets.
//!
//! Connections are handed to the daemon's outbound handler with their original destination,
//! as TPROXY would (the bench's capture stand-in). A waypoint stand-in, an HBONE server with
//! the waypoint's identity from the daemon's CA, records each CONNECT's `:authority` and the
//! client's SPIFFE identity and echoes the bytes; another stands for the destination node's
//! HBONE port. Recording listeners on the pods' addresses prove what never reached them.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use support::istiod::{FakeIstiod, ADDRESS_TYPE};
use support::*;
use weft::identity::{BuiltinCa, Identity};
use weft::proto::istio::workload as xw;
use weft::proxy::ProxyCtx;
use weft::tls::TlsConfigs;

const LIMIT: Duration = Duration::from_secs(10);
/// The HBONE port the waypoints announce (not weft's 15008, so the announced one is used).
const WAYPOINT_PORT: u16 = 15098;
const BROKEN: &str = "Kubernetes//Pod/shop/broken-0";

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "shop", sa).unwrap()
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn hostname(name: &str) -> String {
    format!("{name}.shop.svc.cluster.local")
}

fn svc_key(name: &str) -> String {
    format!("shop/{}", hostname(name))
}

fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/shop/{name}")
}

fn by_address(ip: IpAddr, port: u32) -> xw::GatewayAddress {
    xw::GatewayAddress {
        destination: Some(xw::gateway_address::Destination::Address(
            xw::NetworkAddress {
                network: String::new(),
                address: octets(ip),
            },
        )),
        hbone_mtls_port: port,
    }
}

fn by_hostname(name: &str) -> xw::GatewayAddress {
    xw::GatewayAddress {
        destination: Some(xw::gateway_address::Destination::Hostname(
            xw::NamespacedHostname {
                namespace: "shop".into(),
                hostname: hostname(name),
            },
        )),
        hbone_mtls_port: u32::from(WAYPOINT_PORT),
    }
}

/// A pod: enrolled (HBONE), backing `service` (its port 9080 → 8080, or 15008 → 15008 for
/// the waypoint's service) if any.
fn workload(
    name: &str,
    sa: &str,
    ip: IpAddr,
    node: &str,
    service: Option<(&str, u32)>,
    waypoint: Option<xw::GatewayAddress>,
) -> xw::Address {
    xw::Address {
        r#type: Some(xw::address::Type::Workload(xw::Workload {
            uid: uid(name),
            name: name.into(),
            namespace: "shop".into(),
            addresses: vec![octets(ip)],
            tunnel_protocol: xw::TunnelProtocol::Hbone as i32,
            service_account: sa.into(),
            node: node.into(),
            services: service
                .map(|(s, port)| {
                    (
                        svc_key(s),
                        xw::PortList {
                            ports: vec![xw::Port {
                                service_port: port,
                                target_port: if port == 9080 { 8080 } else { port },
                            }],
                        },
                    )
                })
                .into_iter()
                .collect(),
            waypoint,
            ..Default::default()
        })),
    }
}

fn service(
    name: &str,
    vip: IpAddr,
    port: u32,
    waypoint: Option<xw::GatewayAddress>,
) -> xw::Address {
    xw::Address {
        r#type: Some(xw::address::Type::Service(xw::Service {
            name: name.into(),
            namespace: "shop".into(),
            hostname: hostname(name),
            addresses: vec![xw::NetworkAddress {
                network: String::new(),
                address: octets(vip),
            }],
            ports: vec![xw::Port {
                service_port: port,
                target_port: if port == 9080 { 8080 } else { port },
            }],
            waypoint,
        })),
    }
}

/// One CONNECT an HBONE stand-in accepted.
#[derive(Clone, Debug, PartialEq)]
struct Connect {
    authority: String,
    client: String,
    forwarded: String,
}

/// An HBONE server on `addr` holding `sa`'s certificate from the daemon's CA: answers every
/// CONNECT 200 and echoes its bytes; records what each asked.
async fn hbone_stand_in(
    ca: &BuiltinCa,
    tls: &TlsConfigs,
    sa: &str,
    addr: SocketAddr,
) -> Arc<Mutex<Vec<Connect>>> {
    let cert = ca.issue(&id(sa), Duration::from_secs(3600)).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server(&cert).unwrap());
    let listener = TcpListener::bind(addr).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let client = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| weft::tls::identity_of(c).unwrap().to_string())
                    .unwrap_or_default();
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    seen.lock().unwrap().push(Connect {
                        authority: req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .unwrap_or_default(),
                        client: client.clone(),
                        forwarded: req
                            .headers()
                            .get("forwarded")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string(),
                    });
                    tokio::spawn(async move {
                        let Ok(mut send) = respond.send_response(http::Response::new(()), false)
                        else {
                            return;
                        };
                        let mut body = req.into_body();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            send.reserve_capacity(chunk.len());
                            if send.send_data(chunk, false).is_err() {
                                return;
                            }
                        }
                        let _ = send.send_data(Bytes::new(), true);
                    });
                }
            });
        }
    });
    out
}

/// A listener on `addr` that counts the connections it accepts (and closes them).
async fn recorder(addr: SocketAddr) -> Arc<Mutex<usize>> {
    let listener = TcpListener::bind(addr).await.unwrap();
    let n = Arc::new(Mutex::new(0));
    let out = n.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            *n.lock().unwrap() += 1;
            drop(s);
        }
    });
    out
}

/// Opens a connection from `src` whose original destination is `dst`, handed to the
/// daemon's outbound handler as TPROXY would.
async fn captured(ctx: &Arc<ProxyCtx>, src: IpAddr, dst: SocketAddr) -> TcpStream {
    let listener = TcpListener::bind(SocketAddr::new(src, 0)).await.unwrap();
    let at = listener.local_addr().unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(src, 0)).unwrap();
    let (client, accepted) = tokio::join!(socket.connect(at), listener.accept());
    let (server, peer) = accepted.unwrap();
    tokio::spawn(weft::proxy::outbound::serve_outbound_to(
        ctx.clone(),
        server,
        peer,
        dst,
    ));
    client.unwrap()
}

/// Sends a line and expects it back.
async fn echoes(mut s: TcpStream) {
    let msg = b"through the waypoint\n";
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(LIMIT, s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&back, msg);
}

/// Expects the connection to be reset. Only reads: a write that met the reset first would
/// take its error, and the read after it would see an end of stream.
async fn is_reset(mut s: TcpStream) {
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(LIMIT, s.read(&mut buf))
        .await
        .expect("an answer in time");
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected a reset, got {r:?}"
    );
}

/// `istio_tcp_connections_failed_total`, summed over its series.
fn failed_total(metrics: SocketAddr) -> f64 {
    let (_, body) = http(metrics, "GET", "/metrics");
    body.lines()
        .filter(|l| l.starts_with("istio_tcp_connections_failed_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn failed_now(metrics: SocketAddr) -> f64 {
    tokio::task::spawn_blocking(move || failed_total(metrics))
        .await
        .unwrap()
}

struct Mesh {
    client: IpAddr,
    waypoint: IpAddr,
    waypoint_vip: IpAddr,
    reviews_vip: IpAddr,
    shipping_vip: IpAddr,
    shipping: IpAddr,
    reviews: IpAddr,
    ratings_vip: IpAddr,
    ratings: IpAddr,
    details: IpAddr,
}

impl Mesh {
    fn new() -> Mesh {
        Mesh {
            client: unique_loopback(),
            waypoint: unique_loopback(),
            waypoint_vip: unique_loopback(),
            reviews_vip: unique_loopback(),
            shipping_vip: unique_loopback(),
            shipping: unique_loopback(),
            reviews: unique_loopback(),
            ratings_vip: unique_loopback(),
            ratings: unique_loopback(),
            details: unique_loopback(),
        }
    }

    /// What istiod announces: the client and the waypoint (behind its service `waypoint`)
    /// here (node-a); on node-b `reviews` (its service's waypoint by hostname, its pod's by
    /// the waypoint pod's address) and `shipping` (its service's by the waypoint service's
    /// VIP); `ratings` behind a
    /// waypoint nothing answers for, `details` behind one no service has the name of; and a
    /// workload whose waypoint is malformed.
    fn publish(&self, istiod: &FakeIstiod) {
        let dead = unique_loopback();
        let put = |name: String, a: xw::Address| istiod.xds.put(ADDRESS_TYPE, &name, &a);
        put(
            uid("productpage-0"),
            workload(
                "productpage-0",
                "productpage",
                self.client,
                "node-a",
                None,
                None,
            ),
        );
        put(
            uid("waypoint-0"),
            workload(
                "waypoint-0",
                "waypoint",
                self.waypoint,
                "node-a",
                Some(("waypoint", 15008)),
                None,
            ),
        );
        put(
            svc_key("waypoint"),
            service("waypoint", self.waypoint_vip, 15008, None),
        );
        put(
            uid("shipping-0"),
            workload(
                "shipping-0",
                "shipping",
                self.shipping,
                "node-b",
                Some(("shipping", 9080)),
                None,
            ),
        );
        put(
            svc_key("shipping"),
            service(
                "shipping",
                self.shipping_vip,
                9080,
                Some(by_address(self.waypoint_vip, u32::from(WAYPOINT_PORT))),
            ),
        );
        put(
            uid("reviews-0"),
            workload(
                "reviews-0",
                "reviews",
                self.reviews,
                "node-b",
                Some(("reviews", 9080)),
                Some(by_address(self.waypoint, u32::from(WAYPOINT_PORT))),
            ),
        );
        put(
            svc_key("reviews"),
            service(
                "reviews",
                self.reviews_vip,
                9080,
                Some(by_hostname("waypoint")),
            ),
        );
        put(
            uid("dead-waypoint-0"),
            workload("dead-waypoint-0", "waypoint", dead, "node-c", None, None),
        );
        put(
            uid("ratings-0"),
            workload(
                "ratings-0",
                "ratings",
                self.ratings,
                "node-b",
                Some(("ratings", 9080)),
                None,
            ),
        );
        put(
            svc_key("ratings"),
            service(
                "ratings",
                self.ratings_vip,
                9080,
                Some(by_address(dead, u32::from(WAYPOINT_PORT))),
            ),
        );
        put(
            uid("details-0"),
            workload(
                "details-0",
                "details",
                self.details,
                "node-b",
                None,
                Some(by_hostname("missing")),
            ),
        );
        put(
            BROKEN.to_string(),
            workload(
                "broken-0",
                "broken",
                unique_loopback(),
                "node-b",
                None,
                Some(by_address(self.waypoint, 0)),
            ),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_to_destinations_behind_an_istiod_announced_waypoint_goes_only_through_it() {
    let mesh = Mesh::new();
    let mut istiod = FakeIstiod::new();
    istiod.serve().await;
    mesh.publish(&istiod);

    let node = NodeDir::new("");
    let ip = node.ip;
    let cp = istiod.control_plane_yaml();
    let path = node.path("weft.yaml");
    std::fs::write(
        &path,
        format!(
            "nodeName: node-a\nmesh: {{xds: {cp}}}\nca: {{builtin: {{dir: ca}}, certTtl: 1h}}\n\
             listen:\n  outbound: {ip}:15001\n  inboundPlaintext: {ip}:15006\n  hbone: {ip}:15008\n  \
             admin: {ip}:15000\n  metrics: {ip}:15020\n  readiness: {ip}:15021\nredirect: none\n"
        ),
    )
    .unwrap();
    let config = weft::config::Config::load(&path, &weft::config::Env::default()).unwrap();
    let daemon = weft::daemon::Daemon::start(config, quiet_log())
        .await
        .unwrap();
    assert!(wait_ready(node.readiness(), Duration::from_secs(15)).await);
    let ctx = daemon.proxy_ctx();

    // The malformed waypoint is refused by the name of its resource; the others apply.
    let nack = tokio::time::timeout(
        LIMIT,
        istiod.xds.wait_for("the NACK of the broken workload", |s| {
            s.request
                .error_detail
                .as_ref()
                .is_some_and(|d| d.message.contains(BROKEN))
        }),
    )
    .await
    .expect("a NACK");
    let message = nack.request.error_detail.unwrap().message;
    assert!(
        message.contains("waypoint.hbone_mtls_port: port 0 is not allowed"),
        "{message}"
    );
    assert!(!message.contains("reviews"), "{message}");
    let snap = ctx.store.snapshot();
    assert!(snap.workload(BROKEN).is_none());
    assert!(snap.workload(&uid("reviews-0")).is_some());

    // The stand-ins: the waypoint, reviews' node's HBONE port, and recorders on the pods'
    // own addresses (and the VIPs) that nothing may reach directly.
    let ca = BuiltinCa::load(&node.path("ca")).unwrap();
    let tls = TlsConfigs::new();
    let at_waypoint = hbone_stand_in(
        &ca,
        &tls,
        "waypoint",
        SocketAddr::new(mesh.waypoint, WAYPOINT_PORT),
    )
    .await;
    let at_reviews_node =
        hbone_stand_in(&ca, &tls, "reviews", SocketAddr::new(mesh.reviews, 15008)).await;
    let reviews_app = recorder(SocketAddr::new(mesh.reviews, 8080)).await;
    let reviews_vip = recorder(SocketAddr::new(mesh.reviews_vip, 9080)).await;
    let mut untouched = vec![reviews_app.clone(), reviews_vip.clone()];
    for addr in [
        SocketAddr::new(mesh.ratings, 8080),
        SocketAddr::new(mesh.ratings, 15008),
        SocketAddr::new(mesh.ratings_vip, 9080),
        SocketAddr::new(mesh.details, 8080),
        SocketAddr::new(mesh.details, 15008),
        SocketAddr::new(mesh.shipping, 8080),
        SocketAddr::new(mesh.shipping, 15008),
        SocketAddr::new(mesh.shipping_vip, 9080),
        SocketAddr::new(mesh.waypoint_vip, WAYPOINT_PORT),
    ] {
        untouched.push(recorder(addr).await);
    }

    // To the Service VIP (waypoint by hostname): the waypoint, asked for VIP:port.
    let vip = SocketAddr::new(mesh.reviews_vip, 9080);
    echoes(captured(&ctx, mesh.client, vip).await).await;
    // To the pod's own address (waypoint by address): the waypoint, asked for the pod.
    let pod = SocketAddr::new(mesh.reviews, 8080);
    echoes(captured(&ctx, mesh.client, pod).await).await;
    // To a Service VIP whose waypoint is named by its own service's VIP: that service's
    // endpoint, asked for the VIP:port called.
    let shipping = SocketAddr::new(mesh.shipping_vip, 9080);
    echoes(captured(&ctx, mesh.client, shipping).await).await;
    let seen = at_waypoint.lock().unwrap().clone();
    let productpage = "spiffe://cluster.local/ns/shop/sa/productpage";
    assert_eq!(
        seen.iter()
            .map(|c| (c.authority.as_str(), c.client.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (vip.to_string().as_str(), productpage),
            (pod.to_string().as_str(), productpage),
            (shipping.to_string().as_str(), productpage)
        ]
    );
    assert!(seen
        .iter()
        .all(|c| c.forwarded.starts_with(&format!("for=\"{}:", mesh.client))));
    assert!(at_reviews_node.lock().unwrap().is_empty());

    // The waypoint's own connections, to the pod and to the VIP, go direct: HBONE to the
    // pod's node, asked for the pod, presenting the waypoint's identity.
    echoes(captured(&ctx, mesh.waypoint, pod).await).await;
    echoes(captured(&ctx, mesh.waypoint, vip).await).await;
    assert_eq!(
        at_waypoint.lock().unwrap().len(),
        3,
        "no more to the waypoint"
    );
    let direct = at_reviews_node.lock().unwrap().clone();
    assert_eq!(
        direct
            .iter()
            .map(|c| (c.authority.as_str(), c.client.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (
                pod.to_string().as_str(),
                "spiffe://cluster.local/ns/shop/sa/waypoint"
            ),
            (
                pod.to_string().as_str(),
                "spiffe://cluster.local/ns/shop/sa/waypoint"
            )
        ]
    );

    // A waypoint nothing answers for (ratings' VIP), and one no service is named like
    // (details' pod): the client is reset, nothing reaches the pod, each failure is counted.
    for dst in [
        SocketAddr::new(mesh.ratings_vip, 9080),
        SocketAddr::new(mesh.details, 8080),
    ] {
        let before = failed_now(node.metrics()).await;
        is_reset(captured(&ctx, mesh.client, dst).await).await;
        let mut counted = before;
        for _ in 0..100 {
            counted = failed_now(node.metrics()).await;
            if counted > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(counted, before + 1.0, "one failure counted for {dst}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (i, n) in untouched.iter().enumerate() {
        assert_eq!(*n.lock().unwrap(), 0, "recorder {i} was reached directly");
    }

    // The config dump shows both waypoints in ztunnel's shape.
    let dump = tokio::task::spawn_blocking({
        let a = node.admin();
        move || get_json(a, "/config_dump")
    })
    .await
    .unwrap();
    let find = |list: &str, key: &str, value: &str| {
        dump[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v[key] == value)
            .unwrap_or_else(|| panic!("{list}: no {key} {value}"))
            .clone()
    };
    assert_eq!(
        find("workloads", "uid", &uid("reviews-0"))["waypoint"],
        serde_json::json!({"destination": format!("/{}", mesh.waypoint), "hboneMtlsPort": WAYPOINT_PORT})
    );
    assert_eq!(
        find("services", "name", "reviews")["waypoint"],
        serde_json::json!({"destination": "shop/waypoint.shop.svc.cluster.local", "hboneMtlsPort": WAYPOINT_PORT})
    );
    assert!(find("workloads", "uid", &uid("productpage-0"))
        .get("waypoint")
        .is_none());

    daemon.stop().await;
    istiod.stop().await;
}
