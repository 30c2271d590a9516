//! Counts the bytes of a downstream connection served by the waypoint into its connection
//! record, so `/connections` and the TCP metrics see L7 traffic too.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::conntrack::Conn;

/// An I/O wrapper: reads count as received, writes as sent.
pub struct Counting<I> {
    inner: I,
    conn: Arc<Conn>,
}

impl<I> Counting<I> {
    /// Wraps `inner`, counting into `conn`.
    pub fn new(inner: I, conn: Arc<Conn>) -> Counting<I> {
        Counting { inner, conn }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Counting<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.conn.received.fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counting<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.conn.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
