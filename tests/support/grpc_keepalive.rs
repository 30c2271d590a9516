//! A stand-in for the keepalive enforcement of istiod's gRPC server, put in front of the
//! istiod stand-in: it terminates TLS with istiod's serving certificate, forwards every
//! HTTP/2 frame to the stand-in over a TLS connection of its own, and judges the client's
//! PINGs as grpc-go's server does.
//!
//! What it emulates (grpc-go `internal/transport/http2_server.go`, `handlePing`, with the
//! options Istio's `pilot/pkg/grpc/grpc.go` `ServerOptions` sets):
//! - istiod's `EnforcementPolicy`: `MinTime` = half the keepalive time (30 s / 2 = 15 s in
//!   istiod; a constructor argument here so tests can scale it down), `PermitWithoutStream`
//!   false (grpc-go's default, Istio leaves it);
//! - a PING with the ACK flag is ignored; every other PING is judged against the previous
//!   one (`lastPingAt`, the zero time before the first, so a first PING is never a strike);
//! - when the server wrote HEADERS or DATA since the last PING (`resetPingStrikes`), the
//!   strikes go back to 0 and the PING is not judged;
//! - with no stream open, a PING less than 2 h (`defaultPingTimeout`) after the previous one
//!   is a strike; with a stream open, one less than `MinTime` after it;
//! - a stream is open from the client's HEADERS until the server ends it (END_STREAM) or
//!   either side resets it;
//! - above 2 strikes (`maxPingStrikes`) the server sends GOAWAY with ENHANCE_YOUR_CALM and
//!   debug data `too_many_pings`, and closes the connection.
//!
//! Not emulated: the server's own keepalive pings and connection-age limits.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(2 * 60 * 60);
const MAX_PING_STRIKES: u32 = 2;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// What the enforcer saw, over all connections.
#[derive(Debug, Default)]
pub struct Seen {
    /// TLS connections accepted from the client.
    pub connections: AtomicU64,
    /// PINGs (not ACKs) from the client.
    pub pings: AtomicU64,
    /// PINGs from the client while no stream was open.
    pub idle_pings: AtomicU64,
    /// Strikes counted.
    pub strikes: AtomicU64,
    /// GOAWAY `too_many_pings` sent.
    pub goaways: AtomicU64,
}

/// The per-connection state grpc-go keeps for the policy.
struct Policy {
    min_time: Duration,
    last_ping_at: Option<Instant>,
    strikes: u32,
    reset_strikes: bool,
    open: HashSet<u32>,
    last_stream: u32,
}

/// The enforcer, listening on `addr`.
pub struct KeepaliveEnforcer {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KeepaliveEnforcer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KeepaliveEnforcer {
    /// Listens on `listen` (an address istiod's serving certificate names, another port),
    /// presenting `identity` (certificate PEM, key PEM), and forwards to `backend`, whose
    /// certificate must chain to `root_pem`. `min_time` is the policy's `MinTime`.
    pub async fn start(
        listen: SocketAddr,
        identity: (&str, &str),
        backend: SocketAddr,
        root_pem: &str,
        min_time: Duration,
    ) -> KeepaliveEnforcer {
        let certs: Vec<_> = rustls_pemfile::certs(&mut identity.0.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut identity.1.as_bytes())
            .unwrap()
            .unwrap();
        let provider = weft::tls::provider();
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut root_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let listener = TcpListener::bind(listen).await.unwrap();
        let seen = Arc::new(Seen::default());
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, connector, seen) =
                    (acceptor.clone(), connector.clone(), seen2.clone());
                tokio::spawn(async move {
                    let Ok(down) = acceptor.accept(tcp).await else {
                        return;
                    };
                    seen.connections.fetch_add(1, Ordering::Relaxed);
                    let Ok(up) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let name = rustls::pki_types::ServerName::IpAddress(backend.ip().into());
                    let Ok(up) = connector.connect(name, up).await else {
                        return;
                    };
                    let policy = Arc::new(Mutex::new(Policy {
                        min_time,
                        last_ping_at: None,
                        strikes: 0,
                        reset_strikes: false,
                        open: HashSet::new(),
                        last_stream: 0,
                    }));
                    let (down_r, down_w) = tokio::io::split(down);
                    let (up_r, up_w) = tokio::io::split(up);
                    let down_w = Arc::new(tokio::sync::Mutex::new(down_w));
                    let to_server =
                        client_to_server(down_r, up_w, down_w.clone(), policy.clone(), seen);
                    let to_client = server_to_client(up_r, down_w, policy);
                    tokio::select! {
                        _ = to_server => {}
                        _ = to_client => {}
                    }
                });
            }
        });
        KeepaliveEnforcer {
            addr: listen,
            seen,
            task,
        }
    }
}

