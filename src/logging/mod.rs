//! The process's tracing subscriber and the log level that `/logging` changes at runtime.
//!
//! Owns log formatting (text or JSON on stderr) and the filter. Access logs are events with
//! the fixed target `access`, so the filter can route them (`access=off`).
//!
//! Lines are written to stderr by a thread of their own, through a bounded queue: a burst of
//! events (a flood of refused connections, each logged) never blocks the task that logs them
//! on a slow pipe. When the queue is full, lines are dropped and counted
//! (`weft_log_lines_dropped_total`).
//!
//! The access log's events and fields are `access`'s; their optional export to an
//! OpenTelemetry collector (`accessLog.otlp`) is `otlp`'s.

pub mod access;
pub mod otlp;

use std::sync::{Arc, Mutex};

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Registry};

/// Output format of the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The levels `/logging?level=` accepts, alone or as `target=level`.
pub const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Why a log filter was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Nothing was given.
    #[error("empty log level; {}", accepted())]
    Empty,
    /// An item is no level or `target=level`.
    #[error("invalid log level {item:?}; {accepted}", accepted = accepted())]
    Invalid {
        /// The item refused.
        item: String,
    },
    /// The subscriber refused the filter.
    #[error("cannot apply log filter: {0}")]
    Apply(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn accepted() -> String {
    format!(
        "accepted: a level ({}) or comma-separated target=level items, e.g. `info,weft::proxy=debug`",
        LEVELS.join(", ")
    )
}

/// Checks a filter: comma-separated `level` or `target=level` items, levels from [`LEVELS`].
pub fn validate_filter(filter: &str) -> Result<(), LogError> {
    if filter.trim().is_empty() {
        return Err(LogError::Empty);
    }
    for item in filter.split(',') {
        let item = item.trim();
        let (target, level) = match item.split_once('=') {
            Some((t, l)) => (Some(t), l),
            None => (None, item),
        };
        let target_ok = target.is_none_or(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-')
        });
        if !target_ok || !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(LogError::Invalid {
                item: item.to_string(),
            });
        }
    }
    Ok(())
}

/// The filter that a [`validate_filter`]-checked `filter` describes. A `Targets` filter (target
/// prefixes and levels) rather than `EnvFilter`, whose span and field matching weft does not
/// offer and whose regular-expression machinery made the binary 0.26 MB larger (idle RSS was
/// the same either way: README's history table).
pub fn targets(filter: &str) -> Result<Targets, LogError> {
    validate_filter(filter)?;
    let items: Vec<&str> = filter.split(',').map(str::trim).collect();
    items
        .join(",")
        .parse::<Targets>()
        .map_err(|e| LogError::Apply(e.into()))
}

type Setter = Box<dyn Fn(&str) -> Result<(), LogError> + Send + Sync>;

/// Reads and changes the active filter.
pub struct LogControl {
    current: Mutex<String>,
    set: Setter,
    dropped: Option<tracing_appender::non_blocking::ErrorCounter>,
    access_export: Arc<otlp::ExportCounters>,
}

/// Lines queued for stderr at most; beyond, lines are dropped (and counted).
pub const LOG_QUEUE_LINES: usize = 16_384;

/// Flushes the lines (and access-log records) still queued when dropped: keep it until the
/// process ends.
pub struct LogFlush {
    // Field order is drop order: the exporter flushes first, its own warnings still reach
    // stderr.
    _export: Option<otlp::Export>,
    _stderr: tracing_appender::non_blocking::WorkerGuard,
}

impl LogControl {
    /// A control that applies filters with `set` (tests pass a recorder).
    pub fn new(initial: &str, set: Setter) -> LogControl {
        LogControl {
            current: Mutex::new(initial.to_string()),
            set,
            dropped: None,
            access_export: Arc::default(),
        }
    }

    /// The counters of the access log's OTLP export (zero while it is off).
    pub fn access_export(&self) -> &otlp::ExportCounters {
        &self.access_export
    }

    /// Log lines dropped because the queue to stderr was full.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped
            .as_ref()
            .map_or(0, |c| c.dropped_lines() as u64)
    }

    /// The filter in force.
    pub fn current(&self) -> String {
        self.current
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Validates and applies a new filter.
    pub fn set(&self, filter: &str) -> Result<(), LogError> {
        validate_filter(filter)?;
        (self.set)(filter)?;
        match self.current.lock() {
            Ok(mut g) => *g = filter.to_string(),
            Err(p) => *p.into_inner() = filter.to_string(),
        }
        Ok(())
    }
}

/// Installs the global subscriber. The initial filter is `RUST_LOG` if set (in
/// [`validate_filter`]'s form), else `info`.
/// With `otlp` (its settings and this node's name), access-log events are also exported to
/// an OpenTelemetry collector. Keep the [`LogFlush`] until the process ends.
pub fn init(
    format: LogFormat,
    otlp: Option<(&otlp::OtlpSettings, &str)>,
) -> Result<(Arc<LogControl>, LogFlush), otlp::OtlpError> {
    let initial = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "info".to_string());
    // A `RUST_LOG` weft cannot apply leaves `info` in force, said once logging is up.
    let (initial, filter, refused) = match targets(&initial) {
        Ok(t) => (initial, t, None),
        Err(e) => (
            "info".to_string(),
            Targets::new().with_default(tracing::Level::INFO),
            Some(e),
        ),
    };
    let (filter, handle) = reload::Layer::<Targets, Registry>::new(filter);
    let counters = Arc::new(otlp::ExportCounters::default());
    let mut export = match otlp {
        Some((settings, node)) => Some(otlp::Export::start(settings, node, counters.clone())?),
        None => None,
    };
    let access_layer = export.as_mut().and_then(otlp::Export::take_layer);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(access_layer);
    // Colours only for a person at a terminal: logs collected from a pipe stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("weft-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
    };
    let mut control = LogControl::new(
        &initial,
        Box::new(move |f| {
            let filter = targets(f)?;
            handle.reload(filter).map_err(|e| LogError::Apply(e.into()))
        }),
    );
    if let Some(e) = refused {
        tracing::warn!(error = %e, "RUST_LOG not applied; logging at info");
    }
    control.dropped = Some(dropped);
    control.access_export = counters;
    Ok((
        Arc::new(control),
        LogFlush {
            _export: export,
            _stderr: guard,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_routes_by_target_prefix_and_level() {
        use tracing::Level;
        let t = targets(" INFO , access=off,weft::proxy=debug").unwrap();
        assert!(t.would_enable("weft::state", &Level::INFO));
        assert!(!t.would_enable("weft::state", &Level::DEBUG));
        assert!(t.would_enable("weft::proxy::relay", &Level::DEBUG));
        assert!(!t.would_enable("access", &Level::INFO));
        assert!(!t.would_enable("access", &Level::ERROR));
        // Without a bare level, only the named targets log.
        let t = targets("weft=warn").unwrap();
        assert!(t.would_enable("weft::admin", &Level::WARN));
        assert!(!t.would_enable("h2", &Level::ERROR));
        assert!(matches!(targets("weft"), Err(LogError::Invalid { .. })));
    }

    #[test]
    fn filters_accept_levels_and_targets_only() {
        for ok in ["info", "DEBUG", "warn,weft::proxy=trace", "access=off"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "loud", "weft=", "=info", "a b=info", "info,,debug"] {
            let e = validate_filter(bad).unwrap_err().to_string();
            assert!(
                e.contains("accepted: a level (trace, debug, info, warn, error, off)"),
                "{e}"
            );
        }
    }
}
