//! Connection limits of a listener: at most so many connections at once in all, and from one
//! source address. Every pod of a node, and on 15008 every mesh identity, can reach weft's
//! listeners; without a cap one of them could hold enough connections (each with its buffers
//! and task) to have the node kill weft, taking every pod's traffic down with it.
//!
//! Owns the counters and the refusal (a TCP reset, counted in
//! `weft_connections_refused_total{listener,reason}` and logged at most once a second per
//! listener, with the number refused since). Does not own what a listener does with the
//! connections it admits.
//!
//! The per-source counts sit behind a mutex held for one map update per accept and per close:
//! a counter, not state the data path reads.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::metrics::{LimitMetrics, RefusalReason};

/// The limits of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once on the listener.
    pub total: usize,
    /// Connections open at once from one source address.
    pub per_source: usize,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The listener has as many connections as it may.
    #[error("listener limit reached")]
    Listener,
    /// The source has as many connections as it may.
    #[error("per-source limit reached")]
    Source,
}

impl From<Refused> for RefusalReason {
    fn from(r: Refused) -> RefusalReason {
        match r {
            Refused::Listener => RefusalReason::ListenerLimit,
            Refused::Source => RefusalReason::SourceLimit,
        }
    }
}

/// Counts a listener's connections and refuses those over its [`Limits`].
#[derive(Debug)]
pub struct Limiter {
    listener: &'static str,
    limits: Limits,
    total: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    metrics: LimitMetrics,
    log: RefusalLog,
}

/// A connection admitted by a [`Limiter`]; dropping it frees its place.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    src: IpAddr,
}

impl Limiter {
    /// A limiter for the listener named `listener` (its metric label).
    pub fn new(listener: &'static str, limits: Limits, metrics: LimitMetrics) -> Arc<Limiter> {
        Arc::new(Limiter {
            listener,
            limits,
            total: AtomicUsize::new(0),
            per_source: Mutex::new(HashMap::new()),
            metrics,
            log: RefusalLog::default(),
        })
    }

    /// Admits one more connection from `src`, or says why not (counted and logged).
    pub fn admit(self: &Arc<Self>, src: IpAddr) -> Result<Permit, Refused> {
        let verdict = self.try_admit(src);
        if let Err(why) = verdict {
            self.metrics
                .refused(self.listener, RefusalReason::from(why));
            self.log.refused(self.listener, why, self.limits);
        }
        verdict.map(|()| Permit {
            limiter: self.clone(),
            src,
        })
    }

    fn try_admit(&self, src: IpAddr) -> Result<(), Refused> {
        if self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limits.total).then_some(n + 1)
            })
            .is_err()
        {
            return Err(Refused::Listener);
        }
        let mut by_source = crate::sync::lock(&self.per_source);
        let n = by_source.entry(src).or_insert(0);
        if *n >= self.limits.per_source {
            drop(by_source);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Source);
        }
        *n += 1;
        Ok(())
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut by_source = crate::sync::lock(&self.limiter.per_source);
        if let Some(n) = by_source.get_mut(&self.src) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&self.src);
            }
        }
        drop(by_source);
        self.limiter.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Logs refusals at most once a second per listener: a flood of refused connections must not
/// turn into a flood of log lines (each written out before the next accept).
#[derive(Debug)]
struct RefusalLog {
    start: Instant,
    /// Seconds since `start` of the last line written, plus one (0: none yet).
    last: AtomicU64,
    /// Refusals since the last line.
    since: AtomicU64,
}

impl Default for RefusalLog {
    fn default() -> RefusalLog {
        RefusalLog {
            start: Instant::now(),
            last: AtomicU64::new(0),
            since: AtomicU64::new(0),
        }
    }
}

impl RefusalLog {
    fn refused(&self, listener: &str, why: Refused, limits: Limits) {
        self.since.fetch_add(1, Ordering::AcqRel);
        let now = self.start.elapsed().as_secs() + 1;
        let last = self.last.load(Ordering::Acquire);
        if now > last
            && self
                .last
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let count = self.since.swap(0, Ordering::AcqRel);
            tracing::warn!(
                listener,
                reason = %why,
                refused = count,
                max_connections = limits.total,
                max_per_source = limits.per_source,
                "connections refused (reset); logged at most once a second"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn the_caps_hold_per_listener_and_per_source_and_free_on_drop() {
        let metrics = LimitMetrics::default();
        let l = Limiter::new(
            "test",
            Limits {
                total: 3,
                per_source: 2,
            },
            metrics.clone(),
        );
        let a1 = l.admit(ip(1)).unwrap();
        let _a2 = l.admit(ip(1)).unwrap();
        assert_eq!(l.admit(ip(1)).unwrap_err(), Refused::Source);
        // Another source is unaffected by the first one's cap.
        let _b1 = l.admit(ip(2)).unwrap();
        assert_eq!(l.admit(ip(3)).unwrap_err(), Refused::Listener);
        assert_eq!(l.open(), 3);
        drop(a1);
        assert_eq!(l.open(), 2);
        let _a3 = l.admit(ip(1)).unwrap();
        assert_eq!(metrics.count("test", RefusalReason::SourceLimit), 1);
        assert_eq!(metrics.count("test", RefusalReason::ListenerLimit), 1);
        // A source with nothing open leaves no entry behind.
        drop(_b1);
        assert!(!crate::sync::lock(&l.per_source).contains_key(&ip(2)));
    }

    #[test]
    fn refusals_are_logged_at_most_once_a_second() {
        let log = RefusalLog::default();
        let limits = Limits {
            total: 1,
            per_source: 1,
        };
        for _ in 0..10_000 {
            log.refused("test", Refused::Listener, limits);
        }
        // One line written (the first, counting itself), the rest counted for the next one
        // (unless the test took over a second and wrote a second line: fewer then).
        assert!(log.last.load(Ordering::Acquire) >= 1);
        assert!(log.since.load(Ordering::Acquire) <= 9_999);
        assert!(log.since.load(Ordering::Acquire) > 0);
    }
}
