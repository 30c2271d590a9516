//! The app and the load clients every case shares: one server protocol (the client's first
//! byte picks the mode: 'S' sink (read to EOF, answer with the byte count), 'E' echo 1 KiB
//! messages until EOF, 'P' one-byte ping then close, 'H' hold until EOF), the [`Route`]s a
//! client reaches it by, and the measurements made over a route (throughput, latency,
//! connection rate, time to first byte, idle connections, thread wake-up).
//!
//! Owns how a measurement is taken, not where (loopback or mesh) or how it is reported.

use super::*;

pub(crate) async fn serve_app(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).await.is_err() {
                return;
            }
            match mode[0] {
                b'S' => {
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut n = 0u64;
                    while let Ok(k) = s.read(&mut buf).await {
                        if k == 0 {
                            break;
                        }
                        n += k as u64;
                    }
                    let _ = s.write_all(&n.to_be_bytes()).await;
                }
                b'E' => {
                    let mut buf = [0u8; 1024];
                    while s.read_exact(&mut buf).await.is_ok() {
                        if s.write_all(&buf).await.is_err() {
                            break;
                        }
                    }
                }
                b'P' => {
                    let _ = s.write_all(b"p").await;
                }
                _ => {
                    let mut buf = [0u8; 64];
                    while let Ok(k) = s.read(&mut buf).await {
                        if k == 0 {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// How the bench reaches a server: sockets made up front (unconnected, bound where the route
/// needs it, inside a pod's namespace for the mesh), then connected without blocking. Making
/// them outside the timed loops keeps thread hops out of the measurement: a connect on a
/// blocking-pool thread, or a thread entering a namespace per connection, cost more than the
/// connection itself and flattered every ratio.
pub(crate) trait Route: Send + Sync {
    /// `n` fresh unconnected sockets.
    fn sockets(&self, n: usize) -> std::io::Result<Vec<socket2::Socket>>;
    /// Where they connect to.
    fn dst(&self) -> SocketAddr;
}

pub(crate) fn new_socket(bind: Option<IpAddr>) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    if let Some(ip) = bind {
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

/// Connects one socket made by `route.sockets`.
pub(crate) async fn connect_with(
    route: &Arc<dyn Route>,
    s: socket2::Socket,
) -> std::io::Result<TcpStream> {
    let s: std::net::TcpStream = s.into();
    tokio::net::TcpSocket::from_std_stream(s)
        .connect(route.dst())
        .await
}

/// `route.sockets(n)` on a blocking thread (entering a namespace blocks).
pub(crate) async fn sockets(route: &Arc<dyn Route>, n: usize) -> Vec<socket2::Socket> {
    let r = route.clone();
    tokio::task::spawn_blocking(move || r.sockets(n))
        .await
        .expect("socket task")
        .expect("sockets")
}

pub(crate) async fn dial(route: &Arc<dyn Route>) -> std::io::Result<TcpStream> {
    let s = sockets(route, 1).await.remove(0);
    connect_with(route, s).await
}

pub(crate) async fn stream_once(route: Arc<dyn Route>, bytes: u64) -> u64 {
    let mut s = dial(&route).await.expect("connect");
    s.write_all(b"S").await.unwrap();
    let buf = vec![0x5au8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k]).await.unwrap();
        left -= k as u64;
    }
    s.shutdown().await.unwrap();
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await.unwrap();
    u64::from_be_bytes(n)
}

/// Gbit/s over `streams` parallel connections carrying `bytes` in total.
pub(crate) async fn throughput(route: Arc<dyn Route>, bytes: u64, streams: usize) -> f64 {
    let per = bytes / streams as u64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| tokio::spawn(stream_once(route.clone(), per)))
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, per * streams as u64, "bytes lost");
    total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// Runs a client measurement on a thread of its own with a runtime that drives its sockets
/// itself, like the app server. Run inline in the bench's `block_on`, every socket event took
/// an extra hop: a runtime worker saw it and woke the blocked main thread.
pub(crate) async fn on_client<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    on_own_thread("bench-client", f)
        .await
        .expect("client measurement panicked")
}

/// Runs `f` on a new thread named `name`, on a current-thread runtime of its own (one that
/// drives its sockets itself and parks at once, without spinning); its output comes back
/// through the receiver.
pub(crate) fn on_own_thread<T: Send + 'static>(
    name: &str,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> tokio::sync::oneshot::Receiver<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let _ = tx.send(rt.block_on(f));
        })
        .expect("thread");
    rx
}

