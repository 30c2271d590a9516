//! HBONE's wire format: the HTTP/2 `CONNECT` request that opens a tunnel stream, as Istio's
//! ztunnel sends and accepts it (ARCHITECTURE.md, "HBONE on the wire").
//!
//! Owns: the header names, building the request on the client side ([`Connect::request`],
//! used by the pool) and parsing it on the server side ([`Connect::parse`], used by the
//! inbound listener). Must not touch: connections, TLS, policy. Whether a parsed request is
//! believed (the `forwarded` address only when it belongs to the peer's identity) is the
//! inbound side's decision, not this module's.
//!
//! ```text
//! :method    CONNECT
//! :authority <original destination IP>:<port>
//! forwarded  for="<original client IP>:<port>"      (RFC 7239, quoted as ztunnel sends it)
//! baggage    ...                                    (optional, W3C baggage, accepted)
//! traceparent 00-...                                (optional, W3C trace context, accepted)
//! ```

use std::net::SocketAddr;

use http::header::{HeaderName, HeaderValue, FORWARDED};
use http::{Method, Request};

/// `forwarded: for="<client IP:port>"`: the original client of the tunnelled connection.
pub const FORWARDED_HEADER: HeaderName = FORWARDED;
/// W3C `baggage`, which ztunnel sends with workload metadata; accepted and carried.
pub const BAGGAGE_HEADER: HeaderName = HeaderName::from_static("baggage");
/// W3C `traceparent`, which ztunnel may send; accepted and carried.
pub const TRACEPARENT_HEADER: HeaderName = HeaderName::from_static("traceparent");

/// Why a request is not an HBONE CONNECT.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectError {
    /// Another method than `CONNECT` (answered 405).
    #[error("method {0} is not CONNECT")]
    Method(Method),
    /// The authority is not an `IP:port` with a port 1–65535 (answered 400).
    #[error("authority {0:?} is not an IP:port (port 1-65535)")]
    Authority(String),
}

/// One HBONE CONNECT request: where the tunnel goes and who it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    /// The original destination, the request's `:authority`.
    pub authority: SocketAddr,
    /// The original client from `forwarded: for=`, when present and an `IP:port`.
    pub forwarded_for: Option<SocketAddr>,
    /// The `baggage` header as received (or to send).
    pub baggage: Option<HeaderValue>,
    /// The `traceparent` header as received (or to send).
    pub traceparent: Option<HeaderValue>,
}

impl Connect {
    /// A CONNECT to `authority` on behalf of the client at `forwarded_for`.
    pub fn new(authority: SocketAddr, forwarded_for: SocketAddr) -> Connect {
        Connect {
            authority,
            forwarded_for: Some(forwarded_for),
            baggage: None,
            traceparent: None,
        }
    }

    /// The request to send on an HTTP/2 connection.
    pub fn request(&self) -> Result<Request<()>, http::Error> {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(self.authority.to_string());
        if let Some(client) = self.forwarded_for {
            req = req.header(FORWARDED_HEADER, format!("for=\"{client}\""));
        }
        if let Some(v) = &self.baggage {
            req = req.header(BAGGAGE_HEADER, v);
        }
        if let Some(v) = &self.traceparent {
            req = req.header(TRACEPARENT_HEADER, v);
        }
        req.body(())
    }

    /// Reads a received request. Headers other than these are ignored, as ztunnel does; a
    /// `forwarded` value that is not an `IP:port` leaves `forwarded_for` empty.
    pub fn parse<B>(req: &Request<B>) -> Result<Connect, ConnectError> {
        if req.method() != Method::CONNECT {
            return Err(ConnectError::Method(req.method().clone()));
        }
        let authority = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
            .filter(|a| a.port() != 0)
            .ok_or_else(|| ConnectError::Authority(req.uri().to_string()))?;
        let headers = req.headers();
        Ok(Connect {
            authority,
            forwarded_for: headers
                .get(FORWARDED_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_forwarded_for),
            baggage: headers.get(BAGGAGE_HEADER).cloned(),
            traceparent: headers.get(TRACEPARENT_HEADER).cloned(),
        })
    }
}

