//! [`CertManager`]: one workload certificate per wanted identity, issued promptly, renewed at
//! about half its lifetime, and read lock-free on the connection path.
//!
//! Owns: the set of issued certificates and the driver task that keeps it in step with the
//! wanted identities. Does not own: which identities are wanted (a `watch` channel fed by
//! whoever knows the local enrolled pods), nor how certificates are made
//! ([`CertificateAuthority`]).
//!
//! Invariants:
//! - The driver task is the only writer of the certificate map; readers load an immutable
//!   snapshot (`ArcSwap`), so a reader never waits and never sees a half-applied change.
//! - A certificate is replaced only by installing its successor: while a renewal fails and
//!   is retried, the previous certificate stays served. There is no window without one.
//! - A certificate is removed only when its identity stops being wanted.
//! - Results of an issuance started for an identity that was since dropped (or dropped and
//!   wanted again) are discarded; only the slot's current in-flight issuance may install.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rand::Rng;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;

use super::{CertificateAuthority, Identity, IdentityError, IssueError, IssuedCert};

/// First retry delay after a failed issuance; doubles per consecutive failure.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Cap of the retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An issuance that takes longer than this counts as failed (a remote CA may hang).
const ISSUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Renewal is scheduled uniformly in this fraction of the certificate's remaining lifetime.
const RENEW_AT: std::ops::Range<f64> = 0.45..0.55;
/// Never renew more often than this, even if a CA hands out nearly expired certificates.
const MIN_RENEW_DELAY: Duration = Duration::from_secs(1);

type CertMap = BTreeMap<Identity, Arc<IssuedCert>>;

/// Holds one certificate per wanted identity and keeps them fresh. Create with
/// [`CertManager::new`], start the driver with [`CertManager::run`].
pub struct CertManager {
    ca: Arc<dyn CertificateAuthority>,
    ttl: Duration,
    certs: ArcSwap<CertMap>,
    /// Bumped after every install or removal.
    generation: watch::Sender<u64>,
    issued_total: AtomicU64,
    issue_failures: AtomicU64,
    /// Set while a driver runs: a second driver would be a second writer.
    driving: AtomicBool,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("ttl", &self.ttl)
            .field("certs", &self.certs.load().len())
            .field("issued_total", &self.issued_total())
            .field("renewals_failed", &self.renewals_failed())
            .finish_non_exhaustive()
    }
}

impl CertManager {
    /// A manager that asks `ca` for certificates valid for `ttl`. Holds no certificate until
    /// [`run`](Self::run) is told which identities are wanted.
    pub fn new(ca: Arc<dyn CertificateAuthority>, ttl: Duration) -> Arc<CertManager> {
        Arc::new(CertManager {
            ca,
            ttl,
            certs: ArcSwap::from_pointee(CertMap::new()),
            generation: watch::Sender::new(0),
            issued_total: AtomicU64::new(0),
            issue_failures: AtomicU64::new(0),
            driving: AtomicBool::new(false),
        })
    }

    /// Spawns the driver task (on the current tokio runtime): it issues certificates for newly
    /// wanted identities at once, drops those of identities no longer wanted, renews each at
    /// 45–55 % of its lifetime and retries failures with capped exponential backoff.
    ///
    /// The task ends when `shutdown` becomes `true` or its sender is dropped, after aborting
    /// issuances in flight; certificates already installed stay available for draining
    /// connections. If `wanted`'s sender is dropped, the last wanted set is kept and renewed.
    /// Only one driver may run at a time; a second call returns a task that logs an error and
    /// ends at once.
    pub fn run(
        self: &Arc<Self>,
        wanted: watch::Receiver<BTreeSet<Identity>>,
        shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let manager = Arc::clone(self);
        tokio::spawn(async move {
            if manager.driving.swap(true, Ordering::AcqRel) {
                tracing::error!("certificate manager driver already running; not starting another");
                return;
            }
            Driver::new(Arc::clone(&manager))
                .drive(wanted, shutdown)
                .await;
            manager.driving.store(false, Ordering::Release);
        })
    }

    /// The current certificate for `id`, if any. Lock-free; meant for the connection path.
    pub fn get(&self, id: &Identity) -> Option<Arc<IssuedCert>> {
        self.certs.load().get(id).cloned()
    }

    /// All current certificates, ordered by identity (for the admin dump).
    pub fn certs(&self) -> Vec<Arc<IssuedCert>> {
        self.certs.load().values().cloned().collect()
    }

