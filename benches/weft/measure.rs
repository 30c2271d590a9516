//! The shared measurement of one place (loopback or mesh): a [`Place`] names its routes and
//! meters, [`measure`] runs every client measurement against weft and the plain baseline and
//! returns what the daemons spent ([`Costs`]).
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
    /// Makes the next weft connection pay the TLS handshake.
    pub(crate) cold: Box<dyn Fn() -> Arc<dyn Route> + Send + Sync>,
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

pub(crate) async fn measure(place: &Place, sz: Sizes, report: &mut Report) -> Costs {
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
