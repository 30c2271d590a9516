//! One HTTP/2 CONNECT stream as a byte stream (`AsyncRead + AsyncWrite`), with the reset
//! semantics a tunnel needs.
//!
//! hyper's upgraded streams end every stream cleanly (a dropped writer becomes END_STREAM and
//! a peer's RST_STREAM(CANCEL) reads as EOF), which would turn a failure on one side into a
//! clean close on the other. Here a failure is a failure: [`H2Io::reset`] sends RST_STREAM
//! (`CONNECT_ERROR`, RFC 9113 §8.5), dropping an unfinished stream sends one, and a reset or
//! a broken connection reads as `ConnectionReset`, which the relay turns into a TCP RST.
//!
//! A client stream may be written before its CONNECT is answered ([`H2Io::awaiting`]): the
//! first bytes travel behind the request. Reading waits for the answer; a refusal reads as a
//! reset that names the status.
//!
//! Received bytes are never left queued frame by frame in h2 while a reader is busy
//! elsewhere: the relay takes them with [`H2Io::poll_recv_unreleased`], and other readers (the
//! waypoint) get an [`H2Io::absorbing`] stream. Either way the flow-control credit goes back
//! only when the bytes are really consumed, so the stream's window still bounds what is held.

use crate::sync::lock;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use h2::client::ResponseFuture;
use h2::{Reason, RecvStream, SendStream};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest chunk handed to h2 in one `send_data` (h2 splits it into frames).
const MAX_CHUNK: usize = 256 * 1024;

/// The receiving half: the body, or (client side, before the answer) the answer to come.
enum Recv {
    /// The CONNECT was sent and not answered yet; bytes may already be written.
    Awaiting(ResponseFuture),
    /// The answer was 200: the peer's bytes.
    Open(RecvStream),
    /// The CONNECT was refused (said once; later reads fail the same way).
    Refused(String),
    /// A task takes the peer's bytes off h2 as they arrive ([`H2Io::absorbing`]).
    Absorbed(Absorbed),
}

/// The reading end of an absorbing stream.
struct Absorbed {
    shared: Arc<Mutex<Inbox>>,
    /// Credit is given back as the reader takes bytes, not as the task takes them from h2.
    flow: h2::FlowControl,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Absorbed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How an absorbed stream ended.
enum End {
    /// The peer ended its side cleanly.
    Clean,
    /// Reset or broken: the error's text.
    Failed(String),
}

/// What the absorbing task has taken off h2 and the reader has not read yet.
#[derive(Default)]
struct Inbox {
    bytes: BytesMut,
    /// How the stream ended, once it has.
    end: Option<End>,
    reader: Option<Waker>,
}

/// Why a CONNECT did not open.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The peer answered with this status.
    #[error("CONNECT refused: {0}")]
    Status(StatusCode),
    /// The stream or connection failed first.
    #[error("{0}")]
    Failed(h2::Error),
    /// Asked again after one of the above (its text).
    #[error("{0}")]
    Again(String),
}

