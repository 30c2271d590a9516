//! Request path normalization: the path AuthorizationPolicy `paths`/`notPaths` are matched
//! against, computed from the request target as received.
//!
//! Owns [`normalize_path`] and its error. Does not own what the proxy forwards, but the
//! waypoint relies on it: like Istio, it forwards exactly this normalized path (then the query
//! as received) to the app, and refuses (400) what this module refuses, so a policy and the
//! app never disagree about which resource was asked for (`waypoint::http::target`). The
//! result normalizes to itself, so deciding again on it changes nothing.
//!
//! weft implements Istio's default, meshConfig `pathNormalization: BASE`, which istiod
//! configures as Envoy's `normalize_path: true` with `merge_slashes: false` and the escaped-slash
//! action left at its default (keep `%2F`/`%5C` unchanged). Following Istio's "Authorization
//! Policy Normalization" reference and Envoy's `PathUtil::canonicalPath` tests, in this order:
//!
//! 1. The query and fragment are cut at the first `?` or `#` (Envoy's
//!    `removeQueryAndFragment`; the backend still sees the query).
//! 2. Each `%HH` is decoded once (no double decoding) when it encodes an RFC 3986 unreserved
//!    character: `A-Z a-z 0-9 - . _ ~`. Every other escape is kept exactly as received, hex
//!    case included (`%2F` and `%2f` stay as written: BASE does not decode slashes).
//! 3. `\` becomes `/`.
//! 4. A path that does not start with `/` gets one (`a/b` → `/a/b`, an empty path is `/`).
//! 5. Dot segments are removed as RFC 3986 §5.2.4 says, after step 2 (so `%2e%2e` is `..`);
//!    `..` above the root stays at the root, and a final `.` or `..` leaves a trailing `/`.
//! 6. Repeated slashes are kept (`//a` stays `//a`): merging them is `MERGE_SLASHES`, not BASE.
//!
//! Refused, so the proxy answers 400: `%00` (Istio rejects it with 400 under every option), an
//! escape that is not `%` and two hex digits (Envoy's canonicalizer keeps some of these as
//! text; weft does not guess), and raw bytes no request target may hold: controls, space, DEL
//! and anything outside ASCII. Other printable ASCII is kept as received (Envoy's
//! canonicalizer would percent-encode a few of them, such as `"`, `<`, `>`; HTTP parsers refuse
//! most of them first).

use thiserror::Error;

/// Why a request path cannot be normalized safely; the request should be answered with 400.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PathError {
    /// `%00`: Istio always refuses it.
    #[error("%00 (an encoded NUL) at byte {at}")]
    EncodedNul {
        /// Offset of the `%` in the request target.
        at: usize,
    },
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-escape at byte {at}")]
    InvalidEscape {
        /// Offset of the `%` in the request target.
        at: usize,
    },
    /// A byte no request target may hold raw.
    #[error("byte 0x{byte:02x} at {at} is not allowed in a request path")]
    ForbiddenByte {
        /// Offset in the request target.
        at: usize,
        /// The byte.
        byte: u8,
    },
}

/// The path that `paths`/`notPaths` are matched against: `raw` (the request target's path and
/// query, as received) normalized the way Istio's default `BASE` option does, without the
/// query. See the module documentation for exactly which normalizations apply.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    let bytes = &raw.as_bytes()[..end];
    let mut decoded = Vec::with_capacity(bytes.len() + 1);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hex = |j: usize| bytes.get(j).and_then(|&h| (h as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                    return Err(PathError::InvalidEscape { at: i });
                };
                // Invariant: two hex digits make a value below 256.
                let value = (hi * 16 + lo) as u8;
                if value == 0 {
                    return Err(PathError::EncodedNul { at: i });
                }
                if is_unreserved(value) {
                    decoded.push(value);
                } else {
                    decoded.extend_from_slice(&bytes[i..i + 3]);
                }
                i += 3;
                continue;
            }
            b'\\' => decoded.push(b'/'),
            0x00..=0x20 | 0x7f..=0xff => return Err(PathError::ForbiddenByte { at: i, byte: b }),
            _ => decoded.push(b),
        }
        i += 1;
    }
    if decoded.first() != Some(&b'/') {
        decoded.insert(0, b'/');
    }
    // Every byte pushed is printable ASCII (raw ASCII or a decoded unreserved character).
    let decoded = String::from_utf8_lossy(&decoded);
    Ok(remove_dot_segments(&decoded))
}

