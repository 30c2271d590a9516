//! A stand-in for istio-cni's node agent (in-pod capture), for `redirect: inpod` tests.
//!
//! What it emulates, read from Istio's `cni/pkg/nodeagent/ztunnelserver*.go` and
//! `cni/pkg/iptables/iptables*.go`:
//! - the ZDS server: a unix `SOCK_SEQPACKET` listener (Go's `unixpacket`); per connection it
//!   first reads the proxy's `ZdsHello`, then sends one `WorkloadRequest` per packet and waits
//!   (5 s, its `readWriteDeadline`) for the `WorkloadResponse` ack before the next; an
//!   `AddWorkload` carries the pod's network namespace fd as `SCM_RIGHTS` (`unix.UnixRights`);
//!   after a (re)connection the snapshot (`add`/`keep` per pod) ends with `SnapshotSent`;
//! - the in-pod capture rules istio-cni writes into each pod's network namespace
//!   (`AppendInpodRules`, defaults: no DNS capture, no virtual interfaces, not ingress mode,
//!   host probe SNAT address 169.254.7.127), in one `iptables-restore` like it, plus
//!   `AddInpodMarkIPRule` (`ip rule add fwmark 0x111/0xfff pref 32764 lookup 100`) and
//!   `AddLoopbackRoutes` (`ip route add local 0.0.0.0/0 dev lo table 100`).
//!
//! What it does not: watch pods (the test says which pod to add or delete), the host-side
//! probe SNAT rules and ipset, IPv6 rules, retry an unacknowledged request, or send requests
//! the real agent never sends (`raw` does, on purpose). Everything it writes is inside the
//! pod namespaces the testbed removes.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use weft::proto::istio::workload::zds::{
    workload_request::Payload, workload_response, AddWorkload, DelWorkload, KeepWorkload,
    SnapshotSent, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
};
use weft_testbed::Netns;

/// istio-cni's `readWriteDeadline`.
const DEADLINE: Duration = Duration::from_secs(5);

/// The in-pod rules of `AppendInpodRules`, as `iptables-restore` input.
pub const INPOD_RULES: &str = "\
*mangle
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
";

/// Writes istio-cni's in-pod capture into the pod namespace `ns`: the iptables rules, the
/// mark rule and table 100's local route.
pub fn capture_in_pod(ns: &Netns) -> io::Result<()> {
    use std::io::Write;
    let mut child = ns
        .command("iptables-restore", ["--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(INPOD_RULES.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "iptables-restore in {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    ns.ip([
        "rule",
        "add",
        "fwmark",
        "0x111/0xfff",
        "pref",
        "32764",
        "lookup",
        "100",
    ])?;
    ns.ip([
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ])?;
    Ok(())
}

/// The node agent's listening socket.
pub struct NodeAgent {
    listener: OwnedFd,
    path: PathBuf,
}

impl NodeAgent {
    /// Listens on `path` (a unix seqpacket socket).
    pub fn listen(path: &Path) -> io::Result<NodeAgent> {
        let _ = std::fs::remove_file(path);
        let listener = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        rustix::net::bind(&listener, &SocketAddrUnix::new(path)?)?;
        rustix::net::listen(&listener, 16)?;
        // accept() honours the receive timeout: a proxy that never comes fails the test.
        rustix::net::sockopt::set_socket_timeout(
            &listener,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_secs(20)),
        )?;
        Ok(NodeAgent {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the proxy to connect and reads its hello.
    pub fn accept(&self) -> io::Result<(AgentConn, ZdsHello)> {
        let fd = rustix::net::accept_with(&self.listener, SocketFlags::CLOEXEC)?;
        for t in [
            rustix::net::sockopt::Timeout::Recv,
            rustix::net::sockopt::Timeout::Send,
        ] {
            rustix::net::sockopt::set_socket_timeout(&fd, t, Some(DEADLINE))?;
        }
        let conn = AgentConn { fd };
        let hello = ZdsHello::decode(conn.read_packet()?.as_slice())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok((conn, hello))
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One accepted proxy connection.
pub struct AgentConn {
    fd: OwnedFd,
}

/// The `WorkloadInfo` istio-cni sends for a testbed pod (`podToWorkload`).
pub fn info(name: &str, namespace: &str, sa: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: namespace.into(),
        service_account: sa.into(),
    }
}

impl AgentConn {
    fn read_packet(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 1024];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &self.fd,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        if got.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "proxy closed the connection",
            ));
        }
        buf.truncate(got.bytes);
        Ok(buf)
    }

    /// Sends raw bytes (with `fd` as `SCM_RIGHTS`, when given) and returns the ack's error
    /// (empty: accepted).
    pub fn raw(&self, bytes: &[u8], fd: Option<&OwnedFd>) -> io::Result<String> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds;
        if let Some(fd) = fd {
            fds = [fd.as_fd()];
            control.push(SendAncillaryMessage::ScmRights(&fds));
        }
        rustix::net::sendmsg(
            &self.fd,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        let resp = WorkloadResponse::decode(self.read_packet()?.as_slice())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match resp.payload {
            Some(workload_response::Payload::Ack(a)) => Ok(a.error),
            None => Err(io::Error::new(io::ErrorKind::InvalidData, "no ack")),
        }
    }

    fn request(&self, payload: Payload, fd: Option<&OwnedFd>) -> io::Result<String> {
        let bytes = WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec();
        self.raw(&bytes, fd)
    }

    /// `AddWorkload` with the pod namespace's fd (opened from `ns`, closed after sending).
    pub fn add(&self, uid: &str, info: WorkloadInfo, ns: &Netns) -> io::Result<String> {
        let fd: OwnedFd = std::fs::File::open(ns.path())?.into();
        self.request(
            Payload::Add(AddWorkload {
                uid: uid.into(),
                workload_info: Some(info),
            }),
            Some(&fd),
        )
    }

    /// `AddWorkload` with no fd (the real agent never sends one).
    pub fn add_without_fd(&self, uid: &str, info: WorkloadInfo) -> io::Result<String> {
        self.request(
            Payload::Add(AddWorkload {
                uid: uid.into(),
                workload_info: Some(info),
            }),
            None,
        )
    }

    pub fn keep(&self, uid: &str) -> io::Result<String> {
        self.request(Payload::Keep(KeepWorkload { uid: uid.into() }), None)
    }

    pub fn del(&self, uid: &str) -> io::Result<String> {
        self.request(Payload::Del(DelWorkload { uid: uid.into() }), None)
    }

    pub fn snapshot_sent(&self) -> io::Result<String> {
        self.request(Payload::SnapshotSent(SnapshotSent {}), None)
    }
}
