//! Process accounting from `/proc`: CPU seconds of threads and processes, resident memory.
//!
//! Reads only; knows nothing about the cases.

pub(crate) fn ticks() -> f64 {
    procfs::ticks_per_second() as f64
}

/// CPU seconds of the threads of this process whose name starts with `prefix`.
pub(crate) fn thread_cpu(prefix: &str) -> f64 {
    let Ok(me) = procfs::process::Process::myself() else {
        return 0.0;
    };
    let Ok(tasks) = me.tasks() else { return 0.0 };
    tasks
        .flatten()
        .filter_map(|t| t.stat().ok())
        .filter(|s| s.comm.starts_with(prefix))
        .map(|s| (s.utime + s.stime) as f64 / ticks())
        .sum()
}

pub(crate) fn process_cpu(pid: u32) -> f64 {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| (s.utime + s.stime) as f64 / ticks())
        .unwrap_or(0.0)
}

pub(crate) fn process_rss(pid: u32) -> u64 {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| s.rss * procfs::page_size())
        .unwrap_or(0)
}

pub(crate) fn self_rss() -> u64 {
    process_rss(std::process::id())
}
