//! The Istio CA client against an in-process istiod stand-in over TLS on loopback: what it
//! sends, which chains it refuses (the old certificate stays), and a daemon whose CA is down
//! at start becoming ready once it comes up.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use support::istiod::{CaMode, FakeIstiod, CLUSTER_ID, TOKEN};
use support::*;
use tokio::sync::watch;
use weft::identity::{CertManager, CertificateAuthority, Identity, IstioCa};

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "shop", sa).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_issued_for_the_impersonated_identity_with_istiods_credentials() {
    let istiod = FakeIstiod::start().await;
    let ca = IstioCa::new(istiod.control_plane()).unwrap();
    let cert = ca
        .issue(&id("cart"), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(cert.identity, id("cart"));
    assert_eq!(cert.chain_der.len(), 1, "the leaf; the root travels apart");
    assert_eq!(
        weft::tls::identity_of(&cert.chain_der[0]).unwrap(),
        id("cart")
    );
    let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
    assert!(lifetime >= Duration::from_secs(3600), "{lifetime:?}");
    // The key we hold is the leaf's: rustls accepts the pair.
    rustls::sign::CertifiedKey::from_der(
        cert.chain_der.clone(),
        cert.key_der(),
        &weft::tls::provider(),
    )
    .expect("key matches the leaf");

    let calls = istiod.ca.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(
        call.impersonated.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/cart")
    );
    assert_eq!(call.validity_seconds, 3600);
    assert_eq!(
        call.authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(call.cluster_id.as_deref(), Some(CLUSTER_ID));
    // The certificate brings the root of the response's last entry (here the same root as
    // rootCertFile's), which its connections trust.
    let root: Vec<_> = rustls_pemfile::certs(&mut istiod.root_pem().as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(cert.roots, root);
    assert_eq!(ca.roots_der(), root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_untrusted_and_garbage_chains_are_each_refused() {
    let istiod = FakeIstiod::start().await;
    let ca = IstioCa::new(istiod.control_plane()).unwrap();
    for (mode, needle) in [
        (
            CaMode::WrongIdentity,
            "spiffe://cluster.local/ns/evil/sa/impostor",
        ),
        (CaMode::UnrootedLeaf, "does not lead to a trusted root"),
        (CaMode::NoRoot, "has 1 entry, so no root"),
        (CaMode::Garbage, "not valid X.509"),
    ] {
        istiod.ca.set_mode(mode);
        let e = ca
            .issue(&id("cart"), Duration::from_secs(600))
            .await
            .expect_err("refused")
            .to_string();
        assert!(e.contains("unusable chain"), "{mode:?}: {e}");
        assert!(e.contains(needle), "{mode:?}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_renewals_keep_the_old_certificate_until_a_good_one_arrives() {
    let istiod = FakeIstiod::start().await;
    let ca = Arc::new(IstioCa::new(istiod.control_plane()).unwrap());
    // 4 s certificates: the first renewal is due after about 2 s.
    let manager = CertManager::new(ca, Duration::from_secs(4));
    let (_wanted, wanted_rx) = watch::channel(BTreeSet::from([id("cart")]));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let driver = manager.run(wanted_rx, shutdown_rx);
    let first = eventually(Duration::from_secs(10), || manager.get(&id("cart")))
        .await
        .expect("first certificate");

    let mut calls = 1;
    for mode in [CaMode::WrongIdentity, CaMode::UnrootedLeaf, CaMode::Garbage] {
        istiod.ca.set_mode(mode);
        calls += 1;
        istiod
            .ca
            .wait_for_calls(calls, Duration::from_secs(15))
            .await;
        // The refusal is counted once the call returns (the first call was the good one).
        let refused = (calls - 1) as u64;
        eventually(Duration::from_secs(5), || {
            (manager.renewals_failed() >= refused).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("{mode:?} was not refused"));
        let serving = manager.get(&id("cart")).expect("still has a certificate");
        assert_eq!(
            serving.serial_hex, first.serial_hex,
            "{mode:?} replaced the certificate"
        );
    }
    eventually(Duration::from_secs(5), || {
        (manager.renewals_failed() >= 3).then_some(())
    })
    .await
    .expect("three refusals counted");
    istiod.ca.set_mode(CaMode::Good);
    let renewed = eventually(Duration::from_secs(15), || {
        manager
            .get(&id("cart"))
            .filter(|c| c.serial_hex != first.serial_hex)
    })
    .await
    .expect("renewed once the CA behaves");
    assert_eq!(renewed.identity, id("cart"));
    shutdown.send_replace(true);
    driver.await.unwrap();
}

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-0, namespace: shop, labels: {app: cart}}
spec: {serviceAccountName: cart, nodeName: node-1}
status: {podIP: 10.1.0.5}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_whose_ca_is_down_at_start_becomes_ready_when_it_comes_up() {
    let mut istiod = FakeIstiod::new();
    let node = NodeDir::new(MESH);
    let ip = node.ip;
    let text = format!(
        "nodeName: node-1\nmesh: {{file: mesh.yaml}}\nca: {{istio: {}, certTtl: 1h}}\n\
         listen:\n  outbound: {ip}:15001\n  inboundPlaintext: {ip}:15006\n  hbone: {ip}:15008\n  \
         admin: {ip}:15000\n  metrics: {ip}:15020\n  readiness: {ip}:15021\nredirect: none\n",
        istiod.control_plane_yaml()
    );
    let path = node.path("weft.yaml");
    std::fs::write(&path, text).unwrap();
    let config = weft::config::Config::load(&path, &weft::config::Env::default()).unwrap();
    let daemon = weft::daemon::Daemon::start(config, quiet_log())
        .await
        .unwrap();

    // The mesh loads, but the one local identity has no certificate: not ready.
    assert!(!wait_ready(node.readiness(), Duration::from_secs(2)).await);
    assert!(daemon.store.loaded());
    assert!(
        daemon.certs.renewals_failed() >= 1,
        "issuance was attempted and failed"
    );
    let (status, body) = tokio::task::spawn_blocking({
        let a = node.readiness();
        move || http(a, "GET", "/healthz/ready")
    })
    .await
    .unwrap();
    assert_eq!(status, 503, "{body}");

    istiod.serve().await;
    assert!(
        wait_ready(node.readiness(), Duration::from_secs(20)).await,
        "not ready after the CA came up"
    );
    let cert = daemon.certs.get(&id("cart")).expect("certificate");
    assert_eq!(cert.chain_der.len(), 1);
    assert!(!istiod.ca.calls().is_empty());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_in_istiod_mode_syncs_over_xds_and_gets_its_certificates_from_istio() {
    use support::istiod::ADDRESS_TYPE;
    use weft::proto::istio::workload as xw;
    let istiod = FakeIstiod::start().await;
    let uid = "Kubernetes//Pod/shop/cart-0";
    istiod.xds.put(
        ADDRESS_TYPE,
        uid,
        &xw::Address {
            r#type: Some(xw::address::Type::Workload(xw::Workload {
                uid: uid.into(),
                name: "cart-0".into(),
                namespace: "shop".into(),
                addresses: vec![vec![10, 1, 0, 5]],
                tunnel_protocol: xw::TunnelProtocol::Hbone as i32,
                service_account: "cart".into(),
                node: "node-1".into(),
                ..Default::default()
            })),
        },
    );
    let node = NodeDir::new(MESH);
    let ip = node.ip;
    let cp = istiod.control_plane_yaml();
    let text = format!(
        "nodeName: node-1\nmesh: {{xds: {cp}}}\nca: {{istio: {cp}, certTtl: 1h}}\n\
         listen:\n  outbound: {ip}:15001\n  inboundPlaintext: {ip}:15006\n  hbone: {ip}:15008\n  \
         admin: {ip}:15000\n  metrics: {ip}:15020\n  readiness: {ip}:15021\nredirect: none\n"
    );
    let path = node.path("weft.yaml");
    std::fs::write(&path, text).unwrap();
    let config = weft::config::Config::load(&path, &weft::config::Env::default()).unwrap();
    let daemon = weft::daemon::Daemon::start(config, quiet_log())
        .await
        .unwrap();
    assert!(wait_ready(node.readiness(), Duration::from_secs(15)).await);
    let dump = tokio::task::spawn_blocking({
        let a = node.admin();
        move || get_json(a, "/config_dump")
    })
    .await
    .unwrap();
    assert_eq!(dump["workloads"][0]["uid"], uid);
    assert_eq!(
        dump["certificates"][0]["identity"],
        "spiffe://cluster.local/ns/shop/sa/cart"
    );
    daemon.stop().await;
}

/// The keepalive enforcer in front of istiod: (istiod, enforcer, a control plane that goes
/// through the enforcer and pings every `interval` while a stream is open).
async fn istiod_enforcing_keepalive(
    interval: Duration,
    min_time: Duration,
) -> (
    FakeIstiod,
    support::grpc_keepalive::KeepaliveEnforcer,
    weft::config::ControlPlane,
) {
    let istiod = FakeIstiod::start().await;
    let listen = std::net::SocketAddr::new(istiod.addr.ip(), istiod.addr.port() + 1);
    let enforcer = support::grpc_keepalive::KeepaliveEnforcer::start(
        listen,
        istiod.serving_identity(),
        istiod.addr,
        &istiod.root_pem(),
        min_time,
    )
    .await;
    let mut cp = istiod.control_plane();
    cp.address = format!("https://{listen}");
    cp.keepalive = interval;
    (istiod, enforcer, cp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keepalive_stand_in_sends_goaway_on_the_third_idle_ping_strike() {
    use std::sync::atomic::Ordering;
    let (istiod, enforcer, _) =
        istiod_enforcing_keepalive(Duration::from_secs(1), Duration::from_millis(100)).await;
    // A bare h2 client over TLS that pings with no stream open.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut istiod.root_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(weft::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(enforcer.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(enforcer.addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (_client, mut conn) = h2::client::handshake(tls).await.unwrap();
    let mut pings = conn.ping_pong().unwrap();
    let conn = tokio::spawn(conn);
    // The first ping is no strike; the second, third and fourth are (no stream, < 2 h).
    for n in 1..=3 {
        tokio::time::timeout(Duration::from_secs(5), pings.ping(h2::Ping::opaque()))
            .await
            .unwrap_or_else(|_| panic!("ping {n} unanswered"))
            .unwrap_or_else(|e| panic!("ping {n}: {e}"));
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), pings.ping(h2::Ping::opaque())).await;
    let end = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("connection closed by the GOAWAY")
        .unwrap();
    let e = end.expect_err("closed with an error");
    assert_eq!(e.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{e}");
    assert_eq!(enforcer.seen.goaways.load(Ordering::Relaxed), 1);
    assert_eq!(enforcer.seen.strikes.load(Ordering::Relaxed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_ca_channel_is_not_pinged_and_keeps_its_connection() {
    use std::sync::atomic::Ordering;
    // istiod's policy scaled down 150 times: pings every 200 ms while a stream is open,
    // MinTime 100 ms. Idle for 3 s, a pinging client would take its GOAWAY after 4 pings.
    let (_istiod, enforcer, cp) =
        istiod_enforcing_keepalive(Duration::from_millis(200), Duration::from_millis(100)).await;
    let ca = IstioCa::new(cp).unwrap();
    ca.issue(&id("cart"), Duration::from_secs(600))
        .await
        .expect("first certificate");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = &enforcer.seen;
    assert_eq!(
        seen.idle_pings.load(Ordering::Relaxed),
        0,
        "pinged while idle"
    );
    assert_eq!(seen.goaways.load(Ordering::Relaxed), 0);
    ca.issue(&id("cart"), Duration::from_secs(600))
        .await
        .expect("second certificate, on the same channel");
    assert_eq!(seen.connections.load(Ordering::Relaxed), 1, "reconnected");
    assert_eq!(seen.goaways.load(Ordering::Relaxed), 0);
}

/// A TLS handshake between weft's configs for `client` (expecting `server`'s identity) and
/// for `server`, over an in-memory pipe: Ok, or which side refused and why.
async fn handshake(
    tls: &weft::tls::TlsConfigs,
    client: &weft::identity::IssuedCert,
    server: &weft::identity::IssuedCert,
) -> Result<(), String> {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let connector = tokio_rustls::TlsConnector::from(tls.client(client, &server.identity).unwrap());
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server(server).unwrap());
    let name = rustls::pki_types::ServerName::try_from("peer").unwrap();
    let (c, s) = tokio::join!(connector.connect(name, c), async move {
        let mut s = acceptor.accept(s).await?;
        // The client's certificate is judged on the server's side: read until then.
        tokio::io::AsyncWriteExt::write_all(&mut s, b"x").await?;
        tokio::io::AsyncWriteExt::flush(&mut s).await?;
        Ok::<_, std::io::Error>(s)
    });
    let mut c = c.map_err(|e| format!("client refused: {e}"))?;
    s.map_err(|e| format!("server refused: {e}"))?;
    let mut byte = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut c, &mut byte)
        .await
        .map_err(|e| format!("client saw: {e}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotated_at_the_ca_reaches_new_connections_without_a_restart() {
    let istiod = FakeIstiod::start().await;
    let ca = Arc::new(IstioCa::new(istiod.control_plane()).unwrap());
    // 4 s certificates: a renewal about every 2 s.
    let manager = CertManager::new(ca.clone(), Duration::from_secs(4));
    let (_wanted, wanted_rx) = watch::channel(BTreeSet::from([id("cart")]));
    let (_shutdown, shutdown_rx) = watch::channel(false);
    let _driver = manager.run(wanted_rx, shutdown_rx);
    let tls = weft::tls::TlsConfigs::new();
    // Peers from either root, each trusting both (so only weft's trust is tested).
    let (old_dir, new_dir) = (istiod.plugin_ca_dir(true), istiod.plugin_ca_dir(false));
    let day = Duration::from_secs(86_400);
    let old_peer = weft::identity::BuiltinCa::load(old_dir.path())
        .unwrap()
        .issue(&id("peer"), day)
        .unwrap();
    let new_peer = weft::identity::BuiltinCa::load(new_dir.path())
        .unwrap()
        .issue(&id("peer"), day)
        .unwrap();
    // Both directions: weft's client verifying the peer, the peer's client verified by
    // weft's server.
    let both_ways = |cert: Arc<weft::identity::IssuedCert>, peer: &weft::identity::IssuedCert| {
        let (tls, peer) = (&tls, peer.clone());
        async move {
            let out = handshake(tls, &cert, &peer).await;
            let inn = handshake(tls, &peer, &cert).await;
            (out, inn)
        }
    };
    let renewed = |after: String| {
        let manager = manager.clone();
        async move {
            eventually(Duration::from_secs(15), || {
                manager.get(&id("cart")).filter(|c| c.serial_hex != after)
            })
            .await
            .expect("renewed")
        }
    };

    let first = eventually(Duration::from_secs(10), || manager.get(&id("cart")))
        .await
        .expect("first certificate");
    let (out, inn) = both_ways(first.clone(), &old_peer).await;
    assert!(out.is_ok() && inn.is_ok(), "old root: {out:?} {inn:?}");
    let (out, inn) = both_ways(first.clone(), &new_peer).await;
    assert!(
        out.is_err() && inn.is_err(),
        "new root trusted too early: {out:?} {inn:?}"
    );

    // The CA starts the rotation: the next certificate brings both roots.
    istiod.ca.set_mode(CaMode::Rotating);
    let rotating = renewed(first.serial_hex.clone()).await;
    let rotating = if rotating.roots.len() == 2 {
        rotating
    } else {
        // A renewal already under way when the mode changed still had the old root.
        renewed(rotating.serial_hex.clone()).await
    };
    assert_eq!(rotating.roots.len(), 2);
    for peer in [&old_peer, &new_peer] {
        let (out, inn) = both_ways(rotating.clone(), peer).await;
        assert!(
            out.is_ok() && inn.is_ok(),
            "during the rotation: {out:?} {inn:?}"
        );
    }
    // A config built for the first certificate keeps its roots (live connections do too).
    assert!(handshake(&tls, &first, &new_peer).await.is_err());

    // The rotation done: the old root is no longer trusted by new connections.
    istiod.ca.set_mode(CaMode::Rotated);
    let mut rotated = renewed(rotating.serial_hex.clone()).await;
    while rotated.roots.len() != 1 {
        rotated = renewed(rotated.serial_hex.clone()).await;
    }
    let (out, inn) = both_ways(rotated.clone(), &new_peer).await;
    assert!(out.is_ok() && inn.is_ok(), "new root: {out:?} {inn:?}");
    let (out, inn) = both_ways(rotated.clone(), &old_peer).await;
    assert!(
        out.is_err() && inn.is_err(),
        "old root still trusted: {out:?} {inn:?}"
    );
    assert!(manager.renewals_failed() == 0);
}
