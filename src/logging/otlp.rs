//! Optional export of the access log to an OpenTelemetry collector over OTLP/gRPC
//! (`accessLog.otlp` in the daemon config).
//!
//! Owns the tracing layer that turns each access-log event (target `access`) into an OTLP log
//! record, the bounded queue between that layer and the exporter, and the exporter's thread.
//! It does not decide what an access-log event says: that is `logging::access`.
//!
//! Invariants:
//! - The data path never blocks and never waits on the collector: the layer builds the record
//!   and offers it to a bounded queue (`queueSize` records) with `try_send`; when the queue is
//!   full the record is dropped and counted (`weft_access_log_records_dropped_total`).
//! - One thread of its own (`weft-otlp`, with a single-threaded tokio runtime for the gRPC
//!   client) takes records off the queue in batches of at most `batchSize`, sent when full or
//!   `exportInterval` after the first record of the batch, each export bounded by `timeout`.
//!   A slow or absent collector only fills the queue; records it failed to take are counted
//!   (`weft_access_log_records_failed_total`), those it took too
//!   (`weft_access_log_records_exported_total`).
//! - Every record carries the event's fields as attributes (numbers as numbers) and its
//!   message as body; the resource says `service.name=weft` and `k8s.node.name`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{
    LogBatch, LogExporter, LogProcessor, SdkLogRecord, SdkLogger, SdkLoggerProvider,
};
use opentelemetry_sdk::Resource;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use super::access;

/// `accessLog.otlp`: where and how access-log records are exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpSettings {
    /// The collector's OTLP/gRPC endpoint, `http://host:port`.
    pub endpoint: String,
    /// Records waiting for export at most; beyond, records are dropped (and counted).
    pub queue_size: usize,
    /// Records per export at most.
    pub batch_size: usize,
    /// How long a record waits for its batch to fill before the batch is sent anyway.
    pub export_interval: Duration,
    /// How long one export may take (connecting, retries included).
    pub timeout: Duration,
}

/// Defaults of `accessLog.otlp` beside its `endpoint`.
pub const DEFAULT_OTLP: OtlpSettings = OtlpSettings {
    endpoint: String::new(),
    queue_size: 4096,
    batch_size: 512,
    export_interval: Duration::from_secs(1),
    timeout: Duration::from_secs(5),
};

/// Counts of the access-log export, read by `/metrics` (zero while export is off).
#[derive(Debug, Default)]
pub struct ExportCounters {
    dropped: AtomicU64,
    exported: AtomicU64,
    failed: AtomicU64,
}

impl ExportCounters {
    /// Records dropped because the export queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Records the collector accepted.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }

    /// Records lost in failed exports (collector unreachable, refusing, or too slow).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// Why the exporter could not be started.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The exporter's thread could not be started.
    #[error("cannot start the OTLP exporter thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The exporter refused its settings.
    #[error("OTLP exporter for {endpoint}: {message}")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// What it said.
        message: String,
    },
}

// === impl Export ===

/// The running exporter: its layer goes into the subscriber; dropping it flushes what is
/// queued (bounded by `exportInterval` + `timeout`) and stops the thread.
pub struct Export {
    layer: Option<AccessLayer>,
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<()>,
    wait: Duration,
}

impl Export {
    /// Starts the exporter's thread for `settings`, naming `node` in the resource.
    pub fn start(
        settings: &OtlpSettings,
        node: &str,
        counters: Arc<ExportCounters>,
    ) -> Result<Export, OtlpError> {
        let (tx, rx) = mpsc::sync_channel(settings.queue_size);
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (done_tx, done) = mpsc::sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let resource = Resource::builder_empty()
            .with_service_name("weft")
            .with_attribute(KeyValue::new("k8s.node.name", node.to_string()))
            .build();
        let worker = Worker {
            settings: settings.clone(),
            resource,
            counters: counters.clone(),
            stop: stop.clone(),
        };
        std::thread::Builder::new()
            .name("weft-otlp".into())
            .spawn(move || {
                worker.run(rx, ready_tx);
                let _ = done_tx.send(());
            })
            .map_err(OtlpError::Thread)?;
        // The exporter is built on its thread (the gRPC channel needs its runtime); its
        // verdict comes back before the layer is handed out.
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                return Err(OtlpError::Exporter {
                    endpoint: settings.endpoint.clone(),
                    message,
                })
            }
            Err(_) => {
                return Err(OtlpError::Exporter {
                    endpoint: settings.endpoint.clone(),
                    message: "the exporter thread ended".into(),
                })
            }
        }
        let provider = SdkLoggerProvider::builder()
            .with_log_processor(Queue { tx, counters })
            .build();
        let logger = provider.logger_with_scope(
            InstrumentationScope::builder("weft.access")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        Ok(Export {
            layer: Some(AccessLayer { logger }),
            stop,
            done,
            wait: settings.export_interval + settings.timeout + Duration::from_secs(1),
        })
    }

    /// The tracing layer that feeds the queue (taken once, for the subscriber).
    pub fn take_layer(&mut self) -> Option<AccessLayer> {
        self.layer.take()
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.done.recv_timeout(self.wait);
    }
}

