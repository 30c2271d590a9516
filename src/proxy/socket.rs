//! Sockets of the data path: transparent listeners, upstream connections that keep the
//! original source address, and the mark that keeps weft's own traffic out of the capture.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// `SO_MARK` on every socket weft opens, so rules can tell weft's own traffic apart. Bit 0
/// must stay clear: it is the TPROXY mark, and a socket carrying it would have its own
/// packets routed back to itself by the `fwmark 0x1/0x1 lookup 100` rule (ztunnel's 0x539
/// has that bit set, which is why weft does not reuse it).
pub const WEFT_MARK: u32 = 0x100;

/// How the data path uses sockets: transparently (captured traffic, needs `CAP_NET_ADMIN`)
/// or plainly (loopback tests and benches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketMode {
    /// `IP_TRANSPARENT` listeners and source-preserving upstream connections.
    Transparent,
    /// Ordinary sockets.
    Plain,
}

/// Binds a listener; in transparent mode it accepts connections for any destination that
/// TPROXY sends it, and the accepted socket's local address is the original destination.
pub fn listen(addr: SocketAddr, mode: SocketMode) -> io::Result<TcpListener> {
    listen_on(bind(addr, mode)?)
}

/// Binds a listener's socket without listening yet (a bound socket takes no connection). In
/// transparent mode the port is shared (`SO_REUSEPORT`): a new weft binds beside a draining
/// one and takes the connections the kernel hands its socket; with `tcp_migrate_req` (see
/// [`enable_listener_handover`]) those queued on the old one move to it when the old one
/// closes. An IPv6 address binds an IPv6-only socket (IPv4 has listeners of its own, whose
/// accepted addresses stay plain IPv4 rather than IPv4-mapped).
pub fn bind(addr: SocketAddr, mode: SocketMode) -> io::Result<Socket> {
    let transparent = mode == SocketMode::Transparent;
    bound(addr, transparent, |s| {
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        if transparent {
            set_transparent(s, addr.ip())?;
            s.set_mark(WEFT_MARK)?;
        }
        Ok(())
    })
}

/// A plain listener (admin, metrics, readiness), its port shared with `SO_REUSEPORT` when
/// `shared` (capturing: a new weft starts beside a draining one).
pub fn listen_plain(addr: SocketAddr, shared: bool) -> io::Result<std::net::TcpListener> {
    let s = bound(addr, shared, |_| Ok(()))?;
    s.listen(1024)?;
    Ok(s.into())
}

/// A non-blocking TCP socket bound to `addr` (address reuse on, the port shared when
/// `share_port`), `setup` applied before binding.
fn bound(
    addr: SocketAddr,
    share_port: bool,
    setup: impl FnOnce(&Socket) -> io::Result<()>,
) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
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
/// the app sees who really connected), always with [`WEFT_MARK`].
pub async fn connect(
    dst: SocketAddr,
    src_ip: Option<IpAddr>,
    mode: SocketMode,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let s = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    {
        let r = SockRef::from(&s);
        if mode == SocketMode::Transparent {
            r.set_mark(WEFT_MARK)?;
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
