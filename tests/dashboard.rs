//! The Grafana dashboard (`deploy/grafana/weft-dashboard.json`) cannot drift from what weft
//! exports: every metric its queries name is a family of weft's registry, as `/metrics`
//! writes it.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// Every PromQL query of the dashboard: the panels' `expr`s (rows' panels too) and the
/// template variables' queries.
fn queries(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// The metric names a query uses: identifiers of weft's families (`weft_`, `istio_`,
/// `process_`), outside label matchers' quoted values.
fn metric_names(query: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut in_string = false;
    let mut word = String::new();
    for c in query.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_string = !in_string;
            word.clear();
            continue;
        }
        if !in_string && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if ["weft_", "istio_", "process_"]
            .iter()
            .any(|p| word.starts_with(p))
        {
            names.insert(word.clone());
        }
        word.clear();
    }
    names
}

/// `# TYPE name type` lines of a Prometheus text exposition.
fn described(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| {
            let mut it = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

/// Whether `name` is a series of a described family: a counter's `_total`, a histogram's
/// `_bucket`/`_sum`/`_count`, or a gauge by its own name.
fn exported(name: &str, families: &BTreeMap<String, String>) -> bool {
    let is = |family: &str, kind: &str| families.get(family).is_some_and(|k| k == kind);
    let suffixed = |suffix: &str, kind: &str| {
        name.strip_suffix(suffix)
            .is_some_and(|family| is(family, kind))
    };
    is(name, "gauge")
        || suffixed("_total", "counter")
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|s| suffixed(s, "histogram"))
}

#[test]
fn metric_names_are_read_from_queries_not_from_label_values() {
    assert_eq!(
        metric_names(
            "sum by (le) (rate(istio_request_duration_milliseconds_bucket{instance=~\"weft_x\"}[5m])) / weft_a"
        ),
        BTreeSet::from([
            "istio_request_duration_milliseconds_bucket".to_string(),
            "weft_a".to_string()
        ])
    );
    let families = described("# TYPE weft_a counter\n# TYPE weft_g gauge\n# TYPE h histogram\n");
    assert!(exported("weft_a_total", &families));
    assert!(!exported("weft_a", &families));
    assert!(exported("weft_g", &families));
    assert!(exported("h_bucket", &families));
    assert!(!exported("weft_b_total", &families));
}

/// Every family weft's registry describes. A family without series is not written on
/// `/metrics`, so one series of each is recorded first, through the handles the data path
/// uses; the registry is the one the daemon serves (`Metrics::new`).
fn weft_families() -> BTreeMap<String, String> {
    use weft::metrics::*;
    let node = NodeDir::new("");
    let ca = weft::identity::BuiltinCa::load(&node.path("ca")).unwrap();
    let certs = weft::identity::CertManager::new(Arc::new(ca), Duration::from_secs(3600));
    let m = Metrics::new(
        weft::state::StateStore::new("test"),
        certs,
        quiet_log(),
        Cluster::default(),
    );
    let s = || "x".to_string();
    let tcp = TcpLabels {
        reporter: Reporter::Destination,
        source_workload: s(),
        source_workload_namespace: s(),
        source_principal: s(),
        source_app: s(),
        source_canonical_service: s(),
        source_canonical_revision: s(),
        source_version: s(),
        source_cluster: s(),
        destination_workload: s(),
        destination_workload_namespace: s(),
        destination_principal: s(),
        destination_app: s(),
        destination_canonical_service: s(),
        destination_canonical_revision: s(),
        destination_version: s(),
        destination_cluster: s(),
        destination_service: s(),
        destination_service_name: s(),
        destination_service_namespace: s(),
        request_protocol: RequestProtocol::Tcp,
        response_flags: "-",
        connection_security_policy: SecurityPolicy::MutualTls,
        source_region: UNKNOWN,
        source_zone: UNKNOWN,
        destination_region: UNKNOWN,
        destination_zone: UNKNOWN,
    };
    for family in [
        &m.tcp.failed,
        &m.tcp.opened,
        &m.tcp.closed,
        &m.tcp.sent_bytes,
        &m.tcp.received_bytes,
    ] {
        family.get_or_create(&tcp).inc();
    }
    m.denials
        .denied
        .get_or_create(&DenialLabels {
            destination_workload: s(),
            destination_workload_namespace: s(),
            transport: Transport::Hbone,
            reason: DenialReason::Policy,
            policy: s(),
        })
        .inc();
    m.capture.run(RunResult::Success);
    m.limits.refused("hbone", RefusalReason::Handshakes);
    m.http.record(
        &RequestSides {
            src_identity: None,
            src_workload: None,
            dst_workload: None,
            dst_identity: None,
            dst_service: None,
            response_flags: "-",
        },
        200,
        1.0,
    );
    described(&m.encode().unwrap())
}

#[test]
fn every_metric_the_dashboard_queries_is_exported_by_weft() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/weft-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let used: BTreeSet<String> = queries(&dashboard)
        .iter()
        .flat_map(|q| metric_names(q))
        .collect();
    // What the dashboard is for: each of these is charted.
    for family in [
        "weft_config_generation",
        "weft_config_loads_total",
        "weft_capture_programming_runs_total",
        "weft_workload_certificate_expiry_seconds",
        "weft_tcp_connections_denied_total",
        "weft_connections_refused_total",
        "istio_requests_total",
        "weft_log_lines_dropped_total",
        "weft_access_log_records_dropped_total",
        "weft_access_log_records_exported_total",
        "weft_access_log_records_failed_total",
    ] {
        assert!(
            used.contains(family),
            "the dashboard does not chart {family}"
        );
    }
    let families = weft_families();
    let missing: Vec<&String> = used.iter().filter(|n| !exported(n, &families)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics weft does not export: {missing:?}\nweft's families: {families:?}"
    );
}
