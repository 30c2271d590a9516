//! Moving bytes between the two sides of a connection, counting them, honouring half-close,
//! and stopping when the connection is closed from outside.
//!
//! Memory follows traffic: each direction reads into a per-thread scratch buffer and writes
//! straight out of it; only bytes the writer could not take at once are copied into a
//! per-connection buffer, which is freed again once drained. An idle connection therefore
//! holds no copy buffer at all (a fixed 64 KiB pair per connection and side would cost more
//! than everything else an idle tunnel needs).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::conntrack::Conn;

/// Scratch buffer size: several TLS records' worth.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
}

/// Why a relay ended early.
#[derive(Debug)]
pub enum RelayEnd {
    /// An I/O error on either side.
    Io(io::Error),
    /// Weft closed the connection (policy, drain).
    Killed,
}

#[derive(Clone, Copy)]
enum Side {
    /// Reads from the client: bytes count as received.
    FromClient,
    /// Reads from the server: bytes count as sent.
    FromServer,
}

/// One direction's state.
struct Dir {
    side: Side,
    /// Bytes read but not yet written (only when the writer pushed back).
    pending: Vec<u8>,
    off: usize,
    read_eof: bool,
    done: bool,
    need_flush: bool,
}

impl Dir {
    fn new(side: Side) -> Dir {
        Dir {
            side,
            pending: Vec::new(),
            off: 0,
            read_eof: false,
            done: false,
            need_flush: false,
        }
    }

    fn count(&self, conns: &[Arc<Conn>], n: usize) {
        for c in conns {
            match self.side {
                Side::FromClient => c.received.fetch_add(n as u64, Ordering::Relaxed),
                Side::FromServer => c.sent.fetch_add(n as u64, Ordering::Relaxed),
            };
        }
    }

    /// Drives this direction until it would block, finished (EOF passed on) or failed.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        conns: &[Arc<Conn>],
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            // 1. What the writer pushed back before.
            while self.off < self.pending.len() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.pending[self.off..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.off += n;
                self.need_flush = true;
            }
            if !self.pending.is_empty() {
                // Drained: give the memory back; an idle connection keeps none.
                self.pending = Vec::new();
                self.off = 0;
            }
            // 2. End of stream: pass the half-close on.
            if self.read_eof {
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // 3. Read into the scratch buffer and write straight out of it.
            let step = SCRATCH_BUF.with(|cell| -> Poll<io::Result<()>> {
                let mut scratch = cell.borrow_mut();
                let mut rb = ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_eof = true;
                            return Poll::Ready(Ok(()));
                        }
                        self.count(conns, n);
                        let mut written = 0;
                        while written < n {
                            match Pin::new(&mut *w).poll_write(cx, &scratch[written..n]) {
                                Poll::Ready(Ok(0)) => {
                                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
                                }
                                Poll::Ready(Ok(k)) => {
                                    written += k;
                                    self.need_flush = true;
                                }
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                                Poll::Pending => {
                                    self.pending.extend_from_slice(&scratch[written..n]);
                                    self.off = 0;
                                    break;
                                }
                            }
                        }
                        Poll::Ready(Ok(()))
                    }
                }
            });
            match step {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to read now: make sure what was written goes out.
                    if self.need_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
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
    let mut up = Dir::new(Side::FromClient);
    let mut down = Dir::new(Side::FromServer);
    let copy = poll_fn(|cx| {
        let a = up.poll(cx, client, server, conns)?;
        let b = down.poll(cx, server, client, conns)?;
        match (a, b) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok::<(), io::Error>(())),
            _ => Poll::Pending,
        }
    });
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
        r = copy => r.map_err(RelayEnd::Io),
        _ = killed => Err(RelayEnd::Killed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::conntrack::{ConnMeta, ConnTable, Direction, Protocol};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn table() -> (Arc<ConnTable>, crate::proxy::conntrack::ConnGuard) {
        let t = ConnTable::new(crate::metrics::TcpMetrics::default());
        let g = t.open(ConnMeta {
            direction: Direction::Outbound,
            protocol: Protocol::Plain,
            src: "10.0.0.1:1".parse().unwrap(),
            dst: "10.0.0.2:2".parse().unwrap(),
            src_identity: None,
            dst_identity: None,
            src_workload: None,
            dst_workload: None,
            service: None,
            decision: None,
            audits: Vec::new(),
        });
        (t, g)
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_with_half_close_and_are_counted() {
        let (_t, g) = table();
        let (mut client, mut client_far) = tokio::io::duplex(1024);
        let (mut server, mut server_far) = tokio::io::duplex(1024);
        let conns = [g.conn().clone()];
        let relay_task = async { relay(&mut client_far, &mut server, &conns).await };
        let peers = async {
            let up: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
            let up2 = up.clone();
            let w = async {
                client.write_all(&up2).await.unwrap();
                client.shutdown().await.unwrap();
                let mut back = Vec::new();
                client.read_to_end(&mut back).await.unwrap();
                back
            };
            let s = async {
                let mut got = Vec::new();
                server_far.read_to_end(&mut got).await.unwrap();
                server_far.write_all(b"reply after EOF").await.unwrap();
                server_far.shutdown().await.unwrap();
                got
            };
            let (back, got) = tokio::join!(w, s);
            assert_eq!(got, up);
            assert_eq!(back, b"reply after EOF");
        };
        let (r, ()) = tokio::join!(relay_task, peers);
        assert!(r.is_ok());
        assert_eq!(g.conn().received.load(Ordering::Relaxed), 300_000);
        assert_eq!(g.conn().sent.load(Ordering::Relaxed), 15);
    }

    #[tokio::test]
    async fn a_close_token_ends_the_relay() {
        let (_t, g) = table();
        let (_client, mut client_far) = tokio::io::duplex(64);
        let (mut server, _server_far) = tokio::io::duplex(64);
        let conns = [g.conn().clone()];
        g.conn().close.cancel();
        let r = relay(&mut client_far, &mut server, &conns).await;
        assert!(matches!(r, Err(RelayEnd::Killed)));
    }
}