/// Round trips [`latencies`] makes for `n` samples (it warms up first).
pub(crate) fn round_trips(n: usize) -> usize {
    n + n.min(200)
}

/// Round-trip times of 1 KiB ping-pong on one connection, sorted, in µs.
pub(crate) async fn latencies(route: Arc<dyn Route>, n: usize) -> Vec<f64> {
    on_client(latencies_here(route, n)).await
}

pub(crate) async fn latencies_here(route: Arc<dyn Route>, n: usize) -> Vec<f64> {
    let mut s = dial(&route).await.expect("connect");
    s.write_all(b"E").await.unwrap();
    let msg = [7u8; 1024];
    let mut back = [0u8; 1024];
    for _ in 0..n.min(200) {
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(f64::total_cmp);
    out
}

/// Rounds of each rate measurement (baseline and weft alternate).
pub(crate) const ROUNDS: usize = 3;

/// µs of CPU per connection, from the CPU seconds of `ROUNDS` connection-rate runs.
pub(crate) fn per_conn_us(cpu: f64, sz: Sizes) -> f64 {
    cpu * 1e6 / (ROUNDS * sz.conns) as f64
}

/// GiB one side carries over `ROUNDS` single-stream throughput runs.
pub(crate) fn gib_in_rounds(sz: Sizes) -> f64 {
    (sz.stream_bytes * ROUNDS as u64) as f64 / (1u64 << 30) as f64
}

/// One side of a comparison: the route a measurement runs over, and the CPU meter read
/// around each of its runs.
pub(crate) struct Side<'a> {
    pub(crate) route: &'a Arc<dyn Route>,
    pub(crate) cpu: &'a dyn Fn() -> f64,
}

/// No CPU meter: a side whose CPU is not counted.
pub(crate) fn no_cpu() -> f64 {
    0.0
}

/// `f` on each side in turn, `ROUNDS` times: each side's median, and the CPU seconds its meter
/// counted during its runs. A burst of noise then hits one round of every side rather than
/// one side of a ratio.
pub(crate) async fn rounds<F, Fut>(sides: &[Side<'_>], f: F) -> Vec<(f64, f64)>
where
    F: Fn(Arc<dyn Route>) -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let mut runs = vec![Vec::new(); sides.len()];
    let mut used = vec![0.0; sides.len()];
    for _ in 0..ROUNDS {
        for (i, side) in sides.iter().enumerate() {
            let c0 = (side.cpu)();
            runs[i].push(f(side.route.clone()).await);
            used[i] += (side.cpu)() - c0;
        }
    }
    runs.iter_mut()
        .zip(used)
        .map(|(r, u)| (median(r), u))
        .collect()
}

/// `f` on the baseline route, then on the measured one, `ROUNDS` times: the medians of each
/// side (a burst of noise hits one round of both rather than one side of the ratio), and the
/// CPU seconds `cpu` counted during the runs on `other`.
pub(crate) async fn alternate_cpu<F, Fut>(
    base: &Arc<dyn Route>,
    other: &Arc<dyn Route>,
    cpu: &dyn Fn() -> f64,
    f: F,
) -> (f64, f64, f64)
where
    F: Fn(Arc<dyn Route>) -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let sides = [
        Side {
            route: base,
            cpu: &no_cpu,
        },
        Side { route: other, cpu },
    ];
    let r = rounds(&sides, f).await;
    (r[0].0, r[1].0, r[1].1)
}

