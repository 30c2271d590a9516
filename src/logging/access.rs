//! The access log's contract: which events it has and which fields each carries.
//!
//! Every access-log event is emitted here, with the fixed target [`TARGET`], so the field
//! names live in one file and match the table in README.md ("Access log"), which is a stable
//! contract: a field is added, never renamed or removed. The names follow Istio's ztunnel
//! where it logs the same fact (`src.addr`, `src.workload`, `src.namespace`, `src.identity`,
//! `dst.addr`, `dst.workload`, `dst.namespace`, `dst.identity`, `dst.service`, `direction`,
//! `bytes_sent`, `bytes_recv`, `error`). Every field of an event is always present; what is
//! not known is an empty string.
//!
//! This module owns no I/O: the events go to the process's subscriber (stderr, and the OTLP
//! exporter when configured, `logging::otlp`).

use std::net::SocketAddr;
use std::time::Duration;

/// The target of every access-log event (`RUST_LOG=access=off` silences them).
pub const TARGET: &str = "access";

/// The events of the access log, by their message.
pub mod message {
    /// A connection weft carried ended (either direction).
    pub const CONNECTION_CLOSED: &str = "connection closed";
    /// An inbound connection refused by policy (AuthorizationPolicy or PeerAuthentication).
    pub const CONNECTION_DENIED: &str = "connection denied";
    /// A live inbound connection closed because a new state no longer allows it.
    pub const LIVE_CONNECTION_CLOSED: &str = "live connection closed: no longer allowed";
    /// One request answered by the in-binary waypoint.
    pub const REQUEST: &str = "request";
}

/// The fields every access-log event carries.
pub const COMMON_FIELDS: [&str; 11] = [
    "direction",
    "protocol",
    "src.addr",
    "src.workload",
    "src.namespace",
    "src.identity",
    "dst.addr",
    "dst.workload",
    "dst.namespace",
    "dst.identity",
    "dst.service",
];

/// The fields of each event beyond [`COMMON_FIELDS`], by message.
pub const EVENT_FIELDS: [(&str, &[&str]); 4] = [
    (
        message::CONNECTION_CLOSED,
        &[
            "decision",
            "audit",
            "bytes_sent",
            "bytes_recv",
            "duration_ms",
            "error",
        ],
    ),
    (message::CONNECTION_DENIED, &["policy", "reason", "error"]),
    (
        message::LIVE_CONNECTION_CLOSED,
        &["policy", "bytes_sent", "bytes_recv", "duration_ms", "error"],
    ),
    (
        message::REQUEST,
        &[
            "method",
            "authority",
            "path",
            "status",
            "policy",
            "jwt_principal",
            "duration_ms",
        ],
    ),
];

/// One end of a connection, as the access log names it. Empty strings where not known.
#[derive(Clone, Copy, Debug)]
pub struct End<'a> {
    /// `IP:port`.
    pub addr: SocketAddr,
    /// The pod's name.
    pub workload: &'a str,
    /// The pod's namespace.
    pub namespace: &'a str,
    /// The SPIFFE id (`spiffe://td/ns/N/sa/S`), when authenticated or a mesh workload.
    pub identity: &'a str,
}

impl<'a> End<'a> {
    /// An end known only by its address.
    pub fn addr(addr: SocketAddr) -> End<'a> {
        End {
            addr,
            workload: "",
            namespace: "",
            identity: "",
        }
    }
}

/// What every access-log event says: who talked to whom, which way, how.
#[derive(Clone, Copy, Debug)]
pub struct Common<'a> {
    /// `inbound` (arriving at a local pod) or `outbound` (leaving one).
    pub direction: &'a str,
    /// `hbone`, `plain` or `local` for connections, `http` for requests.
    pub protocol: &'a str,
    /// The client.
    pub src: End<'a>,
    /// The destination the client asked for (the original destination).
    pub dst: End<'a>,
    /// The Service reached by its VIP (`name.namespace.svc.cluster.local`), or empty.
    pub dst_service: &'a str,
}

/// Bytes carried, from the client's view as Istio counts them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bytes {
    /// Bytes sent to the client (the response direction).
    pub sent: u64,
    /// Bytes received from the client (the request direction).
    pub recv: u64,
}

/// Milliseconds, with microseconds as the fraction.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

/// Emits one access-log event: the common fields, then the event's own. Strings are recorded
/// with `%` (Display), so the text format writes them unquoted (`policy=ns/name`), as before
/// this module.
macro_rules! access_event {
    ($c:expr, $msg:expr, $($field:tt)*) => {{
        let c: &Common<'_> = $c;
        tracing::info!(
            target: "access",
            direction = %c.direction,
            protocol = %c.protocol,
            src.addr = %c.src.addr,
            src.workload = %c.src.workload,
            src.namespace = %c.src.namespace,
            src.identity = %c.src.identity,
            dst.addr = %c.dst.addr,
            dst.workload = %c.dst.workload,
            dst.namespace = %c.dst.namespace,
            dst.identity = %c.dst.identity,
            dst.service = %c.dst_service,
            $($field)*
            "{}", $msg
        )
    }};
}

