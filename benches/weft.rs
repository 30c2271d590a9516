//! weft's benchmarks: what the tunnel costs against plain TCP on the same path, measured in
//! the same run, on loopback (two daemons in this process, no root) and across the
//! network-namespace mesh (two weft processes with real TPROXY capture; needs root).
//!
//! `cargo bench --bench weft` runs everything (`-- --json FILE` also writes JSON; `-- --only
//! loopback|mesh|micro` narrows it; `-- --loop CASE` repeats one loopback case for profiling,
//! see [`run_loop`]). Run any other way (as `cargo test --all-targets` does)
//! it does one tiny iteration of every case, so CI proves the harness works without timing
//! anything. Numbers are never asserted: the machines are shared and noisy.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// === sizes ===

#[derive(Clone, Copy)]
struct Sizes {
    stream_bytes: u64,
    pings: usize,
    conns: usize,
    idle: [usize; 2],
    workloads: [usize; 2],
    policies: [usize; 2],
    decisions: usize,
    crypto_bytes: u64,
    tokens: usize,
}

const FULL: Sizes = Sizes {
    stream_bytes: 2 << 30,
    pings: 20_000,
    conns: 2_000,
    idle: [1_000, 10_000],
    workloads: [10_000, 100_000],
    policies: [10, 1_000],
    decisions: 1_000_000,
    crypto_bytes: 2 << 30,
    tokens: 2_000,
};

const SMOKE: Sizes = Sizes {
    stream_bytes: 1 << 20,
    pings: 20,
    conns: 10,
    idle: [5, 10],
    workloads: [100, 200],
    policies: [10, 20],
    decisions: 100,
    crypto_bytes: 1 << 20,
    tokens: 2,
};

// === results ===

#[derive(Clone, serde::Serialize)]
struct Row {
    case: String,
    place: &'static str,
    weft: f64,
    baseline: Option<f64>,
    unit: &'static str,
    /// weft / baseline (for "higher is better" units) or baseline / weft otherwise.
    ratio: Option<f64>,
    note: String,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn add(
        &mut self,
        case: impl Into<String>,
        place: &'static str,
        weft: f64,
        baseline: Option<f64>,
        unit: &'static str,
        note: impl Into<String>,
    ) {
        let higher_better = matches!(unit, "Gbit/s" | "conn/s" | "decisions/s");
        let ratio = baseline.filter(|b| *b > 0.0 && weft > 0.0).map(|b| {
            if higher_better {
                weft / b
            } else {
                b / weft
            }
        });
        let row = Row {
            case: case.into(),
            place,
            weft,
            baseline,
            unit,
            ratio,
            note: note.into(),
        };
        println!("{}", fmt_row(&row));
        self.rows.push(row);
    }
}

fn fmt_row(r: &Row) -> String {
    let num = |v: f64| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else if v >= 1.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.3}")
        }
    };
    format!(
        "{:<44} {:<9} {:>12} {:>12} {:<12} {:>7}  {}",
        r.case,
        r.place,
        num(r.weft),
        r.baseline.map(num).unwrap_or_else(|| "-".into()),
        r.unit,
        r.ratio
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into()),
        r.note
    )
}

// === the app: one server protocol for every case ===
//
// The client's first byte picks the mode: 'S' sink (read to EOF, answer with the byte count),
// 'E' echo 1 KiB messages until EOF, 'P' one-byte ping then close, 'H' hold until EOF.

