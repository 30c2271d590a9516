//! The micro benchmarks: state (parsing and publishing a large mesh), policy decisions,
//! crypto (handshakes, certificates) and JWT verification, each beside a baseline.
//!
//! Owns the micro cases only; no sockets between daemons.

use super::*;

pub(crate) fn mesh_text(workloads: usize) -> String {
    let mut y = String::with_capacity(workloads * 220);
    y.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: big, labels: {istio.io/dataplane-mode: ambient}}\n");
    for i in 0..workloads {
        let ip = Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1);
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: big, labels: {{app: a{}}}}}\nspec: {{nodeName: node-{}, serviceAccountName: sa{}}}\nstatus: {{podIP: {ip}}}\n",
            i % 100,
            i % 50,
            i % 100
        ));
    }
    y
}

/// A copy of `w` whose uid and name (its own, not interned) are new allocations.
fn own_strings(w: &weft::model::Workload) -> weft::model::Workload {
    use weft::model::ArcStr;
    let name = ArcStr::from(w.name.as_str());
    let workload_name = if ArcStr::ptr_eq(&w.workload_name, &w.name) {
        name.clone()
    } else {
        w.workload_name.clone()
    };
    weft::model::Workload {
        uid: ArcStr::from(w.uid.as_str()),
        name,
        workload_name,
        ..w.clone()
    }
}