/// `n` ping-pong round trips on each side, in `ROUNDS` rounds that visit the sides in turn:
/// per side its sorted samples, and the CPU its meter counted per round trip, in µs.
pub(crate) async fn latency_rounds(sides: &[Side<'_>], n: usize) -> Vec<(Vec<f64>, f64)> {
    let mut samples = vec![Vec::new(); sides.len()];
    let mut used = vec![0.0; sides.len()];
    let per = n.div_ceil(ROUNDS);
    for _ in 0..ROUNDS {
        for (i, side) in sides.iter().enumerate() {
            let c0 = (side.cpu)();
            samples[i].extend(latencies(side.route.clone(), per).await);
            used[i] += (side.cpu)() - c0;
        }
    }
    samples
        .into_iter()
        .zip(used)
        .map(|(mut s, u)| {
            s.sort_by(f64::total_cmp);
            (s, u * 1e6 / (ROUNDS * round_trips(per)) as f64)
        })
        .collect()
}

/// `n` ping-pong round trips on each route, in `ROUNDS` alternating rounds: sorted samples of
/// each, and the CPU seconds `cpu` counted per round trip on `other`, in µs.
pub(crate) async fn alternate_latencies_cpu(
    base: &Arc<dyn Route>,
    other: &Arc<dyn Route>,
    cpu: &dyn Fn() -> f64,
    n: usize,
) -> (Vec<f64>, Vec<f64>, f64) {
    let sides = [
        Side {
            route: base,
            cpu: &no_cpu,
        },
        Side { route: other, cpu },
    ];
    let mut r = latency_rounds(&sides, n).await;
    let (o, per_rt) = r.remove(1);
    let (b, _) = r.remove(0);
    (b, o, per_rt)
}

/// Connections per second: connect, one round trip, close.
pub(crate) async fn conn_rate(route: Arc<dyn Route>, n: usize) -> f64 {
    on_client(conn_rate_here(route, n)).await
}

pub(crate) async fn conn_rate_here(route: Arc<dyn Route>, n: usize) -> f64 {
    let made = sockets(&route, n).await;
    let start = Instant::now();
    for sock in made {
        let mut s = connect_with(&route, sock).await.expect("connect");
        s.write_all(b"P").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

pub(crate) async fn first_byte_ms(route: Arc<dyn Route>) -> f64 {
    on_client(first_byte_ms_here(route)).await
}

pub(crate) async fn first_byte_ms_here(route: Arc<dyn Route>) -> f64 {
    let sock = sockets(&route, 1).await.remove(0);
    let t = Instant::now();
    let mut s = connect_with(&route, sock).await.expect("connect");
    s.write_all(b"P").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    t.elapsed().as_secs_f64() * 1e3
}

/// Opens `n` idle connections (held until the returned vector drops).
pub(crate) async fn hold(route: Arc<dyn Route>, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = dial(&route).await.expect("connect");
        s.write_all(b"H").await.unwrap();
        v.push(s);
    }
    // Let the far side finish accepting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    v
}

/// One-way wake-up of a thread blocked reading a socket, the median of `n` (µs): what each
/// extra hop on a path costs at least when its thread sleeps between messages.
pub(crate) fn wake_up_us(n: usize) -> f64 {
    use std::os::unix::net::UnixStream;
    let (mut a, mut b) = UnixStream::pair().expect("socket pair");
    let echo = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while b.read_exact(&mut byte).is_ok() {
            if b.write_all(&byte).is_err() {
                return;
            }
        }
    });
    let mut byte = [0u8; 1];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        a.write_all(&byte).expect("wake write");
        a.read_exact(&mut byte).expect("wake read");
        v.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
    }
    drop(a);
    let _ = echo.join();
    median(&mut v)
}

// === paced HTTP load ===

/// The body the mesh's HTTP app answers every request with (Istio's published workload: 1 KiB).
pub(crate) const HTTP_BODY: usize = 1024;