/// A connection ended: `decision` is what let it in (inbound), `audit` the AUDIT policies that
/// matched (comma-separated), `error` why it failed (empty on a clean close).
pub fn connection_closed(
    c: &Common<'_>,
    decision: &str,
    audit: &str,
    bytes: Bytes,
    duration: Duration,
    error: &str,
) {
    access_event!(
        c,
        message::CONNECTION_CLOSED,
        %decision,
        %audit,
        bytes_sent = bytes.sent,
        bytes_recv = bytes.recv,
        duration_ms = millis(duration),
        %error,
    );
}

/// An inbound connection refused by policy: `policy` decided it (`namespace/name`, or
/// `default` when no ALLOW matched), `reason` is `policy` or `mtls`, `error` says why.
pub fn connection_denied(c: &Common<'_>, policy: &str, reason: &str, error: &str) {
    access_event!(c, message::CONNECTION_DENIED, %policy, %reason, %error,);
}

/// A live connection closed because the state in force no longer allows it.
pub fn live_connection_closed(
    c: &Common<'_>,
    policy: &str,
    bytes: Bytes,
    duration: Duration,
    error: &str,
) {
    access_event!(
        c,
        message::LIVE_CONNECTION_CLOSED,
        %policy,
        bytes_sent = bytes.sent,
        bytes_recv = bytes.recv,
        duration_ms = millis(duration),
        %error,
    );
}

/// One request through the waypoint and its answer.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The method.
    pub method: &'a str,
    /// The authority policy matched.
    pub authority: &'a str,
    /// The normalized path policy matched.
    pub path: &'a str,
    /// The status answered.
    pub status: u16,
    /// The policy that allowed or denied it.
    pub policy: &'a str,
    /// The verified JWT's `iss/sub`, or empty.
    pub jwt_principal: &'a str,
}

/// A request the waypoint answered, `duration` after it arrived.
pub fn request(c: &Common<'_>, r: &Request<'_>, duration: Duration) {
    access_event!(
        c,
        message::REQUEST,
        method = %r.method,
        authority = %r.authority,
        path = %r.path,
        status = r.status,
        policy = %r.policy,
        jwt_principal = %r.jwt_principal,
        duration_ms = millis(duration),
    );
}

/// Every field `message`'s events carry, common ones first; `None` for no access event.
pub fn fields_of(message: &str) -> Option<Vec<&'static str>> {
    EVENT_FIELDS
        .iter()
        .find(|(m, _)| *m == message)
        .map(|(_, own)| COMMON_FIELDS.iter().chain(own.iter()).copied().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer into a shared buffer, for a test subscriber.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_text_format_writes_values_unquoted_as_before() {
        let buf = Buffer::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            connection_denied(
                &Common {
                    direction: "inbound",
                    protocol: "hbone",
                    src: End {
                        identity: "spiffe://cluster.local/ns/a/sa/b",
                        ..End::addr("10.0.0.1:4000".parse().unwrap())
                    },
                    dst: End::addr("10.0.0.2:80".parse().unwrap()),
                    dst_service: "",
                },
                "shop/deny-all",
                "policy",
                "denied by shop/deny-all",
            )
        });
        let line = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        for want in [
            " access: connection denied ",
            "direction=inbound",
            "src.addr=10.0.0.1:4000",
            "src.identity=spiffe://cluster.local/ns/a/sa/b",
            "policy=shop/deny-all",
            "reason=policy",
        ] {
            assert!(line.contains(want), "{want:?} not in {line}");
        }
    }

    /// The README's "Access log" table is the contract: it names exactly these fields.
    #[test]
    fn the_readme_documents_every_field_of_every_event() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("\n## Access log")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README.md has an \"Access log\" section");
        // Field rows: `| `name` | type | ...`.
        let documented: std::collections::BTreeSet<&str> = section
            .lines()
            .filter_map(|l| {
                let mut cells = l.split('|').map(str::trim).skip(1);
                let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
                matches!(cells.next()?, "string" | "integer" | "number").then_some(name)
            })
            .collect();
        let mut emitted: std::collections::BTreeSet<&str> = COMMON_FIELDS.into_iter().collect();
        for (m, own) in EVENT_FIELDS {
            emitted.extend(own.iter().copied());
            assert!(section.contains(&format!("`{m}`")), "message {m:?} missing");
        }
        assert_eq!(
            documented, emitted,
            "README's field rows (left) and the fields the code emits (right) differ"
        );
    }
}
