//! The loopback cases: two daemons in this process (no root), the app behind them, plain
//! TCP and two plain forwarders as baselines, the waypoint's HTTP case, and `--loop CASE`
//! for profiling ([`run_loop`]).
//!
//! Owns the in-process setup and the runtimes the bench's clients and daemons run on.

use super::*;

pub(crate) struct Loop {
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) daemons: Vec<weft::daemon::Daemon>,
    pub(crate) client_ip: IpAddr,
    pub(crate) capture: SocketAddr,
    pub(crate) server: SocketAddr,
    pub(crate) http_capture: SocketAddr,
    /// The mesh file's text (the waypoint case edits it).
    pub(crate) mesh: String,
}

pub(crate) struct ViaWeft {
    pub(crate) client_ip: IpAddr,
    pub(crate) capture: SocketAddr,
}

impl Route for ViaWeft {
    fn sockets(&self, n: usize) -> std::io::Result<Vec<socket2::Socket>> {
        (0..n).map(|_| new_socket(Some(self.client_ip))).collect()
    }
    fn dst(&self) -> SocketAddr {
        self.capture
    }
}

pub(crate) struct Direct(pub(crate) SocketAddr);

impl Route for Direct {
    fn sockets(&self, n: usize) -> std::io::Result<Vec<socket2::Socket>> {
        (0..n).map(|_| new_socket(None)).collect()
    }
    fn dst(&self) -> SocketAddr {
        self.0
    }
}

pub(crate) fn loop_config(dir: &Path, node: &str, ip: IpAddr) -> weft::config::Config {
    let text = format!(
        "nodeName: {node}\nmesh: {{file: mesh.yaml}}\nca: {{builtin: {{dir: ca}}}}\nlisten:\n  outbound: {ip}:15001\n  inboundPlaintext: {ip}:15006\n  hbone: {ip}:15008\n  admin: {ip}:15000\n  metrics: {ip}:15020\n  readiness: {ip}:15021\nredirect: none\n"
    );
    let path = dir.join(format!("{node}.yaml"));
    std::fs::write(&path, &text).unwrap();
    weft::config::Config::load(&path, &weft::config::Env::default()).unwrap()
}

