//! Both daemons in network namespaces take their mesh from a test istiod over xDS and their
//! certificates from its CA, and carry HBONE traffic between the nodes. Needs root.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use support::istiod::{FakeIstiod, ADDRESS_TYPE};
use weft::proto::istio::workload as xw;

fn workload(name: &str, ip: Ipv4Addr, node: &str) -> xw::Address {
    xw::Address {
        r#type: Some(xw::address::Type::Workload(xw::Workload {
            uid: format!("Kubernetes//Pod/shop/{name}"),
            name: name.into(),
            namespace: "shop".into(),
            addresses: vec![ip.octets().to_vec()],
            tunnel_protocol: xw::TunnelProtocol::Hbone as i32,
            service_account: name.into(),
            node: node.into(),
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_configured_by_istiod_carry_traffic_between_nodes() {
    if weft_testbed::require().is_none() {
        return;
    }
    let mut bed = weft_testbed::Testbed::new(2).unwrap();
    let a = bed.add_pod(1, "a").unwrap();
    let c = bed.add_pod(2, "c").unwrap();
    // istiod lives on the underlay, reachable from both nodes.
    let istiod_ip = Ipv4Addr::new(172, 18, 0, 254);
    bed.underlay()
        .ip(["addr", "add", "172.18.0.254/24", "dev", "br0"])
        .unwrap();
    let mut istiod = FakeIstiod::new_at(IpAddr::V4(istiod_ip));
    let listener = bed
        .underlay()
        .tcp_listen(SocketAddr::new(IpAddr::V4(istiod_ip), 15012))
        .unwrap();
    istiod.serve_on(listener).await;
    istiod.xds.put(
        ADDRESS_TYPE,
        "Kubernetes//Pod/shop/a",
        &workload("a", a.ip, "node-1"),
    );
    istiod.xds.put(
        ADDRESS_TYPE,
        "Kubernetes//Pod/shop/c",
        &workload("c", c.ip, "node-2"),
    );
    let cp = istiod.control_plane_yaml();
    let mut daemons = Vec::new();
    for n in 1..=2 {
        let cfg = bed.temp_dir().join(format!("w{n}.yaml"));
        std::fs::write(
            &cfg,
            format!("nodeName: node-{n}\nmesh: {{xds: {cp}}}\nca: {{istio: {cp}}}\n"),
        )
        .unwrap();
        let mut cmd = bed
            .node(n)
            .ns
            .command(env!("CARGO_BIN_EXE_weft"), ["run", "--config"]);
        cmd.arg(&cfg);
        daemons.push(bed.spawn(&format!("weft-{n}"), cmd).unwrap());
    }
    for n in 1..=2 {
        let start = Instant::now();
        loop {
            let ns = bed.node(n).ns.clone();
            let r = tokio::task::spawn_blocking(move || {
                ns.http_get("127.0.0.1:15021".parse().unwrap(), "/healthz/ready")
            })
            .await
            .unwrap();
            if matches!(r, Ok((200, _))) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "node-{n} not ready:\n{}",
                daemons[n - 1].log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Both asked the CA for their workload's identity.
    let calls = istiod.ca.calls();
    assert!(calls.len() >= 2, "{} CA calls", calls.len());

    // a -> c across nodes, HBONE, with the identity istiod's CA issued.
    let (a_ns, c_ns) = (a.ns.clone(), c.ns.clone());
    let (a_ip, c_ip) = (a.ip, c.ip);
    let admin2 = bed.node(2).ns.clone();
    let result = tokio::task::spawn_blocking(move || {
        let l = c_ns
            .tcp_listen(SocketAddr::new(IpAddr::V4(c_ip), 8080))
            .unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, peer) = l.accept().unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            s.write_all(b"world").unwrap();
            peer
        });
        let mut s = a_ns
            .tcp_connect(
                SocketAddr::new(IpAddr::V4(c_ip), 8080),
                Duration::from_secs(5),
            )
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"hello").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let conns = admin2
            .http_get("127.0.0.1:15000".parse().unwrap(), "/connections")
            .unwrap()
            .1;
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        (b, server.join().unwrap(), conns, a_ip)
    })
    .await
    .unwrap();
    let (reply, peer, conns, a_ip) = result;
    assert_eq!(&reply, b"world");
    assert_eq!(peer.ip(), IpAddr::V4(a_ip));
    let v: serde_json::Value = serde_json::from_str(&conns).unwrap();
    let inbound = v["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["direction"] == "inbound")
        .cloned()
        .unwrap_or_default();
    assert_eq!(inbound["protocol"], "hbone", "{v}");
    assert_eq!(
        inbound["srcIdentity"], "spiffe://cluster.local/ns/shop/sa/a",
        "{v}"
    );
    drop(daemons);
    istiod.stop().await;
}