/// A CONNECT stream's two halves.
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: Recv,
    /// Received but not yet read.
    pending: Bytes,
    /// END_STREAM sent (our write side is closed).
    sent_end: bool,
    /// A reset was sent or received.
    reset: bool,
    /// Bytes taken by [`H2Io::poll_recv_unreleased`] whose credit is not given back yet.
    owed: usize,
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
            recv: Recv::Open(recv),
            pending: Bytes::new(),
            sent_end: false,
            reset: false,
            owed: 0,
        }
    }

    /// A client stream whose CONNECT is not answered yet. Writes go out at once (they are
    /// the tunnel's first bytes, which the peer holds until it has reached the destination);
    /// reads wait for the answer, and a refusal reads as a reset.
    pub fn awaiting(send: SendStream<Bytes>, response: ResponseFuture) -> H2Io {
        H2Io {
            send,
            recv: Recv::Awaiting(response),
            pending: Bytes::new(),
            sent_end: false,
            reset: false,
            owed: 0,
        }
    }

    /// Waits for the answer to the CONNECT (at once for a stream already open).
    pub async fn established(&mut self) -> Result<(), Refusal> {
        std::future::poll_fn(|cx| self.poll_established(cx)).await
    }

    /// The next received chunk as h2 delivered it, *without* giving its flow-control credit
    /// back: the caller calls [`H2Io::release`] once the bytes are really gone (written on),
    /// so the peer can never have more in flight than the stream's window however the chunks
    /// are held. `None` at the end of the stream.
    pub fn poll_recv_unreleased(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            // Left by a `poll_read` (its credit was given back then).
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        if let Err(refusal) = ready!(self.poll_established(cx)) {
            return Poll::Ready(Err(reset_error(refusal)));
        }
        let Recv::Open(recv) = &mut self.recv else {
            return Poll::Ready(Err(reset_error("CONNECT not answered")));
        };
        match ready!(recv.poll_data(cx)) {
            None => Poll::Ready(Ok(None)),
            Some(Ok(data)) => {
                self.owed += data.len();
                Poll::Ready(Ok(Some(data)))
            }
            Some(Err(e)) => {
                self.reset = true;
                Poll::Ready(Err(reset_error(e)))
            }
        }
    }

    /// Gives back the flow-control credit of `n` bytes taken with
    /// [`H2Io::poll_recv_unreleased`].
    pub fn release(&mut self, n: usize) {
        let n = n.min(self.owed);
        if n > 0 {
            self.owed -= n;
            if let Recv::Open(recv) = &mut self.recv {
                let _ = recv.flow_control().release_capacity(n);
            }
        }
    }

    /// Hands the receiving side to a task that takes the peer's bytes off h2 as they arrive,
    /// for readers that stop reading while they wait on something else (the waypoint's HTTP
    /// server does, while the app is slow to take a request body). h2 would otherwise hold
    /// the bytes frame by frame, and many tiny frames exhaust its per-connection budget for
    /// them: the GOAWAY takes every stream of the connection down. Flow control is unchanged:
    /// credit goes back as the reader reads, so at most the stream's window is held.
    pub fn absorbing(mut self) -> H2Io {
        let mut recv = match std::mem::replace(&mut self.recv, Recv::Refused(String::new())) {
            Recv::Open(recv) => recv,
            other => {
                self.recv = other;
                return self;
            }
        };
        let shared = Arc::new(Mutex::new(Inbox::default()));
        let flow = recv.flow_control().clone();
        let inbox = shared.clone();
        let task = tokio::spawn(async move {
            let end = loop {
                match std::future::poll_fn(|cx| recv.poll_data(cx)).await {
                    Some(Ok(data)) => {
                        let mut i = lock(&inbox);
                        i.bytes.extend_from_slice(&data);
                        if let Some(w) = i.reader.take() {
                            w.wake();
                        }
                    }
                    Some(Err(e)) => break End::Failed(e.to_string()),
                    None => break End::Clean,
                }
            };
            let mut i = lock(&inbox);
            i.end = Some(end);
            if let Some(w) = i.reader.take() {
                w.wake();
            }
        });
        self.recv = Recv::Absorbed(Absorbed { shared, flow, task });
        self
    }

    /// Why the CONNECT was refused, if its answer has arrived and was not 200 (without
    /// waiting). After a failed write this names the real cause: the peer's status.
    pub fn refusal_now(&mut self) -> Option<String> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.poll_established(&mut cx) {
            Poll::Ready(Err(Refusal::Status(s))) => Some(Refusal::Status(s).to_string()),
            Poll::Ready(Err(Refusal::Again(why))) => Some(why),
            _ => None,
        }
    }

    fn poll_established(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        let response = match &mut self.recv {
            Recv::Awaiting(response) => response,
            Recv::Open(_) | Recv::Absorbed(_) => return Poll::Ready(Ok(())),
            Recv::Refused(why) => return Poll::Ready(Err(Refusal::Again(why.clone()))),
        };
        let refusal = match ready!(Pin::new(response).poll(cx)) {
            Ok(resp) if resp.status() == StatusCode::OK => {
                self.recv = Recv::Open(resp.into_body());
                return Poll::Ready(Ok(()));
            }
            Ok(resp) => Refusal::Status(resp.status()),
            Err(e) => Refusal::Failed(e),
        };
        self.reset = true;
        self.send.send_reset(Reason::CANCEL);
        self.recv = Recv::Refused(refusal.to_string());
        Poll::Ready(Err(refusal))
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
        if let Recv::Absorbed(a) = &mut self.recv {
            let mut inbox = lock(&a.shared);
            if inbox.bytes.is_empty() {
                return match &inbox.end {
                    None => {
                        inbox.reader = Some(cx.waker().clone());
                        Poll::Pending
                    }
                    Some(End::Clean) => Poll::Ready(Ok(())),
                    Some(End::Failed(e)) => {
                        let e = reset_error(e);
                        drop(inbox);
                        self.reset = true;
                        Poll::Ready(Err(e))
                    }
                };
            }
            let n = inbox.bytes.len().min(buf.remaining());
            buf.put_slice(&inbox.bytes[..n]);
            inbox.bytes.advance(n);
            if inbox.bytes.is_empty() {
                // Drained: an idle stream keeps no buffer.
                inbox.bytes = BytesMut::new();
            }
            let _ = a.flow.release_capacity(n);
            return Poll::Ready(Ok(()));
        }
        if self.pending.is_empty() {
            match ready!(self.poll_recv_unreleased(cx))? {
                None => return Poll::Ready(Ok(())),
                Some(data) => {
                    self.release(data.len());
                    self.pending = data;
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
