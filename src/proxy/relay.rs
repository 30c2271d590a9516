//! Moving bytes between the two sides of a connection, counting them, honouring half-close,
//! and stopping when the connection is closed from outside.
//!
//! Memory follows traffic: each direction reads into a per-thread scratch buffer and writes
//! straight out of it; only bytes the writer could not take at once are copied into a
//! per-connection buffer, which is freed again once drained. An idle connection therefore
//! holds no copy buffer at all (a fixed 64 KiB pair per connection and side would cost more
//! than everything else an idle tunnel needs).
//!
//! Out of an HBONE stream, each large chunk h2 received is written on as it is; small ones are
//! gathered with those already received behind them into one write. Flow-control credit is
//! given back only once the bytes are written. While the writer is full, chunks are still taken
//! off h2 into the per-connection buffer (their credit stays owed, so the peer cannot send more
//! than the stream's window): h2 would otherwise hold them frame by frame, and a client sending
//! many tiny writes to a stalled app exhausts h2's per-connection budget for small frames and
//! takes every stream on the connection down with it (ENHANCE_YOUR_CALM).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::conntrack::{Conn, Outcome};
use super::h2io::H2Io;

/// Scratch buffer size: one read takes what a fast sender has queued, and is handed on as one
/// HTTP/2 DATA frame of up to the peer's largest (256 KiB, `pool::MAX_FRAME`) and one write of
/// its TLS records, where 64 KiB took four of each (ztunnel grows its per-connection buffers to
/// the same size on bulk transfers). One per worker thread, so idle connections pay nothing.
const SCRATCH: usize = 256 * 1024;

/// Chunks out of an HBONE stream smaller than this are gathered with those received behind
/// them into one write (`Dir::write_gathered`); larger ones are written as they are, since
/// copying them would cost about what a write does.
const GATHER_BELOW: usize = 32 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
}

/// One side of a relay: a byte stream, which may be an HBONE stream.
pub trait Endpoint: AsyncRead + AsyncWrite + Unpin {
    /// The HBONE stream, when this side is one.
    fn hbone(&mut self) -> Option<&mut H2Io> {
        None
    }
}

impl Endpoint for tokio::net::TcpStream {}

impl Endpoint for H2Io {
    fn hbone(&mut self) -> Option<&mut H2Io> {
        Some(self)
    }
}

#[cfg(test)]
impl Endpoint for tokio::io::DuplexStream {}

/// Why a relay ended early.
#[derive(Debug)]
pub enum RelayEnd {
    /// An I/O error on either side.
    Io(io::Error),
    /// Weft closed the connection (policy, drain).
    Killed,
}

impl From<RelayEnd> for Outcome {
    fn from(end: RelayEnd) -> Outcome {
        match end {
            RelayEnd::Io(e) => Outcome::Failed(e.to_string()),
            RelayEnd::Killed => Outcome::Killed,
        }
    }
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

