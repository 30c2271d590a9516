//! Profiles of the node proxies taken during the mesh rounds, side by side with the peer
//! (`WEFT_BENCH_PROFILE=DIR`): `perf record` sampling the CPU clock (the VM has no hardware
//! counters) of a tunnel's two node proxies while one of its runs goes on, one file per run,
//! `DIR/<case>-<tunnel>.data` (read with `perf report -i FILE --sort dso,sym`), and beside it
//! `perf stat`'s counts of the same run in `DIR/<case>-<tunnel>.stat`: context switches, page
//! faults, and system calls by kind.
//!
//! In this mode the mesh stops after the profiled rows (one stream, a connection-rate run, the
//! paced HTTP load): the figures are taken under the profiler, so they are printed for
//! orientation only.
//! Owns nothing else; `measure` and `mesh` call [`record`] around their first round.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// Where profiles go, when asked for.
fn dir() -> Option<PathBuf> {
    std::env::var_os("WEFT_BENCH_PROFILE").map(PathBuf::from)
}

/// Whether the processes `pids` are profiled in this run (profiles asked for, and separate
/// processes to record: loopback's daemons share the bench's process and never are).
pub(crate) fn wanted(pids: &[u32]) -> bool {
    dir().is_some() && !pids.is_empty()
}

/// What `perf stat` counts: scheduling, faults, and the system calls a relay makes.
const STAT_EVENTS: &str = "task-clock,context-switches,cpu-migrations,page-faults,\
raw_syscalls:sys_enter,syscalls:sys_enter_read,syscalls:sys_enter_write,\
syscalls:sys_enter_readv,syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom,\
syscalls:sys_enter_sendto,syscalls:sys_enter_recvmsg,syscalls:sys_enter_sendmsg,\
syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_mmap,\
syscalls:sys_enter_munmap,syscalls:sys_enter_madvise,syscalls:sys_enter_brk,\
sched:sched_wakeup";

/// A running `perf record` and `perf stat`; dropping it stops both and waits for their files.
pub(crate) struct Recording(Vec<Child>);

/// Starts recording `pids` into `DIR/<case>-<tunnel>.data` during `round` of a case, when it
/// is the first round and they are [`wanted`]; dropping the recording ends it.
pub(crate) fn record(round: usize, case: &str, tunnel: &str, pids: &[u32]) -> Option<Recording> {
    if round != 0 || !wanted(pids) {
        return None;
    }
    let dir = dir()?;
    std::fs::create_dir_all(&dir).expect("profile directory");
    let out = dir.join(format!("{case}-{tunnel}.data"));
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let perf = |args: &[&str], out: PathBuf| {
        Command::new("perf")
            .args(args)
            .arg("-p")
            .arg(pids.join(","))
            .arg("-o")
            .arg(out)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("perf (linux-perf) for WEFT_BENCH_PROFILE")
    };
    let children = vec![
        perf(
            &["record", "--quiet", "-e", "cpu-clock", "-F", "1999"],
            out.clone(),
        ),
        perf(
            &["stat", "-e", STAT_EVENTS],
            dir.join(format!("{case}-{tunnel}.stat")),
        ),
    ];
    // perf attaches asynchronously; give it a moment before the run starts.
    std::thread::sleep(std::time::Duration::from_millis(300));
    eprintln!(
        "profile: recording {case} of {tunnel} into {}",
        out.display()
    );
    Some(Recording(children))
}

impl Drop for Recording {
    fn drop(&mut self) {
        for child in &self.0 {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
        }
        for mut child in self.0.drain(..) {
            let _ = child.wait();
        }
    }
}