    /// Readiness: whether every identity in `wanted` has a certificate.
    pub fn has_all(&self, wanted: &BTreeSet<Identity>) -> bool {
        let certs = self.certs.load();
        wanted.iter().all(|id| certs.contains_key(id))
    }

    /// A receiver whose value (a generation counter) changes after every installed or removed
    /// certificate; await it instead of polling.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// How many certificates have been issued and installed, renewals included.
    pub fn issued_total(&self) -> u64 {
        self.issued_total.load(Ordering::Relaxed)
    }

    /// How many issuance attempts failed (first issuances and renewals alike; each retry
    /// counts).
    pub fn renewals_failed(&self) -> u64 {
        self.issue_failures.load(Ordering::Relaxed)
    }

    fn install(&self, cert: Arc<IssuedCert>) {
        // Load-clone-store is race-free because the driver is the only writer (module doc).
        let mut certs = CertMap::clone(&self.certs.load());
        certs.insert(cert.identity.clone(), cert);
        self.certs.store(Arc::new(certs));
        self.issued_total.fetch_add(1, Ordering::Relaxed);
        self.generation.send_modify(|g| *g += 1);
    }

    fn remove(&self, ids: &[Identity]) {
        let mut certs = CertMap::clone(&self.certs.load());
        let before = certs.len();
        for id in ids {
            certs.remove(id);
        }
        if certs.len() != before {
            self.certs.store(Arc::new(certs));
            self.generation.send_modify(|g| *g += 1);
        }
    }
}

// === Driver ===

/// Where an identity stands in its issue/renew cycle.
enum Next {
    /// An issuance is due at this time.
    Due(Instant),
    /// An issuance is running; only its result may install.
    InFlight(AbortHandle),
}

struct Slot {
    next: Next,
    /// Consecutive failed attempts, for backoff; reset by a success.
    failures: u32,
}

type Issuance = Result<IssuedCert, IdentityError>;

/// The state of the driver task; lives only inside it.
struct Driver {
    manager: Arc<CertManager>,
    slots: BTreeMap<Identity, Slot>,
    tasks: JoinSet<Issuance>,
    /// Which identity each running issuance is for.
    task_ids: HashMap<tokio::task::Id, Identity>,
}

impl Driver {
    fn new(manager: Arc<CertManager>) -> Driver {
        Driver {
            manager,
            slots: BTreeMap::new(),
            tasks: JoinSet::new(),
            task_ids: HashMap::new(),
        }
    }

