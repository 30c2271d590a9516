//! The tiny HTTP/1.1 client behind `Netns::http_get`: one `GET` with `Connection: close`,
//! bounded in time and size, enough to read a daemon's admin endpoint.
//!
//! Owns: writing the request and parsing the response (status line, headers, a body that is
//! close-delimited, `Content-Length`-delimited or chunked). Not a general HTTP client.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Connect, read and write timeout of one request.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(5);

/// The largest response read; an admin page is far smaller.
const MAX_RESPONSE: u64 = 16 << 20;

/// Sends `GET path` on `stream` and returns the status code and the decoded body.
pub(crate) fn get(mut stream: TcpStream, host: &str, path: &str) -> io::Result<(u16, String)> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: weft-testbed\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    // Read until the server closes, or until the response is complete by its own framing
    // (a server may keep the connection open despite `Connection: close`).
    let deadline = Instant::now() + TIMEOUT;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        raw.extend_from_slice(&buf[..n]);
        if n == 0 || framed_complete(&raw) {
            break;
        }
        if raw.len() as u64 > MAX_RESPONSE {
            return Err(invalid(format!(
                "response larger than {MAX_RESPONSE} bytes"
            )));
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("response incomplete after {TIMEOUT:?}"),
            ));
        }
    }
    parse(&raw)
}

/// Whether `raw` holds a whole response delimited by `Content-Length` or chunking.
fn framed_complete(raw: &[u8]) -> bool {
    let Some(head_end) = find(raw, b"\r\n\r\n") else {
        return false;
    };
    let body = &raw[head_end + 4..];
    let head = String::from_utf8_lossy(&raw[..head_end]);
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            return dechunk(body).is_ok();
        }
        if name.eq_ignore_ascii_case("content-length") {
            return value
                .trim()
                .parse::<usize>()
                .is_ok_and(|length| body.len() >= length);
        }
    }
    false
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Parses a complete response read until the server closed the connection.
fn parse(raw: &[u8]) -> io::Result<(u16, String)> {
    let head_end = find(raw, b"\r\n\r\n").ok_or_else(|| {
        invalid(format!(
            "response has no end of headers ({} bytes read)",
            raw.len()
        ))
    })?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let body = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| invalid(format!("bad content-length {value:?}")))?,
            );
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(length) = length {
        body.get(..length)
            .ok_or_else(|| {
                invalid(format!(
                    "body shorter ({}) than content-length {length}",
                    body.len()
                ))
            })?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Decodes a chunked body (trailers are ignored).
fn dechunk(mut rest: &[u8]) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or_else(|| invalid("truncated chunk size"))?;
        let size_line = String::from_utf8_lossy(&rest[..line_end]);
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| invalid(format!("bad chunk size {size_hex:?}")))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or_else(|| invalid("truncated chunk"))?;
        body.extend_from_slice(chunk);
        rest = rest
            .get(size + 2..)
            .ok_or_else(|| invalid("truncated chunk end"))?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_content_length_body() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse(raw).unwrap(), (200, "hello".to_owned()));
    }

    #[test]
    fn decodes_a_chunked_body() {
        let raw = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse(raw).unwrap(), (404, "abcde".to_owned()));
    }

    #[test]
    fn reads_a_close_delimited_body() {
        let raw = b"HTTP/1.0 503 Service Unavailable\r\n\r\nnot ready";
        assert_eq!(parse(raw).unwrap(), (503, "not ready".to_owned()));
    }

    #[test]
    fn knows_when_a_framed_response_is_complete() {
        assert!(framed_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        ));
        assert!(!framed_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok"
        ));
        assert!(framed_complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ));
        assert!(!framed_complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
        ));
        assert!(!framed_complete(b"HTTP/1.1 200 OK\r\n\r\nuntil close"));
    }

    #[test]
    fn rejects_a_response_without_headers_end() {
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse(b"garbage\r\n\r\n").is_err());
    }
}