pub(crate) async fn loopback() -> Loop {
    let pid = std::process::id();
    let base = Ipv4Addr::new(127, 100 + (pid % 100) as u8, (pid >> 8) as u8, 0).octets();
    let ip = |last: u8| IpAddr::V4(Ipv4Addr::new(base[0], base[1], base[2], last));
    let (client_ip, server_ip) = (ip(1), ip(2));
    let dir = tempfile::tempdir().unwrap();
    weft::identity::ca::init_dir(&dir.path().join("ca"), "cluster.local").unwrap();
    let mut mesh = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: bench, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: bench}}\nspec: {{nodeName: node-a, serviceAccountName: client}}\nstatus: {{podIP: {client_ip}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: server, namespace: bench}}\nspec: {{nodeName: node-b, serviceAccountName: server}}\nstatus: {{podIP: {server_ip}}}\n"
    );
    for i in 0..5u8 {
        mesh.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: cold-{i}, namespace: bench}}\nspec: {{nodeName: node-a, serviceAccountName: cold-{i}}}\nstatus: {{podIP: {}}}\n",
            ip(10 + i)
        ));
    }
    std::fs::write(dir.path().join("mesh.yaml"), &mesh).unwrap();
    let log = || Arc::new(weft::logging::LogControl::new("off", Box::new(|_| Ok(()))));
    // The daemons run on their own runtime (threads `weft-worker`), apart from the app and
    // the clients, so their CPU time can be read per thread.
    let (ca, cb) = (
        loop_config(dir.path(), "node-a", client_ip),
        loop_config(dir.path(), "node-b", server_ip),
    );
    let a = weft_rt()
        .spawn(weft::daemon::Daemon::start(ca, log()))
        .await
        .unwrap()
        .unwrap();
    let b = weft_rt()
        .spawn(weft::daemon::Daemon::start(cb, log()))
        .await
        .unwrap()
        .unwrap();
    for d in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.store.loaded() || d.certs.certs().is_empty() {
            assert!(Instant::now() < deadline, "daemon not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The app.
    let server = SocketAddr::new(server_ip, 18080);
    // On a thread of its own with a runtime that parks at once (no spinning workers): then a
    // message always wakes the app's thread, on the plain path as on weft's. On a spinning
    // multi-thread runtime the plain ping-pong sometimes caught the app still spinning (a
    // ~10 µs round trip instead of ~70 µs) and the baseline turned bimodal.
    let listener = std::net::TcpListener::bind(server).unwrap();
    drop(on_own_thread("bench-app-server", async move {
        listener.set_nonblocking(true).unwrap();
        serve_app(TcpListener::from_std(listener).unwrap()).await
    }));
    // The capture stand-ins: what TPROXY does in a cluster, hand each connection to weft's
    // outbound handler with its original destination.
    let capture = SocketAddr::new(client_ip, 16001);
    capture_to(&a, capture, server).await;
    // An HTTP app on the same pod, and its own capture stand-in, for the waypoint case.
    let http_app = SocketAddr::new(server_ip, 18081);
    tokio::spawn(serve_http(
        TcpListener::bind(http_app).await.unwrap(),
        bytes::Bytes::from_static(b"ok"),
    ));
    let http_capture = SocketAddr::new(client_ip, 16002);
    capture_to(&a, http_capture, http_app).await;
    // Wait for the cold-client certificates too.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.certs.certs().len() < 6 {
        assert!(Instant::now() < deadline, "cold-client certificates");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Loop {
        _dir: dir,
        daemons: vec![a, b],
        client_ip,
        capture,
        server,
        http_capture,
        mesh,
    }
}

/// Listens on `at` and hands every connection to `daemon`'s outbound handler as if TPROXY had
/// captured it on its way to `dst`.
pub(crate) async fn capture_to(daemon: &weft::daemon::Daemon, at: SocketAddr, dst: SocketAddr) {
    let listener = TcpListener::bind(at).await.unwrap().into_std().unwrap();
    let ctx = daemon.proxy_ctx();
    weft_rt().spawn(async move {
        let listener = TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((s, peer)) = listener.accept().await else {
                return;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(weft::proxy::outbound::serve_outbound_to(
                ctx.clone(),
                s,
                peer,
                dst,
            ));
        }
    });
}

/// A minimal HTTP/1.1 app (keep-alive, the same `body` to every request, with its
/// Content-Length): the waypoint case here (`ok`) and the mesh's app ([`HTTP_BODY`] bytes).
pub(crate) async fn serve_http(listener: TcpListener, body: bytes::Bytes) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            return;
        };
        let _ = s.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(body),
                        ))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
        });
    }
}

/// Round trips of `GET /` on one keep-alive connection, sorted, in µs.
pub(crate) async fn http_latencies(route: Arc<dyn Route>, n: usize) -> Vec<f64> {
    on_client(http_latencies_here(route, n)).await
}

pub(crate) async fn http_latencies_here(route: Arc<dyn Route>, n: usize) -> Vec<f64> {
    let mut s = dial(&route).await.expect("connect");
    let req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
    let mut buf = [0u8; 4096];
    let mut one = async |s: &mut TcpStream| {
        s.write_all(req).await.unwrap();
        // The response is small and fixed: read until its 2-byte body arrived.
        let mut got = Vec::new();
        loop {
            let k = s.read(&mut buf).await.unwrap();
            assert!(k > 0, "connection closed");
            got.extend_from_slice(&buf[..k]);
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                if got.len() >= i + 4 + 2 {
                    assert!(
                        got.starts_with(b"HTTP/1.1 200"),
                        "{}",
                        String::from_utf8_lossy(&got)
                    );
                    return;
                }
            }
        }
    };
    for _ in 0..n.min(200) {
        one(&mut s).await;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        one(&mut s).await;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(f64::total_cmp);
    out
}