    /// While the writer is full: takes what an HBONE reader has received off h2 into
    /// `pending` (credit owed), so h2 holds no pile of frames (module doc).
    fn absorb(
        &mut self,
        cx: &mut Context<'_>,
        h: &mut H2Io,
        conns: &[Arc<Conn>],
    ) -> io::Result<()> {
        if self.read_eof {
            return Ok(());
        }
        if self.off > 0 && self.off * 2 >= self.pending.len() {
            self.pending.drain(..self.off);
            self.off = 0;
        }
        loop {
            match h.poll_recv_unreleased(cx) {
                Poll::Ready(Ok(Some(chunk))) => {
                    self.count(conns, chunk.len());
                    self.pending.extend_from_slice(&chunk);
                }
                Poll::Ready(Ok(None)) => {
                    self.read_eof = true;
                    return Ok(());
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(()),
            }
        }
    }

    /// Writes `chunk` (just read) on, giving an HBONE reader `h` its credit back as it goes;
    /// what the writer does not take now is kept in `pending`, and so is all of `chunk` while
    /// `pending` holds anything (order first; so `pending` is empty when a write stops short).
    fn write_chunk<W>(
        &mut self,
        cx: &mut Context<'_>,
        mut h: Option<&mut H2Io>,
        w: &mut W,
        chunk: &[u8],
    ) -> io::Result<()>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        if !self.pending.is_empty() {
            self.pending.extend_from_slice(chunk);
            return Ok(());
        }
        let mut written = 0;
        while written < chunk.len() {
            match Pin::new(&mut *w).poll_write(cx, &chunk[written..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(k)) => {
                    written += k;
                    if let Some(h) = h.as_deref_mut() {
                        h.release(k);
                    }
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {
                    self.pending.extend_from_slice(&chunk[written..]);
                    self.off = 0;
                    break;
                }
            }
        }
        Ok(())
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
        R: Endpoint + ?Sized,
        W: Endpoint + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            // 1. What the writer pushed back before.
            while self.off < self.pending.len() {
                match Pin::new(&mut *w).poll_write(cx, &self.pending[self.off..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.off += n;
                        self.need_flush = true;
                        if let Some(h) = r.hbone() {
                            h.release(n);
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if let Some(h) = r.hbone() {
                            self.absorb(cx, h, conns)?;
                        }
                        return Poll::Pending;
                    }
                }
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
            // 3. Read, and write straight out of what was read.
            let step = if let Some(h) = r.hbone() {
                match h.poll_recv_unreleased(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Ready(Ok(None)) => {
                        self.read_eof = true;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Ok(Some(chunk))) => {
                        self.count(conns, chunk.len());
                        if chunk.len() >= GATHER_BELOW {
                            Poll::Ready(self.write_chunk(cx, Some(h), w, &chunk))
                        } else {
                            Poll::Ready(self.write_gathered(cx, h, w, conns, &chunk))
                        }
                    }
                }
            } else {
                self.read_through_scratch(cx, r, w, conns)
            };
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

    /// Writes `first` (a small chunk just taken off h2) together with the chunks already
    /// received behind it, gathered in the per-thread scratch buffer: one write (one syscall,
    /// one credit release) where each would otherwise take its own. A sender of many small
    /// writes would else be served one syscall per frame, and the frames waiting their turn
    /// pile up in h2 against its small-frame budget (`pool::DATA_FRAME_BUDGET`).
    fn write_gathered<W>(
        &mut self,
        cx: &mut Context<'_>,
        h: &mut H2Io,
        w: &mut W,
        conns: &[Arc<Conn>],
        first: &[u8],
    ) -> io::Result<()>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        SCRATCH_BUF.with(|cell| -> io::Result<()> {
            let mut scratch = cell.borrow_mut();
            // Bytes gathered in `scratch`; `first` is copied there only once a second chunk
            // is there to join it (a lone small chunk, a request or an answer, is written as
            // it is).
            let mut n = 0;
            // A chunk that did not fit, written after the gathered ones; an error or the end
            // of the stream, acted on once the gathered bytes are on their way.
            let mut after = None;
            let mut failed = None;
            loop {
                match h.poll_recv_unreleased(cx) {
                    Poll::Ready(Ok(Some(c))) => {
                        self.count(conns, c.len());
                        if n == 0 && first.len() + c.len() <= SCRATCH {
                            scratch[..first.len()].copy_from_slice(first);
                            n = first.len();
                        }
                        if n > 0 && c.len() <= SCRATCH - n {
                            scratch[n..n + c.len()].copy_from_slice(&c);
                            n += c.len();
                        } else {
                            after = Some(c);
                            break;
                        }
                    }
                    Poll::Ready(Ok(None)) => {
                        self.read_eof = true;
                        break;
                    }
                    Poll::Ready(Err(e)) => {
                        failed = Some(e);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            let gathered = if n == 0 { first } else { &scratch[..n] };
            self.write_chunk(cx, Some(&mut *h), w, gathered)?;
            if let Some(c) = after {
                self.write_chunk(cx, Some(h), w, &c)?;
            }
            match failed {
                Some(e) => Err(e),
                None => Ok(()),
            }
        })
    }

    /// Reads into the per-thread scratch buffer and writes straight out of it.
    fn read_through_scratch<R, W>(
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
        SCRATCH_BUF.with(|cell| -> Poll<io::Result<()>> {
            let mut scratch = cell.borrow_mut();
            let mut rb = ReadBuf::new(&mut scratch[..]);
            ready!(Pin::new(&mut *r).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                self.read_eof = true;
                return Poll::Ready(Ok(()));
            }
            self.count(conns, n);
            Poll::Ready(self.write_chunk(cx, None, w, &scratch[..n]))
        })
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
    A: Endpoint + ?Sized,
    B: Endpoint + ?Sized,
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
            // Boxed: only the same-node path has two records, and two waits inline would
            // double what every relay holds while it lives.
            [a, b, ..] => {
                Box::pin(async {
                    tokio::select! {
                        _ = a.close.cancelled() => {}
                        _ = b.close.cancelled() => {}
                    }
                })
                .await
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
    use crate::metrics::Direction;
    use crate::proxy::conntrack::{ConnMeta, ConnTable, Protocol};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn table() -> (Arc<ConnTable>, crate::proxy::conntrack::ConnGuard) {
        let t = ConnTable::new(crate::metrics::TcpMetrics::default());
        let g = t.open(ConnMeta {
            direction: Direction::Outbound,
            protocol: Protocol::Plain,
            src: "10.0.0.1:1".parse().unwrap(),
            dst: "10.0.0.2:2".parse().unwrap(),
            original_dst: None,
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

    /// A server's end of a byte stream that records the size of every write it takes and
    /// reads as an immediate EOF.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<usize>,
        bytes: Vec<u8>,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.push(buf.len());
            self.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Endpoint for Recorder {}

    #[tokio::test]
    async fn small_chunks_already_received_go_out_in_one_write_and_in_order() {
        use bytes::Bytes;
        // An h2 connection over an in-memory pipe; the server's stream is the relay's client.
        let (a, b) = tokio::io::duplex(4 << 20);
        let (mut sender, conn) = h2::client::handshake(a).await.unwrap();
        tokio::spawn(conn);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .initial_window_size(4 << 20)
                .initial_connection_window_size(8 << 20)
                .max_frame_size(1 << 16)
                .handshake::<_, Bytes>(b)
                .await
                .unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            H2Io::new(send, req.into_body())
        });
        let req = http::Request::builder()
            .method("CONNECT")
            .uri("10.0.0.2:2")
            .body(())
            .unwrap();
        let (_answer, mut up) = sender.send_request(req, false).unwrap();
        let mut h = server.await.unwrap();
        // Frames, all received before the relay first looks: 1, ten of 30,000 bytes, one of
        // 40,000, one of 2, and the end of the stream.
        let mut frames: Vec<Vec<u8>> = vec![vec![1]];
        for k in 0..10u8 {
            frames.push(vec![k + 10; 30_000]);
        }
        frames.push(vec![99; 40_000]);
        frames.push(vec![5, 6]);
        up.reserve_capacity(1 << 20);
        for f in &frames {
            up.send_data(Bytes::from(f.clone()), false).unwrap();
        }
        up.send_data(Bytes::new(), true).unwrap();
        // Let both connection tasks run until they are idle: on this single-threaded runtime,
        // with nothing but an in-memory pipe between them, the server's h2 has every frame
        // queued on the stream by then.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (_t, g) = table();
        let conns = [g.conn().clone()];
        let mut rec = Recorder::default();
        relay(&mut h, &mut rec, &conns).await.unwrap();
        assert_eq!(rec.bytes, frames.concat());
        // 1 + 8 × 30,000 gathered; the 9th, which no longer fits, alone; the 10th starts the
        // next gathering, which takes the 40,000 and the 2 behind it.
        assert_eq!(rec.writes, vec![240_001, 30_000, 70_002]);
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
