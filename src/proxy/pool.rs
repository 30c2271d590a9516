//! The HBONE client: mTLS + HTTP/2 connections to other nodes' `:15008`, pooled, and the
//! CONNECT streams opened on them.
//!
//! Invariants:
//! - A pooled connection carries streams of one (source identity, destination identity,
//!   destination IP) only: its TLS handshake proved exactly that pair, so a stream can never
//!   ride on a connection authenticated as someone else.
//! - At most [`MAX_STREAMS`] streams are open on one connection; a new connection is opened
//!   when every pooled one is full, and only one task connects per key at a time, so a burst
//!   of N streams opens about N / MAX_STREAMS connections, not N.
//! - A connection with no streams for [`IDLE_TIMEOUT`] is dropped, which closes it.
//! - A closed connection (peer gone) is never handed out again. One the peer is shutting
//!   down (GOAWAY) is retired by the first stream that it refuses, and that stream goes on
//!   another connection; so does a stream it turned away unprocessed after it was sent, with
//!   its first bytes (`H2Io::reopen_with`). Both are bounded: a peer that goes away on every
//!   connection fails the stream after a few.

use crate::sync::lock;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;
use bytes::Bytes;
use h2::client::SendRequest;
use http::{Request, StatusCode};
use rustls::pki_types::ServerName;
use serde::Serialize;

use super::h2io::{H2Io, Refusal};
use super::hbone::Connect;

use super::socket::{self, SocketMode};
use crate::identity::{Identity, IssuedCert};
use crate::tls::TlsConfigs;

/// Streams per pooled connection before another is opened.
pub const MAX_STREAMS: usize = 100;
/// Idle pooled connections are closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2 flow-control window per stream: large enough for one stream to fill a fast link.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 flow-control window per connection.
pub const CONN_WINDOW: u32 = 16 * 1024 * 1024;
/// h2's send buffer per stream on the pooled (client) side: how much a stream's writer may
/// hand h2 before it waits for the connection task to write it out. The stream window's size
/// (as ztunnel sets it), so a bulk writer waits on the peer's window rather than on each
/// hand-off to the connection task (h2's default is 400 KiB).
pub const SEND_BUFFER: usize = STREAM_WINDOW as usize;
/// Largest HTTP/2 frame we accept (and so send, as the peer does the same).
pub const MAX_FRAME: u32 = 256 * 1024;
/// h2's budget for small DATA frames held in its buffers, per connection. A frame under 256
/// bytes left queued in h2 costs `256 - len` of it, and h2 answers an exhausted budget with
/// GOAWAY(ENHANCE_YOUR_CALM), which resets every stream of the connection. No reader leaves
/// frames queued there: a stream's bytes are taken off h2 as they arrive while its
/// destination is being reached (`inbound`), by the relay, and by the waypoint's absorbing
/// reader, coalesced into one buffer with their credit still owed. So h2 holds only the frames
/// that arrived between two polls of a stream: the budget (65,536 one-byte frames) is far
/// beyond what scheduling lag builds up for a legitimate stream (h2's default, half the
/// connection window, is 32,896 and tripped on pooled streams before the readers coalesced),
/// and it caps what a flood of tiny frames can pin in h2 to a few MiB per connection.
pub const DATA_FRAME_BUDGET: usize = 65_536 * 255;
/// How often a pooled connection's peer is asked for a PING answer.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered before the connection is retired.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes a pooled connection's peer (HTTP/2 PING every [`PING_INTERVAL`]) until the
/// connection ends; a peer that does not answer within [`PING_TIMEOUT`] (stopped, gone without
/// a FIN, partitioned) has its connection retired and closed (`driver` aborted), failing its
/// streams instead of leaving them hanging.
async fn probe(
    mut ping: h2::PingPong,
    driver: tokio::task::JoinHandle<()>,
    closed: Arc<AtomicBool>,
    addr: SocketAddr,
) {
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        if closed.load(Ordering::Acquire) || driver.is_finished() {
            return;
        }
        match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::info!(peer = %addr, "HBONE peer did not answer a PING; connection retired");
                closed.store(true, Ordering::Release);
                driver.abort();
                return;
            }
        }
    }
}

/// The largest header block accepted on a stream (ztunnel's limit; h2 would decode up to
/// 16 MiB): a CONNECT needs a few hundred bytes.
pub const MAX_HEADER_LIST: u32 = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// New connections one stream may find going away (GOAWAY) at once before it fails.
const MAX_RETIRED: usize = 3;