/// What the node proxies on a paced run's path use, read at its start and its end:
/// CPU seconds and RSS bytes of the source node's proxy and of the destination node's.
#[derive(Clone, Copy, Default)]
pub(crate) struct Meters {
    pub(crate) cpu: [f64; 2],
    pub(crate) rss: [u64; 2],
}

/// One paced HTTP run: the requests answered, over how many seconds, and what the proxies
/// used meanwhile (CPU from the first paced request to the last answer; RSS at the end, with
/// the load's connections still open).
pub(crate) struct Paced {
    pub(crate) requests: u64,
    pub(crate) secs: f64,
    pub(crate) cpu: [f64; 2],
    pub(crate) rss: [u64; 2],
}

impl Paced {
    pub(crate) fn rate(&self) -> f64 {
        self.requests as f64 / self.secs
    }
    /// vCPU of the source (0) or destination (1) node's proxy: CPU seconds ÷ wall seconds.
    pub(crate) fn vcpu(&self, node: usize) -> f64 {
        self.cpu[node] / self.secs
    }
}

/// `GET /` at `rate` requests per second in total for `secs`, over `conns` keep-alive
/// connections (each paced at `rate / conns`, staggered, one request in flight: an open-loop
/// schedule, not as fast as answers come back; a late request is sent at once, so the rate is
/// kept unless answers take longer than the period). Each answer is read whole (Content-Length).
pub(crate) async fn paced_http(
    route: Arc<dyn Route>,
    conns: usize,
    rate: f64,
    secs: f64,
    meters: Arc<dyn Fn() -> Meters + Send + Sync>,
) -> Paced {
    on_client(paced_http_here(route, conns, rate, secs, meters)).await
}

async fn paced_http_here(
    route: Arc<dyn Route>,
    conns: usize,
    rate: f64,
    secs: f64,
    meters: Arc<dyn Fn() -> Meters + Send + Sync>,
) -> Paced {
    let mut streams = Vec::with_capacity(conns);
    for s in sockets(&route, conns).await {
        let mut s = connect_with(&route, s).await.expect("connect");
        // Connected and answered once before the clock starts: the run measures the load,
        // not the connections' set-up.
        http_get(&mut s).await;
        streams.push(s);
    }
    let period = Duration::from_secs_f64(conns as f64 / rate);
    let at0 = meters();
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            let first = start + period.mul_f64(i as f64 / conns as f64);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(first, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut n = 0u64;
                while tick.tick().await < end {
                    http_get(&mut s).await;
                    n += 1;
                }
                (n, s)
            })
        })
        .collect();
    let mut requests = 0;
    let mut open = Vec::with_capacity(conns);
    for t in tasks {
        let (n, s) = t.await.expect("load task");
        requests += n;
        open.push(s);
    }
    let secs = start.elapsed().as_secs_f64();
    let at1 = meters();
    drop(open);
    Paced {
        requests,
        secs,
        cpu: [at1.cpu[0] - at0.cpu[0], at1.cpu[1] - at0.cpu[1]],
        rss: at1.rss,
    }
}

/// One `GET /` on a keep-alive connection, its answer read whole; panics unless it is a 200.
async fn http_get(s: &mut TcpStream) {
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await
        .expect("HTTP request");
    let mut got = Vec::with_capacity(HTTP_BODY + 256);
    let mut buf = [0u8; 4096];
    loop {
        let k = s.read(&mut buf).await.expect("HTTP response");
        assert!(k > 0, "connection closed in an HTTP response");
        got.extend_from_slice(&buf[..k]);
        let Some(head) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let headers = String::from_utf8_lossy(&got[..head]).to_ascii_lowercase();
        assert!(headers.starts_with("http/1.1 200"), "{headers}");
        let len: usize = headers
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("Content-Length");
        if got.len() >= head + 4 + len {
            return;
        }
    }
}
