//! The shared measurement of one place (loopback or mesh): a [`Place`] names its routes and
//! meters, [`measure`] runs every client measurement against weft and the plain baseline (and
//! the peer, ztunnel, when `--peer` gave one: [`PeerSide`]) and returns what the daemons spent
//! ([`Costs`]).
//!
//! Owns the order and pairing of the measurements; does not set a place up.

use super::*;

pub(crate) struct Place {
    pub(crate) name: &'static str,
    pub(crate) weft: Arc<dyn Route>,
    pub(crate) plain: Arc<dyn Route>,
    /// CPU seconds used so far by both daemons.
    pub(crate) cpu: Box<dyn Fn() -> f64 + Send + Sync>,
    /// CPU seconds used so far by the apps (client and server), where they can be told apart.
    pub(crate) app_cpu: Option<Box<dyn Fn() -> f64 + Send + Sync>>,
    /// RSS of both daemons, when they are separate processes.
    pub(crate) rss: Option<Box<dyn Fn() -> u64 + Send + Sync>>,
    /// The daemons' processes, where they are separate processes (profiles, [`profile`]).
    pub(crate) pids: Vec<u32>,
    /// Makes the next weft connection pay the TLS handshake.
    pub(crate) cold: Box<dyn Fn() -> Arc<dyn Route> + Send + Sync>,
    /// Another tunnel measured in the same rounds as weft (`--peer`), where there is one.
    pub(crate) peer: Option<PeerSide>,
}

/// A peer's side of the comparison (ztunnel, [`peer`]): its route and meters, like weft's in
/// [`Place`], and the check that its figures are its own.
pub(crate) struct PeerSide {
    pub(crate) route: Arc<dyn Route>,
    /// To the server's HTTP app (the paced HTTP rows, [`mesh`]).
    pub(crate) http: Arc<dyn Route>,
    /// The node proxies' processes: the client's node, the server's node.
    pub(crate) pids: [u32; 2],
    /// CPU seconds used so far by both of the peer's node proxies.
    pub(crate) cpu: Box<dyn Fn() -> f64 + Send + Sync>,
    /// RSS of both of the peer's node proxies.
    pub(crate) rss: Box<dyn Fn() -> u64 + Send + Sync>,
    /// Makes the next peer connection pay the TLS handshake.
    pub(crate) cold: Box<dyn Fn() -> Arc<dyn Route> + Send + Sync>,
    /// Panics unless every connection made over the peer's routes so far went through the
    /// peer, as mTLS at both ends. Called before each of the peer's figures is printed.
    pub(crate) verify: Box<dyn Fn() + Send + Sync>,
}

/// What the daemons spent per unit of work, in µs of CPU (both daemons together).
pub(crate) struct Costs {
    pub(crate) per_round_trip: f64,
    pub(crate) per_conn: f64,
    /// CPU seconds per GiB of the apps alone over plain TCP, where measured.
    pub(crate) apps_per_gib: Option<f64>,
    /// Plain TCP's single-stream rate, Gbit/s.
    pub(crate) plain_gbps: f64,
}

