//! Hostile peers against a weft daemon running as its own process on loopback (so its memory
//! can be read from `/proc`): slow clients on the metrics port, connection caps, HBONE
//! handshakes in progress, oversized header blocks and floods of tiny DATA frames. Real TLS,
//! real HTTP/2, real sockets; no root needed.
//!
//! Stated bounds (the daemon's resident memory, measured against its own at rest):
//! - 500 slow clients on the metrics port: at most [`ADMIN_LIMITS`] held at once, every one
//!   closed within the header timeout (5 s) plus 2 s, memory grown by under 16 MiB;
//! - a flood of one-byte DATA frames on a stream whose app connection is pending: memory grown
//!   by under 64 MiB (h2 holding each frame would take hundreds), the stream refused.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use support::*;
use weft::admin::{ADMIN_HEADER_TIMEOUT, ADMIN_LIMITS};
use weft::identity::Identity;
use weft::proxy::pool::{Pool, PoolKey};
use weft::proxy::socket::SocketMode;
use weft::tls::TlsConfigs;

use support::process::WeftProcess as Weft;

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "mesh", sa).unwrap()
}

/// Starts weft with `config_extra` added to its config; waits until it is ready.
async fn weft(config_extra: &str) -> Weft {
    let client_ip = unique_loopback();
    let node = NodeDir::new("");
    let server_ip = node.ip;
    std::fs::write(
        node.mesh_path(),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: mesh, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: server, namespace: mesh}}\nspec: {{nodeName: node-b, serviceAccountName: server}}\nstatus: {{podIP: {server_ip}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: mesh}}\nspec: {{nodeName: node-a, serviceAccountName: client}}\nstatus: {{podIP: {client_ip}}}\n"
        ),
    )
    .unwrap();
    Weft::start(node, client_ip, &id("client"), &[], config_extra).await
}

impl Weft {
    /// Resident memory, KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn app(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.node.ip, port)
    }

    fn hbone(&self) -> SocketAddr {
        self.app(15008)
    }

    /// `weft_connections_refused_total` for `listener` and `reason`.
    fn refused(&self, listener: &str, reason: &str) -> u64 {
        let (_, text) = http(self.node.metrics(), "GET", "/metrics");
        text.lines()
            .filter(|l| {
                l.starts_with("weft_connections_refused_total{")
                    && l.contains(&format!("listener=\"{listener}\""))
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// A pool as the client workload.
    fn pool(&self) -> Arc<Pool> {
        let tls = Arc::new(TlsConfigs::new());
        Pool::new(
            tls,
            SocketMode::Plain,
            15008,
            weft::proxy::socket::Keepalive::default(),
        )
    }

    /// One exchange through HBONE with the echo app on `port`.
    async fn echo_through_hbone(&self, pool: &Arc<Pool>, port: u16) -> std::io::Result<()> {
        let key = PoolKey {
            src: id("client"),
            dst: id("server"),
            dst_ip: self.node.ip,
            dst_port: 15008,
        };
        let mut t = pool
            .tunnel(
                &key,
                &self.cert,
                self.app(port),
                SocketAddr::new(self.client_ip, 40000),
            )
            .await
            .map_err(std::io::Error::other)?;
        t.io.write_all(b"ping").await?;
        let mut back = [0u8; 4];
        t.io.read_exact(&mut back).await?;
        assert_eq!(&back, b"ping");
        Ok(())
    }

    /// A raw HTTP/2 client over mTLS as the client workload (to send what weft's pool never
    /// sends).
    async fn raw_h2(&self) -> h2::client::SendRequest<Bytes> {
        let tls = TlsConfigs::new();
        let cfg = tls.client(&self.cert, &id("server")).unwrap();
        let tcp = tokio::net::TcpStream::connect(self.hbone()).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::IpAddress(self.node.ip.into()), tcp)
            .await
            .unwrap();
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .handshake(stream)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender
    }
}

/// A TCP connection from `src` to `dst`.
async fn connect_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(dst).await
}