/// RFC 3986 unreserved: ALPHA / DIGIT / "-" / "." / "_" / "~".
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §5.2.4 on a path that starts with `/`; empty segments are kept.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.into_iter().enumerate() {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
        // A final `.` or `..` names a directory: the path keeps its trailing slash.
        if i == last && matches!(seg, "." | "..") {
            out.push("");
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Normalizing is idempotent: what `paths` are matched against is already in normal
        /// form, so a proxy that forwards the normalized path and a backend (or a second
        /// proxy) that normalizes again agree on the resource. Paths are drawn from the
        /// pieces normalization acts on: dot segments, escapes of `.`, `/`, `\` and `%`,
        /// backslashes, repeated slashes, a query.
        #[test]
        fn normalizing_a_normalized_path_changes_nothing(
            raw in "(/|//|\\\\|\\.|\\.\\.|%2[eEfF]|%5[cC]|%25|%41|%7[eE]|%3[fF]|a|b~|;|\\?x|#f|%|%0)*"
        ) {
            if let Ok(once) = normalize_path(&raw) {
                prop_assert!(once.starts_with('/'), "{raw:?} -> {once:?}");
                prop_assert_eq!(normalize_path(&once), Ok(once.clone()), "{:?}", raw);
            }
        }
    }

    #[test]
    fn paths_normalize_as_istio_base_does() {
        for (raw, want) in [
            ("/", "/"),
            ("", "/"),
            ("/xyz", "/xyz"),
            ("/a/b/../c", "/a/c"),
            ("/a/b/./c", "/a/b/c"),
            ("a/b/../c", "/a/c"),
            ("/a/b/../../../../c", "/c"),
            ("..", "/"),
            ("/..", "/"),
            ("/../a/b", "/a/b"),
            ("/./a/b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/..\\c", "/c"),
            ("/some\\data", "/some/data"),
            ("/a/b/%2E%2E/c", "/a/c"),
            ("/a/b/%2e%2e/c", "/a/c"),
            ("/a/b/%2E./c", "/a/c"),
            ("/a/b/%2E/c", "/a/b/c"),
            ("/%41%62%7e%2d%5f%30", "/Ab~-_0"),
            ("/a/%2F%2f/c", "/a/%2F%2f/c"),
            ("/%5c%25", "/%5c%25"),
            ("/%c0%af", "/%c0%af"),
            ("/%252e%252e/x", "/%252e%252e/x"),
            ("/A/B/C", "/A/B/C"),
            ("//a//b", "//a//b"),
            ("/a//../b", "/a/b"),
            ("/abc?param=value", "/abc"),
            ("/abc?a=/../x", "/abc"),
            ("/abc#frag?x", "/abc"),
            ("/a/../b?x=%00", "/b"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw:?}");
        }
    }

    #[test]
    fn unsafe_paths_are_refused() {
        assert_eq!(
            normalize_path("/xyz/.%00../abc"),
            Err(PathError::EncodedNul { at: 6 })
        );
        for raw in ["/a%", "/a%2", "/a%zz", "/AAAAA%%0000/abc", "/a%g1"] {
            assert!(
                matches!(normalize_path(raw), Err(PathError::InvalidEscape { .. })),
                "{raw:?}"
            );
        }
        for raw in ["/a b", "/a\tb", "/a\u{7f}", "/caf\u{e9}", "/a\0b"] {
            assert!(
                matches!(normalize_path(raw), Err(PathError::ForbiddenByte { .. })),
                "{raw:?}"
            );
        }
    }
}
