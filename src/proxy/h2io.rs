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
//! reset that names the status (a write that fails meanwhile names it too).
//!
//! One task drives both directions of an `H2Io` (the relay does): the answer, and a reopen in
//! progress, are polled from either side, and a future keeps one waker.
//!
//! A peer shutting down (GOAWAY) may turn away a stream it never processed: one whose request
//! was still in our send queue when the peer's final GOAWAY named its last stream (RFC 9113
//! §6.8; h2's graceful shutdown leaves that window open). Such a stream can safely be opened
//! again elsewhere, and with [`H2Io::reopen_with`] it is, its first bytes (up to
//! [`REPLAY_MAX`]) sent again behind the new request: the client sees nothing of it. Only a
//! graceful GOAWAY (`NO_ERROR`) is followed so: one with an error code may be the peer's
//! answer to what this stream sent, which must not take down more connections.
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

/// Bytes written before the answer that are kept to send again if the stream must be opened
/// again; a stream that wrote more before its answer fails as it would have without.
pub const REPLAY_MAX: usize = 64 * 1024;

/// How many times one stream is opened again after being turned away unprocessed.
const MAX_REOPEN: u8 = 2;

/// How long a client stream waits for the answer to its CONNECT. The peer answers once it
/// has reached the destination (its app connect gives up after 5 s), so a stream with no
/// answer after this is on a connection to a peer that stopped answering.
pub const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens the stream again (on another connection), holding what it needs (its pool slot,
/// [`H2Io::hold`]).
pub type Reopen = Box<dyn FnMut() -> Reopening + Send + Sync>;

/// A reopen in progress; it fails with whatever kept the stream from opening again (the
/// pool's error: this module sits below the pool and does not name its type).
pub type Reopening = Pin<Box<dyn Future<Output = Result<H2Io, ReopenError>> + Send>>;

/// Why a reopen failed.
pub type ReopenError = Box<dyn std::error::Error + Send + Sync>;

/// The receiving half: the body, or (client side, before the answer) the answer to come.
enum Recv {
    /// The CONNECT was sent and not answered yet; bytes may already be written.
    Awaiting(ResponseFuture),
    /// The answer was 200: the peer's bytes.
    Open(RecvStream),
    /// The CONNECT was turned away unprocessed and is being sent again.
    Reopening(Reopening),
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
    /// Turned away unprocessed (GOAWAY), and opening it again failed.
    #[error("turned away by a peer going away; opening the stream again failed: {0}")]
    Reopen(#[source] ReopenError),
    /// No answer came within [`ANSWER_TIMEOUT`].
    #[error("no answer to the CONNECT within {0:?}")]
    Unanswered(std::time::Duration),
}

/// Until the answer: what was written, to send again if the stream is turned away unprocessed.
struct Early {
    /// One buffer (tiny writes would otherwise each keep a `Bytes` alive). Whether
    /// END_STREAM went too is `sent_end`.
    bytes: BytesMut,
    reopen: Reopen,
}

/// Whether `e`, a stream's failure, says a peer shutting down gracefully never processed the
/// stream: a GOAWAY from the peer naming a lower last stream fails exactly those (h2 fails no
/// other stream with a remote GOAWAY error; streams the peer did process end as reset or
/// broken instead), and `NO_ERROR` says it is a shutdown, not a complaint.
pub fn unprocessed(e: &h2::Error) -> bool {
    e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::NO_ERROR)
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
    /// Client side, until the answer, when the stream may be opened again.
    early: Option<Box<Early>>,
    /// Held as long as the stream is (its pool slot).
    _held: Option<Box<dyn Send + Sync>>,
    /// Times the stream was opened again.
    reopens: u8,
    /// Server side: bytes received before the stream was answered ([`H2Io::with_received`]).
    early_received: Option<Box<EarlyReceived>>,
    /// Client side, until the answer: when to give up waiting for it.
    answer_by: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Called once if the answer does not come in time (the pool retires the connection).
    on_unanswered: Option<Box<dyn FnOnce() + Send + Sync>>,
}

/// What a server stream received before it was answered.
struct EarlyReceived {
    /// Credit still owed (counted in `owed`).
    bytes: Bytes,
    /// The peer's side already ended: cleanly, or with the error's text.
    ended: Option<Result<(), String>>,
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
            early: None,
            _held: None,
            reopens: 0,
            early_received: None,
            answer_by: None,
            on_unanswered: None,
        }
    }

    /// A client stream whose CONNECT is not answered yet. Writes go out at once (they are
    /// the tunnel's first bytes, which the peer holds until it has reached the destination);
    /// reads wait for the answer, and a refusal reads as a reset.
    pub fn awaiting(send: SendStream<Bytes>, response: ResponseFuture) -> H2Io {
        let mut io = H2Io::awaiting_untimed(send, response);
        io.answer_by = Some(Box::pin(tokio::time::sleep(ANSWER_TIMEOUT)));
        io
    }

    /// Runs `f` once if the answer does not come within [`ANSWER_TIMEOUT`] (the stream then
    /// fails with [`Refusal::Unanswered`]).
    pub fn on_unanswered(&mut self, f: Box<dyn FnOnce() + Send + Sync>) {
        self.on_unanswered = Some(f);
    }

    fn awaiting_untimed(send: SendStream<Bytes>, response: ResponseFuture) -> H2Io {
        H2Io {
            send,
            recv: Recv::Awaiting(response),
            pending: Bytes::new(),
            sent_end: false,
            reset: false,
            owed: 0,
            early: None,
            _held: None,
            reopens: 0,
            early_received: None,
            answer_by: None,
            on_unanswered: None,
        }
    }

    /// Lets a stream still awaiting its answer be opened again with `reopen` if the peer
    /// turns it away unprocessed (module doc). Until the answer, what is written is kept (up
    /// to [`REPLAY_MAX`]) to be sent again.
    pub fn reopen_with(&mut self, reopen: Reopen) {
        if matches!(self.recv, Recv::Awaiting(_)) {
            self.early = Some(Box::new(Early {
                bytes: BytesMut::new(),
                reopen,
            }));
        }
    }

    /// A server stream whose first bytes (`received`, taken off h2 while the destination was
    /// being reached, with their flow-control credit still owed) come before the rest, and
    /// whose peer may already have ended its side (`ended`: `Some(Ok)` cleanly, `Some(Err)`
    /// with a reset or a broken connection).
    pub fn with_received(
        send: SendStream<Bytes>,
        recv: RecvStream,
        received: Bytes,
        ended: Option<Result<(), String>>,
    ) -> H2Io {
        let mut io = H2Io::new(send, recv);
        io.owed = received.len();
        io.early_received = Some(Box::new(EarlyReceived {
            bytes: received,
            ended,
        }));
        io
    }

    /// Keeps `held` as long as the stream (a reopened stream holds its own instead).
    pub fn hold(&mut self, held: Box<dyn Send + Sync>) {
        self._held = Some(held);
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
        if let Some(early) = &mut self.early_received {
            if !early.bytes.is_empty() {
                return Poll::Ready(Ok(Some(std::mem::take(&mut early.bytes))));
            }
            match early.ended.take() {
                None => self.early_received = None,
                Some(Ok(())) => return Poll::Ready(Ok(None)),
                Some(Err(e)) => {
                    self.reset = true;
                    return Poll::Ready(Err(reset_error(e)));
                }
            }
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
        let mut first = Inbox::default();
        let mut ended = None;
        if let Some(early) = self.early_received.take() {
            // Their credit is given back as the reader reads them, like the rest.
            first.bytes.extend_from_slice(&early.bytes);
            self.owed = 0;
            ended = early.ended;
        }
        let already = ended.map(|e| match e {
            Ok(()) => End::Clean,
            Err(e) => End::Failed(e),
        });
        let shared = Arc::new(Mutex::new(first));
        let flow = recv.flow_control().clone();
        let inbox = shared.clone();
        let task = tokio::spawn(async move {
            let end = if let Some(end) = already {
                end
            } else {
                loop {
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
    /// waiting).
    pub fn refusal_now(&mut self) -> Option<String> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.poll_answer(&mut cx, false) {
            Poll::Ready(Err(r @ Refusal::Status(_))) => Some(r.to_string()),
            Poll::Ready(Err(Refusal::Again(why))) => Some(why),
            _ => None,
        }
    }

    fn poll_established(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.poll_answer(cx, true)
    }

    /// The answer to the CONNECT; a stream turned away unprocessed is opened again first
    /// when it may be (`reopen`, and [`H2Io::reopen_with`] was given).
    fn poll_answer(&mut self, cx: &mut Context<'_>, reopen: bool) -> Poll<Result<(), Refusal>> {
        loop {
            let refusal = match &mut self.recv {
                Recv::Open(_) | Recv::Absorbed(_) => return Poll::Ready(Ok(())),
                Recv::Refused(why) => return Poll::Ready(Err(Refusal::Again(why.clone()))),
                Recv::Awaiting(response) => match Pin::new(response).poll(cx) {
                    Poll::Pending => {
                        let late = self
                            .answer_by
                            .as_mut()
                            .is_some_and(|by| by.as_mut().poll(cx).is_ready());
                        if !late {
                            return Poll::Pending;
                        }
                        if let Some(retire) = self.on_unanswered.take() {
                            retire();
                        }
                        Refusal::Unanswered(ANSWER_TIMEOUT)
                    }
                    Poll::Ready(Ok(resp)) if resp.status() == StatusCode::OK => {
                        self.recv = Recv::Open(resp.into_body());
                        self.early = None;
                        self.answer_by = None;
                        self.on_unanswered = None;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Ok(resp)) => Refusal::Status(resp.status()),
                    Poll::Ready(Err(e)) => match self.early.as_mut() {
                        Some(early) if reopen && unprocessed(&e) => {
                            if self.reopens >= MAX_REOPEN {
                                Refusal::Reopen(
                                    format!(
                                        "turned away again after {} reopens: {e}",
                                        self.reopens
                                    )
                                    .into(),
                                )
                            } else {
                                tracing::debug!(error = %e, "HBONE stream turned away unprocessed; opening it again");
                                self.recv = Recv::Reopening((early.reopen)());
                                continue;
                            }
                        }
                        _ => Refusal::Failed(e),
                    },
                },
                // Only a caller that may reopen drives a reopen (not a look at the answer).
                Recv::Reopening(_) if !reopen => return Poll::Pending,
                Recv::Reopening(reopening) => match ready!(reopening.as_mut().poll(cx)) {
                    Ok(mut io) => {
                        // The new stream's halves and slot become ours (`io` goes with the
                        // dead ones, and the old slot); what was written before goes out
                        // again behind its request.
                        std::mem::swap(&mut self.send, &mut io.send);
                        std::mem::swap(&mut self.recv, &mut io.recv);
                        std::mem::swap(&mut self._held, &mut io._held);
                        self.reopens += 1;
                        if let Some(early) = &self.early {
                            // A failure shows in the answer, as the original's did.
                            if !early.bytes.is_empty() {
                                let again = Bytes::copy_from_slice(&early.bytes);
                                let _ = self.send.send_data(again, false);
                            }
                            if self.sent_end {
                                let _ = self.send.send_data(Bytes::new(), true);
                            }
                        }
                        continue;
                    }
                    Err(why) => Refusal::Reopen(why),
                },
            };
            self.reset = true;
            self.early = None;
            self.send.send_reset(Reason::CANCEL);
            self.recv = Recv::Refused(refusal.to_string());
            return Poll::Ready(Err(refusal));
        }
    }

    /// Before a write: a stream being opened again takes no writes until it is (this drives
    /// the reopen). `Ready(Ok)`: write on.
    fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !matches!(self.recv, Recv::Reopening(_)) {
            return Poll::Ready(Ok(()));
        }
        match self.poll_answer(cx, true) {
            Poll::Ready(Err(r)) => Poll::Ready(Err(reset_error(r))),
            Poll::Pending if matches!(self.recv, Recv::Reopening(_)) => Poll::Pending,
            _ => Poll::Ready(Ok(())),
        }
    }

    /// A write (or END_STREAM) failed with `e`. Before the answer, the answer decides: a
    /// refusal fails the write naming the peer's status (not the write's own, blind error),
    /// and a stream that may be opened again gets the chance: `Ready(Ok)` means write again
    /// (on the new stream), `Pending` that the reopen is under way. Otherwise `e` stands.
    fn poll_write_failed(
        &mut self,
        cx: &mut Context<'_>,
        e: impl std::fmt::Display,
    ) -> Poll<io::Result<()>> {
        if matches!(self.recv, Recv::Awaiting(_)) {
            let reopens = self.reopens;
            // The stream failed as a whole, so its answer is there too (h2 keeps one state).
            match self.poll_answer(cx, true) {
                Poll::Ready(Err(r)) => return Poll::Ready(Err(reset_error(r))),
                Poll::Pending if matches!(self.recv, Recv::Reopening(_)) => return Poll::Pending,
                _ if self.reopens > reopens => return Poll::Ready(Ok(())),
                _ => {}
            }
        }
        self.reset = true;
        Poll::Ready(Err(reset_error(e)))
    }

    /// Keeps `chunk`, just sent before the answer, for a reopen; past [`REPLAY_MAX`] the
    /// stream can no longer be opened again.
    fn keep_early(&mut self, chunk: &[u8]) {
        if let Some(early) = &mut self.early {
            if early.bytes.len() + chunk.len() > REPLAY_MAX {
                self.early = None;
            } else {
                early.bytes.extend_from_slice(chunk);
            }
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
        loop {
            ready!(self.poll_writable(cx))?;
            self.send.reserve_capacity(want);
            let cap = self.send.capacity();
            let failure = if cap > 0 {
                let n = cap.min(want);
                match self
                    .send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                {
                    Ok(()) => {
                        self.keep_early(&buf[..n]);
                        return Poll::Ready(Ok(n));
                    }
                    Err(e) => e.to_string(),
                }
            } else {
                match ready!(self.send.poll_capacity(cx)) {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => e.to_string(),
                    None => "stream closed by the peer".to_string(),
                }
            };
            ready!(self.poll_write_failed(cx, failure))?;
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames as the connection task gets to them; nothing is held back here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.sent_end {
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_writable(cx))?;
            // A reset from the peer arriving before our end: report it rather than hide it.
            let failure = if let Poll::Ready(Ok(reason)) = self.send.poll_reset(cx) {
                reason.to_string()
            } else {
                match self.send.send_data(Bytes::new(), true) {
                    Ok(()) => {
                        self.sent_end = true;
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) => e.to_string(),
                }
            };
            ready!(self.poll_write_failed(cx, failure))?;
        }
    }
}
