//! A watch on HTTP/1 message framing as the bytes arrive, before hyper parses them.
//!
//! hyper resolves a request carrying both `Content-Length` and `Transfer-Encoding` the way
//! RFC 9112 §6.3 allows (chunked wins, the length header is dropped, the connection closes
//! afterwards), so a service never sees the conflict. A proxy must not even forward such a
//! request: it is the classic request-smuggling shape. This wrapper follows the message
//! boundaries of an HTTP/1 byte stream (heads parsed with `httparse`, bodies skipped by length
//! or by chunk), records for every request head whether its framing is ambiguous, and the
//! waypoint answers those requests `400` and closes the connection. A chunk size that cannot be
//! read as a 64-bit number (`ffffffffffffffff` plus its CRLF overflows, longer sizes do not
//! parse) loses the framing: every later request on the connection counts as ambiguous. HTTP/2
//! (its connection preface) and anything after an upgrade or CONNECT pass through unwatched
//! (the waypoint closes a connection whose upgrade or CONNECT did not switch protocols).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per request head, in order: `true` when its framing is ambiguous; and whether the stream
/// lost its framing altogether (every later request is then ambiguous).
#[derive(Clone, Default)]
pub struct Verdicts(Arc<Mutex<Recorded>>);

#[derive(Default)]
struct Recorded {
    heads: VecDeque<bool>,
    lost: bool,
}

impl Verdicts {
    /// Takes the verdict of the next request in order (`false` when none was recorded, e.g.
    /// HTTP/2; `true` for every request once the framing was lost).
    pub fn next_is_ambiguous(&self) -> bool {
        let mut r = crate::sync::lock(&self.0);
        let head = r.heads.pop_front().unwrap_or(false);
        head || r.lost
    }

    fn push(&self, ambiguous: bool) {
        crate::sync::lock(&self.0).heads.push_back(ambiguous);
    }

    /// The body's framing cannot be followed (a chunk size that does not fit 64 bits): where
    /// the next request starts is ambiguous, so none is forwarded.
    fn lose(&self) {
        crate::sync::lock(&self.0).lost = true;
    }
}

/// Heads longer than this are left to hyper (which refuses them).
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug)]
enum State {
    /// Collecting a request head.
    Head(Vec<u8>),
    /// Skipping this many body bytes.
    Body(u64),
    /// In a chunked body: reading a chunk-size line.
    ChunkSize(Vec<u8>),
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// Reading trailer lines until an empty one.
    Trailer(Vec<u8>),
    /// No longer watching (HTTP/2, upgrade, CONNECT, or something unparsable).
    Off,
}

/// The wrapper: reads pass through unchanged while the framing is followed.
pub struct Watched<I> {
    inner: I,
    state: State,
    verdicts: Verdicts,
    first: bool,
}

