//! ZDS on the wire: one protobuf message per packet on a unix `SOCK_SEQPACKET` socket to
//! istio-cni's node agent, the pod's network namespace riding along an `AddWorkload` as an
//! `SCM_RIGHTS` file descriptor.
//!
//! The exchange (istio-cni's `ztunnelserver.go`, ztunnel's `inpod/protocol.rs`): weft sends
//! `ZdsHello { version: V1 }`; the agent sends one `WorkloadRequest` at a time and waits for
//! its `WorkloadResponse { ack }` (an empty `error` accepts, anything else refuses) before
//! the next. After a (re)connection it first sends every pod it knows (`add`, or `keep` for a
//! pod whose namespace it lost), then `snapshot_sent`; `add` and `del` follow as pods come
//! and go.
//!
//! Owns the socket and the decoding; what a request means is `inpod`'s.

use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::Path;

use prost::Message;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendFlags,
    SocketAddrUnix, SocketFlags, SocketType,
};
use tokio::io::unix::AsyncFd;

use crate::proto::istio::workload::zds::{
    self, workload_request::Payload, Ack, Version, WorkloadRequest, WorkloadResponse, ZdsHello,
};

/// Largest request read: the agent's messages are a uid and three names (ztunnel reads 1 KiB).
const MAX_MESSAGE: usize = 4096;

/// One request of the node agent, decoded.
#[derive(Debug)]
pub enum Request {
    /// Serve this pod, whose network namespace is `netns`.
    Add {
        /// The pod's uid (Kubernetes' `metadata.uid`).
        uid: String,
        /// Its name, namespace and service account, when sent.
        info: Option<zds::WorkloadInfo>,
        /// Its network namespace.
        netns: OwnedFd,
    },
    /// Keep serving this pod if it is served (reconnection snapshot only).
    Keep {
        /// The pod's uid.
        uid: String,
    },
    /// Stop serving this pod.
    Del {
        /// The pod's uid.
        uid: String,
    },
    /// The reconnection snapshot is complete.
    SnapshotSent,
}

/// What one packet turned out to be.
#[derive(Debug)]
pub enum Received {
    /// A request to act on.
    Request(Request),
    /// A packet that is not a valid request (its fds, if any, already closed): refused with
    /// this reason, nothing else is affected.
    Invalid(String),
    /// The agent closed the connection.
    Closed,
}

/// A connection to the node agent.
pub struct ZdsConnection {
    fd: AsyncFd<OwnedFd>,
}

