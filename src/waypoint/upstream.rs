//! Connections from the waypoint to apps: pooled per (client IP, app address, HTTP version),
//! each made from the client's own IP so the app sees who is calling.
//!
//! The pools are keyed by client IP, which any client on the mesh chooses, so their number is
//! bounded: when a new key comes, every pool unused for [`IDLE`] is dropped (its idle
//! connections close with it), and if [`MAX_POOLS`] are still kept the least recently used one
//! makes room. A request
//! in flight keeps its pool's connections alive until it ends; dropping a pool only forgets it.
//!
//! The app address is part of the key and of the connector: a connection always goes to the
//! destination the inbound side admitted, whatever authority the request URI carries (the URI
//! names the host the client asked for, and is sent as the request's `Host`/`:authority`).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;

use crate::proxy::socket::{self, SocketMode};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an unused pool (and an idle connection in it) is kept.
pub const IDLE: Duration = Duration::from_secs(60);
/// Most pools kept at once (one per client IP, app address and HTTP version).
pub const MAX_POOLS: usize = 1024;

/// Connects from a fixed source IP to a fixed app address.
#[derive(Clone)]
pub struct FromSource {
    src: IpAddr,
    dst: SocketAddr,
    mode: SocketMode,
}

impl tower_service::Service<http::Uri> for FromSource {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let (src, dst, mode) = (self.src, self.dst, self.mode.clone());
        Box::pin(async move {
            let s = socket::connect(dst, Some(src), &mode, CONNECT_TIMEOUT).await?;
            Ok(TokioIo::new(s))
        })
    }
}

type Key = (IpAddr, SocketAddr, bool);

/// One pool and when it was last handed out.
struct Entry {
    client: Client<FromSource, Incoming>,
    used: Instant,
}

/// The pools of upstream connections.
pub struct Upstream {
    clients: Mutex<HashMap<Key, Entry>>,
    max: usize,
    idle: Duration,
}

impl Default for Upstream {
    fn default() -> Upstream {
        Upstream::new(MAX_POOLS, IDLE)
    }
}

impl Upstream {
    /// At most `max` pools (at least one), each dropped once unused for `idle`.
    pub fn new(max: usize, idle: Duration) -> Upstream {
        Upstream {
            clients: Mutex::new(HashMap::new()),
            max: max.max(1),
            idle,
        }
    }

    /// The client for requests from `src` to the app at `dst` (HTTP/2 when `h2`).
    pub fn client(
        &self,
        src: IpAddr,
        dst: SocketAddr,
        h2: bool,
        mode: SocketMode,
    ) -> Client<FromSource, Incoming> {
        let now = Instant::now();
        let mut clients = crate::sync::lock(&self.clients);
        if let Some(e) = clients.get_mut(&(src, dst, h2)) {
            e.used = now;
            return e.client.clone();
        }
        // A new key (rare: a new client or app): idle pools go, and if that left no room the
        // least recently used one does too. At most `max` entries to look at.
        clients.retain(|_, e| now.duration_since(e.used) < self.idle);
        if clients.len() >= self.max {
            let oldest = clients.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| *k);
            if let Some(k) = oldest {
                clients.remove(&k);
            }
        }
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.idle)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .http2_only(h2)
            // `Host` is exactly what the waypoint sets (the authority policy matched), never
            // one made up from the URI.
            .set_host(false)
            .build(FromSource { src, dst, mode });
        clients.insert(
            (src, dst, h2),
            Entry {
                client: client.clone(),
                used: now,
            },
        );
        client
    }

    /// How many pools are kept.
    pub fn len(&self) -> usize {
        crate::sync::lock(&self.clients).len()
    }

    /// Whether no pool is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// An app answering every request `200` on keep-alive connections; counts connections.
    async fn app() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut b = [0u8; 1024];
                    while let Ok(n) = c.read(&mut b).await {
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&b[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if c.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// A front server forwarding every request it receives through `up` to `app`, keyed by
    /// the address its client connected from (as the waypoint keys by the client's IP).
    async fn front(up: Arc<Upstream>, app: SocketAddr) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((c, peer)) = l.accept().await {
                let up = up.clone();
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let client = up.client(peer.ip(), app, false, SocketMode::Plain);
                    async move {
                        let (mut parts, body) = req.into_parts();
                        parts.uri = format!("http://{app}/").parse().unwrap();
                        let resp = client.request(http::Request::from_parts(parts, body)).await;
                        resp.map(|r| r.map(|b| b.boxed()))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(c), svc),
                );
            }
        });
        addr
    }

    /// One GET to `front` from a socket bound to `src`; the status.
    async fn get_from(src: IpAddr, front: SocketAddr) -> u16 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::new(src, 0)).unwrap();
        let c: TcpStream = s.connect(front).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(c))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get("/")
            .header("host", "app")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        send.send_request(req).await.unwrap().status().as_u16()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pools_stay_within_their_cap_with_many_client_ips() {
        let (app, accepted) = app().await;
        let up = Arc::new(Upstream::new(8, Duration::from_secs(60)));
        let front = front(up.clone(), app).await;
        for i in 1..=40u8 {
            let src = IpAddr::from([127, 0, 1, i]);
            assert_eq!(get_from(src, front).await, 200, "from {src}");
            assert!(up.len() <= 8, "{} pools after {i} client IPs", up.len());
        }
        assert_eq!(up.len(), 8);
        // The most recent clients' pools are the ones kept: asking again reuses a connection.
        let before = accepted.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(get_from(IpAddr::from([127, 0, 1, 40]), front).await, 200);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), before);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pools_unused_for_the_idle_time_are_dropped() {
        let (app, _) = app().await;
        let up = Arc::new(Upstream::new(100, Duration::from_millis(300)));
        let front = front(up.clone(), app).await;
        for i in 1..=5u8 {
            assert_eq!(get_from(IpAddr::from([127, 0, 2, i]), front).await, 200);
        }
        assert_eq!(up.len(), 5);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(get_from(IpAddr::from([127, 0, 2, 6]), front).await, 200);
        assert_eq!(up.len(), 1, "the idle pools were kept");
    }
}
