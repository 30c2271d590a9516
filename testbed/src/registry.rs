//! The process-wide record of what live testbeds created, so that it can be removed on
//! drop, on Ctrl-C and after a killed run.
//!
//! Owns: the naming scheme (`wt<pid><tag>`, e.g. `wt12345a`), every `ip netns add` made by
//! this crate, the pids of processes started in testbeds, the SIGINT/SIGTERM handler, and
//! [`cleanup_stale`]. Does not own the topology (see `testbed`).
//!
//! Invariants:
//! - A namespace is recorded under its testbed's prefix in the same critical section that
//!   creates it, so whoever holds the lock sees every namespace that exists.
//! - Once the signal handler has started cleaning up, no namespace is created any more.
//! - A pid is recorded only while its process is not yet reaped (its `Child` still owns
//!   it), so signalling a recorded pid never hits an unrelated process.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::netns::{self, Netns};

/// Every testbed prefix starts with this, followed by the pid of the creating process.
const NAME_HEAD: &str = "wt";

/// Per-process counter that makes several testbeds of one process distinct.
static NEXT_TAG: AtomicU64 = AtomicU64::new(0);

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    beds: BTreeMap::new(),
    pids: BTreeMap::new(),
    shutting_down: false,
});

struct Registry {
    /// Live testbeds by prefix.
    beds: BTreeMap<String, LiveBed>,
    /// Unreaped child processes started in testbeds, with their testbed's prefix.
    pids: BTreeMap<u32, String>,
    /// Set by the signal handler: the process is about to exit.
    shutting_down: bool,
}

#[derive(Default)]
struct LiveBed {
    /// In creation order; removed in reverse.
    namespaces: Vec<String>,
    /// The testbed's temporary directory, removed by the signal handler (drop removes it
    /// through `TempDir`).
    dir: Option<PathBuf>,
}

fn lock() -> MutexGuard<'static, Registry> {
    // A panic while holding the lock leaves the maps consistent (every mutation is a
    // single insert or remove), so a poisoned lock is still usable.
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Allocates a fresh prefix `wt<pid><tag>` that no existing namespace uses, and records a
/// live testbed under it.
pub(crate) fn register_bed(dir: Option<PathBuf>) -> io::Result<String> {
    let pid = std::process::id();
    let existing = netns::list()?;
    // Names of a dead run whose pid we now have may still be around: skip their tags.
    for _ in 0..10_000 {
        let prefix = format!(
            "{NAME_HEAD}{pid}{}",
            tag(NEXT_TAG.fetch_add(1, Ordering::Relaxed))
        );
        let taken = existing
            .iter()
            .any(|name| name == &prefix || name.starts_with(&format!("{prefix}-")));
        if !taken {
            let bed = LiveBed {
                namespaces: Vec::new(),
                dir,
            };
            lock().beds.insert(prefix.clone(), bed);
            return Ok(prefix);
        }
    }
    Err(io::Error::other("no free testbed prefix"))
}

/// `a`, `b`, ..., `z`, `ba`, `bb`, ...: base 26 in letters, so that the pid before it stays
/// parseable.
fn tag(mut n: u64) -> String {
    let mut letters = Vec::new();
    loop {
        letters.push(b'a' + (n % 26) as u8);
        n /= 26;
        if n == 0 {
            break;
        }
    }
    letters.reverse();
    String::from_utf8_lossy(&letters).into_owned()
}

/// Creates the namespace `name` for the testbed `prefix` and records it.
pub(crate) fn create_namespace(prefix: &str, name: &str) -> io::Result<Netns> {
    let mut registry = lock();
    if registry.shutting_down {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "the process is shutting down on a signal",
        ));
    }
    let ns = netns::create(name)?;
    registry
        .beds
        .entry(prefix.to_owned())
        .or_default()
        .namespaces
        .push(name.to_owned());
    Ok(ns)
}

/// Records `pid` as a child process of the testbed `prefix`.
pub(crate) fn track_pid(prefix: &str, pid: u32) {
    lock().pids.insert(pid, prefix.to_owned());
}

/// Forgets `pid`; called right after the process was reaped.
pub(crate) fn untrack_pid(pid: u32) {
    lock().pids.remove(&pid);
}

/// Removes the testbed `prefix`: SIGKILLs its processes that are still recorded (their
/// guards outlived the testbed), deletes its namespaces in reverse creation order and
/// forgets it. Returns the errors met, one line each.
pub(crate) fn remove_bed(prefix: &str) -> Vec<String> {
    let mut registry = lock();
    let mut errors = Vec::new();
    let orphans: Vec<u32> = registry
        .pids
        .iter()
        .filter(|(_, owner)| owner.as_str() == prefix)
        .map(|(pid, _)| *pid)
        .collect();
    for pid in orphans {
        signal_pid(pid, Signal::SIGKILL);
    }
    if let Some(bed) = registry.beds.remove(prefix) {
        for name in bed.namespaces.iter().rev() {
            if let Err(e) = netns::delete(name) {
                errors.push(e.to_string());
            }
        }
    }
    errors
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub(crate) fn signal_pid(pid: u32, signal: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), signal);
    }
}