/// The first `for=` of a `Forwarded` value, when it is an `IP:port` (quoted or not, IPv6 in
/// brackets); anything else (obfuscated identifiers, `unknown`, a bare IP) is `None`.
fn parse_forwarded_for(v: &str) -> Option<SocketAddr> {
    v.split([';', ','])
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
        .and_then(|(_, v)| v.trim().trim_matches('"').parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<Ipv4Addr>().prop_map(IpAddr::V4),
            any::<Ipv6Addr>().prop_map(IpAddr::V6),
        ]
    }

    proptest! {
        /// Whatever the pool builds, inbound reads back: the same destination and client,
        /// IPv4 or IPv6 (any address, mapped and unspecified ones included) on either side.
        #[test]
        fn a_built_connect_parses_back_to_the_same_authority_and_client(
            dst in ip(), dst_port in 1u16.., client in ip(), client_port in any::<u16>()
        ) {
            let sent = Connect::new(
                SocketAddr::new(dst, dst_port),
                SocketAddr::new(client, client_port),
            );
            let req = sent.request().unwrap();
            let got = Connect::parse(&req).unwrap();
            prop_assert_eq!(got.authority, SocketAddr::new(dst, dst_port));
            prop_assert_eq!(got.forwarded_for, Some(SocketAddr::new(client, client_port)));
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_takes_the_first_ip_and_port_and_nothing_else() {
        let p = |v: &str| parse_forwarded_for(v).map(|a| a.to_string());
        assert_eq!(
            p(r#"for="10.0.0.1:4321""#).as_deref(),
            Some("10.0.0.1:4321")
        );
        assert_eq!(p("for=10.0.0.1:4321").as_deref(), Some("10.0.0.1:4321"));
        assert_eq!(
            p(r#"proto=https;FOR="[fd00::1]:80";by=x"#).as_deref(),
            Some("[fd00::1]:80")
        );
        assert_eq!(
            p(r#"for="10.0.0.1:1", for="10.0.0.2:2""#).as_deref(),
            Some("10.0.0.1:1")
        );
        for bad in [
            "",
            "for=unknown",
            r#"for="_hidden""#,
            "for=10.0.0.1",
            "by=10.0.0.1:1",
            "for=10.0.0.1:99999",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_built_request_is_what_ztunnel_sends_and_parses_back_to_itself() {
        let mut c = Connect::new(addr("10.244.2.10:8080"), addr("10.244.1.10:40000"));
        let req = c.request().unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "10.244.2.10:8080");
        assert_eq!(req.headers()["forwarded"], r#"for="10.244.1.10:40000""#);
        assert!(req.headers().get("baggage").is_none());
        assert_eq!(Connect::parse(&req), Ok(c.clone()));

        c.baggage = Some(HeaderValue::from_static("k8s.namespace.name=shop"));
        c.traceparent = Some(HeaderValue::from_static(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        let req = c.request().unwrap();
        assert_eq!(req.headers()["baggage"], "k8s.namespace.name=shop");
        assert_eq!(Connect::parse(&req), Ok(c));
    }

    #[test]
    fn a_ztunnel_request_with_baggage_and_traceparent_is_accepted() {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("[fd00::2]:80")
            .header("forwarded", r#"for="[fd00::1]:5000""#)
            .header(
                "baggage",
                "k8s.cluster.name=Kubernetes,k8s.namespace.name=default",
            )
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .header("x-unknown", "ignored")
            .body(())
            .unwrap();
        let c = Connect::parse(&req).unwrap();
        assert_eq!(c.authority, addr("[fd00::2]:80"));
        assert_eq!(c.forwarded_for, Some(addr("[fd00::1]:5000")));
        assert!(c.baggage.is_some() && c.traceparent.is_some());
    }

    #[test]
    fn a_request_that_is_no_connect_to_an_ip_and_port_is_refused_with_its_reason() {
        let req = |m: Method, uri: &str| Request::builder().method(m).uri(uri).body(()).unwrap();
        assert_eq!(
            Connect::parse(&req(Method::GET, "http://10.0.0.1:80/")),
            Err(ConnectError::Method(Method::GET))
        );
        for bad in ["10.0.0.1:0", "example.com:80", "10.0.0.1"] {
            assert!(
                matches!(
                    Connect::parse(&req(Method::CONNECT, bad)),
                    Err(ConnectError::Authority(_))
                ),
                "{bad}"
            );
        }
        // No or a malformed `forwarded`: parsed, the client unknown.
        let no_fwd = Connect::parse(&req(Method::CONNECT, "10.0.0.1:80")).unwrap();
        assert_eq!(no_fwd.forwarded_for, None);
    }
}
