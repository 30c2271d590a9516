//! A pod's network namespace, for in-pod capture (`redirect: inpod`): the sockets weft opens
//! for a pod (its listeners, its connections to apps, to other nodes, to the outside) are
//! created inside it, so they use the pod's own addresses and istio-cni's rules in there.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole
//! life; binding, listening and connecting can happen on any thread after that. So each pod
//! gets one thread of its own that entered the namespace once (`setns`) and creates sockets
//! on request; no runtime worker ever changes namespace. The thread ends when the pod's data
//! path is done with it ([`PodNetns::close`], after its drain) or the last handle is dropped,
//! whichever comes first: a thread inside a namespace keeps it alive, and a removed pod's
//! must not outlive its connections (a handle may linger in a cache, e.g. the waypoint's app
//! connection pools). The namespace fd istio-cni sent is closed as soon as the thread entered
//! it.
//!
//! Owns no policy and no listener: `proxy::socket` asks it for sockets, `inpod` makes it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};

type Job = Box<dyn FnOnce() + Send>;

/// A handle on a pod's network namespace: creates TCP sockets inside it.
pub struct PodNetns {
    /// Which pod, for logs.
    name: String,
    /// `None` once closed.
    jobs: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
}

impl std::fmt::Debug for PodNetns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PodNetns({})", self.name)
    }
}

fn gone(name: &str) -> io::Error {
    io::Error::other(format!("the network namespace thread of {name} is gone"))
}

impl PodNetns {
    /// Starts the pod's socket thread inside the network namespace `netns` refers to (a
    /// `/proc/<pid>/ns/net` or `/var/run/netns/<name>` fd). Fails when `netns` is not a
    /// network namespace or cannot be entered.
    pub fn enter(netns: OwnedFd, name: &str) -> io::Result<Arc<PodNetns>> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (entered_tx, entered) = mpsc::sync_channel::<io::Result<()>>(1);
        std::thread::Builder::new()
            .name(format!("netns {name}"))
            .spawn(move || {
                let r = rustix::thread::move_into_link_name_space(
                    netns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(io::Error::from);
                drop(netns);
                let ok = r.is_ok();
                let _ = entered_tx.send(r);
                if !ok {
                    return;
                }
                // Until every handle is dropped (the sender side closes).
                while let Ok(job) = queue.recv() {
                    job();
                }
            })?;
        match entered.recv() {
            Ok(Ok(())) => Ok(Arc::new(PodNetns {
                name: name.to_string(),
                jobs: std::sync::Mutex::new(Some(jobs)),
            })),
            Ok(Err(e)) => Err(io::Error::new(
                e.kind(),
                format!("cannot enter the network namespace of {name}: {e}"),
            )),
            Err(_) => Err(gone(name)),
        }
    }

    /// The pod this namespace belongs to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `f` to the namespace's thread.
    fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
        reply: impl FnOnce(T) + Send + 'static,
    ) -> io::Result<()> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        match jobs.as_ref() {
            Some(jobs) => jobs
                .send(Box::new(move || reply(f())))
                .map_err(|_| gone(&self.name)),
            None => Err(gone(&self.name)),
        }
    }

    /// Ends the namespace's thread (it leaves the namespace, which can then go away): no
    /// socket can be created in it from now on.
    pub fn close(&self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// A new TCP socket inside the namespace, waiting on the calling thread for it (the
    /// thread does nothing else than create sockets, so this is a `socket()` call away).
    pub fn tcp_socket(&self, domain: Domain) -> io::Result<Socket> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            move || Socket::new(domain, Type::STREAM, Some(Protocol::TCP)),
            move |s| {
                let _ = tx.send(s);
            },
        )?;
        rx.recv().map_err(|_| gone(&self.name))?
    }

    /// [`PodNetns::tcp_socket`] for async callers (the data path's connections).
    pub async fn tcp_socket_async(&self, domain: Domain) -> io::Result<Socket> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            move || Socket::new(domain, Type::STREAM, Some(Protocol::TCP)),
            move |s| {
                let _ = tx.send(s);
            },
        )?;
        rx.await.map_err(|_| gone(&self.name))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_namespace_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = PodNetns::enter(f.into(), "ns/pod").unwrap_err();
        assert!(e.to_string().contains("ns/pod"), "{e}");
    }

    #[test]
    fn sockets_come_from_the_namespace_entered() {
        // Our own namespace: always allowed to enter, even without root.
        let Ok(f) = std::fs::File::open("/proc/self/ns/net") else {
            return;
        };
        let ns = match PodNetns::enter(f.into(), "self") {
            Ok(ns) => ns,
            // setns needs CAP_SYS_ADMIN, even into one's own namespace.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return,
            Err(e) => panic!("{e}"),
        };
        let s = ns.tcp_socket(Domain::IPV4).unwrap();
        s.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        ns.close();
        let e = ns.tcp_socket(Domain::IPV4).unwrap_err();
        assert!(e.to_string().contains("is gone"), "{e}");
    }
}