    async fn drive(
        mut self,
        mut wanted: watch::Receiver<BTreeSet<Identity>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let initial = wanted.borrow_and_update().clone();
        self.reconcile(&initial);
        let mut wanted_open = true;
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            self.start_due();
            let next_due = self
                .slots
                .values()
                .filter_map(|slot| match slot.next {
                    Next::Due(at) => Some(at),
                    Next::InFlight(_) => None,
                })
                .min();
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        tracing::debug!("shutdown sender dropped; stopping certificate manager");
                        break;
                    }
                }
                changed = wanted.changed(), if wanted_open => {
                    if changed.is_ok() {
                        let set = wanted.borrow_and_update().clone();
                        self.reconcile(&set);
                    } else {
                        tracing::debug!("wanted-identities sender dropped; keeping the last set");
                        wanted_open = false;
                    }
                }
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finish(joined);
                }
                () = sleep_until_opt(next_due), if next_due.is_some() => {}
            }
        }
        self.tasks.shutdown().await;
        tracing::debug!("certificate manager stopped");
    }

    /// Makes the slots match `wanted`: new identities become due now, dropped ones lose their
    /// issuance in flight and their certificate.
    fn reconcile(&mut self, wanted: &BTreeSet<Identity>) {
        let dropped: Vec<Identity> = self
            .slots
            .keys()
            .filter(|id| !wanted.contains(*id))
            .cloned()
            .collect();
        for id in &dropped {
            if let Some(Slot {
                next: Next::InFlight(handle),
                ..
            }) = self.slots.remove(id)
            {
                handle.abort();
            }
            tracing::info!(identity = %id, "identity no longer wanted; dropping its certificate");
        }
        if !dropped.is_empty() {
            self.manager.remove(&dropped);
        }
        let now = Instant::now();
        for id in wanted {
            self.slots.entry(id.clone()).or_insert_with(|| Slot {
                next: Next::Due(now),
                failures: 0,
            });
        }
    }

    /// Starts an issuance for every slot that is due.
    fn start_due(&mut self) {
        let now = Instant::now();
        for (id, slot) in &mut self.slots {
            let Next::Due(at) = slot.next else { continue };
            if at > now {
                continue;
            }
            let ca = Arc::clone(&self.manager.ca);
            let ttl = self.manager.ttl;
            let task_id = id.clone();
            let handle = self.tasks.spawn(async move {
                match tokio::time::timeout(ISSUE_TIMEOUT, ca.sign(&task_id, ttl)).await {
                    Ok(result) => result,
                    Err(_) => Err(IdentityError::Issue {
                        identity: task_id,
                        reason: IssueError::Timeout(ISSUE_TIMEOUT),
                    }),
                }
            });
            self.task_ids.insert(handle.id(), id.clone());
            slot.next = Next::InFlight(handle);
        }
    }

    /// Handles the end of one issuance: install and schedule the renewal, or schedule a retry.
    fn finish(&mut self, joined: Result<(tokio::task::Id, Issuance), tokio::task::JoinError>) {
        let (task, outcome) = match joined {
            Ok((task, result)) => (task, Ok(result)),
            Err(e) => (e.id(), Err(e)),
        };
        let Some(id) = self.task_ids.remove(&task) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(&id) else {
            // Dropped while in flight.
            return;
        };
        if !matches!(&slot.next, Next::InFlight(handle) if handle.id() == task) {
            // Superseded: dropped and wanted again while in flight.
            return;
        }
        let error = match outcome {
            Ok(Ok(cert)) => {
                let delay = renew_delay(&cert);
                let previous = self.manager.get(&id);
                tracing::info!(
                    identity = %id,
                    serial = %cert.serial_hex,
                    not_after = %time::OffsetDateTime::from(cert.not_after),
                    renew_in = ?delay,
                    replaces = previous.as_ref().map(|c| c.serial_hex.as_str()),
                    "installed certificate"
                );
                self.manager.install(Arc::new(cert));
                slot.failures = 0;
                slot.next = Next::Due(Instant::now() + delay);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) if e.is_cancelled() => return,
            Err(e) => format!("issuance task failed: {e}"),
        };
        self.manager.issue_failures.fetch_add(1, Ordering::Relaxed);
        slot.failures = slot.failures.saturating_add(1);
        let retry_in = backoff(slot.failures);
        slot.next = Next::Due(Instant::now() + retry_in);
        let current = self.manager.get(&id);
        tracing::warn!(
            identity = %id,
            error = %error,
            attempt = slot.failures,
            retry_in = ?retry_in,
            serving = current.as_ref().map(|c| c.serial_hex.as_str()),
            serving_not_after = current
                .as_ref()
                .map(|c| time::OffsetDateTime::from(c.not_after).to_string()),
            "certificate issuance failed; will retry"
        );
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Uniformly 45–55 % of the certificate's remaining lifetime (measured now, just after
/// issuance), so renewals of many certificates spread out.
fn renew_delay(cert: &IssuedCert) -> Duration {
    let remaining = cert
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    remaining
        .mul_f64(rand::rng().random_range(RENEW_AT))
        .max(MIN_RENEW_DELAY)
}

/// This client's retry schedule.
fn backoff(failures: u32) -> Duration {
    crate::backoff::Backoff {
        min: BACKOFF_MIN,
        max: BACKOFF_MAX,
    }
    .delay(failures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::tests::test_ca;
    use crate::identity::BuiltinCa;
    use std::future::Future;
    use std::pin::Pin;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "foo", sa).unwrap()
    }

    fn set(ids: &[&Identity]) -> BTreeSet<Identity> {
        ids.iter().map(|&i| i.clone()).collect()
    }

    /// Wraps the built-in CA: fails the calls whose index (0-based) is in `fail_calls` and
    /// records the (paused-clock) time of every call.
    struct FlakyCa {
        inner: BuiltinCa,
        fail_calls: Vec<usize>,
        calls: watch::Sender<Vec<Instant>>,
        _dir: tempfile::TempDir,
    }

    impl FlakyCa {
        fn new(fail_calls: Vec<usize>) -> Arc<FlakyCa> {
            let (dir, inner) = test_ca();
            Arc::new(FlakyCa {
                inner,
                fail_calls,
                calls: watch::Sender::new(Vec::new()),
                _dir: dir,
            })
        }

        fn call_times(&self) -> Vec<Instant> {
            self.calls.borrow().clone()
        }

        async fn wait_for_calls(&self, n: usize) {
            let mut calls = self.calls.subscribe();
            within_a_day(calls.wait_for(|calls| calls.len() >= n)).await;
        }
    }

    impl CertificateAuthority for FlakyCa {
        fn sign(
            &self,
            id: &Identity,
            ttl: Duration,
        ) -> Pin<Box<dyn Future<Output = Result<IssuedCert, IdentityError>> + Send + '_>> {
            let mut index = 0;
            self.calls.send_modify(|calls| {
                index = calls.len();
                calls.push(Instant::now());
            });
            let result = if self.fail_calls.contains(&index) {
                Err(IdentityError::Issue {
                    identity: id.clone(),
                    // A planned failure of call `index`, as the wrapped built-in CA would
                    // report one.
                    reason: crate::identity::ca::SignError::CaExpired.into(),
                })
            } else {
                self.inner.issue(id, ttl)
            };
            Box::pin(std::future::ready(result))
        }

        fn roots_der(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
            self.inner.roots_der()
        }
    }

    /// A running manager and the ends of its channels.
    struct Harness {
        manager: Arc<CertManager>,
        wanted: watch::Sender<BTreeSet<Identity>>,
        shutdown: watch::Sender<bool>,
        driver: JoinHandle<()>,
        changes: watch::Receiver<u64>,
    }

    impl Harness {
        fn start(
            ca: Arc<dyn CertificateAuthority>,
            ttl: Duration,
            wanted: BTreeSet<Identity>,
        ) -> Self {
            let manager = CertManager::new(ca, ttl);
            let changes = manager.changes();
            let (wanted, wanted_rx) = watch::channel(wanted);
            let (shutdown, shutdown_rx) = watch::channel(false);
            let driver = manager.run(wanted_rx, shutdown_rx);
            Harness {
                manager,
                wanted,
                shutdown,
                driver,
                changes,
            }
        }

        /// Waits (the paused clock advancing as needed) until `f` holds.
        async fn until(&mut self, f: impl Fn(&CertManager) -> bool) {
            let manager = Arc::clone(&self.manager);
            within_a_day(self.changes.wait_for(|_| f(&manager))).await;
        }

        fn serial(&self, id: &Identity) -> Option<String> {
            self.manager.get(id).map(|c| c.serial_hex.clone())
        }

        async fn stop(self) {
            self.shutdown.send(true).unwrap();
            self.driver.await.unwrap();
        }
    }

    const TTL: Duration = Duration::from_secs(1000);

    /// Fails the test instead of hanging it when a condition never comes true: a day of
    /// paused time passes in milliseconds.
    async fn within_a_day<T, E: std::fmt::Debug>(wait: impl Future<Output = Result<T, E>>) -> T {
        tokio::time::timeout(Duration::from_secs(24 * 60 * 60), wait)
            .await
            .expect("condition not reached within a day of (paused) time")
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn certificates_appear_for_wanted_identities_and_disappear_when_unwanted() {
        let (a, b) = (id("a"), id("b"));
        let (_dir, ca) = test_ca();
        let mut h = Harness::start(Arc::new(ca), TTL, set(&[&a, &b]));
        let start = Instant::now();
        h.until(|m| m.has_all(&set(&[&a, &b]))).await;
        // Issued promptly, not after some timer.
        assert_eq!(Instant::now(), start);
        assert_eq!(h.manager.get(&a).unwrap().identity, a);
        assert_eq!(h.manager.get(&b).unwrap().identity, b);
        let all: Vec<Identity> = h
            .manager
            .certs()
            .iter()
            .map(|c| c.identity.clone())
            .collect();
        assert_eq!(all, vec![a.clone(), b.clone()]);
        assert_eq!(h.manager.issued_total(), 2);

        h.wanted.send(set(&[&b])).unwrap();
        h.until(|m| m.get(&a).is_none()).await;
        assert!(h.manager.get(&b).is_some());
        assert_eq!(h.manager.certs().len(), 1);

        // Wanted again: issued anew.
        h.wanted.send(set(&[&a, &b])).unwrap();
        h.until(|m| m.get(&a).is_some()).await;
        assert_eq!(h.manager.issued_total(), 3);

        h.wanted.send(BTreeSet::new()).unwrap();
        h.until(|m| m.certs().is_empty()).await;
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn certificates_are_renewed_between_45_and_55_percent_of_their_lifetime() {
        let a = id("a");
        let (_dir, ca) = test_ca();
        let mut h = Harness::start(Arc::new(ca), TTL, set(&[&a]));
        h.until(|m| m.get(&a).is_some()).await;
        let mut delays = Vec::new();
        for _ in 0..5 {
            let serial = h.serial(&a).unwrap();
            let issued_at = Instant::now();
            // Not before 45 % (minus a second: the lifetime is measured in whole seconds).
            tokio::time::sleep(TTL.mul_f64(0.45) - Duration::from_secs(1)).await;
            assert_eq!(h.serial(&a).unwrap(), serial, "renewed too early");
            h.until(|m| m.get(&a).is_some_and(|c| c.serial_hex != serial))
                .await;
            let delay = Instant::now() - issued_at;
            assert!(delay <= TTL.mul_f64(0.55), "renewed too late: {delay:?}");
            delays.push(delay);
        }
        assert!(
            delays.iter().any(|d| *d != delays[0]),
            "no jitter: {delays:?}"
        );
        assert_eq!(h.manager.issued_total(), 6);
        assert_eq!(h.manager.renewals_failed(), 0);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_keeps_the_old_certificate_and_retries_with_backoff() {
        let a = id("a");
        // Call 0 issues; the renewal fails three times (calls 1-3) and then succeeds.
        let ca = FlakyCa::new(vec![1, 2, 3]);
        let mut h = Harness::start(ca.clone(), TTL, set(&[&a]));
        h.until(|m| m.get(&a).is_some()).await;
        let old = h.serial(&a).unwrap();
        let generation = *h.changes.borrow();

        ca.wait_for_calls(4).await;
        assert_eq!(h.serial(&a).as_deref(), Some(old.as_str()), "old cert kept");
        assert!(h.manager.has_all(&set(&[&a])));
        assert_eq!(h.manager.renewals_failed(), 3);

        h.until(|m| m.get(&a).is_some_and(|c| c.serial_hex != old))
            .await;
        // The only change since the first issuance is the replacement: never a gap.
        assert_eq!(*h.changes.borrow(), generation + 1);
        let calls = ca.call_times();
        assert_eq!(calls.len(), 5);
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
        let secs = |s: f64| Duration::from_secs_f64(s);
        assert!(gaps[0] >= TTL.mul_f64(0.45) - secs(1.0) && gaps[0] <= TTL.mul_f64(0.55));
        for (gap, ceiling) in gaps[1..].iter().zip([1.0, 2.0, 4.0]) {
            assert!(
                *gap >= secs(ceiling / 2.0) && *gap <= secs(ceiling),
                "backoff {gap:?} not in [{}, {ceiling}] s: {gaps:?}",
                ceiling / 2.0
            );
        }
        assert_eq!(h.manager.renewals_failed(), 3);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn has_all_holds_only_when_every_wanted_identity_has_a_certificate() {
        let (a, b) = (id("a"), id("b"));
        // The first two calls fail: neither identity has a certificate until its retry.
        let ca = FlakyCa::new(vec![0, 1]);
        assert!(CertManager::new(ca.clone(), TTL).has_all(&BTreeSet::new()));
        let mut h = Harness::start(ca.clone(), TTL, set(&[&a, &b]));
        assert!(h.manager.has_all(&BTreeSet::new()));
        assert!(!h.manager.has_all(&set(&[&a])));

        ca.wait_for_calls(2).await;
        assert!(!h.manager.has_all(&set(&[&a])));
        assert!(!h.manager.has_all(&set(&[&a, &b])));

        h.until(|m| m.has_all(&set(&[&a, &b]))).await;
        assert!(h.manager.has_all(&set(&[&a])));
        assert!(!h.manager.has_all(&set(&[&a, &b, &id("c")])));
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_driver_does_not_start_while_one_runs() {
        let a = id("a");
        let (_dir, ca) = test_ca();
        let mut h = Harness::start(Arc::new(ca), TTL, set(&[&a]));
        h.until(|m| m.get(&a).is_some()).await;
        let (_w, w_rx) = watch::channel(BTreeSet::new());
        let (_s, s_rx) = watch::channel(false);
        // It would drop `a` if it ran; it ends at once instead.
        h.manager.run(w_rx, s_rx).await.unwrap();
        assert!(h.manager.get(&a).is_some());
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_the_driver_and_keeps_installed_certificates() {
        let a = id("a");
        let (_dir, ca) = test_ca();
        let mut h = Harness::start(Arc::new(ca), TTL, set(&[&a]));
        h.until(|m| m.get(&a).is_some()).await;
        let manager = Arc::clone(&h.manager);
        h.stop().await;
        assert!(manager.get(&a).is_some());
    }
}