pub(crate) fn run_state(sz: Sizes, report: &mut Report) {
    for n in sz.workloads {
        // Text and parse on another thread: glibc gives it its own arena, so the memory they
        // free is not reused below and the RSS delta is the snapshot's own.
        let (parsed, parse) = std::thread::spawn(move || {
            let text = mesh_text(n);
            let t = Instant::now();
            let parsed = weft::source::file::parse_mesh("bench.yaml", &text).unwrap();
            (parsed, t.elapsed())
        })
        .join()
        .unwrap();
        let before = self_rss();
        // The snapshot gets its own copy of every workload (the parsed mesh shares them
        // otherwise), with its own copy of each workload's own strings (a clone would share
        // them, and they were allocated before the reading above); the strings workloads
        // share through `model::intern` stay shared, as in the daemon.
        let mut mesh = parsed.mesh.clone();
        mesh.workloads = mesh
            .workloads
            .values()
            .map(|w| {
                let w = own_strings(w);
                (w.uid.clone(), Arc::new(w))
            })
            .collect();
        let data = self_rss();
        let store = weft::state::StateStore::new("bench");
        let t = Instant::now();
        store.publish(mesh, vec![]);
        let publish = t.elapsed();
        let after = self_rss();
        drop(parsed);
        let per = |bytes: u64| bytes as f64 / n as f64;
        report.add(
            format!("state memory per workload, {n}"),
            "in-proc",
            per(after.saturating_sub(before)),
            None,
            "bytes",
            format!(
                "RSS delta of one indexed snapshot: workloads {:.0}, mesh and indexes {:.0}",
                per(data.saturating_sub(before)),
                per(after.saturating_sub(data))
            ),
        );
        // One change: a pod's labels, applied the way a source applies it (one edit on the
        // snapshot in force; earlier snapshots stay valid for their readers). The median of
        // several, different pods each time: the first after the drop above also pays the
        // allocator's consolidation of the freed parse.
        let mut times: Vec<f64> = (0..21)
            .map(|i| {
                let uid = format!("Kubernetes//Pod/big/p{}", n / 2 + i);
                let t = Instant::now();
                let mut w =
                    weft::model::Workload::clone(&store.snapshot().mesh.workloads[uid.as_str()]);
                w.labels.insert("version".into(), "v2".into());
                store.apply([weft::state::Edit::UpsertWorkload(w)]);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        report.add(
            format!("apply one change, {n} workloads"),
            "in-proc",
            times[times.len() / 2],
            None,
            "ms",
            format!(
                "median of {}, max {:.2} ms; full file parse: {:.0} ms, full publish: {:.0} ms",
                times.len(),
                times[times.len() - 1],
                parse.as_secs_f64() * 1e3,
                publish.as_secs_f64() * 1e3
            ),
        );
        // What the proxy pays on the first connection after a change.
        let snap = store.snapshot();
        let t = Instant::now();
        let authz = weft::authz::Authz::new(&snap.mesh, "istio-system");
        report.add(
            format!("compile authz, {n} workloads"),
            "in-proc",
            t.elapsed().as_secs_f64() * 1e3,
            None,
            "ms",
            "Authz::new on the snapshot, once per generation",
        );
        drop(authz);
    }
}

/// Policy decision cost: `n` AuthorizationPolicies spread over 100 namespaces, the
/// destination's namespace holding its share plus mesh-wide ones.
pub(crate) fn run_policy(sz: Sizes, report: &mut Report) {
    for n in sz.policies {
        let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: ns0, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: dst, namespace: ns0, labels: {app: web}}\nspec: {nodeName: n1, serviceAccountName: web}\nstatus: {podIP: 10.0.0.1}\n");
        for i in 0..n {
            let (ns, action) = (
                if i % 10 == 0 {
                    "istio-system".to_string()
                } else {
                    format!("ns{}", i % 100)
                },
                if i % 3 == 0 { "DENY" } else { "ALLOW" },
            );
            y.push_str(&format!(
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: {ns}}}\nspec:\n  action: {action}\n  selector: {{matchLabels: {{app: web}}}}\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/x{i}/sa/y], namespaces: [\"n{i}*\"], ipBlocks: [10.{}.0.0/16]}}}}]\n    to: [{{operation: {{ports: [\"{}\"]}}}}]\n    when: [{{key: source.ip, notValues: [192.168.0.1]}}]\n",
                i % 250,
                1000 + i % 5000
            ));
        }
        let mesh = weft::source::file::parse_mesh("p.yaml", &y).unwrap().mesh;
        let authz = weft::authz::Authz::new(&mesh, "istio-system");
        let dst = mesh.workloads.values().next().unwrap().clone();
        let id = weft::identity::Identity::new("cluster.local", "x7", "y").unwrap();
        let start = Instant::now();
        let mut allowed = 0usize;
        for i in 0..sz.decisions {
            let conn = weft::authz::Connection {
                src_ip: IpAddr::V4(Ipv4Addr::new(10, (i % 250) as u8, 1, 1)),
                src_identity: Some(&id),
                dst: &dst,
                dst_ip: "10.0.0.1".parse().unwrap(),
                dst_port: 1000 + (i % 5000) as u16,
            };
            allowed += usize::from(authz.check(&conn).decision.is_allow());
        }
        let ns = start.elapsed().as_nanos() as f64 / sz.decisions as f64;
        report.add(
            format!("policy decision, {n} policies"),
            "in-proc",
            ns / 1000.0,
            None,
            "µs",
            format!("{} of {} allowed", allowed, sz.decisions),
        );
    }
}

