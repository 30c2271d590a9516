//! The results: one [`Row`] per figure, printed as the table goes and kept for the JSON
//! report; the helpers that turn samples into rows (percentiles, medians, CPU costs, the
//! cores a path needs).
//!
//! Owns the table's format and the JSON row shape (`scripts/bench --json` readers depend on
//! it). With a peer (`--peer`), rows measured on both carry the peer's figure and weft's ratio
//! to it in two more columns (and two more JSON fields); without one, table and JSON are as
//! they were. Measures nothing itself.

use super::*;

#[derive(Clone, serde::Serialize)]
pub(crate) struct Row {
    pub(crate) case: String,
    pub(crate) place: &'static str,
    pub(crate) weft: f64,
    pub(crate) baseline: Option<f64>,
    pub(crate) unit: &'static str,
    /// weft / baseline (for "higher is better" units) or baseline / weft otherwise.
    pub(crate) ratio: Option<f64>,
    /// The peer's figure (`--peer`: ztunnel), measured in the same rounds as weft's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) peer: Option<f64>,
    /// weft / peer (for "higher is better" units) or peer / weft otherwise: above 1, weft
    /// does better.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) peer_ratio: Option<f64>,
    pub(crate) note: String,
}

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    /// The peer's name (`--peer`), when there is one: the table then has its two columns.
    pub(crate) peer: Option<&'static str>,
}

impl Report {
    pub(crate) fn new(peer: Option<&'static str>) -> Report {
        Report {
            rows: Vec::new(),
            peer,
        }
    }

    /// The table's header line.
    pub(crate) fn header(&self) -> String {
        let mut line = format!(
            "{:<44} {:<9} {:>12} {:>12} {:<12} {:>7}",
            "case", "where", "weft", "baseline", "unit", "ratio"
        );
        if let Some(peer) = self.peer {
            line.push_str(&format!(" {peer:>12} {:>10}", format!("vs {peer}")));
        }
        line.push_str("  note");
        line
    }

    pub(crate) fn add(
        &mut self,
        case: impl Into<String>,
        place: &'static str,
        weft: f64,
        baseline: Option<f64>,
        unit: &'static str,
        note: impl Into<String>,
    ) {
        self.add_vs(case, place, weft, baseline, None, unit, note)
    }

    /// A row with the peer's figure beside weft's, where the peer was measured.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_vs(
        &mut self,
        case: impl Into<String>,
        place: &'static str,
        weft: f64,
        baseline: Option<f64>,
        peer: Option<f64>,
        unit: &'static str,
        note: impl Into<String>,
    ) {
        let higher_better = matches!(unit, "Gbit/s" | "conn/s" | "decisions/s");
        let ratio_to = |other: Option<f64>| {
            other.filter(|b| *b > 0.0 && weft > 0.0).map(|b| {
                if higher_better {
                    weft / b
                } else {
                    b / weft
                }
            })
        };
        let row = Row {
            case: case.into(),
            place,
            weft,
            baseline,
            unit,
            ratio: ratio_to(baseline),
            peer,
            peer_ratio: ratio_to(peer),
            note: note.into(),
        };
        println!("{}", fmt_row(&row, self.peer.is_some()));
        self.rows.push(row);
    }
}

/// One line of the table; `peer_columns` when the run has a peer (`-` where a row has none).
pub(crate) fn fmt_row(r: &Row, peer_columns: bool) -> String {
    let num = |v: f64| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else if v >= 1.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.3}")
        }
    };
    let ratio = |x: Option<f64>| x.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
    let peer = if peer_columns {
        format!(
            " {:>12} {:>10}",
            r.peer.map(num).unwrap_or_else(|| "-".into()),
            ratio(r.peer_ratio)
        )
    } else {
        String::new()
    };
    format!(
        "{:<44} {:<9} {:>12} {:>12} {:<12} {:>7}{peer}  {}",
        r.case,
        r.place,
        num(r.weft),
        r.baseline.map(num).unwrap_or_else(|| "-".into()),
        r.unit,
        ratio(r.ratio),
        r.note
    )
}

/// One row per percentile: `ours` against `base`, with the difference in the note; the
/// peer's samples beside ours where measured (its difference to `base` in the note too).
#[allow(clippy::too_many_arguments)]
pub(crate) fn report_latencies(
    report: &mut Report,
    what: &str,
    place: &'static str,
    ours: &[f64],
    base: &[f64],
    peer: Option<&[f64]>,
    qs: &[(&str, f64)],
    note: &str,
) {
    for (name, q) in qs {
        let (x, y) = (pct(ours, *q), pct(base, *q));
        let z = peer.map(|p| pct(p, *q));
        let peer_note = match (z, report.peer) {
            (Some(z), Some(peer)) => format!("; {peer} +{:.1} µs", z - y),
            _ => String::new(),
        };
        report.add_vs(
            format!("{what} {name}"),
            place,
            x,
            Some(y),
            z,
            "µs",
            format!("+{:.1} µs{note}{peer_note}", x - y),
        );
    }
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The throughput target is 60 % of plain TCP: the cores a path costing `per_gib` CPU seconds
/// per GiB (everything on it: apps and proxies) keeps busy at that rate. Where it exceeds the
/// machine's cores, no run here can reach the target, whatever the scheduling.
pub(crate) fn report_cores_needed(
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

/// The daemons' CPU per unit of work, beside `floor` (two plain forwarders) and the peer's
/// where measured.
pub(crate) fn report_costs(
    report: &mut Report,
    place: &'static str,
    weft: &Costs,
    floor: Option<&Costs>,
    peer: Option<&Costs>,
) {
    let note = if floor.is_some() {
        "both daemons; baseline: the 2 plain forwarders"
    } else {
        "both daemons"
    };
    report.add_vs(
        "daemons' CPU per 1 KiB round trip",
        place,
        weft.per_round_trip,
        floor.map(|f| f.per_round_trip),
        peer.map(|p| p.per_round_trip),
        "µs",
        note,
    );
    report.add_vs(
        "daemons' CPU per connection",
        place,
        weft.per_conn,
        floor.map(|f| f.per_conn),
        peer.map(|p| p.per_conn),
        "µs",
        note,
    );
}
