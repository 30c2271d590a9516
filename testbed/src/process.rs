//! Long-running processes started inside a testbed (a weft daemon, a test server), with
//! their output in a log file and a guaranteed end.
//!
//! Owns: starting the process, its log file, signalling it (SIGTERM, SIGKILL), waiting for
//! it with a deadline, and stopping it on drop. Does not own the namespace it runs in.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::exec;
use crate::registry;

/// How long a process gets to exit after SIGTERM when its guard is dropped.
pub const DROP_GRACE: Duration = Duration::from_secs(5);

/// How long to wait for a process to disappear after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// A running child process of a testbed, started by `Testbed::spawn`. Its stdout and stderr
/// go to [`log_path`](Self::log_path). Dropping the guard stops the process (SIGTERM, then
/// SIGKILL after [`DROP_GRACE`]) and reaps it.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
    /// Set once the process has been reaped; its pid may then belong to someone else.
    status: Option<ExitStatus>,
}

// === impl ChildGuard ===

impl ChildGuard {
    /// Starts `cmd` with stdin from /dev/null and stdout+stderr appended to `log`, recorded
    /// under the testbed `prefix` so the testbed and the signal handler can stop it.
    pub(crate) fn spawn(
        prefix: &str,
        name: &str,
        mut cmd: Command,
        log: PathBuf,
    ) -> io::Result<ChildGuard> {
        let out = OpenOptions::new().create(true).append(true).open(&log)?;
        let err = out.try_clone()?;
        let line = exec::display(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawn `{line}`: {e}")))?;
        registry::track_pid(prefix, child.id());
        Ok(ChildGuard {
            name: name.to_owned(),
            child,
            log,
            status: None,
        })
    }

    /// The name given at spawn, used in the log file's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id (of the program itself: `ip netns exec` execs it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file that receives the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far (lossy UTF-8; empty if it cannot be read), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            if let Some(status) = self.child.try_wait()? {
                self.reaped(status);
            }
        }
        Ok(self.status)
    }

    /// Waits at most `timeout` for the process to exit; `None` if it still runs then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            if let Some(status) = exec::wait_timeout(&mut self.child, timeout)? {
                self.reaped(status);
            }
        }
        Ok(self.status)
    }

    /// Sends SIGTERM (nothing if the process has already exited).
    pub fn terminate(&mut self) -> io::Result<()> {
        self.send(Signal::SIGTERM)
    }

    /// Sends SIGINT (nothing if the process has already exited).
    pub fn interrupt(&mut self) -> io::Result<()> {
        self.send(Signal::SIGINT)
    }

    /// Freezes the process (SIGSTOP) until [`resume`](Self::resume): its sockets stay open
    /// and the kernel keeps queueing connections on its listeners.
    pub fn pause(&mut self) -> io::Result<()> {
        self.send(Signal::SIGSTOP)
    }

    /// Lets a [`pause`](Self::pause)d process run again (SIGCONT).
    pub fn resume(&mut self) -> io::Result<()> {
        self.send(Signal::SIGCONT)
    }

    /// Sends SIGKILL (nothing if the process has already exited). Use
    /// [`wait_timeout`](Self::wait_timeout) to reap it.
    pub fn kill(&mut self) -> io::Result<()> {
        self.send(Signal::SIGKILL)
    }

    /// Stops the process: SIGTERM, up to `grace` to exit, then SIGKILL. Returns its exit
    /// status (a signal status if it had to be killed).
    pub fn stop(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        self.terminate()?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        self.kill()?;
        self.wait_timeout(KILL_WAIT)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} (pid {}) survived SIGKILL", self.name, self.pid()),
            )
        })
    }

    fn send(&mut self, signal: Signal) -> io::Result<()> {
        // Reap first: once reaped, the pid may already belong to another process.
        if self.try_wait()?.is_none() {
            registry::signal_pid(self.pid(), signal);
        }
        Ok(())
    }

    fn reaped(&mut self, status: ExitStatus) {
        self.status = Some(status);
        registry::untrack_pid(self.child.id());
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.stop(DROP_GRACE) {
            eprintln!("weft-testbed: stopping {}: {e}", self.name);
        }
    }
}
