//! Connections from the waypoint to apps: pooled per (client IP, app address, HTTP version),
//! each made from the client's own IP so the app sees who is calling.

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

use crate::proxy::socket::{self, SocketMode};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IDLE: Duration = Duration::from_secs(60);

/// Connects to the request URI's address from a fixed source IP.
#[derive(Clone)]
pub struct FromSource {
    src: IpAddr,
    mode: SocketMode,
}

impl tower_service::Service<http::Uri> for FromSource {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (src, mode) = (self.src, self.mode);
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    std::io::Error::other(format!("upstream URI {uri} has no IP:port"))
                })?;
            let s = socket::connect(addr, Some(src), mode, CONNECT_TIMEOUT).await?;
            Ok(TokioIo::new(s))
        })
    }
}

type Key = (IpAddr, SocketAddr, bool);

/// The pools of upstream connections.
#[derive(Default)]
pub struct Upstream {
    clients: Mutex<HashMap<Key, Client<FromSource, Incoming>>>,
}

impl Upstream {
    /// The client for requests from `src` to `dst` (HTTP/2 when `h2`).
    pub fn client(
        &self,
        src: IpAddr,
        dst: SocketAddr,
        h2: bool,
        mode: SocketMode,
    ) -> Client<FromSource, Incoming> {
        let mut clients = crate::sync::lock(&self.clients);
        clients
            .entry((src, dst, h2))
            .or_insert_with(|| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(IDLE)
                    .pool_timer(hyper_util::rt::TokioTimer::new())
                    .http2_only(h2)
                    .build(FromSource { src, mode })
            })
            .clone()
    }
}