/// Errors opening a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// TCP connect to the peer's HBONE port failed.
    #[error("connect {addr}: {source}")]
    Connect {
        /// Peer HBONE address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS handshake failed (including a wrong server identity).
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        /// Peer HBONE address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// No TLS config could be built.
    #[error(transparent)]
    Config(#[from] crate::tls::TlsError),
    /// HTTP/2 failed.
    #[error("HTTP/2 with {addr}: {source}")]
    Http {
        /// Peer HBONE address.
        addr: SocketAddr,
        /// Why.
        source: h2::Error,
    },
    /// The peer answered the CONNECT with an error status.
    #[error("CONNECT {authority} refused by {addr}: {status}")]
    Refused {
        /// Peer HBONE address.
        addr: SocketAddr,
        /// Requested destination.
        authority: SocketAddr,
        /// Its answer.
        status: StatusCode,
    },
}

/// What identifies a poolable connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Whose certificate the client presents.
    pub src: Identity,
    /// Whom the server must prove to be.
    pub dst: Identity,
    /// The IP of the workload the tunnel goes to: the destination's, or its waypoint's.
    pub dst_ip: IpAddr,
    /// Its HBONE port: [`Pool::hbone_port`] for another node's weft (or ztunnel), the
    /// announced `hboneMtlsPort` for an Envoy waypoint. The CONNECT's `:authority` is chosen
    /// apart from this address (the original destination).
    pub dst_port: u16,
}

impl PoolKey {
    /// The address the tunnel's TCP connection goes to.
    pub fn peer(&self) -> SocketAddr {
        SocketAddr::new(self.dst_ip, self.dst_port)
    }
}

struct Pooled {
    sender: SendRequest<Bytes>,
    /// Set by the connection task when the connection ended.
    closed: Arc<AtomicBool>,
    active: AtomicUsize,
    /// When `active` last dropped to zero, in ms since `created`.
    idle_since_ms: AtomicU64,
    created: Instant,
    local: Option<SocketAddr>,
}

impl Pooled {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn idle_for(&self) -> Duration {
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        self.created.elapsed().saturating_sub(since)
    }
}

/// A CONNECT stream through a pooled connection; holding it keeps its stream slot (held by
/// the stream, so a stream opened again on another connection holds that one's instead).
pub struct Tunnel {
    /// The byte stream to the destination.
    pub io: H2Io,
}

struct Slot(Arc<Pooled>);

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ms = u64::try_from(self.0.created.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.0.idle_since_ms.store(ms, Ordering::Release);
        }
    }
}

/// `/connections` view of one pooled connection.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolView {
    /// Source identity.
    pub src_identity: String,
    /// Destination identity.
    pub dst_identity: String,
    /// Peer HBONE address.
    pub peer: SocketAddr,
    /// Our end.
    pub local: Option<SocketAddr>,
    /// Open streams.
    pub streams: usize,
    /// Age in seconds.
    pub age_secs: f64,
}

/// The pooled connections by key. Read without a lock on every new stream (a load of the
/// current map, then atomics on the connections); replaced whole, copy-on-write, only when a
/// connection is added or reaped. Persistent collections make the copy cheap.
type Conns = imbl::HashMap<PoolKey, imbl::Vector<Arc<Pooled>>>;

