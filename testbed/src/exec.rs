//! Running short-lived external programs (`ip`, `tcpdump --version`, ...) with a deadline
//! and a checked exit status.
//!
//! Owns: turning a [`Command`] into its output or into an error that names the command line
//! and carries its stderr. Does not own long-running processes (see `process`).

use std::io::{self, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long a short-lived helper program (`ip`, ...) may take before it is killed.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The command line of `cmd`, for error messages: `ip -n wt1a-n1 link set lo up`.
pub(crate) fn display(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` to completion (at most `timeout`), capturing stdout and stderr, and fails
/// unless it exits with status 0. The error names the command line, its status and stderr.
pub(crate) fn checked_output(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    let line = display(cmd);
    let output = output_with_timeout(cmd, timeout)
        .map_err(|e| io::Error::new(e.kind(), format!("`{line}`: {e}")))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(io::Error::other(format!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Runs `cmd` with [`COMMAND_TIMEOUT`] and a checked status, discarding the output.
pub(crate) fn run(cmd: &mut Command) -> io::Result<()> {
    checked_output(cmd, COMMAND_TIMEOUT).map(drop)
}

/// Like [`Command::output`], but kills the child and fails with `TimedOut` after `timeout`.
fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Drain both pipes on their own threads so a chatty child cannot block on a full pipe
    // while we wait for it to exit.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = match wait_timeout(&mut child, timeout)? {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("did not finish within {timeout:?}"),
            ));
        }
    };
    Ok(Output {
        status,
        stdout: join_drain(stdout),
        stderr: join_drain(stderr),
    })
}

type Drain = Option<mpsc::Receiver<Vec<u8>>>;

fn drain(pipe: Option<impl Read + Send + 'static>) -> Drain {
    pipe.map(|mut pipe| {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
        rx
    })
}

/// The drained bytes; bounded because a grandchild that inherited the pipe could keep it
/// open long after the child exited.
fn join_drain(drain: Drain) -> Vec<u8> {
    drain
        .and_then(|rx| rx.recv_timeout(DRAIN_TIMEOUT).ok())
        .unwrap_or_default()
}

/// How long to wait for a pipe to reach EOF after the child exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits for `child` to exit for at most `timeout`; `None` if it is still running.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}
