//! Moving bytes between the two sides of a connection, counting them, honouring half-close,
//! and stopping when the connection is closed from outside.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::conntrack::Conn;

/// Copy buffer per direction: room for a full TLS record (16 KiB) several times over.
const BUF: usize = 64 * 1024;

/// Why a relay ended early.
#[derive(Debug)]
pub enum RelayEnd {
    /// An I/O error on either side.
    Io(io::Error),
    /// Weft closed the connection (policy, drain).
    Killed,
}

/// Relays until both directions finished (each side's EOF is passed on as a half-close), an
/// error occurs, or a close token of `conns` fires. Bytes read from `client` count as
/// received, bytes read from `server` as sent, on every connection record in `conns` (the
/// same-node path records both the outbound and the inbound view).
pub async fn relay<A, B>(
    client: &mut A,
    server: &mut B,
    conns: &[Arc<Conn>],
) -> Result<(), RelayEnd>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut c = Counted {
        inner: client,
        conns,
        side: Side::Client,
    };
    let mut s = Counted {
        inner: server,
        conns,
        side: Side::Server,
    };
    let killed = async {
        match conns {
            [a] => a.close.cancelled().await,
            [a, b, ..] => {
                tokio::select! {
                    _ = a.close.cancelled() => {}
                    _ = b.close.cancelled() => {}
                }
            }
            [] => std::future::pending().await,
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut s, BUF, BUF) => r.map(|_| ()).map_err(RelayEnd::Io),
        _ = killed => Err(RelayEnd::Killed),
    }
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Server,
}

struct Counted<'a, S: ?Sized> {
    inner: &'a mut S,
    conns: &'a [Arc<Conn>],
    side: Side,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            for c in self.conns {
                match self.side {
                    Side::Client => c.received.fetch_add(n, Ordering::Relaxed),
                    Side::Server => c.sent.fetch_add(n, Ordering::Relaxed),
                };
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