impl<I> Watched<I> {
    /// Watches `inner`, recording into `verdicts`.
    pub fn new(inner: I, verdicts: Verdicts) -> Watched<I> {
        Watched {
            inner,
            state: State::Head(Vec::new()),
            verdicts,
            first: true,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        if self.first && !data.is_empty() {
            self.first = false;
            if data.starts_with(b"PRI * HTTP/2.0") {
                self.state = State::Off;
            }
        }
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Head(buf) => {
                    // Tolerate blank lines between requests.
                    if buf.is_empty() {
                        while let [b'\r' | b'\n', rest @ ..] = data {
                            data = rest;
                        }
                        if data.is_empty() {
                            return;
                        }
                    }
                    let start = buf.len().saturating_sub(3);
                    buf.extend_from_slice(data);
                    let Some(end) = find(&buf[start..], b"\r\n\r\n").map(|i| start + i + 4) else {
                        if buf.len() > MAX_HEAD {
                            self.state = State::Off;
                        }
                        return;
                    };
                    // What followed the head is the tail of `data`: the bytes buffered before
                    // held no blank line, so the head ends inside `data` (`rest < data.len()`).
                    let rest = buf.len() - end;
                    buf.truncate(end);
                    let head = std::mem::take(buf);
                    self.state = self.after_head(&head);
                    // A loop, not a call per head: one read may hold thousands of pipelined
                    // requests, and the stack must not grow with them.
                    data = &data[data.len().saturating_sub(rest)..];
                }
                State::Body(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => match data.iter().position(|&b| b == b'\n') {
                    None => {
                        line.extend_from_slice(data);
                        if line.len() > 1024 {
                            self.state = State::Off;
                        }
                        return;
                    }
                    Some(i) => {
                        line.extend_from_slice(&data[..=i]);
                        data = &data[i + 1..];
                        let text = String::from_utf8_lossy(line);
                        let size = text
                            .trim()
                            .split(';')
                            .next()
                            .unwrap_or("")
                            .trim()
                            .to_string();
                        // The size and its CRLF must fit 64 bits: a size that does not is
                        // read differently by every parser (wrapped, truncated, refused), so
                        // where the next request starts is ambiguous.
                        self.state = match u64::from_str_radix(&size, 16) {
                            Ok(0) => State::Trailer(Vec::new()),
                            Ok(n) => match n.checked_add(2) {
                                Some(left) => State::ChunkData(left),
                                None => self.lost(),
                            },
                            // Too long for 64 bits, or not a size at all.
                            Err(_) => self.lost(),
                        };
                    }
                },
                State::ChunkData(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailer(line) => match data.iter().position(|&b| b == b'\n') {
                    None => {
                        line.extend_from_slice(data);
                        return;
                    }
                    Some(i) => {
                        line.extend_from_slice(&data[..=i]);
                        data = &data[i + 1..];
                        let empty = line.iter().all(|b| *b == b'\r' || *b == b'\n');
                        line.clear();
                        if empty {
                            self.state = State::Head(Vec::new());
                        }
                    }
                },
            }
        }
    }

    /// Gives up following a stream whose framing was lost, recording it.
    fn lost(&self) -> State {
        self.verdicts.lose();
        State::Off
    }

    /// Records the head's verdict and decides how its body is framed.
    fn after_head(&self, head: &[u8]) -> State {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            // hyper will refuse it; nothing more to follow.
            _ => return State::Off,
        }
        let mut lengths = Vec::new();
        let mut chunked = false;
        let mut te = false;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths.push(String::from_utf8_lossy(h.value).trim().to_string());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
                chunked = String::from_utf8_lossy(h.value)
                    .rsplit(',')
                    .next()
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        let conflicting_lengths = lengths.windows(2).any(|w| w[0] != w[1]);
        let ambiguous = (te && !lengths.is_empty()) || conflicting_lengths;
        self.verdicts.push(ambiguous);
        if ambiguous || upgrade || req.method == Some("CONNECT") {
            // The waypoint closes after an ambiguous request; upgraded streams are opaque.
            return State::Off;
        }
        if te {
            return if chunked {
                State::ChunkSize(Vec::new())
            } else {
                State::Off
            };
        }
        match lengths.first().map(|l| l.parse::<u64>()) {
            Some(Ok(0)) | None => State::Head(Vec::new()),
            Some(Ok(n)) => State::Body(n),
            Some(Err(_)) => State::Off,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && !matches!(self.state, State::Off) {
            let data = buf.filled()[before..].to_vec();
            self.feed(&data);
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(stream: &[&[u8]]) -> Vec<bool> {
        let v = Verdicts::default();
        let mut w = Watched::new(tokio::io::empty(), v.clone());
        for chunk in stream {
            w.feed(chunk);
        }
        let out: Vec<bool> = v.0.lock().unwrap().heads.iter().copied().collect();
        out
    }

    #[test]
    fn keep_alive_requests_with_bodies_are_followed_across_reads() {
        let a: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel";
        let b: &[u8] = b"loGET /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let c: &[u8] = b"GET /c HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(verdicts(&[a, b, c]), [false, false, true]);
    }

    #[test]
    fn conflicting_framing_is_flagged_in_either_order() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 4\r\nContent-Length: 5\r\n\r\n",
        ] {
            assert_eq!(
                verdicts(&[head]),
                [true],
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        assert_eq!(
            verdicts(&[b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd"]),
            [false]
        );
    }

    #[test]
    fn chunk_sizes_beyond_64_bits_lose_the_framing_without_panicking() {
        let head: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        let next: &[u8] = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n";
        for size in [
            &b"ffffffffffffffff"[..],
            b"fffffffffffffffe",
            b"FFFFFFFFFFFFFFFF;ext=1",
            b"10000000000000000",
            b"00000000000000000000000000000000000001",
        ] {
            let v = Verdicts::default();
            let mut w = Watched::new(tokio::io::empty(), v.clone());
            w.feed(head);
            w.feed(size);
            w.feed(b"\r\nabc\r\n");
            w.feed(next);
            let what = String::from_utf8_lossy(size);
            assert!(matches!(w.state, State::Off), "{what}: {:?}", w.state);
            assert!(
                v.next_is_ambiguous(),
                "{what}: a request after it is not refused"
            );
            assert!(v.next_is_ambiguous(), "{what}: the framing was forgotten");
        }
        // The largest size that fits is followed (and does not wrap).
        let v = Verdicts::default();
        let mut w = Watched::new(tokio::io::empty(), v.clone());
        w.feed(head);
        w.feed(b"fffffffffffffffd\r\nabc");
        assert!(
            matches!(w.state, State::ChunkData(n) if n == u64::MAX - 3),
            "{:?}",
            w.state
        );
        assert!(!v.next_is_ambiguous());
        assert!(!v.next_is_ambiguous());
    }

    #[test]
    fn thousands_of_pipelined_requests_in_one_read_need_no_more_stack() {
        // hyper's reads grow to hundreds of KiB; a call per request head overflowed a
        // worker's stack on a read full of minimal requests. 30,000 heads on a 128 KiB stack.
        let read: Vec<u8> = b"GET / HTTP/1.1\r\n\r\n".repeat(30_000);
        let n = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || verdicts(&[&read]).len())
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(n, 30_000);
    }

    #[test]
    fn a_chunk_size_at_the_limit_of_u64_stops_the_watch_instead_of_overflowing() {
        let head: &[u8] = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let v = Verdicts::default();
        let mut w = Watched::new(tokio::io::empty(), v.clone());
        w.feed(head);
        w.feed(b"ffffffffffffffff\r\nGET /next HTTP/1.1\r\n\r\n");
        assert!(matches!(w.state, State::Off), "{:?}", w.state);
        assert_eq!(verdicts(&[head, b"fffffffffffffffe\r\n"]), [false]);
    }

    #[test]
    fn http2_and_upgrades_are_not_followed() {
        assert!(verdicts(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).is_empty());
        let up: &[u8] = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nGET /x HTTP/1.1\r\n\r\n";
        assert_eq!(verdicts(&[up]), [false]);
    }
}
