//! Helpers for loopback integration tests: unique addresses, a tiny HTTP client, and a
//! daemon started in-process on a temporary directory.
#![allow(dead_code)]

pub mod apiserver;
pub mod grpc_keepalive;
pub mod istiod;
pub mod l7;
pub mod mesh;
pub mod process;
pub mod zds;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft::config::Config;
use weft::daemon::Daemon;
use weft::logging::LogControl;

/// A loopback address no other test of this run uses (127.0.0.0/8 is all on `lo`).
pub fn unique_loopback() -> IpAddr {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    IpAddr::V4(Ipv4Addr::new(
        127,
        128 | ((pid >> 8) & 0x7f) as u8,
        pid as u8,
        n as u8,
    ))
}

/// One HTTP/1.1 request; returns (status, body). Panics on I/O errors (tests only).
pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// GET returning parsed JSON.
pub fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http(addr, "GET", path);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls `f` every 20 ms until it returns Some or `limit` passes.
pub async fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A temporary node directory: CA, mesh file and config.
pub struct NodeDir {
    pub dir: tempfile::TempDir,
    pub ip: IpAddr,
}

impl NodeDir {
    /// Creates the directory with a fresh CA and `mesh` as the mesh file.
    pub fn new(mesh: &str) -> NodeDir {
        let dir = tempfile::tempdir().unwrap();
        weft::identity::ca::init_dir(&dir.path().join("ca"), "cluster.local").unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), mesh).unwrap();
        NodeDir {
            dir,
            ip: unique_loopback(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn mesh_path(&self) -> PathBuf {
        self.path("mesh.yaml")
    }

    /// Replaces the mesh file the way an editor does: write aside, rename over.
    pub fn write_mesh(&self, text: &str) {
        let tmp = self.path(".mesh.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.mesh_path()).unwrap();
    }

    pub fn config_text(&self, node: &str) -> String {
        let ip = self.ip;
        format!(
            "nodeName: {node}\nmesh: {{file: mesh.yaml}}\nca: {{builtin: {{dir: ca}}, certTtl: 1h}}\n\
             listen:\n  outbound: {ip}:15001\n  inboundPlaintext: {ip}:15006\n  hbone: {ip}:15008\n  \
             admin: {ip}:15000\n  metrics: {ip}:15020\n  readiness: {ip}:15021\nredirect: none\n"
        )
    }

    pub fn config(&self, node: &str) -> Config {
        let path = self.path("weft.yaml");
        std::fs::write(&path, self.config_text(node)).unwrap();
        Config::load(&path, &weft::config::Env::default()).unwrap()
    }

    pub fn admin(&self) -> SocketAddr {
        SocketAddr::new(self.ip, 15000)
    }
    pub fn metrics(&self) -> SocketAddr {
        SocketAddr::new(self.ip, 15020)
    }
    pub fn readiness(&self) -> SocketAddr {
        SocketAddr::new(self.ip, 15021)
    }
}

/// A log control that records nothing (the global subscriber is not installed in tests).
pub fn quiet_log() -> Arc<LogControl> {
    Arc::new(LogControl::new("info", Box::new(|_| Ok(()))))
}

/// Starts a daemon in-process for `node` on `dir`.
pub async fn start(dir: &NodeDir, node: &str) -> Daemon {
    Daemon::start(dir.config(node), quiet_log()).await.unwrap()
}

/// Waits until `/healthz/ready` answers 200 (blocking HTTP on a blocking thread).
pub async fn wait_ready(addr: SocketAddr, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        let ok = tokio::task::spawn_blocking(move || http(addr, "GET", "/healthz/ready").0 == 200)
            .await
            .unwrap();
        if ok {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The repository's example mesh.
pub fn example_mesh() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local/mesh.yaml"))
        .unwrap()
}

/// An echo app: every connection's bytes sent back, until the client closes.
pub fn echo_app(listener: tokio::net::TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

/// An HTTP/1.1 app answering every request `200 ok` and closing.
pub fn http_app(listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
}