/// The pool of HBONE client connections.
pub struct Pool {
    tls: Arc<TlsConfigs>,
    mode: SocketMode,
    hbone_port: u16,
    keepalive: socket::Keepalive,
    conns: ArcSwap<Conns>,
    connecting: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl Pool {
    /// A pool whose tunnels to other nodes go to `<ip>:hbone_port` (see [`PoolKey::dst_port`]).
    pub fn new(
        tls: Arc<TlsConfigs>,
        mode: SocketMode,
        hbone_port: u16,
        keepalive: socket::Keepalive,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            tls,
            mode,
            hbone_port,
            keepalive,
            conns: ArcSwap::from_pointee(Conns::new()),
            connecting: Mutex::new(HashMap::new()),
        })
    }

    /// The HBONE port of other nodes, for the keys of tunnels to them.
    pub fn hbone_port(&self) -> u16 {
        self.hbone_port
    }

    /// An empty pool with the same settings whose connections are opened with `mode` (a
    /// pod's, in-pod: they leave from inside the pod).
    pub fn in_mode(&self, mode: SocketMode) -> Arc<Pool> {
        Pool::new(self.tls.clone(), mode, self.hbone_port, self.keepalive)
    }

    /// Takes a slot on a live pooled connection with room, if any. Takes no lock: closed
    /// connections are skipped here and removed by [`Pool::reap`].
    fn pick(&self, key: &PoolKey) -> Option<Slot> {
        let conns = self.conns.load();
        let list = conns.get(key)?;
        for c in list.iter().filter(|c| !c.is_closed()) {
            let n = c.active.load(Ordering::Acquire);
            if n < MAX_STREAMS
                && c.active
                    .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Some(Slot(c.clone()));
            }
        }
        None
    }

    /// Opens a CONNECT stream to `authority` (the original destination) through a pooled
    /// connection for `key`, presenting `cert`; `forwarded_for` is the original client.
    /// Returns once the peer accepted the stream (200); any other answer is an error.
    pub async fn tunnel(
        self: &Arc<Self>,
        key: &PoolKey,
        cert: &Arc<IssuedCert>,
        authority: SocketAddr,
        forwarded_for: SocketAddr,
    ) -> Result<Tunnel, TunnelError> {
        let mut tunnel = self
            .tunnel_early(key, cert, authority, forwarded_for)
            .await?;
        let addr = key.peer();
        match tunnel.io.established().await {
            Ok(()) => Ok(tunnel),
            Err(Refusal::Status(status)) => Err(TunnelError::Refused {
                addr,
                authority,
                status,
            }),
            Err(Refusal::Failed(source)) => Err(TunnelError::Http { addr, source }),
            Err(Refusal::Again(why)) => Err(TunnelError::Connect {
                addr,
                source: std::io::Error::other(why),
            }),
            Err(Refusal::Reopen(why)) => Err(TunnelError::Connect {
                addr,
                source: std::io::Error::other(why),
            }),
            Err(r @ Refusal::Unanswered(_)) => Err(TunnelError::Connect {
                addr,
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, r.to_string()),
            }),
        }
    }

    /// Like [`Pool::tunnel`], but returns as soon as the CONNECT is sent, without waiting for
    /// the answer: what is written goes out behind the request (the peer holds it until it
    /// reached the destination), which saves the tunnel one round trip before the first
    /// byte. A refusal shows on the first read, as a reset (or on a write that fails).
    ///
    /// A stream the peer turns away unprocessed, as a peer shutting down may, is opened again
    /// on another connection with its first bytes (see [`H2Io::reopen_with`]).
    pub async fn tunnel_early(
        self: &Arc<Self>,
        key: &PoolKey,
        cert: &Arc<IssuedCert>,
        authority: SocketAddr,
        forwarded_for: SocketAddr,
    ) -> Result<Tunnel, TunnelError> {
        let mut tunnel = self.stream(key, cert, authority, forwarded_for).await?;
        let (pool, key, cert) = (self.clone(), key.clone(), cert.clone());
        tunnel.io.reopen_with(Box::new(move || {
            let (pool, key, cert) = (pool.clone(), key.clone(), cert.clone());
            Box::pin(async move {
                let tunnel = pool.stream(&key, &cert, authority, forwarded_for).await?;
                Ok(tunnel.io)
            })
        }));
        Ok(tunnel)
    }

    /// Sends a CONNECT on a pooled connection (see [`Pool::tunnel_early`]).
    async fn stream(
        &self,
        key: &PoolKey,
        cert: &IssuedCert,
        authority: SocketAddr,
        forwarded_for: SocketAddr,
    ) -> Result<Tunnel, TunnelError> {
        let addr = key.peer();
        let connect = Connect::new(authority, forwarded_for);
        let req = || {
            connect.request().map_err(|e| TunnelError::Connect {
                addr,
                source: std::io::Error::other(e),
            })
        };
        // A connection the peer is shutting down (GOAWAY: a weft draining for a restart)
        // refuses new streams before anything is sent: it is retired and the stream tries
        // another connection, a new one once the pooled ones are used up. A few times at
        // most, for a peer that sends GOAWAY on every connection.
        let mut fresh_retired = 0;
        loop {
            let (slot, fresh) = match self.pick(key) {
                Some(s) => (s, false),
                None => self.slot_on_new_or_pooled(key, cert).await?,
            };
            match Self::open_stream(&slot, req()?).await {
                Ok(mut io) => {
                    // A peer that answers no CONNECT in time has stopped answering: its
                    // connection takes no more streams, the next one opens a new one.
                    let closed = slot.0.closed.clone();
                    io.on_unanswered(Box::new(move || {
                        tracing::info!(peer = %addr, "no answer to a CONNECT in time; HBONE connection retired");
                        closed.store(true, Ordering::Release);
                    }));
                    io.hold(Box::new(slot));
                    return Ok(Tunnel { io });
                }
                // Pooled connections are tried each at most once (each is retired); a new
                // one that goes away at once counts towards the limit.
                Err(e) if e.is_go_away() && (!fresh || fresh_retired < MAX_RETIRED) => {
                    tracing::debug!(peer = %addr, "HBONE connection going away; trying another");
                    slot.0.closed.store(true, Ordering::Release);
                    fresh_retired += usize::from(fresh);
                }
                Err(source) => return Err(TunnelError::Http { addr, source }),
            }
        }
    }

    /// Sends the CONNECT request on `slot`'s connection.
    async fn open_stream(slot: &Slot, req: Request<()>) -> Result<H2Io, h2::Error> {
        let mut sender = slot.0.sender.clone().ready().await?;
        let (response, send) = sender.send_request(req, false)?;
        Ok(H2Io::awaiting(send, response))
    }

    /// A slot on a connection with room: one that another task opened meanwhile, or a new
    /// one (only one task connects per key at a time); true when new.
    async fn slot_on_new_or_pooled(
        &self,
        key: &PoolKey,
        cert: &IssuedCert,
    ) -> Result<(Slot, bool), TunnelError> {
        let gate = lock(&self.connecting)
            .entry(key.clone())
            .or_default()
            .clone();
        let _one_at_a_time = gate.lock().await;
        if let Some(s) = self.pick(key) {
            return Ok((s, false));
        }
        let pooled = Arc::new(Box::pin(self.connect(key, cert)).await?);
        pooled.active.store(1, Ordering::Release);
        self.conns.rcu(|conns| {
            let mut conns = Conns::clone(conns);
            let list = conns.entry(key.clone()).or_default();
            list.retain(|c| !c.is_closed());
            list.push_back(pooled.clone());
            conns
        });
        Ok((Slot(pooled), true))
    }

    async fn connect(&self, key: &PoolKey, cert: &IssuedCert) -> Result<Pooled, TunnelError> {
        let addr = key.peer();
        let tcp = socket::connect(addr, None, &self.mode, CONNECT_TIMEOUT)
            .await
            .map_err(|source| TunnelError::Connect { addr, source })?;
        socket::keepalive(&tcp, &self.keepalive);
        let local = tcp.local_addr().ok();
        let cfg = self.tls.client(cert, &key.dst)?;
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_rustls::TlsConnector::from(cfg)
                .connect(ServerName::IpAddress(key.dst_ip.into()), tcp),
        )
        .await
        .map_err(|_| TunnelError::Tls {
            addr,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
        })?
        .map_err(|source| TunnelError::Tls { addr, source })?;
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            .data_frame_budget(DATA_FRAME_BUDGET)
            .max_header_list_size(MAX_HEADER_LIST)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| TunnelError::Http { addr, source })?;
        let mut conn = conn;
        let ping = conn.ping_pong();
        let closed = Arc::new(AtomicBool::new(false));
        let (src, dst, done) = (key.src.clone(), key.dst.clone(), closed.clone());
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer = %addr, src = %src, dst = %dst, error = %e, "HBONE connection ended");
            }
            done.store(true, Ordering::Release);
        });
        if let Some(ping) = ping {
            tokio::spawn(probe(ping, driver, closed.clone(), addr));
        }
        tracing::debug!(peer = %addr, src = %key.src, dst = %key.dst, "HBONE connection opened");
        Ok(Pooled {
            sender,
            closed,
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            created: Instant::now(),
            local,
        })
    }

    /// Drops connections idle for longer than `idle` and closed ones; returns how many remain.
    pub fn reap(&self, idle: Duration) -> usize {
        let keep = |c: &Arc<Pooled>| {
            !c.is_closed() && (c.active.load(Ordering::Acquire) > 0 || c.idle_for() < idle)
        };
        // Copied only when something is dropped.
        if !self.conns.load().values().flatten().all(keep) {
            self.conns.rcu(|conns| {
                let mut out = Conns::new();
                for (k, list) in conns.iter() {
                    let list: imbl::Vector<_> = list.iter().filter(|c| keep(c)).cloned().collect();
                    if !list.is_empty() {
                        out.insert(k.clone(), list);
                    }
                }
                out
            });
        }
        let conns = self.conns.load();
        // A gate still held or awaited guards a first connect in progress: keep it, or a
        // second task could connect for the same key at the same time.
        lock(&self.connecting)
            .retain(|k, gate| conns.contains_key(k) || Arc::strong_count(gate) > 1);
        conns.values().map(imbl::Vector::len).sum()
    }

    /// Runs [`Pool::reap`] periodically until `shutdown`.
    pub fn spawn_reaper(
        self: &Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let pool = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => { pool.reap(IDLE_TIMEOUT); }
                    _ = crate::sync::shut_down(&mut shutdown) => return,
                }
            }
        })
    }

    /// Closes every pooled connection (streams in flight keep their connection alive until
    /// they end).
    pub fn clear(&self) {
        self.conns.store(Arc::new(Conns::new()));
    }

    /// The pooled connections.
    pub fn view(&self) -> Vec<PoolView> {
        let conns = self.conns.load();
        let mut out = Vec::new();
        for (k, list) in conns.iter() {
            for c in list {
                if c.is_closed() {
                    continue;
                }
                out.push(PoolView {
                    src_identity: k.src.to_string(),
                    dst_identity: k.dst.to_string(),
                    peer: k.peer(),
                    local: c.local,
                    streams: c.active.load(Ordering::Acquire),
                    age_secs: c.created.elapsed().as_secs_f64(),
                });
            }
        }
        out
    }
}