type Down = tokio_rustls::server::TlsStream<TcpStream>;
type Up = tokio_rustls::client::TlsStream<TcpStream>;

/// Reads one frame: (header, payload).
async fn frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<([u8; 9], Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((head, payload))
}

fn stream_id(head: &[u8; 9]) -> u32 {
    u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff
}

async fn client_to_server(
    mut r: ReadHalf<Down>,
    mut w: WriteHalf<Up>,
    down_w: Arc<tokio::sync::Mutex<WriteHalf<Down>>>,
    policy: Arc<Mutex<Policy>>,
    seen: Arc<Seen>,
) {
    let mut preface = [0u8; PREFACE.len()];
    if r.read_exact(&mut preface).await.is_err() || preface != PREFACE {
        return;
    }
    if w.write_all(PREFACE).await.is_err() {
        return;
    }
    loop {
        let Ok((head, payload)) = frame(&mut r).await else {
            return;
        };
        let (kind, flags, id) = (head[3], head[4], stream_id(&head));
        let mut goaway = None;
        {
            let mut p = policy.lock().unwrap();
            match kind {
                HEADERS if !p.open.contains(&id) && id > p.last_stream => {
                    p.open.insert(id);
                    p.last_stream = id;
                }
                RST_STREAM => {
                    p.open.remove(&id);
                }
                PING if flags & ACK == 0 => {
                    seen.pings.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    let last = p.last_ping_at.replace(now);
                    if std::mem::take(&mut p.reset_strikes) {
                        p.strikes = 0;
                    } else {
                        let window = if p.open.is_empty() {
                            seen.idle_pings.fetch_add(1, Ordering::Relaxed);
                            DEFAULT_PING_TIMEOUT
                        } else {
                            p.min_time
                        };
                        if last.is_some_and(|at| at + window > now) {
                            p.strikes += 1;
                            seen.strikes.fetch_add(1, Ordering::Relaxed);
                        }
                        if p.strikes > MAX_PING_STRIKES {
                            goaway = Some(p.last_stream);
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(last_stream) = goaway {
            seen.goaways.fetch_add(1, Ordering::Relaxed);
            let debug = b"too_many_pings";
            let len = 8 + debug.len();
            let mut f = vec![
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                GOAWAY,
                0,
                0,
                0,
                0,
                0,
            ];
            f.extend_from_slice(&last_stream.to_be_bytes());
            f.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
            f.extend_from_slice(debug);
            let mut down = down_w.lock().await;
            let _ = down.write_all(&f).await;
            let _ = down.shutdown().await;
            return;
        }
        if w.write_all(&head).await.is_err()
            || w.write_all(&payload).await.is_err()
            || w.flush().await.is_err()
        {
            return;
        }
    }
}

async fn server_to_client(
    mut r: ReadHalf<Up>,
    down_w: Arc<tokio::sync::Mutex<WriteHalf<Down>>>,
    policy: Arc<Mutex<Policy>>,
) {
    loop {
        let Ok((head, payload)) = frame(&mut r).await else {
            return;
        };
        let (kind, flags, id) = (head[3], head[4], stream_id(&head));
        {
            let mut p = policy.lock().unwrap();
            match kind {
                DATA | HEADERS => {
                    p.reset_strikes = true;
                    if flags & END_STREAM != 0 {
                        p.open.remove(&id);
                    }
                }
                RST_STREAM => {
                    p.open.remove(&id);
                }
                _ => {}
            }
        }
        let mut down = down_w.lock().await;
        if down.write_all(&head).await.is_err() || down.write_all(&payload).await.is_err() {
            return;
        }
        let _ = down.flush().await;
    }
}
