//! One HTTP/2 CONNECT stream as a byte stream (`AsyncRead + AsyncWrite`), with the reset
//! semantics a tunnel needs.
//!
//! hyper's upgraded streams end every stream cleanly (a dropped writer becomes END_STREAM and
//! a peer's RST_STREAM(CANCEL) reads as EOF), which would turn a failure on one side into a
//! clean close on the other. Here a failure is a failure: [`H2Io::reset`] sends RST_STREAM
//! (`CONNECT_ERROR`, RFC 9113 §8.5), dropping an unfinished stream sends one, and a reset or
//! a broken connection reads as `ConnectionReset`, which the relay turns into a TCP RST.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest chunk handed to h2 in one `send_data` (h2 splits it into frames).
const MAX_CHUNK: usize = 256 * 1024;

/// A CONNECT stream's two halves.
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    /// END_STREAM sent (our write side is closed).
    sent_end: bool,
    /// A reset was sent or received.
    reset: bool,
}

fn reset_error(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("HBONE stream reset: {what}"),
    )
}

impl H2Io {
    /// Wraps the halves of an accepted (server) or opened (client) stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Io {
        H2Io {
            send,
            recv,
            pending: Bytes::new(),
            sent_end: false,
            reset: false,
        }
    }

    /// Aborts the stream: the peer sees a reset, not an end of stream.
    pub fn reset(&mut self) {
        if !self.reset {
            self.reset = true;
            self.send.send_reset(Reason::CONNECT_ERROR);
        }
    }
}

impl Drop for H2Io {
    fn drop(&mut self) {
        // Dropped before both directions finished: that is an abort, say so.
        if !self.sent_end && !self.reset {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => {
                    let n = data.len();
                    let _ = self.recv.flow_control().release_capacity(n);
                    self.pending = data;
                }
                Some(Err(e)) => {
                    self.reset = true;
                    return Poll::Ready(Err(reset_error(e)));
                }
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = buf.len().min(MAX_CHUNK);
        self.send.reserve_capacity(want);
        loop {
            let cap = self.send.capacity();
            if cap > 0 {
                let n = cap.min(want);
                return match self
                    .send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(e) => {
                        self.reset = true;
                        Poll::Ready(Err(reset_error(e)))
                    }
                };
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    self.reset = true;
                    return Poll::Ready(Err(reset_error(e)));
                }
                None => {
                    self.reset = true;
                    return Poll::Ready(Err(reset_error("stream closed by the peer")));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames as the connection task gets to them; nothing is held back here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.sent_end {
            return Poll::Ready(Ok(()));
        }
        // A reset from the peer arriving before our end: report it rather than hide it.
        if let Poll::Ready(Ok(reason)) = self.send.poll_reset(cx) {
            self.reset = true;
            return Poll::Ready(Err(reset_error(reason)));
        }
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                self.sent_end = true;
                Poll::Ready(Ok(()))
            }
            Err(e) => {
                self.reset = true;
                Poll::Ready(Err(reset_error(e)))
            }
        }
    }
}