/// Measures `place`: every row of the table for it, weft against plain TCP (and against the
/// peer, where there is one). Returns what weft's daemons spent, and what the peer's did; or
/// nothing when its daemons were profiled (`profile`), which stops after the one-stream rows.
pub(crate) async fn measure(
    place: &Place,
    sz: Sizes,
    report: &mut Report,
) -> Option<(Costs, Option<Costs>)> {
    let p = place.name;
    let (w, b) = (place.weft.clone(), place.plain.clone());
    let peer = place.peer.as_ref();
    let verify = || {
        if let Some(z) = peer {
            (z.verify)()
        }
    };
    // Warm up the pool and the app.
    let _ = stream_once(w.clone(), 1 << 16).await;
    if let Some(z) = peer {
        let _ = stream_once(z.route.clone(), 1 << 16).await;
    }

    // The VM this runs on is noisy (the plain baseline alone moved 2x between runs), so each
    // rate is measured in rounds that alternate baseline and weft (and the peer), and the
    // medians are compared: a burst of noise then hits one round of each, not one side of the
    // ratio.
    let mut base = Vec::new();
    let mut wt = Vec::new();
    let mut zt = Vec::new();
    let mut cpu = 0.0;
    let mut zcpu = 0.0;
    let mut secs = 0.0;
    let app_cpu = || place.app_cpu.as_ref().map_or(0.0, |f| f());
    let (mut app_base, mut app_weft) = (0.0, 0.0);
    for round in 0..ROUNDS {
        let a0 = app_cpu();
        base.push(throughput(b.clone(), sz.stream_bytes, 1).await);
        app_base += app_cpu() - a0;
        let cpu0 = (place.cpu)();
        let a0 = app_cpu();
        let t0 = Instant::now();
        let rec = profile::record(round, "stream", "weft", &place.pids);
        wt.push(throughput(w.clone(), sz.stream_bytes, 1).await);
        drop(rec);
        cpu += (place.cpu)() - cpu0;
        app_weft += app_cpu() - a0;
        secs += t0.elapsed().as_secs_f64();
        if let Some(z) = peer {
            let cpu0 = (z.cpu)();
            let rec = profile::record(round, "stream", peer::NAME, &z.pids);
            zt.push(throughput(z.route.clone(), sz.stream_bytes, 1).await);
            drop(rec);
            zcpu += (z.cpu)() - cpu0;
        }
    }
    verify();
    let gib = gib_in_rounds(sz);
    let plain_gbps = median(&mut base);
    let peer_median = (!zt.is_empty()).then(|| median(&mut zt));
    report.add_vs(
        "throughput, 1 stream",
        p,
        median(&mut wt),
        Some(plain_gbps),
        peer_median,
        "Gbit/s",
        format!("{} MiB, median of {ROUNDS}", sz.stream_bytes >> 20),
    );
    let peer_cpu_note = match (peer, report.peer) {
        (Some(_), Some(name)) => format!("; {name}: {zcpu:.2} cpu-s"),
        _ => String::new(),
    };
    report.add_vs(
        "CPU per GiB carried (both daemons)",
        p,
        cpu / gib,
        None,
        peer.map(|_| zcpu / gib),
        "cpu-s/GiB",
        format!("{cpu:.2} cpu-s over {secs:.2} s{peer_cpu_note}"),
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
    if profile::wanted(&place.pids) {
        // Profiled: the connection rate's first round too (both proxies), then no more rows.
        let rec = profile::record(0, "connrate", "weft", &place.pids);
        let rate = conn_rate(w.clone(), sz.conns).await;
        drop(rec);
        let mut note = format!("weft {rate:.0} conn/s");
        if let Some(z) = peer {
            let rec = profile::record(0, "connrate", peer::NAME, &z.pids);
            let zrate = conn_rate(z.route.clone(), sz.conns).await;
            drop(rec);
            note.push_str(&format!(", {} {zrate:.0} conn/s", peer::NAME));
        }
        eprintln!("profiled connection rate (under the profiler): {note}");
        return None;
    }
    let mut sides = vec![
        Side {
            route: &b,
            cpu: &no_cpu,
        },
        Side {
            route: &w,
            cpu: &no_cpu,
        },
    ];
    if let Some(z) = peer {
        sides.push(Side {
            route: &z.route,
            cpu: &no_cpu,
        });
    }
    let r8 = rounds(&sides, |r| throughput(r, sz.stream_bytes, 8)).await;
    verify();
    report.add_vs(
        "throughput, 8 streams",
        p,
        r8[1].0,
        Some(r8[0].0),
        r8.get(2).map(|z| z.0),
        "Gbit/s",
        format!("median of {ROUNDS}"),
    );

    // From here on each side's CPU is counted too.
    sides[1].cpu = &*place.cpu;
    if let (Some(z), Some(side)) = (peer, sides.get_mut(2)) {
        side.cpu = &*z.cpu;
    }
    let mut lat = latency_rounds(&sides, sz.pings).await;
    verify();
    let lz = (lat.len() > 2).then(|| lat.remove(2));
    let (lw, per_round_trip) = lat.remove(1);
    let (lb, _) = lat.remove(0);
    let qs = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];
    report_latencies(
        report,
        "latency 1 KiB ping-pong",
        p,
        &lw,
        &lb,
        lz.as_ref().map(|(z, _)| z.as_slice()),
        &qs,
        "",
    );

    let rc = rounds(&sides, |r| conn_rate(r, sz.conns)).await;
    verify();
    let per_conn = per_conn_us(rc[1].1, sz);
    report.add_vs(
        "connection rate (warm pool)",
        p,
        rc[1].0,
        Some(rc[0].0),
        rc.get(2).map(|z| z.0),
        "conn/s",
        format!("connect + 1 round trip + close, median of {ROUNDS}"),
    );
    let cold = cold_first_byte_ms(&*place.cold).await;
    let warm = first_byte_ms(w.clone()).await;
    let zcold = match peer {
        Some(z) => Some(cold_first_byte_ms(&*z.cold).await),
        None => None,
    };
    verify();
    report.add_vs(
        "first connection, cold (TLS handshake)",
        p,
        cold,
        Some(warm),
        zcold,
        "ms",
        "median of 5, baseline = warm",
    );

    if let Some(rss) = &place.rss {
        let idle = rss();
        report.add_vs(
            "daemon RSS idle (both)",
            p,
            idle as f64 / 1024.0,
            None,
            peer.map(|z| (z.rss)() as f64 / 1024.0),
            "KiB",
            "",
        );
        for n in sz.idle {
            let ours = idle_kib(&**rss, w.clone(), n).await;
            let theirs = match peer {
                Some(z) => Some(idle_kib(&*z.rss, z.route.clone(), n).await),
                None => None,
            };
            verify();
            report.add_vs(
                format!("memory per idle tunnelled connection, {n}"),
                p,
                ours,
                None,
                theirs,
                "KiB",
                "both daemons, RSS delta / connections",
            );
        }
    }
    let costs = Costs {
        per_round_trip,
        per_conn,
        apps_per_gib: place.app_cpu.as_ref().map(|_| app_base / gib),
        plain_gbps,
    };
    let peer_costs = match (&lz, rc.get(2)) {
        (Some((_, per_rt)), Some(z)) => Some(Costs {
            per_round_trip: *per_rt,
            per_conn: per_conn_us(z.1, sz),
            apps_per_gib: None,
            plain_gbps,
        }),
        _ => None,
    };
    Some((costs, peer_costs))
}

/// Time to the first byte over 5 connections that each pay the TLS handshake, median, in ms.
async fn cold_first_byte_ms(cold: &(dyn Fn() -> Arc<dyn Route> + Send + Sync)) -> f64 {
    let mut v = Vec::new();
    for _ in 0..5 {
        v.push(first_byte_ms(cold()).await);
    }
    median(&mut v)
}

/// RSS that `n` idle connections over `route` add to what `rss` meters, per connection, in KiB.
async fn idle_kib(rss: &(dyn Fn() -> u64 + Send + Sync), route: Arc<dyn Route>, n: usize) -> f64 {
    let before = rss();
    let held = hold(route, n).await;
    let after = rss();
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    after.saturating_sub(before) as f64 / n as f64 / 1024.0
}
