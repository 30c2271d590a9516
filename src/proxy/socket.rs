//! Sockets of the data path: transparent listeners, upstream connections that keep the
//! original source address, and the mark that keeps weft's own traffic out of the capture.
//! In-pod (`SocketMode::InPod`), every socket is created inside the pod's network namespace
//! and carries istio-cni's mark instead, and the original destination of a redirected
//! connection comes from `SO_ORIGINAL_DST`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// `SO_MARK` on every socket weft opens, so rules can tell weft's own traffic apart. Bit 0
/// must stay clear: it is the TPROXY mark, and a socket carrying it would have its own
/// packets routed back to itself by the `fwmark 0x1/0x1 lookup 100` rule (ztunnel's 0x539
/// has that bit set, which is why weft does not reuse it).
pub const WEFT_MARK: u32 = 0x100;

/// `SO_MARK` on every socket weft opens inside a pod (in-pod capture): istio-cni's rules in
/// the pod skip packets with `0x539/0xfff` and mark their connection `0x111`, which routes
/// the app's answers to a source weft took over back to weft (table 100). Istio's
/// `InpodMark`; ztunnel's `packet_mark` in-pod.
pub const INPOD_MARK: u32 = 0x539;

/// How the data path uses sockets: transparently (captured traffic, needs `CAP_NET_ADMIN`),
/// inside a pod's network namespace (in-pod capture), or plainly (loopback tests and benches).
#[derive(Clone, Debug)]
pub enum SocketMode {
    /// `IP_TRANSPARENT` listeners and source-preserving upstream connections.
    Transparent,
    /// Ordinary sockets.
    Plain,
    /// Sockets created in this pod's network namespace with [`INPOD_MARK`]; listeners take
    /// connections istio-cni's rules `REDIRECT` there, upstream connections keep the source
    /// (`IP_TRANSPARENT`) like [`SocketMode::Transparent`].
    InPod(Arc<super::netns::PodNetns>),
}