pub(crate) async fn run_loopback(sz: Sizes, report: &mut Report) {
    let l = loopback().await;
    let base_ip = l.client_ip;
    let capture = l.capture;
    let ctx = l.daemons[0].proxy_ctx();
    let cold_next = std::sync::atomic::AtomicU8::new(0);
    let place = Place {
        name: "loopback",
        weft: Arc::new(ViaWeft {
            client_ip: l.client_ip,
            capture: l.capture,
        }),
        plain: Arc::new(Direct(l.server)),
        cpu: Box::new(|| thread_cpu("weft-worker")),
        app_cpu: Some(Box::new(|| thread_cpu("bench-app"))),
        rss: None,
        // The daemons share this process with the apps: not profiled apart.
        pids: Vec::new(),
        peer: None,
        cold: Box::new(move || {
            // A client with an identity that has no pooled connection yet.
            ctx.pool.clear();
            let i = cold_next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 5;
            let o = match base_ip {
                IpAddr::V4(v) => v.octets(),
                IpAddr::V6(_) => unreachable!("loopback bench is IPv4"),
            };
            Arc::new(ViaWeft {
                client_ip: IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], 10 + i)),
                capture,
            })
        }),
    };
    let Some((costs, _)) = measure(&place, sz, report).await else {
        unreachable!("loopback's daemons are never profiled apart (no pids)");
    };

    // The floor of any design with a proxy on each side, on this machine: two plain TCP
    // forwarders in series (no TLS, no HTTP/2, no policy), on the daemons' runtime. What weft
    // adds beyond these rows is its own cost; what these add over plain TCP is the price of
    // two extra hops here, which no tunnel can avoid.
    let fwd: Arc<dyn Route> = Arc::new(Direct(two_forwarders(l.client_ip, l.server).await));
    let plain: Arc<dyn Route> = Arc::new(Direct(l.server));
    let floor = format!("median of {ROUNDS}: the two-hop floor");
    let path_cpu = || thread_cpu("weft-worker") + thread_cpu("bench-app");
    let (fb, ft, fwd_used) = alternate_cpu(&plain, &fwd, &path_cpu, |r| {
        throughput(r, sz.stream_bytes, 1)
    })
    .await;
    let name = "reference: 2 plain forwarders";
    report.add(
        format!("{name}, 1 stream"),
        "loopback",
        ft,
        Some(fb),
        "Gbit/s",
        &floor,
    );
    let fwd_per_gib = fwd_used / gib_in_rounds(sz);
    report.add(
        format!("{name}, CPU/GiB path"),
        "loopback",
        fwd_per_gib,
        costs.apps_per_gib,
        "cpu-s/GiB",
        "apps + forwarders; baseline: the apps alone over plain TCP",
    );
    report_cores_needed(
        report,
        "loopback",
        &format!("{name}, cores @ 60 %"),
        fwd_per_gib,
        costs.plain_gbps,
    );
    let fwd_cpu = || thread_cpu("weft-worker");
    let (rb, rf, conn_cpu) =
        alternate_cpu(&plain, &fwd, &fwd_cpu, |r| conn_rate(r, sz.conns)).await;
    report.add(
        format!("{name}, conn rate"),
        "loopback",
        rf,
        Some(rb),
        "conn/s",
        &floor,
    );
    let (lb, lf, rt_cpu) = alternate_latencies_cpu(&plain, &fwd, &fwd_cpu, sz.pings).await;
    let qs = [("p50", 0.5), ("p99", 0.99)];
    let what = format!("{name}, latency");
    report_latencies(
        report,
        &what,
        "loopback",
        &lf,
        &lb,
        None,
        &qs,
        ": the two-hop floor",
    );
    let fwd_costs = Costs {
        per_round_trip: rt_cpu,
        per_conn: per_conn_us(conn_cpu, sz),
        apps_per_gib: None,
        plain_gbps: fb,
    };
    report_costs(report, "loopback", &costs, Some(&fwd_costs), None);
    let wake = wake_up_us(sz.pings);
    report.add(
        "reference: thread wake-up, one way",
        "loopback",
        wake,
        None,
        "µs",
        "a thread blocked reading a socket, woken by a write; median",
    );

    // The same HTTP request over the L4 tunnel, then through the waypoint (the server pod
    // labelled `istio.io/use-waypoint: weft`): what L7 costs, and that L4 traffic never pays it.
    let http_route: Arc<dyn Route> = Arc::new(ViaWeft {
        client_ip: l.client_ip,
        capture: l.http_capture,
    });
    let l4 = http_latencies(http_route.clone(), sz.pings).await;
    let labelled = l.mesh.replace(
        "metadata: {name: server, namespace: bench}",
        "metadata: {name: server, namespace: bench, labels: {istio.io/use-waypoint: weft}}",
    );
    let mesh_path = l._dir.path().join("mesh.yaml");
    let generation = l.daemons[1].store.snapshot().generation;
    std::fs::write(&mesh_path, labelled).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while l.daemons[1].store.snapshot().generation == generation {
        assert!(Instant::now() < deadline, "mesh edit not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let l7 = http_latencies(http_route, sz.pings).await;
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        let (x, y) = (pct(&l7, q), pct(&l4, q));
        report.add(
            format!("HTTP GET latency {name}: waypoint vs L4"),
            "loopback",
            x,
            Some(y),
            "µs",
            format!("+{:.1} µs for L7 parsing and policy", x - y),
        );
    }
    for d in l.daemons {
        let _ = weft_rt().spawn(d.stop()).await;
    }
}

