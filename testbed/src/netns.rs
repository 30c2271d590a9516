//! A handle to one named network namespace (`/var/run/netns/<name>`), and the ways a test
//! acts inside it: run a closure on a thread that entered it, open sockets in it, run a
//! program in it, write its sysctls, fetch an HTTP page from a server inside it.
//!
//! Owns: creating and deleting named namespaces (`ip netns add/del`). Does not own which
//! namespaces exist or when they go away: that is the `Testbed`'s job.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

use crate::exec;
use crate::http;

/// Where `ip netns` keeps the bind mounts that name namespaces.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// A named network namespace. Cloning the handle does not clone the namespace; dropping it
/// does not delete the namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Netns {
    name: String,
}

// === impl Netns ===

impl Netns {
    /// A handle to the namespace called `name` (as listed by `ip netns list`). The namespace
    /// is not created; acting on a namespace that does not exist fails then.
    pub fn named(name: impl Into<String>) -> Netns {
        Netns { name: name.into() }
    }

    /// The namespace's name, as used by `ip -n <name>` and `ip netns exec <name>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that names the namespace: `/var/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `f` on a fresh thread that has entered this network namespace
    /// (`setns(CLONE_NEWNET)`), and returns its result. A panic in `f` is resumed on the
    /// calling thread.
    ///
    /// Sockets created inside `f` stay in this namespace for their whole life and can be
    /// used from any thread afterwards (e.g. turned into tokio sockets). The thread ends
    /// when `f` returns, so the calling thread's namespace is never changed.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let path = self.path();
        let handle = thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || -> io::Result<T> {
                let ns = File::open(&path).map_err(|e| {
                    io::Error::new(e.kind(), format!("open {}: {e}", path.display()))
                })?;
                setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    io::Error::other(format!("setns({}, CLONE_NEWNET): {e}", path.display()))
                })?;
                drop(ns);
                Ok(f())
            })?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// A TCP listener bound to `addr` inside this namespace (std's defaults: `SO_REUSEADDR`,
    /// backlog 128).
    pub fn tcp_listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.run(move || TcpListener::bind(addr))?
            .map_err(|e| self.context(e, &format!("bind tcp {addr}")))
    }

    /// A TCP connection to `addr` made from inside this namespace, failing after `timeout`.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.run(move || TcpStream::connect_timeout(&addr, timeout))?
            .map_err(|e| self.context(e, &format!("connect tcp {addr}")))
    }

    /// A UDP socket bound to `addr` inside this namespace.
    pub fn udp_bind(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        self.run(move || UdpSocket::bind(addr))?
            .map_err(|e| self.context(e, &format!("bind udp {addr}")))
    }

    /// A command that runs `program args...` inside this namespace
    /// (`ip netns exec <name> program args...`). `ip` execs the program in place, so the
    /// child's pid is the program's pid and signals reach it directly.
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.arg("netns")
            .arg("exec")
            .arg(&self.name)
            .arg(program)
            .args(args);
        cmd
    }

    /// Runs `program args...` inside this namespace to completion (at most 30 s) and returns
    /// its stdout; fails with the command line and stderr unless it exits with status 0.
    pub fn exec<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> io::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = exec::checked_output(&mut self.command(program, args), exec::COMMAND_TIMEOUT)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ip -n <name> args...` (checked, at most 30 s) and returns its stdout.
    pub fn ip<I, S>(&self, args: I) -> io::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.arg("-n").arg(&self.name).args(args);
        let out = exec::checked_output(&mut cmd, exec::COMMAND_TIMEOUT)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sets the sysctl `key` (dotted, e.g. `net.ipv4.ip_forward`) to `value` in this
    /// namespace, like `sysctl -w key=value` run inside it. Interface names in `key` must not
    /// contain dots.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_owned();
        // /proc/sys/net resolves against the network namespace of the calling thread.
        let written = {
            let path = path.clone();
            self.run(move || std::fs::write(&path, value))?
        };
        written.map_err(|e| self.context(e, &format!("sysctl {key} ({})", path.display())))
    }

    /// A tiny HTTP/1.1 client: `GET path` from the server at `addr`, over a socket created
    /// inside this namespace (e.g. a daemon's admin endpoint at `127.0.0.1:15000` inside a
    /// node namespace). Sends `Connection: close`; connect, read and write each time out
    /// after 5 s. Returns the status code and the body (chunked bodies are decoded).
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
        let stream = self.tcp_connect(addr, http::TIMEOUT)?;
        http::get(stream, &addr.to_string(), path)
            .map_err(|e| self.context(e, &format!("GET http://{addr}{path}")))
    }

    fn context(&self, e: io::Error, what: &str) -> io::Error {
        io::Error::new(e.kind(), format!("{what} in netns {}: {e}", self.name))
    }
}

/// Serialises `ip netns add`: concurrent first uses of `/var/run/netns` race on making it a
/// shared mount point, and the work is quick.
static CREATE_LOCK: Mutex<()> = Mutex::new(());

/// Creates the named network namespace `name` (`ip netns add`).
pub(crate) fn create(name: &str) -> io::Result<Netns> {
    let _serial = CREATE_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    exec::run(Command::new("ip").args(["netns", "add", name]))?;
    Ok(Netns::named(name))
}

/// Deletes the named network namespace `name` (`ip netns del`). Interfaces inside it go
/// with it (a veth pair goes when either end's namespace goes).
pub(crate) fn delete(name: &str) -> io::Result<()> {
    exec::run(Command::new("ip").args(["netns", "del", name]))
}

/// Names of all namespaces in [`NETNS_RUN_DIR`] (empty if the directory does not exist).
pub fn list() -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        if let Some(name) = entry?.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}