impl ZdsConnection {
    /// Connects to the agent's socket at `path` and says hello (protocol version 1).
    pub async fn connect(path: &Path) -> io::Result<ZdsConnection> {
        let path = path.to_path_buf();
        // A unix connect does not wait for the peer, except on a full backlog: off the runtime.
        let fd = tokio::task::spawn_blocking(move || -> io::Result<OwnedFd> {
            let fd = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::SEQPACKET,
                SocketFlags::CLOEXEC,
                None,
            )?;
            let addr = SocketAddrUnix::new(&path)?;
            rustix::net::connect(&fd, &addr)?;
            rustix::io::ioctl_fionbio(&fd, true)?;
            Ok(fd)
        })
        .await
        .map_err(|e| io::Error::other(format!("connect task: {e}")))??;
        // `AsyncFd::new` is deprecated because a `T: AsRawFd` may close or swap its fd behind
        // the registration; an `OwnedFd` moved in cannot, and the replacement
        // (`AsyncFd::register`) is `unsafe`, which this crate forbids.
        #[allow(deprecated)]
        let fd = AsyncFd::new(fd)?;
        let conn = ZdsConnection { fd };
        conn.send(&ZdsHello {
            version: Version::V1 as i32,
        })
        .await?;
        Ok(conn)
    }

    /// Accepts the request answered (`error` `None`) or refuses it with `error`.
    pub async fn ack(&self, error: Option<String>) -> io::Result<()> {
        self.send(&WorkloadResponse {
            payload: Some(zds::workload_response::Payload::Ack(Ack {
                error: error.unwrap_or_default(),
            })),
        })
        .await
    }

    async fn send(&self, msg: &impl Message) -> io::Result<()> {
        let bytes = msg.encode_to_vec();
        loop {
            let mut ready = self.fd.writable().await?;
            match ready.try_io(|fd| {
                rustix::net::send(fd.get_ref(), &bytes, SendFlags::NOSIGNAL)
                    .map_err(io::Error::from)
            }) {
                Ok(sent) => return sent.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next packet. An `Err` is the connection failing (reconnect); a bad packet is
    /// [`Received::Invalid`].
    pub async fn recv(&self) -> io::Result<Received> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut buf = vec![0u8; MAX_MESSAGE];
            // Room for one fd: more than one is cut (MSG_CTRUNC) and the kernel closes the rest.
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let got = ready.try_io(|fd| {
                rustix::net::recvmsg(
                    fd.get_ref(),
                    &mut [IoSliceMut::new(&mut buf)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)
            });
            let msg = match got {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            // Take ownership of every fd first, so whatever happens next closes them.
            let mut fds: Vec<OwnedFd> = Vec::new();
            for m in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = m {
                    fds.extend(received);
                }
            }
            if msg.bytes == 0 && fds.is_empty() {
                return Ok(Received::Closed);
            }
            if msg.flags.contains(ReturnFlags::TRUNC) || msg.flags.contains(ReturnFlags::CTRUNC) {
                return Ok(Received::Invalid("truncated message".to_string()));
            }
            return Ok(decode(&buf[..msg.bytes.min(buf.len())], fds));
        }
    }
}

/// A packet's bytes and fds as a request (as ztunnel reads them: exactly one fd with an
/// `add`, none with anything else).
pub fn decode(bytes: &[u8], mut fds: Vec<OwnedFd>) -> Received {
    let req = match WorkloadRequest::decode(bytes) {
        Ok(r) => r,
        Err(e) => return Received::Invalid(format!("undecodable request: {e}")),
    };
    let Some(payload) = req.payload else {
        return Received::Invalid("request with no payload this version knows".to_string());
    };
    let fd = match (fds.pop(), fds.is_empty()) {
        (None, _) => None,
        (Some(fd), true) => Some(fd),
        (Some(_), false) => {
            return Received::Invalid(format!("{} file descriptors, not one", fds.len() + 1))
        }
    };
    Received::Request(match (payload, fd) {
        (Payload::Add(a), Some(netns)) => Request::Add {
            uid: a.uid,
            info: a.workload_info,
            netns,
        },
        (Payload::Add(a), None) => {
            return Received::Invalid(format!(
                "add {:?}: no network namespace file descriptor",
                a.uid
            ))
        }
        (_, Some(_)) => {
            return Received::Invalid("a file descriptor with a request other than add".to_string())
        }
        (Payload::Keep(k), None) => Request::Keep { uid: k.uid },
        (Payload::Del(d), None) => Request::Del { uid: d.uid },
        (Payload::SnapshotSent(_), None) => Request::SnapshotSent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(uid: &str) -> Vec<u8> {
        WorkloadRequest {
            payload: Some(Payload::Add(zds::AddWorkload {
                uid: uid.into(),
                workload_info: Some(zds::WorkloadInfo {
                    name: "a".into(),
                    namespace: "shop".into(),
                    service_account: "a".into(),
                }),
            })),
        }
        .encode_to_vec()
    }

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn an_add_needs_exactly_one_fd() {
        assert!(matches!(
            decode(&add("u1"), vec![fd()]),
            Received::Request(Request::Add { uid, info: Some(_), .. }) if uid == "u1"
        ));
        assert!(
            matches!(decode(&add("u1"), vec![]), Received::Invalid(why) if why.contains("no network namespace"))
        );
        assert!(
            matches!(decode(&add("u1"), vec![fd(), fd()]), Received::Invalid(why) if why.contains("2 file descriptors"))
        );
    }

    #[test]
    fn other_requests_carry_no_fd() {
        let del = WorkloadRequest {
            payload: Some(Payload::Del(zds::DelWorkload { uid: "u1".into() })),
        }
        .encode_to_vec();
        assert!(
            matches!(decode(&del, vec![]), Received::Request(Request::Del { uid }) if uid == "u1")
        );
        assert!(matches!(decode(&del, vec![fd()]), Received::Invalid(_)));
        let keep = WorkloadRequest {
            payload: Some(Payload::Keep(zds::KeepWorkload { uid: "u2".into() })),
        }
        .encode_to_vec();
        assert!(
            matches!(decode(&keep, vec![]), Received::Request(Request::Keep { uid }) if uid == "u2")
        );
        let sent = WorkloadRequest {
            payload: Some(Payload::SnapshotSent(zds::SnapshotSent {})),
        }
        .encode_to_vec();
        assert!(matches!(
            decode(&sent, vec![]),
            Received::Request(Request::SnapshotSent)
        ));
    }

    #[test]
    fn unknown_payloads_and_garbage_are_invalid() {
        // Field 9, length-delimited, empty: a payload a later version might add.
        assert!(
            matches!(decode(&[0x4a, 0x00], vec![]), Received::Invalid(why) if why.contains("no payload"))
        );
        assert!(
            matches!(decode(&[0xff, 0xff, 0xff], vec![]), Received::Invalid(why) if why.contains("undecodable"))
        );
        // The request's wire bytes are ztunnel's: field 1 (add) holding field 1 (uid).
        assert_eq!(&add("u")[..5], &[0x0a, 0x11, 0x0a, 0x01, b'u']);
    }
}