async fn serve_app(listener: TcpListener) {
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
trait Route: Send + Sync {
    /// `n` fresh unconnected sockets.
    fn sockets(&self, n: usize) -> std::io::Result<Vec<socket2::Socket>>;
    /// Where they connect to.
    fn dst(&self) -> SocketAddr;
}

fn new_socket(bind: Option<IpAddr>) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    if let Some(ip) = bind {
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

/// Connects one socket made by `route.sockets`.
async fn connect_with(route: &Arc<dyn Route>, s: socket2::Socket) -> std::io::Result<TcpStream> {
    let s: std::net::TcpStream = s.into();
    tokio::net::TcpSocket::from_std_stream(s)
        .connect(route.dst())
        .await
}

/// `route.sockets(n)` on a blocking thread (entering a namespace blocks).
async fn sockets(route: &Arc<dyn Route>, n: usize) -> Vec<socket2::Socket> {
    let r = route.clone();
    tokio::task::spawn_blocking(move || r.sockets(n))
        .await
        .expect("socket task")
        .expect("sockets")
}

async fn dial(route: &Arc<dyn Route>) -> std::io::Result<TcpStream> {
    let s = sockets(route, 1).await.remove(0);
    connect_with(route, s).await
}

async fn stream_once(route: Arc<dyn Route>, bytes: u64) -> u64 {
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
async fn throughput(route: Arc<dyn Route>, bytes: u64, streams: usize) -> f64 {
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
async fn on_client<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    on_own_thread("bench-client", f)
        .await
        .expect("client measurement panicked")
}

/// Runs `f` on a new thread named `name`, on a current-thread runtime of its own (one that
/// drives its sockets itself and parks at once, without spinning); its output comes back
/// through the receiver.
fn on_own_thread<T: Send + 'static>(
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
fn round_trips(n: usize) -> usize {
    n + n.min(200)
}

/// Round-trip times of 1 KiB ping-pong on one connection, sorted, in µs.
async fn latencies(route: Arc<dyn Route>, n: usize) -> Vec<f64> {
    on_client(latencies_here(route, n)).await
}

async fn latencies_here(route: Arc<dyn Route>, n: usize) -> Vec<f64> {
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
const ROUNDS: usize = 3;

/// µs of CPU per connection, from the CPU seconds of `ROUNDS` connection-rate runs.
fn per_conn_us(cpu: f64, sz: Sizes) -> f64 {
    cpu * 1e6 / (ROUNDS * sz.conns) as f64
}

/// GiB one side carries over `ROUNDS` single-stream throughput runs.
fn gib_in_rounds(sz: Sizes) -> f64 {
    (sz.stream_bytes * ROUNDS as u64) as f64 / (1u64 << 30) as f64
}

/// `f` on the baseline route, then on the measured one, `ROUNDS` times: the medians of each
/// side, so a burst of noise hits one round of both rather than one side of the ratio.
async fn alternate<F, Fut>(base: &Arc<dyn Route>, other: &Arc<dyn Route>, f: F) -> (f64, f64)
where
    F: Fn(Arc<dyn Route>) -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let (b, o, _) = alternate_cpu(base, other, &|| 0.0, f).await;
    (b, o)
}

/// Like [`alternate`], and also the CPU seconds `cpu` counted during the runs on `other`.
async fn alternate_cpu<F, Fut>(
    base: &Arc<dyn Route>,
    other: &Arc<dyn Route>,
    cpu: &dyn Fn() -> f64,
    f: F,
) -> (f64, f64, f64)
where
    F: Fn(Arc<dyn Route>) -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let (mut b, mut o, mut used) = (Vec::new(), Vec::new(), 0.0);
    for _ in 0..ROUNDS {
        b.push(f(base.clone()).await);
        let c0 = cpu();
        o.push(f(other.clone()).await);
        used += cpu() - c0;
    }
    (median(&mut b), median(&mut o), used)
}

/// `n` ping-pong round trips on each route, in `ROUNDS` alternating rounds: sorted samples of
/// each, and the CPU seconds `cpu` counted per round trip on `other`, in µs.
async fn alternate_latencies_cpu(
    base: &Arc<dyn Route>,
    other: &Arc<dyn Route>,
    cpu: &dyn Fn() -> f64,
    n: usize,
) -> (Vec<f64>, Vec<f64>, f64) {
    let (mut b, mut o, mut used) = (Vec::new(), Vec::new(), 0.0);
    let per = n.div_ceil(ROUNDS);
    for _ in 0..ROUNDS {
        b.extend(latencies(base.clone(), per).await);
        let c0 = cpu();
        o.extend(latencies(other.clone(), per).await);
        used += cpu() - c0;
    }
    b.sort_by(f64::total_cmp);
    o.sort_by(f64::total_cmp);
    (b, o, used * 1e6 / (ROUNDS * round_trips(per)) as f64)
}

/// One row per percentile: `ours` against `base`, with the difference in the note.
fn report_latencies(
    report: &mut Report,
    what: &str,
    place: &'static str,
    ours: &[f64],
    base: &[f64],
    qs: &[(&str, f64)],
    note: &str,
) {
    for (name, q) in qs {
        let (x, y) = (pct(ours, *q), pct(base, *q));
        report.add(
            format!("{what} {name}"),
            place,
            x,
            Some(y),
            "µs",
            format!("+{:.1} µs{note}", x - y),
        );
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Connections per second: connect, one round trip, close.
async fn conn_rate(route: Arc<dyn Route>, n: usize) -> f64 {
    on_client(conn_rate_here(route, n)).await
}

async fn conn_rate_here(route: Arc<dyn Route>, n: usize) -> f64 {
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

async fn first_byte_ms(route: Arc<dyn Route>) -> f64 {
    on_client(first_byte_ms_here(route)).await
}

async fn first_byte_ms_here(route: Arc<dyn Route>) -> f64 {
    let sock = sockets(&route, 1).await.remove(0);
    let t = Instant::now();
    let mut s = connect_with(&route, sock).await.expect("connect");
    s.write_all(b"P").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    t.elapsed().as_secs_f64() * 1e3
}

/// Opens `n` idle connections (held until the returned vector drops).
async fn hold(route: Arc<dyn Route>, n: usize) -> Vec<TcpStream> {
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

// === process accounting ===

fn ticks() -> f64 {
    procfs::ticks_per_second() as f64
}

/// CPU seconds of the threads of this process whose name starts with `prefix`.
fn thread_cpu(prefix: &str) -> f64 {
    let Ok(me) = procfs::process::Process::myself() else {
        return 0.0;
    };
    let Ok(tasks) = me.tasks() else { return 0.0 };
    tasks
        .flatten()
        .filter_map(|t| t.stat().ok())
        .filter(|s| s.comm.starts_with(prefix))
        .map(|s| (s.utime + s.stime) as f64 / ticks())
        .sum()
}

fn process_cpu(pid: u32) -> f64 {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| (s.utime + s.stime) as f64 / ticks())
        .unwrap_or(0.0)
}

fn process_rss(pid: u32) -> u64 {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| s.rss * procfs::page_size())
        .unwrap_or(0)
}

fn self_rss() -> u64 {
    process_rss(std::process::id())
}

// === the shared measurement of one place (loopback or mesh) ===

struct Place {
    name: &'static str,
    weft: Arc<dyn Route>,
    plain: Arc<dyn Route>,
    /// CPU seconds used so far by both daemons.
    cpu: Box<dyn Fn() -> f64 + Send + Sync>,
    /// CPU seconds used so far by the apps (client and server), where they can be told apart.
    app_cpu: Option<Box<dyn Fn() -> f64 + Send + Sync>>,
    /// RSS of both daemons, when they are separate processes.
    rss: Option<Box<dyn Fn() -> u64 + Send + Sync>>,
    /// Makes the next weft connection pay the TLS handshake.
    cold: Box<dyn Fn() -> Arc<dyn Route> + Send + Sync>,
}

/// What the daemons spent per unit of work, in µs of CPU (both daemons together).
struct Costs {
    per_round_trip: f64,
    per_conn: f64,
    /// CPU seconds per GiB of the apps alone over plain TCP, where measured.
    apps_per_gib: Option<f64>,
    /// Plain TCP's single-stream rate, Gbit/s.
    plain_gbps: f64,
}

async fn measure(place: &Place, sz: Sizes, report: &mut Report) -> Costs {
    let p = place.name;
    let (w, b) = (place.weft.clone(), place.plain.clone());
    // Warm up the pool and the app.
    let _ = stream_once(w.clone(), 1 << 16).await;

    // The VM this runs on is noisy (the plain baseline alone moved 2x between runs), so each
    // rate is measured in rounds that alternate baseline and weft, and the medians are
    // compared: a burst of noise then hits one round of each, not one side of the ratio.
    let mut base = Vec::new();
    let mut wt = Vec::new();
    let mut cpu = 0.0;
    let mut secs = 0.0;
    let app_cpu = || place.app_cpu.as_ref().map_or(0.0, |f| f());
    let (mut app_base, mut app_weft) = (0.0, 0.0);
    for _ in 0..ROUNDS {
        let a0 = app_cpu();
        base.push(throughput(b.clone(), sz.stream_bytes, 1).await);
        app_base += app_cpu() - a0;
        let cpu0 = (place.cpu)();
        let a0 = app_cpu();
        let t0 = Instant::now();
        wt.push(throughput(w.clone(), sz.stream_bytes, 1).await);
        cpu += (place.cpu)() - cpu0;
        app_weft += app_cpu() - a0;
        secs += t0.elapsed().as_secs_f64();
    }
    let gib = gib_in_rounds(sz);
    let plain_gbps = median(&mut base);
    report.add(
        "throughput, 1 stream",
        p,
        median(&mut wt),
        Some(plain_gbps),
        "Gbit/s",
        format!("{} MiB, median of {ROUNDS}", sz.stream_bytes >> 20),
    );
    report.add(
        "CPU per GiB carried (both daemons)",
        p,
        cpu / gib,
        None,
        "cpu-s/GiB",
        format!("{cpu:.2} cpu-s over {secs:.2} s"),
    );
    if place.app_cpu.is_some() {
        report.add(
            "CPU per GiB, whole path (apps + daemons)",
            p,
            (app_weft + cpu) / gib,
            Some(app_base / gib),
            "cpu-s/GiB",
            "baseline: the apps alone over plain TCP",
        );
        report_cores_needed(
            report,
            p,
            "cores needed for 60 % of plain, 1 stream",
            (app_weft + cpu) / gib,
            plain_gbps,
        );
    }
    let (base8, wt8) = alternate(&b, &w, |r| throughput(r, sz.stream_bytes, 8)).await;
    report.add(
        "throughput, 8 streams",
        p,
        wt8,
        Some(base8),
        "Gbit/s",
        format!("median of {ROUNDS}"),
    );

    let (lb, lw, per_round_trip) = alternate_latencies_cpu(&b, &w, &place.cpu, sz.pings).await;
    let qs = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];
    report_latencies(report, "latency 1 KiB ping-pong", p, &lw, &lb, &qs, "");

    let (rb, rw, conn_cpu) = alternate_cpu(&b, &w, &place.cpu, |r| conn_rate(r, sz.conns)).await;
    let per_conn = per_conn_us(conn_cpu, sz);
    report.add(
        "connection rate (warm pool)",
        p,
        rw,
        Some(rb),
        "conn/s",
        format!("connect + 1 round trip + close, median of {ROUNDS}"),
    );
    let mut cold = Vec::new();
    for _ in 0..5 {
        cold.push(first_byte_ms((place.cold)()).await);
    }
    cold.sort_by(f64::total_cmp);
    let warm = first_byte_ms(w.clone()).await;
    report.add(
        "first connection, cold (TLS handshake)",
        p,
        cold[2],
        Some(warm),
        "ms",
        "median of 5, baseline = warm",
    );

    if let Some(rss) = &place.rss {
        let idle = rss();
        report.add(
            "daemon RSS idle (both)",
            p,
            idle as f64 / 1024.0,
            None,
            "KiB",
            "",
        );
        for n in sz.idle {
            let before = rss();
            let held = hold(w.clone(), n).await;
            let after = rss();
            report.add(
                format!("memory per idle tunnelled connection, {n}"),
                p,
                after.saturating_sub(before) as f64 / n as f64 / 1024.0,
                None,
                "KiB",
                "both daemons, RSS delta / connections",
            );
            drop(held);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Costs {
        per_round_trip,
        per_conn,
        apps_per_gib: place.app_cpu.as_ref().map(|_| app_base / gib),
        plain_gbps,
    }
}

/// The throughput target is 60 % of plain TCP: the cores a path costing `per_gib` CPU seconds
/// per GiB (everything on it: apps and proxies) keeps busy at that rate. Where it exceeds the
/// machine's cores, no run here can reach the target, whatever the scheduling.
fn report_cores_needed(
    report: &mut Report,
    place: &'static str,
    what: &str,
    per_gib: f64,
    plain_gbps: f64,
) {
    let gib_per_s = 0.6 * plain_gbps * 1e9 / 8.0 / (1u64 << 30) as f64;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    report.add(
        what,
        place,
        gib_per_s * per_gib,
        None,
        "cores",
        format!(
            "{per_gib:.2} cpu-s/GiB at {:.2} Gbit/s; this machine has {cores}",
            0.6 * plain_gbps
        ),
    );
}

/// The daemons' CPU per unit of work, beside `floor` (two plain forwarders) where measured.
fn report_costs(report: &mut Report, place: &'static str, weft: &Costs, floor: Option<&Costs>) {
    let note = if floor.is_some() {
        "both daemons; baseline: the 2 plain forwarders"
    } else {
        "both daemons"
    };
    report.add(
        "daemons' CPU per 1 KiB round trip",
        place,
        weft.per_round_trip,
        floor.map(|f| f.per_round_trip),
        "µs",
        note,
    );
    report.add(
        "daemons' CPU per connection",
        place,
        weft.per_conn,
        floor.map(|f| f.per_conn),
        "µs",
        note,
    );
}

/// One-way wake-up of a thread blocked reading a socket, the median of `n` (µs): what each
/// extra hop on a path costs at least when its thread sleeps between messages.
fn wake_up_us(n: usize) -> f64 {
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

// === loopback: two daemons in this process ===

struct Loop {
    _dir: tempfile::TempDir,
    daemons: Vec<weft::daemon::Daemon>,
    client_ip: IpAddr,
    capture: SocketAddr,
    server: SocketAddr,
    http_capture: SocketAddr,
    /// The mesh file's text (the waypoint case edits it).
    mesh: String,
}

struct ViaWeft {
    client_ip: IpAddr,
    capture: SocketAddr,
}

impl Route for ViaWeft {
    fn sockets(&self, n: usize) -> std::io::Result<Vec<socket2::Socket>> {
        (0..n).map(|_| new_socket(Some(self.client_ip))).collect()
    }
    fn dst(&self) -> SocketAddr {
        self.capture
    }
}

struct Direct(SocketAddr);

impl Route for Direct {
    fn sockets(&self, n: usize) -> std::io::Result<Vec<socket2::Socket>> {
        (0..n).map(|_| new_socket(None)).collect()
    }
    fn dst(&self) -> SocketAddr {
        self.0
    }
}

fn loop_config(dir: &Path, node: &str, ip: IpAddr) -> weft::config::Config {
    let text = format!(
        "nodeName: {node}\nmesh: {{file: mesh.yaml}}\nca: {{builtin: {{dir: ca}}}}\nlisten:\n  outbound: {ip}:15001\n  inboundPlaintext: {ip}:15006\n  hbone: {ip}:15008\n  admin: {ip}:15000\n  metrics: {ip}:15020\n  readiness: {ip}:15021\nredirect: none\n"
    );
    let path = dir.join(format!("{node}.yaml"));
    std::fs::write(&path, &text).unwrap();
    weft::config::Config::load(&path, None).unwrap()
}

async fn loopback() -> Loop {
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
    tokio::spawn(serve_http(TcpListener::bind(http_app).await.unwrap()));
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
async fn capture_to(daemon: &weft::daemon::Daemon, at: SocketAddr, dst: SocketAddr) {
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

/// A minimal HTTP/1.1 app (keep-alive, fixed body) for the waypoint case.
async fn serve_http(listener: TcpListener) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            return;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
        });
    }
}

/// Round trips of `GET /` on one keep-alive connection, sorted, in µs.
async fn http_latencies(route: Arc<dyn Route>, n: usize) -> Vec<f64> {
    on_client(http_latencies_here(route, n)).await
}

async fn http_latencies_here(route: Arc<dyn Route>, n: usize) -> Vec<f64> {
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

async fn run_loopback(sz: Sizes, report: &mut Report) {
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
    let costs = measure(&place, sz, report).await;

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
        &qs,
        ": the two-hop floor",
    );
    let fwd_costs = Costs {
        per_round_trip: rt_cpu,
        per_conn: per_conn_us(conn_cpu, sz),
        apps_per_gib: None,
        plain_gbps: fb,
    };
    report_costs(report, "loopback", &costs, Some(&fwd_costs));
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
async fn run_loop(case: &str) {
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
            _ => println!("{:.2} Gbit/s", throughput(route.clone(), 1 << 30, 1).await),
        }
    }
}

/// Two plain forwarders in series on `ip` towards `server`: the two-hop floor. Returns the
/// first one's address.
async fn two_forwarders(ip: IpAddr, server: SocketAddr) -> SocketAddr {
    let second = forwarder(SocketAddr::new(ip, 16004), server).await;
    forwarder(SocketAddr::new(ip, 16003), second).await
}

/// A plain TCP forwarder on the daemons' runtime: accepts on `at`, connects to `to`, copies
/// both ways with 64 KiB buffers. Returns `at`.
async fn forwarder(at: SocketAddr, to: SocketAddr) -> SocketAddr {
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
fn app_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-app")
        .enable_all()
        .build()
        .expect("bench runtime")
}

/// The runtime the in-process daemons run on.
fn weft_rt() -> &'static tokio::runtime::Handle {
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

// === the namespace mesh: two weft processes with TPROXY ===

struct PodRoute {
    ns: weft_testbed::Netns,
    dst: SocketAddr,
}

impl Route for PodRoute {
    fn sockets(&self, n: usize) -> std::io::Result<Vec<socket2::Socket>> {
        // Made inside the pod's namespace (one thread entering it for all `n`); a socket
        // stays in the namespace it was made in wherever it is used later.
        self.ns
            .run(move || (0..n).map(|_| new_socket(None)).collect())?
    }
    fn dst(&self) -> SocketAddr {
        self.dst
    }
}

async fn run_mesh(weft_bin: &Path, sz: Sizes, report: &mut Report) {
    if weft_testbed::require().is_none() {
        println!("(mesh cases skipped: prerequisites missing)");
        return;
    }
    let mut bed = weft_testbed::Testbed::new(2).expect("testbed");
    let pods = [
        ("client", 1, "bench"),
        ("server", 2, "bench"),
        ("pclient", 1, "plain"),
        ("pserver", 2, "plain"),
    ];
    for (name, node, _) in pods {
        bed.add_pod(node, name).unwrap();
    }
    let colds: Vec<String> = (0..5).map(|i| format!("cold{i}")).collect();
    for c in &colds {
        bed.add_pod(1, c).unwrap();
    }
    let dir = bed.temp_dir().to_path_buf();
    weft::identity::ca::init_dir(&dir.join("ca"), "cluster.local").unwrap();
    let mut mesh = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n");
    let mut all: Vec<(String, usize, &str)> = pods
        .iter()
        .map(|(n, node, ns)| (n.to_string(), *node, *ns))
        .collect();
    all.extend(colds.iter().map(|c| (c.clone(), 1, "bench")));
    for (name, node, ns) in &all {
        mesh.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{nodeName: node-{node}, serviceAccountName: {name}}}\nstatus: {{podIP: {}}}\n",
            bed.pod(name).ip
        ));
    }
    std::fs::write(dir.join("mesh.yaml"), mesh).unwrap();
    let mut daemons = Vec::new();
    for n in 1..=2 {
        let cfg = dir.join(format!("w{n}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "nodeName: node-{n}\nmesh: {{file: {}}}\nca: {{builtin: {{dir: {}}}}}\n",
                dir.join("mesh.yaml").display(),
                dir.join("ca").display()
            ),
        )
        .unwrap();
        let mut cmd = bed.node(n).ns.command(weft_bin, ["run", "--config"]);
        cmd.arg(&cfg).env("RUST_LOG", "warn");
        daemons.push(bed.spawn(&format!("weft-{n}"), cmd).unwrap());
    }
    for n in 1..=2 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(
            bed.node(n)
                .ns
                .http_get("127.0.0.1:15021".parse().unwrap(), "/healthz/ready"),
            Ok((200, _))
        ) {
            assert!(
                Instant::now() < deadline,
                "weft-{n} not ready:\n{}",
                daemons[n - 1].log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The apps run as separate processes (this bench binary with `--app`), so 10,000 idle
    // connections do not put 20,000 sockets into one process's descriptor limit.
    let mut apps = Vec::new();
    for server in ["server", "pserver"] {
        let p = bed.pod(server);
        let exe = std::env::current_exe().unwrap();
        let mut cmd = p.ns.command(exe, ["--app"]);
        cmd.arg(SocketAddr::new(IpAddr::V4(p.ip), 18080).to_string());
        apps.push(bed.spawn(&format!("app-{server}"), cmd).unwrap());
    }
    for server in ["server", "pserver"] {
        let p = bed.pod(server);
        let deadline = Instant::now() + Duration::from_secs(10);
        while p
            .ns
            .tcp_connect(
                SocketAddr::new(IpAddr::V4(p.ip), 18080),
                Duration::from_secs(1),
            )
            .is_err()
        {
            assert!(Instant::now() < deadline, "app in {server} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let route = |from: &str, to: &str| -> Arc<dyn Route> {
        Arc::new(PodRoute {
            ns: bed.pod(from).ns.clone(),
            dst: SocketAddr::new(IpAddr::V4(bed.pod(to).ip), 18080),
        })
    };
    let pids: Vec<u32> = daemons.iter().map(|d| d.pid()).collect();
    let (p1, p2) = (pids[0], pids[1]);
    let cold_routes: Vec<Arc<dyn Route>> = colds.iter().map(|c| route(c, "server")).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let place = Place {
        name: "netns",
        weft: route("client", "server"),
        plain: route("pclient", "pserver"),
        cpu: Box::new(move || process_cpu(p1) + process_cpu(p2)),
        app_cpu: None,
        rss: Some(Box::new(move || process_rss(p1) + process_rss(p2))),
        cold: Box::new(move || {
            cold_routes[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 5].clone()
        }),
    };
    let costs = measure(&place, sz, report).await;
    report_costs(report, "netns", &costs, None);
    drop(apps);
    drop(daemons);
    drop(bed);
}

// === micro: state and crypto ===

fn mesh_text(workloads: usize) -> String {
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

fn run_state(sz: Sizes, report: &mut Report) {
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
        // otherwise).
        let mut mesh = parsed.mesh.clone();
        mesh.workloads = mesh
            .workloads
            .iter()
            .map(|(uid, w)| (uid.clone(), Arc::new(weft::model::Workload::clone(w))))
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
                let mut w = weft::model::Workload::clone(&store.snapshot().mesh.workloads[&uid]);
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
fn run_policy(sz: Sizes, report: &mut Report) {
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

fn run_crypto(sz: Sizes, report: &mut Report) {
    use rustls::pki_types::ServerName;
    let dir = tempfile::tempdir().unwrap();
    weft::identity::ca::init_dir(dir.path(), "cluster.local").unwrap();
    let ca = weft::identity::BuiltinCa::load(dir.path()).unwrap();
    use weft::identity::CertificateAuthority;
    let id = |sa: &str| weft::identity::Identity::new("cluster.local", "b", sa).unwrap();
    let server_cert = ca.issue(&id("server"), Duration::from_secs(3600)).unwrap();
    let client_cert = ca.issue(&id("client"), Duration::from_secs(3600)).unwrap();
    let tls = weft::tls::TlsConfigs::new(ca.roots_der()).unwrap();
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
fn run_jwt(sz: Sizes, report: &mut Report) {
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(addr) = args
        .iter()
        .position(|a| a == "--app")
        .and_then(|i| args.get(i + 1))
    {
        // The app server of the mesh cases, run inside a pod namespace.
        let addr: SocketAddr = addr.parse().expect("--app ADDR");
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        // One thread that drives its own sockets, as the loopback app (a multi-thread runtime's
        // `block_on` accepted on the main thread, woken by a worker: one more hop per accept).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(
            async move { serve_app(TcpListener::bind(addr).await.expect("app bind")).await },
        );
        return;
    }
    if let Some(case) = args
        .iter()
        .position(|a| a == "--loop")
        .and_then(|i| args.get(i + 1))
    {
        // For profiling (`perf record -p PID`): one loopback case through weft, over and
        // over, printing its figure each round.
        app_runtime().block_on(run_loop(case));
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let sz = if full { FULL } else { SMOKE };
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let want = |what: &str| only.as_deref().is_none_or(|o| o == what);
    let weft_bin = PathBuf::from(env!("CARGO_BIN_EXE_weft"));
    // 10,000 tunnelled connections are 20,000 sockets in this process alone; as root, lift
    // the hard limit too (the daemons inherit it).
    if let Err(e) = rlimit::setrlimit(rlimit::Resource::NOFILE, 200_000, 200_000) {
        eprintln!("cannot lift the open-file limit ({e}); large connection counts may fail");
        let _ = rlimit::increase_nofile_limit(u64::MAX);
    }
    if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        eprintln!("open-file limit: {soft}");
    }

    println!(
        "weft benchmarks ({}), {}",
        if full {
            "full"
        } else {
            "smoke run: one tiny iteration each, numbers meaningless"
        },
        machine()
    );
    println!(
        "{:<44} {:<9} {:>12} {:>12} {:<12} {:>7}  note",
        "case", "where", "weft", "baseline", "unit", "ratio"
    );
    let mut report = Report::default();
    let rt = app_runtime();
    if want("loopback") {
        rt.block_on(run_loopback(sz, &mut report));
    }
    if want("mesh") {
        rt.block_on(run_mesh(&weft_bin, sz, &mut report));
    }
    if want("micro") {
        run_state(sz, &mut report);
        run_policy(sz, &mut report);
        run_crypto(sz, &mut report);
        run_jwt(sz, &mut report);
    }
    if let Some(path) = json {
        let mut doc = BTreeMap::new();
        doc.insert("machine", serde_json::Value::String(machine()));
        doc.insert("full", serde_json::Value::Bool(full));
        doc.insert("rows", serde_json::to_value(&report.rows).unwrap());
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        println!("written {}", path.display());
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!(
        "{} cores, {cpu}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}