pub(crate) fn run_crypto(sz: Sizes, report: &mut Report) {
    use rustls::pki_types::ServerName;
    let dir = tempfile::tempdir().unwrap();
    weft::identity::ca::init_dir(dir.path(), "cluster.local").unwrap();
    let ca = weft::identity::BuiltinCa::load(dir.path()).unwrap();
    let id = |sa: &str| weft::identity::Identity::new("cluster.local", "b", sa).unwrap();
    let server_cert = ca.issue(&id("server"), Duration::from_secs(3600)).unwrap();
    let client_cert = ca.issue(&id("client"), Duration::from_secs(3600)).unwrap();
    let tls = weft::tls::TlsConfigs::new();
    let mut client = rustls::ClientConnection::new(
        tls.client(&client_cert, &id("server")).unwrap(),
        ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()),
    )
    .unwrap();
    let mut server = rustls::ServerConnection::new(tls.server(&server_cert).unwrap()).unwrap();
    let mut wire = Vec::new();
    // Handshake in memory.
    // (An empty read_tls would mean EOF, so only feed what was written.)
    for _ in 0..10 {
        wire.clear();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        if !wire.is_empty() {
            server.read_tls(&mut &wire[..]).unwrap();
            server.process_new_packets().unwrap();
        }
        wire.clear();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        if !wire.is_empty() {
            client.read_tls(&mut &wire[..]).unwrap();
            client.process_new_packets().unwrap();
        }
    }
    assert!(!client.is_handshaking() && !server.is_handshaking());
    let suite = format!("{:?}", client.negotiated_cipher_suite().map(|s| s.suite()));
    client.set_buffer_limit(None);
    server.set_buffer_limit(None);
    let chunk = vec![0x42u8; 16 * 1024];
    let mut plain = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let mut moved = 0u64;
    while moved < sz.crypto_bytes {
        for _ in 0..4 {
            client.writer().write_all(&chunk).unwrap();
        }
        wire.clear();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            server.process_new_packets().unwrap();
            loop {
                match server.reader().read(&mut plain) {
                    Ok(0) => break,
                    Ok(k) => moved += k as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
    let gbps = moved as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9;
    report.add(
        "rustls encrypt+decrypt in memory",
        "in-proc",
        gbps,
        None,
        "Gbit/s",
        format!("{suite}, one core: the tunnel's ceiling"),
    );
}

/// What one JWT costs the waypoint (`authenticate` with an inline key set): RS256 against
/// ES512, whose pure-Rust P-521 verification is the dearest a client can ask for.
pub(crate) fn run_jwt(sz: Sizes, report: &mut Report) {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine as _;
    use p521::ecdsa::signature::Signer as _;
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::traits::PublicKeyParts as _;
    use weft::waypoint::jwt::{AuthnResult, JwksCache, JwksConfig, JwtAuthenticator};
    let rsa = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let p521 = p521::ecdsa::SigningKey::random(&mut rsa::rand_core::OsRng);
    let point = p521::ecdsa::VerifyingKey::from(&p521).to_encoded_point(false);
    let jwks = serde_json::json!({"keys": [
        {"kty": "RSA", "kid": "rsa", "n": B64.encode(rsa.n().to_bytes_be()), "e": B64.encode(rsa.e().to_bytes_be())},
        {"kty": "EC", "crv": "P-521", "kid": "p521", "x": B64.encode(point.x().unwrap()), "y": B64.encode(point.y().unwrap())},
    ]});
    let rule = weft::model::policy::JwtRule {
        issuer: "https://issuer.example".into(),
        jwks: Some(jwks.to_string()),
        ..Default::default()
    };
    let cache = JwksCache::new(JwksConfig {
        system_roots: false,
        ..Default::default()
    })
    .unwrap();
    let authn = JwtAuthenticator::new(vec![rule], Arc::new(cache)).unwrap();
    let claims = serde_json::json!({"iss": "https://issuer.example", "sub": "alice", "exp": 4_000_000_000u64});
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("rsa".into());
    let der = rsa.to_pkcs1_der().unwrap();
    let rs256 = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()),
    )
    .unwrap();
    let input = format!(
        "{}.{}",
        B64.encode(serde_json::json!({"alg": "ES512", "kid": "p521"}).to_string()),
        B64.encode(claims.to_string())
    );
    let sig: p521::ecdsa::Signature = p521.sign(input.as_bytes());
    let es512 = format!("{input}.{}", B64.encode(sig.to_bytes()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let per_token = |token: &str| {
        let req = http::Request::get("/")
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let start = Instant::now();
        for _ in 0..sz.tokens {
            let r = rt.block_on(authn.authenticate(&req));
            assert!(matches!(r, AuthnResult::Valid(_)), "{r:?}");
        }
        start.elapsed().as_secs_f64() * 1e6 / sz.tokens as f64
    };
    let rs = per_token(&rs256);
    let es = per_token(&es512);
    report.add(
        "JWT check, RS256 (2048-bit key)",
        "in-proc",
        rs,
        None,
        "µs",
        "waypoint authenticate, inline key set; one core",
    );
    report.add(
        "JWT check, ES512 (P-521)",
        "in-proc",
        es,
        Some(rs),
        "µs",
        "baseline: RS256; what a client sending ES512 tokens costs per request",
    );
}