// === impl AccessLayer ===

/// Turns access-log events into OTLP log records (other targets are ignored).
pub struct AccessLayer {
    logger: SdkLogger,
}

impl<S: tracing::Subscriber> Layer<S> for AccessLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != access::TARGET {
            return;
        }
        let mut record = self.logger.create_log_record();
        let now = SystemTime::now();
        record.set_timestamp(now);
        record.set_observed_timestamp(now);
        record.set_severity_number(Severity::Info);
        record.set_severity_text("INFO");
        record.set_target(access::TARGET);
        event.record(&mut Fields(&mut record));
        self.logger.emit(record);
    }
}

/// Copies an event's fields into a record: `message` as the body, the rest as attributes.
struct Fields<'a>(&'a mut SdkLogRecord);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.add_attribute(field.name(), value.to_string());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0
            .add_attribute(field.name(), i64::try_from(value).unwrap_or(i64::MAX));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.add_attribute(field.name(), value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.add_attribute(field.name(), value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.add_attribute(field.name(), value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.0.set_body(AnyValue::String(text.into()));
        } else {
            self.0.add_attribute(field.name(), text);
        }
    }
}

// === impl Queue ===

/// The SDK's log processor: offers each record to the bounded queue, never waiting.
#[derive(Debug)]
struct Queue {
    tx: SyncSender<SdkLogRecord>,
    counters: Arc<ExportCounters>,
}

impl LogProcessor for Queue {
    fn emit(&self, data: &mut SdkLogRecord, _scope: &InstrumentationScope) {
        match self.tx.try_send(data.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

// === impl Worker ===

/// The exporter's thread: batches off the queue, exports, counts.
struct Worker {
    settings: OtlpSettings,
    resource: Resource,
    counters: Arc<ExportCounters>,
    stop: Arc<AtomicBool>,
}

/// A failed export is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

impl Worker {
    fn run(self, rx: mpsc::Receiver<SdkLogRecord>, ready: SyncSender<Result<(), String>>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(format!("runtime: {e}")));
                return;
            }
        };
        let built = rt.block_on(async {
            opentelemetry_otlp::LogExporter::builder()
                .with_tonic()
                .with_endpoint(self.settings.endpoint.clone())
                .with_timeout(self.settings.timeout)
                .build()
        });
        let mut exporter = match built {
            Ok(e) => e,
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return;
            }
        };
        exporter.set_resource(&self.resource);
        let _ = ready.send(Ok(()));
        let scope = InstrumentationScope::builder("weft.access")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let mut batch: Vec<SdkLogRecord> = Vec::with_capacity(self.settings.batch_size);
        let mut last_warning: Option<Instant> = None;
        loop {
            let stopping = self.stop.load(Ordering::Relaxed);
            // Fill a batch: the first record waits up to an interval (so `stop` is seen), the
            // rest until the batch is full or the interval since the first has passed.
            let mut deadline = Instant::now() + self.settings.export_interval;
            while batch.len() < self.settings.batch_size {
                let wait = deadline.saturating_duration_since(Instant::now());
                let next = if stopping {
                    rx.try_recv().map_err(|_| RecvTimeoutError::Timeout)
                } else {
                    rx.recv_timeout(wait)
                };
                match next {
                    Ok(record) => {
                        if batch.is_empty() {
                            deadline = Instant::now() + self.settings.export_interval;
                        }
                        batch.push(record);
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            let full = batch.len() == self.settings.batch_size;
            if !batch.is_empty() {
                let n = batch.len() as u64;
                let pairs: Vec<(&SdkLogRecord, &InstrumentationScope)> =
                    batch.iter().map(|r| (r, &scope)).collect();
                // The exporter bounds its own attempts by `timeout`; this bounds them again in
                // case a connection hangs where its deadline does not reach.
                let result = rt.block_on(async {
                    tokio::time::timeout(
                        self.settings.timeout + Duration::from_millis(500),
                        exporter.export(LogBatch::new(&pairs)),
                    )
                    .await
                });
                drop(pairs);
                batch.clear();
                let error = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some(format!("no answer in {:?}", self.settings.timeout)),
                };
                match error {
                    None => {
                        self.counters.exported.fetch_add(n, Ordering::Relaxed);
                    }
                    Some(e) => {
                        self.counters.failed.fetch_add(n, Ordering::Relaxed);
                        if last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                            last_warning = Some(Instant::now());
                            tracing::warn!(
                                endpoint = %self.settings.endpoint,
                                records = n,
                                error = %e,
                                "access-log export failed (logged at most once a minute; weft_access_log_records_failed_total counts every record)"
                            );
                        }
                    }
                }
            }
            // Stopping, the queue is drained batch by batch (bounded by its size).
            if stopping && !full {
                let _ = exporter.shutdown();
                return;
            }
        }
    }
}
