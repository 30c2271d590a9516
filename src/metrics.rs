//! The Prometheus registry weft serves on `:15020/metrics`.
//!
//! Owns metric names and their encoding. Istio's names are used where Istio has one (the
//! data-path metrics); weft's own state is under `weft_`. Values that already live elsewhere
//! (the config load status, certificates, the process) are read at scrape time by
//! collectors instead of being copied into counters, so they cannot drift.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::identity::manager::CertManager;
use crate::state::StateStore;

/// The registry and the handles the data path updates.
pub struct Metrics {
    registry: Registry,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A registry with process, config and certificate metrics.
    pub fn new(store: Arc<StateStore>, certs: Arc<CertManager>) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        registry.register_collector(Box::new(StateCollector { store, certs }));
        Metrics { registry }
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// `process_*` metrics from `/proc/self`, the names Prometheus client libraries use.
#[derive(Debug)]
struct ProcessCollector;

fn gauge<
    T: prometheus_client::encoding::EncodeGaugeValue + Default + fmt::Debug + Send + Sync + 'static,
>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: T,
) -> Result<(), fmt::Error>
where
    ConstGauge<T>: EncodeMetric,
{
    let g = ConstGauge::new(v);
    let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), fmt::Error> {
    let c = ConstCounter::new(v);
    let m = encoder.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let Ok(me) = procfs::process::Process::myself() else {
            return Ok(());
        };
        let tps = procfs::ticks_per_second() as f64;
        if let Ok(stat) = me.stat() {
            let page = procfs::page_size();
            let cpu = (stat.utime + stat.stime) as f64 / tps;
            counter(
                &mut encoder,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                cpu,
            )?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                (stat.rss * page) as i64,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                stat.vsize as i64,
            )?;
            gauge(
                &mut encoder,
                "process_threads",
                "Number of OS threads in the process.",
                stat.num_threads,
            )?;
            if let Ok(boot) = procfs::boot_time_secs() {
                let start = boot as f64 + stat.starttime as f64 / tps;
                gauge(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    start,
                )?;
            }
        }
        if let Ok(n) = me.fd_count() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors.",
                n as i64,
            )?;
        }
        if let Ok(limits) = me.limits() {
            if let procfs::process::LimitValue::Value(v) = limits.max_open_files.soft_limit {
                gauge(
                    &mut encoder,
                    "process_max_fds",
                    "Maximum number of open file descriptors.",
                    v as i64,
                )?;
            }
        }
        Ok(())
    }
}

/// Config-load and certificate metrics, read from the store and the cert manager.
struct StateCollector {
    store: Arc<StateStore>,
    certs: Arc<CertManager>,
}

impl fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StateCollector")
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let st = self.store.status();
        gauge(
            &mut encoder,
            "weft_config_generation",
            "Generation of the mesh config in force (0: none loaded).",
            st.generation as i64,
        )?;
        gauge(
            &mut encoder,
            "weft_config_last_load_success",
            "1 when the most recent attempt to load the mesh config succeeded, 0 when it was rejected.",
            i64::from(st.last_attempt_ok),
        )?;
        {
            let mut m = encoder.encode_descriptor(
                "weft_config_loads",
                "Attempts to load the mesh config, by result.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(st.loads_ok).encode(m.encode_family(&[("result", "success")])?)?;
            ConstCounter::new(st.loads_failed)
                .encode(m.encode_family(&[("result", "failure")])?)?;
        }
        let certs = self.certs.certs();
        gauge(
            &mut encoder,
            "weft_workload_certificates",
            "Workload certificates held.",
            certs.len() as i64,
        )?;
        let mut m = encoder.encode_descriptor(
            "weft_workload_certificate_expiry_seconds",
            "Expiry time of each workload certificate, in seconds since the epoch.",
            None,
            MetricType::Gauge,
        )?;
        for c in certs {
            let expiry = c
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let id = c.identity.to_string();
            ConstGauge::new(expiry).encode(m.encode_family(&[("identity", id.as_str())])?)?;
        }
        Ok(())
    }
}