/// Whether the server closed `s` (EOF or reset) within `wait`; false if it is still open.
async fn closed_within(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 256];
    loop {
        match tokio::time::timeout(wait, s.read(&mut b)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Whether a new connection from `src` to `dst` is reset at once (at the connect already, or
/// right after).
async fn reset_at_once(src: IpAddr, dst: SocketAddr) -> bool {
    match connect_from(src, dst).await {
        Ok(mut s) => closed_within(&mut s, Duration::from_secs(2)).await,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Source addresses for many clients: `127.201.x.y`, each usable on loopback.
fn sources(n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| IpAddr::from([127, 201, (i / 250) as u8, (i % 250 + 1) as u8]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_on_the_metrics_port_are_capped_closed_in_time_and_hbone_keeps_flowing() {
    let w = weft("").await;
    echo_app(TcpListener::bind(w.app(8080)).await.unwrap());
    let pool = w.pool();
    w.echo_through_hbone(&pool, 8080).await.unwrap();
    let rest = w.rss_kib();

    // 500 clients, each from its own address, each sending half a request head and then
    // nothing.
    let opened = Instant::now();
    let mut slow = Vec::new();
    let mut reset_at_once = 0;
    for src in sources(500) {
        match connect_from(src, w.node.metrics()).await {
            Ok(mut s) => {
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
                slow.push(s);
            }
            // Refused so fast that the reset came before the connect was seen through.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => reset_at_once += 1,
            Err(e) => panic!("connect from {src}: {e}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // HBONE traffic flows meanwhile.
    for _ in 0..20 {
        tokio::time::timeout(Duration::from_secs(2), w.echo_through_hbone(&pool, 8080))
            .await
            .expect("HBONE stalled while the metrics port was flooded")
            .unwrap();
    }
    let during = w.rss_kib();
    // At most the cap is held; the others were reset at once and counted.
    let mut held = Vec::new();
    for mut s in slow {
        if !closed_within(&mut s, Duration::from_millis(20)).await {
            held.push(s);
        }
    }
    assert!(
        held.len() <= ADMIN_LIMITS.total,
        "{} slow clients held at once",
        held.len()
    );
    assert!(!held.is_empty(), "no slow client was admitted at all");
    assert!(reset_at_once + ADMIN_LIMITS.total <= 500);
    // Those held are closed within the header timeout (from their opening), plus slack.
    let deadline = opened + ADMIN_HEADER_TIMEOUT + Duration::from_secs(2);
    for mut s in held {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            closed_within(&mut s, left).await,
            "a slow client outlived the header timeout"
        );
    }
    assert!(
        during.saturating_sub(rest) < 16 * 1024,
        "resident memory grew from {rest} KiB to {during} KiB"
    );
    assert!(
        w.refused("metrics", "listener_limit") >= 400,
        "refusals not counted:\n{}",
        http(w.node.metrics(), "GET", "/metrics").1
    );
    // And the metrics port answers again.
    assert_eq!(http(w.node.metrics(), "GET", "/metrics").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_over_a_cap_is_reset_and_counted_and_other_sources_are_unaffected() {
    // Raw TCP to 15008 that never starts TLS holds its place until the handshake times out.
    let w = weft("limits: {connectionsPerListener: 6, connectionsPerSource: 3}\n").await;
    let [a, b, c]: [IpAddr; 3] = sources(3).try_into().unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(a, w.hbone()).await.unwrap());
    }
    assert!(
        reset_at_once(a, w.hbone()).await,
        "the source's 4th connection was not reset"
    );
    for _ in 0..3 {
        held.push(connect_from(b, w.hbone()).await.unwrap());
    }
    assert!(
        reset_at_once(c, w.hbone()).await,
        "the listener's 7th connection was not reset"
    );
    for s in &mut held {
        assert!(
            !closed_within(s, Duration::from_millis(50)).await,
            "a connection within the caps was closed"
        );
    }
    assert_eq!(w.refused("hbone", "source_limit"), 1);
    assert_eq!(w.refused("hbone", "listener_limit"), 1);
    // A place freed is a place taken: c gets in once a's connections are gone.
    held.drain(..3);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from(c, w.hbone()).await.unwrap();
    assert!(!closed_within(&mut again, Duration::from_millis(300)).await);
    // Logged, but not once per refusal: a flood of 300 more refusals adds a line or two.
    for _ in 0..300 {
        assert!(reset_at_once(b, w.hbone()).await);
    }
    // Logs reach the file a moment later (a writer thread).
    let waited = Instant::now();
    while !w.log().contains("connections refused") && waited.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = w.log();
    let lines = log.matches("connections refused").count();
    assert!(
        (1..=4).contains(&lines),
        "{lines} lines for 302 refusals:\n{log}"
    );
    assert_eq!(
        w.refused("hbone", "source_limit") + w.refused("hbone", "listener_limit"),
        302
    );
    // The log queue's drops are counted (none here).
    let (_, metrics) = http(w.node.metrics(), "GET", "/metrics");
    assert!(
        metrics.contains("weft_log_lines_dropped_total 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_are_capped() {
    let w = weft("limits: {handshakesInProgress: 2}\n").await;
    echo_app(TcpListener::bind(w.app(8080)).await.unwrap());
    // Two connections that never finish their handshake take both places.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(connect_from(w.client_ip, w.hbone()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(reset_at_once(w.client_ip, w.hbone()).await);
    assert_eq!(w.refused("hbone", "handshakes"), 1);
    // Once they are gone, a real tunnel gets through.
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(200)).await;
    w.echo_through_hbone(&w.pool(), 8080).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_with_a_one_mib_header_block_is_refused() {
    let w = weft("").await;
    echo_app(TcpListener::bind(w.app(8080)).await.unwrap());
    let mut h2 = w.raw_h2().await;
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(w.app(8080).to_string());
    // 64 headers of 16 KiB each: a 1 MiB header block.
    let value = "v".repeat(16 * 1024);
    for i in 0..64 {
        req = req.header(format!("x-big-{i}"), value.as_str());
    }
    let (resp, _send) = h2.send_request(req.body(()).unwrap(), false).unwrap();
    match tokio::time::timeout(Duration::from_secs(5), resp).await {
        Ok(Ok(r)) => assert_eq!(
            r.status(),
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        ),
        Ok(Err(e)) => assert!(e.is_reset() || e.is_go_away() || e.is_io(), "{e}"),
        Err(_) => panic!("no answer to a 1 MiB header block"),
    }
    // The daemon is fine and the same client's next tunnel works.
    w.echo_through_hbone(&w.pool(), 8080).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_tiny_data_frames_on_a_pending_stream_is_bounded_and_refused() {
    let w = weft("").await;
    echo_app(TcpListener::bind(w.app(8080)).await.unwrap());
    // An app whose accept queue is full: weft's connect to it stays pending (its SYNs are
    // dropped) until weft gives up.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.set_reuse_address(true).unwrap();
    full.bind(&w.app(8097).into()).unwrap();
    full.listen(0).unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&w.app(8097).into());
        fillers.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rest = w.rss_kib();

    let mut h2 = w.raw_h2().await;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(w.app(8097).to_string())
        .body(())
        .unwrap();
    let (resp, mut send) = h2.send_request(req, false).unwrap();
    let flood = tokio::spawn(async move {
        let mut frames = 0u64;
        let one = Bytes::from_static(b"x");
        loop {
            send.reserve_capacity(1);
            match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) if n > 0 => {}
                _ => return frames,
            }
            if send.send_data(one.clone(), false).is_err() {
                return frames;
            }
            frames += 1;
            if frames.is_multiple_of(1024) {
                tokio::task::yield_now().await;
            }
        }
    });
    // Memory while the flood lasts: it ends when weft refuses the stream (its app connect
    // times out) or, failing that, the test gives up.
    let mut peak = rest;
    let started = Instant::now();
    while !flood.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the flood was never stopped"
        );
        peak = peak.max(w.rss_kib());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let frames = flood.await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), resp).await;
    match status {
        Ok(Ok(r)) => assert_ne!(
            r.status(),
            http::StatusCode::OK,
            "the flooded stream was taken"
        ),
        Ok(Err(_)) => {}
        Err(_) => panic!("the flooded stream was never refused"),
    }
    peak = peak.max(w.rss_kib());
    assert!(frames > 100_000, "only {frames} frames sent");
    assert!(
        peak.saturating_sub(rest) < 64 * 1024,
        "resident memory grew from {rest} KiB to {peak} KiB under {frames} one-byte frames"
    );
    // The daemon serves others all along.
    w.echo_through_hbone(&w.pool(), 8080).await.unwrap();
    drop(fillers);
    drop(full);
}

/// Sends `signal` (`STOP`, `CONT`) to the daemon.
fn signal(w: &Weft, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(w.child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal}");
    // kill returns once the signal is sent; the stop reaches each thread after that. Wait
    // until every thread of the daemon is stopped (state T), so nothing it does afterwards
    // is a thread that had not stopped yet.
    if signal == "STOP" {
        let deadline = Instant::now() + Duration::from_secs(5);
        let tasks = format!("/proc/{}/task", w.child.id());
        loop {
            let all_stopped = std::fs::read_dir(&tasks).unwrap().all(|t| {
                let stat =
                    std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
                // The state follows the command name's closing parenthesis.
                let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
                matches!(state, Some(Some('T' | 't')))
            });
            if all_stopped {
                break;
            }
            assert!(Instant::now() < deadline, "the daemon did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_fails_new_tunnels_in_time_and_is_probed_away() {
    use weft::proxy::h2io::ANSWER_TIMEOUT;
    use weft::proxy::pool::{PING_INTERVAL, PING_TIMEOUT};
    let w = weft("limits: {tcpKeepalive: {idle: 77s, interval: 5s, probes: 3}}\n").await;
    echo_app(TcpListener::bind(w.app(8080)).await.unwrap());
    let pool = w.pool();
    w.echo_through_hbone(&pool, 8080).await.unwrap();
    let first = pool.view()[0].local;
    // TCP keepalive as configured on weft's side of the tunnel and of the app connection.
    let ss = |filter: &str| {
        let out = Command::new("ss")
            .args(["-tnoH", "state", "established", filter])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tunnel = ss(&format!("( src {} and sport = :15008 )", w.node.ip));
    assert!(
        tunnel.contains("timer:(keepalive"),
        "{tunnel}\nall:\n{}",
        ss("sport = :15008")
    );
    // The app connection lives as long as a tunnel is open.
    let key = PoolKey {
        src: id("client"),
        dst: id("server"),
        dst_ip: w.node.ip,
        dst_port: 15008,
    };
    let open = pool
        .tunnel(
            &key,
            &w.cert,
            w.app(8080),
            SocketAddr::new(w.client_ip, 40000),
        )
        .await
        .unwrap();
    let app = ss(&format!("( dst {} and dport = :8080 )", w.node.ip));
    assert!(app.contains("timer:(keepalive"), "{app}");
    drop(open);

    // Stopped: the pooled connection is still up at the TCP level, but nothing answers. A new
    // tunnel fails within the answer timeout instead of hanging.
    signal(&w, "STOP");
    let asked = Instant::now();
    let r = tokio::time::timeout(
        ANSWER_TIMEOUT + Duration::from_secs(5),
        w.echo_through_hbone(&pool, 8080),
    )
    .await
    .expect("a tunnel to a stopped peer hung");
    assert!(r.is_err(), "a stopped peer answered");
    assert!(asked.elapsed() <= ANSWER_TIMEOUT + Duration::from_secs(2));
    // Resumed: the next tunnel works, on a new connection.
    signal(&w, "CONT");
    w.echo_through_hbone(&pool, 8080).await.unwrap();
    let view = pool.view();
    assert_eq!(view.len(), 1, "{view:?}");
    assert_ne!(
        view[0].local, first,
        "the unanswering connection was used again"
    );

    // Stopped again with nothing to send: the PING probe retires the connection by itself.
    let second = view[0].local;
    signal(&w, "STOP");
    let deadline = Instant::now() + PING_INTERVAL + PING_TIMEOUT + Duration::from_secs(3);
    while pool.view().iter().any(|c| c.local == second) {
        assert!(
            Instant::now() < deadline,
            "a connection to a stopped peer was never retired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    signal(&w, "CONT");
    w.echo_through_hbone(&pool, 8080).await.unwrap();
}