impl PartialEq for SocketMode {
    fn eq(&self, other: &SocketMode) -> bool {
        match (self, other) {
            (SocketMode::Transparent, SocketMode::Transparent)
            | (SocketMode::Plain, SocketMode::Plain) => true,
            (SocketMode::InPod(a), SocketMode::InPod(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for SocketMode {}

impl SocketMode {
    /// Whether sockets live in a pod's network namespace.
    pub fn is_in_pod(&self) -> bool {
        matches!(self, SocketMode::InPod(_))
    }

    /// A new TCP socket in the right network namespace.
    fn tcp_socket(&self, domain: Domain) -> io::Result<Socket> {
        match self {
            SocketMode::InPod(netns) => netns.tcp_socket(domain),
            _ => Socket::new(domain, Type::STREAM, Some(Protocol::TCP)),
        }
    }
}

/// Binds a listener; in transparent mode it accepts connections for any destination that
/// TPROXY sends it, and the accepted socket's local address is the original destination.
pub fn listen(addr: SocketAddr, mode: &SocketMode) -> io::Result<TcpListener> {
    listen_on(bind(addr, mode)?)
}

/// Binds a listener's socket without listening yet (a bound socket takes no connection). In
/// transparent mode the port is shared (`SO_REUSEPORT`): a new weft binds beside a draining
/// one and takes the connections the kernel hands its socket; with `tcp_migrate_req` (see
/// [`enable_listener_handover`]) those queued on the old one move to it when the old one
/// closes. An IPv6 address binds an IPv6-only socket (IPv4 has listeners of its own, whose
/// accepted addresses stay plain IPv4 rather than IPv4-mapped). In a pod, the socket is the
/// pod's, marked [`INPOD_MARK`], its port shared too (a new weft's listeners beside the old
/// one's in the same pod).
pub fn bind(addr: SocketAddr, mode: &SocketMode) -> io::Result<Socket> {
    let transparent = *mode == SocketMode::Transparent;
    // The port is shared when capturing, so a new weft can listen beside a draining one: on
    // the node (TPROXY), and inside each pod (in-pod, as ztunnel's `inpodPortReuse`: during a
    // rolling update istio-cni hands the pods to the new weft while the old one drains).
    bound(mode, addr, transparent || mode.is_in_pod(), |s| {
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        if transparent {
            set_transparent(s, addr.ip())?;
            s.set_mark(WEFT_MARK)?;
        }
        if mode.is_in_pod() {
            s.set_mark(INPOD_MARK)?;
        }
        Ok(())
    })
}

/// A plain listener (admin, metrics, readiness), its port shared with `SO_REUSEPORT` when
/// `shared` (capturing: a new weft starts beside a draining one).
pub fn listen_plain(addr: SocketAddr, shared: bool) -> io::Result<std::net::TcpListener> {
    let s = bound(&SocketMode::Plain, addr, shared, |_| Ok(()))?;
    s.listen(1024)?;
    Ok(s.into())
}

/// A non-blocking TCP socket bound to `addr` (address reuse on, the port shared when
/// `share_port`), `setup` applied before binding.
fn bound(
    mode: &SocketMode,
    addr: SocketAddr,
    share_port: bool,
    setup: impl FnOnce(&Socket) -> io::Result<()>,
) -> io::Result<Socket> {
    let s = mode.tcp_socket(Domain::for_address(addr))?;
    s.set_reuse_address(true)?;
    if share_port {
        s.set_reuse_port(true)?;
    }
    setup(&s)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// Starts listening on a socket from [`bind`].
pub fn listen_on(s: Socket) -> io::Result<TcpListener> {
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Lets a closing listener hand the connections queued on it to another listener of its
/// port (`net.ipv4.tcp_migrate_req`, Linux 5.14, per network namespace), so a weft that
/// stops beside a new one drops none of them.
pub fn enable_listener_handover() -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1")
}

fn set_transparent(s: &Socket, ip: IpAddr) -> io::Result<()> {
    match ip {
        IpAddr::V4(_) => s.set_ip_transparent_v4(true),
        IpAddr::V6(_) => s.set_ip_transparent_v6(true),
    }
}

/// Connects to `dst`; in transparent mode from `src_ip` (the original client's address, so
/// the app sees who really connected), always with [`WEFT_MARK`]. In a pod, from inside the
/// pod's network namespace with [`INPOD_MARK`], from `src_ip` too.
pub async fn connect(
    dst: SocketAddr,
    src_ip: Option<IpAddr>,
    mode: &SocketMode,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let s = match mode {
        SocketMode::InPod(netns) => {
            let s = netns.tcp_socket_async(Domain::for_address(dst)).await?;
            s.set_nonblocking(true)?;
            TcpSocket::from_std_stream(s.into())
        }
        _ if dst.is_ipv4() => TcpSocket::new_v4()?,
        _ => TcpSocket::new_v6()?,
    };
    {
        let r = SockRef::from(&s);
        let mark = match mode {
            SocketMode::Transparent => Some(WEFT_MARK),
            SocketMode::InPod(_) => Some(INPOD_MARK),
            SocketMode::Plain => None,
        };
        if let Some(mark) = mark {
            r.set_mark(mark)?;
            if let Some(ip) = src_ip.filter(|ip| ip.is_ipv4() == dst.is_ipv4()) {
                set_transparent(&r, ip)?;
                s.bind(SocketAddr::new(ip, 0))?;
            }
        }
        r.set_tcp_nodelay(true)?;
    }
    match tokio::time::timeout(timeout, s.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out after {timeout:?}"),
        )),
    }
}

/// Where an accepted connection was going: the local address (TPROXY keeps it), or in a pod
/// the destination before istio-cni's `REDIRECT` rewrote it (`SO_ORIGINAL_DST`).
pub fn original_dst(s: &TcpStream, mode: &SocketMode) -> io::Result<SocketAddr> {
    let local = s.local_addr()?;
    if !mode.is_in_pod() {
        return Ok(local);
    }
    let r = SockRef::from(s);
    let orig = if local.is_ipv4() {
        r.original_dst_v4()?
    } else {
        r.original_dst_v6()?
    };
    let orig = orig.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST is not an IP address",
        )
    })?;
    // Not redirected: a connection to the listener itself. Taken at its word, weft would
    // connect to its own listener again, and again.
    if orig == local {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{local} was connected to directly, not redirected"),
        ));
    }
    Ok(orig)
}

/// Makes the next close of `s` send a TCP RST instead of a FIN: used when the other side
/// failed, so the client learns at once rather than seeing a clean end of stream.
pub fn reset_on_close(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// TCP keepalive of tunnel and app sockets: a peer that vanished without a FIN or RST (a node
/// gone, a NAT entry expired) is found out and its connection closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub probes: u32,
}

impl Default for Keepalive {
    /// ztunnel's: 180 s idle, 180 s between probes, 9 probes.
    fn default() -> Keepalive {
        Keepalive {
            idle: Duration::from_secs(180),
            interval: Duration::from_secs(180),
            probes: 9,
        }
    }
}

/// Turns TCP keepalive on for `s`.
pub fn keepalive(s: &TcpStream, k: &Keepalive) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(k.idle)
        .with_interval(k.interval)
        .with_retries(k.probes);
    if let Err(e) = SockRef::from(s).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// Socket options for accepted data-path connections.
pub fn tune_accepted(s: &TcpStream, k: &Keepalive) {
    let _ = s.set_nodelay(true);
    keepalive(s, k);
}
