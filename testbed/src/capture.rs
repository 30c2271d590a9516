//! Packet captures on an interface inside a namespace (`tcpdump`), used to prove what does
//! and does not cross the underlay in clear text.
//!
//! Owns: the tcpdump process, the pcap file it produces, and [`contains`]. The capture is
//! written by tcpdump to a pipe and copied to the file by this crate, so tcpdump's
//! privilege drop cannot make the file unwritable.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::exec;
use crate::netns::Netns;
use crate::registry;

/// How long tcpdump may take to start capturing.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long tcpdump may take to exit after SIGINT, and the copy to finish after that.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// A capture is considered drained once its size has not changed for this long...
const SETTLE_QUIET: Duration = Duration::from_millis(100);
/// ...or after this long in any case.
const SETTLE_MAX: Duration = Duration::from_secs(2);

/// A running `tcpdump -i <iface> -U -s 0` inside a namespace. [`stop`](Self::stop) ends it
/// and returns the pcap bytes; dropping it without `stop` kills tcpdump.
#[derive(Debug)]
pub struct Capture {
    child: Child,
    file: PathBuf,
    /// Bytes copied to `file` so far.
    written: Arc<AtomicU64>,
    /// tcpdump's stderr, for error messages.
    stderr: Arc<Mutex<String>>,
    /// Receives the copy thread's result when tcpdump closes its stdout.
    copied: mpsc::Receiver<io::Result<()>>,
    reaped: bool,
}

// === impl Capture ===

impl Capture {
    /// Starts capturing every packet on `iface` inside `ns` into the pcap file `file`, and
    /// returns once tcpdump reports that it is listening (at most 10 s).
    pub fn start(ns: &Netns, iface: &str, file: impl Into<PathBuf>) -> io::Result<Capture> {
        let file = file.into();
        let mut out = File::create(&file)
            .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", file.display())))?;
        let mut cmd = ns.command(
            "tcpdump",
            [
                "-i",
                iface,
                "-w",
                "-",
                "-U",
                "-s",
                "0",
                "-n",
                "--immediate-mode",
            ],
        );
        let line = exec::display(&cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawn `{line}`: {e}")))?;
        // Recorded under the testbed that owns the namespace (if any), so that the testbed's
        // drop and the signal handler stop it too.
        let owner = ns.name().split('-').next().unwrap_or_default();
        registry::track_pid(owner, child.id());

        let written = Arc::new(AtomicU64::new(0));
        let (copied_tx, copied) = mpsc::channel();
        if let Some(mut stdout) = child.stdout.take() {
            let written = written.clone();
            thread::spawn(move || {
                let result = (|| {
                    let mut buf = [0u8; 64 * 1024];
                    loop {
                        let n = stdout.read(&mut buf)?;
                        if n == 0 {
                            return out.flush();
                        }
                        out.write_all(&buf[..n])?;
                        written.fetch_add(n as u64, Ordering::Relaxed);
                    }
                })();
                let _ = copied_tx.send(result);
            });
        }

        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready) = mpsc::channel();
        if let Some(pipe) = child.stderr.take() {
            let stderr = stderr.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("listening on") {
                        let _ = ready_tx.send(());
                    }
                    let mut text = stderr.lock().unwrap_or_else(|p| p.into_inner());
                    text.push_str(&line);
                    text.push('\n');
                }
            });
        }

        let mut capture = Capture {
            child,
            file,
            written,
            stderr,
            copied,
            reaped: false,
        };
        match ready.recv_timeout(START_TIMEOUT) {
            Ok(()) => Ok(capture),
            Err(e) => {
                capture.kill_and_reap();
                let why = match e {
                    mpsc::RecvTimeoutError::Timeout => {
                        format!("not listening after {START_TIMEOUT:?}")
                    }
                    mpsc::RecvTimeoutError::Disconnected => "exited".to_owned(),
                };
                Err(io::Error::other(format!(
                    "`{line}` {why}: {}",
                    capture.stderr_text().trim()
                )))
            }
        }
    }

    /// The pcap file being written.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// What tcpdump printed on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until the capture has stopped growing (packets sent just before are written),
    /// stops tcpdump (SIGINT, SIGKILL after 5 s) and returns the whole pcap file.
    pub fn stop(mut self) -> io::Result<Vec<u8>> {
        self.settle();
        if let Ok(None) = self.child.try_wait() {
            registry::signal_pid(self.child.id(), Signal::SIGINT);
        }
        if exec::wait_timeout(&mut self.child, STOP_TIMEOUT)?.is_none() {
            self.kill_and_reap();
        } else {
            self.reaped();
        }
        match self.copied.recv_timeout(STOP_TIMEOUT) {
            Ok(result) => result?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("capture {} did not finish", self.file.display()),
                ))
            }
        }
        std::fs::read(&self.file)
    }

    fn settle(&self) {
        let deadline = Instant::now() + SETTLE_MAX;
        let mut last = self.written.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            let now = self.written.load(Ordering::Relaxed);
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= SETTLE_QUIET {
                return;
            }
        }
    }

    fn kill_and_reap(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = exec::wait_timeout(&mut self.child, STOP_TIMEOUT);
            self.reaped();
        }
    }

    fn reaped(&mut self) {
        self.reaped = true;
        registry::untrack_pid(self.child.id());
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// Whether `needle` occurs anywhere in `haystack` (an empty needle always does). Used to look
/// for a plaintext marker in a capture.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