/// `--loop CASE`: repeats one loopback case through weft until killed (`connrate`,
/// `latency`, `stream`; `-plain` after the name runs it over plain TCP, `-fwd` through the
/// two plain forwarders).
pub(crate) async fn run_loop(case: &str) {
    let l = loopback().await;
    let (name, via) = case.split_once('-').unwrap_or((case, "weft"));
    let route: Arc<dyn Route> = match via {
        "plain" => Arc::new(Direct(l.server)),
        "fwd" => Arc::new(Direct(two_forwarders(l.client_ip, l.server).await)),
        _ => Arc::new(ViaWeft {
            client_ip: l.client_ip,
            capture: l.capture,
        }),
    };
    eprintln!("looping {name} via {via}, pid {}", std::process::id());
    loop {
        match name {
            "connrate" => println!("{:.0} conn/s", conn_rate(route.clone(), 2_000).await),
            "latency" => {
                let v = latencies(route.clone(), 20_000).await;
                println!("p50 {:.1} µs, p99 {:.1} µs", pct(&v, 0.5), pct(&v, 0.99));
            }
            "idle" => {
                // Holds 4,000 idle connections until killed, for a heap profile of what an
                // idle connection keeps (`heaptrack`). Each takes four descriptors in this
                // process (client, capture, weft's app connection, the app's), and a
                // container's hard limit may be 20,000.
                let held = hold(route.clone(), 4_000).await;
                println!("holding {} idle connections", held.len());
                std::future::pending::<()>().await;
            }
            _ => println!("{:.2} Gbit/s", throughput(route.clone(), 1 << 30, 1).await),
        }
    }
}

/// Two plain forwarders in series on `ip` towards `server`: the two-hop floor. Returns the
/// first one's address.
pub(crate) async fn two_forwarders(ip: IpAddr, server: SocketAddr) -> SocketAddr {
    let second = forwarder(SocketAddr::new(ip, 16004), server).await;
    forwarder(SocketAddr::new(ip, 16003), second).await
}

/// A plain TCP forwarder on the daemons' runtime: accepts on `at`, connects to `to`, copies
/// both ways with 64 KiB buffers. Returns `at`.
pub(crate) async fn forwarder(at: SocketAddr, to: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(at).await.unwrap().into_std().unwrap();
    weft_rt().spawn(async move {
        let listener = TcpListener::from_std(listener).unwrap();
        while let Ok((mut a, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = a.set_nodelay(true);
                let Ok(mut b) = TcpStream::connect(to).await else {
                    return;
                };
                let _ = b.set_nodelay(true);
                let _ =
                    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 64 << 10, 64 << 10)
                        .await;
            });
        }
    });
    at
}

/// The runtime of the bench's clients (threads `bench-app`).
pub(crate) fn app_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-app")
        .enable_all()
        .build()
        .expect("bench runtime")
}

/// The runtime the in-process daemons run on.
pub(crate) fn weft_rt() -> &'static tokio::runtime::Handle {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("weft-worker")
            .enable_all()
            .build()
            .expect("weft runtime")
    })
    .handle()
}