/// Whether `pid` is a process that still runs (not gone, not a zombie).
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// Installs a SIGINT/SIGTERM/SIGHUP handler that removes every live testbed of this process
/// (stops its processes, deletes its namespaces and temporary directory) and then exits
/// with status 128 + signal number. Meant for binaries such as the demo; tests rely on drop.
///
/// The handler only wakes a dedicated thread (signal-hook's self-pipe), which does the
/// cleanup. No signal is blocked: processes started later, in testbeds or not, begin with
/// an empty signal mask and default dispositions (exec resets caught signals), so a daemon
/// started by the demo sees the SIGTERM this cleanup sends it. Calling it again is a no-op.
pub fn install_signal_cleanup() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
                .map_err(|e| format!("handle SIGINT/SIGTERM/SIGHUP: {e}"))?;
            thread::Builder::new()
                .name("testbed-signals".into())
                .spawn(move || {
                    let Some(number) = signals.forever().next() else {
                        return;
                    };
                    let name = Signal::try_from(number)
                        .map(|signal| signal.as_str())
                        .unwrap_or("signal");
                    eprintln!("weft-testbed: {name}, removing testbeds");
                    cleanup_all();
                    std::process::exit(128 + number);
                })
                .map(drop)
                .map_err(|e| format!("spawn the signal thread: {e}"))
        })
        .clone()
        .map_err(io::Error::other)
}

/// How long processes get between SIGTERM and SIGKILL when the process is interrupted.
const SIGNAL_GRACE: Duration = Duration::from_secs(2);

/// Removes everything of every live testbed; no namespace is created after this starts.
fn cleanup_all() {
    let mut registry = lock();
    registry.shutting_down = true;
    let pids: Vec<u32> = registry.pids.keys().copied().collect();
    for &pid in &pids {
        signal_pid(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + SIGNAL_GRACE;
    while pids.iter().any(|&pid| is_running(pid)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    for &pid in &pids {
        signal_pid(pid, Signal::SIGKILL);
    }
    for (prefix, bed) in std::mem::take(&mut registry.beds) {
        for name in bed.namespaces.iter().rev() {
            if let Err(e) = netns::delete(name) {
                eprintln!("weft-testbed: {prefix}: {e}");
            }
        }
        if let Some(dir) = bed.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The pid in a testbed namespace name `wt<pid><tag>[-...]` (tag: lowercase letters), or
/// `None` for any other name.
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_HEAD)?;
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (pid, rest) = rest.split_at(digits);
    let tag_len = rest.len()
        - rest
            .trim_start_matches(|c: char| c.is_ascii_lowercase())
            .len();
    let (tag, rest) = rest.split_at(tag_len);
    if digits == 0 || tag.is_empty() || !(rest.is_empty() || rest.starts_with('-')) {
        return None;
    }
    pid.parse::<u32>()
        .ok()
        .filter(|&pid| pid > 0 && i32::try_from(pid).is_ok())
}

/// Deletes the namespaces left by killed runs: names of the shape `wt<pid><tag>[-...]` whose
/// pid no longer exists. Names of live processes (this one included), and names of any
/// other shape, are never touched. Returns the names deleted.
pub fn cleanup_stale() -> io::Result<Vec<String>> {
    let own = std::process::id();
    let mut deleted = Vec::new();
    let mut errors = Vec::new();
    for name in netns::list()? {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid == own || process_exists(pid) {
            continue;
        }
        match netns::delete(&name) {
            Ok(()) => deleted.push(name),
            // Another process cleaning up at the same time got there first.
            Err(_) if !Netns::named(&name).path().exists() => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    if errors.is_empty() {
        Ok(deleted)
    } else {
        Err(io::Error::other(format!(
            "deleted {deleted:?}, but: {}",
            errors.join("; ")
        )))
    }
}

/// Whether a process `pid` exists (a zombie counts: its pid is not free yet).
fn process_exists(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 checks existence only; EPERM means it exists but belongs to someone else.
    !matches!(kill(Pid::from_raw(raw), None), Err(Errno::ESRCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_distinct_letter_strings() {
        let tags: Vec<String> = (0..1000).map(tag).collect();
        assert_eq!(&tags[..3], ["a", "b", "c"]);
        assert_eq!(tags[26], "ba");
        let unique: std::collections::BTreeSet<&String> = tags.iter().collect();
        assert_eq!(unique.len(), tags.len());
        assert!(tags
            .iter()
            .all(|t| t.bytes().all(|b| b.is_ascii_lowercase())));
    }

    #[test]
    fn owner_pid_reads_only_the_testbed_shape() {
        assert_eq!(owner_pid("wt12345a"), Some(12345));
        assert_eq!(owner_pid("wt12345a-n1"), Some(12345));
        assert_eq!(owner_pid("wt12345bc-n1-p0"), Some(12345));
        assert_eq!(owner_pid("wt12345"), None);
        assert_eq!(owner_pid("wt12345-n1"), None);
        assert_eq!(owner_pid("wta-n1"), None);
        assert_eq!(owner_pid("wt0a"), None);
        assert_eq!(owner_pid("wt99999999999a"), None);
        assert_eq!(owner_pid("wt12345aB"), None);
        assert_eq!(owner_pid("xwt12345a"), None);
        assert_eq!(owner_pid("cni-1234"), None);
    }
}
