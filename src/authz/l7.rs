//! L7 decisions for the in-binary waypoint: [`Authz::check_http`] and [`Authz::explain_http`]
//! decide one HTTP request with the rules compiled for L7 (`compile`), evaluating their HTTP
//! tests on the request's attributes (`http`).
//!
//! Must not touch: compiling, the attributes' meaning, answering the client.

use serde::Serialize;

use super::compile::Peer;
use super::http::{HttpAttributes, HttpRequest};
use super::{Authz, Connection, Decision, DenyReason, Explanation, Verdict};

/// The request as `explain_http` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestExplanation {
    /// The method as received.
    pub method: String,
    /// The host as received.
    pub host: String,
    /// The path as received.
    pub path: String,
    /// The path policies were matched against; `None` when it could not be normalized.
    pub normalized_path: Option<String>,
    /// Why the request cannot be evaluated (the proxy answers 400).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

const BAD_REQUEST: Decision = Decision::Deny {
    by: None,
    reason: DenyReason::BadRequest,
};

impl Authz {
    /// Decides an HTTP request by the AuthorizationPolicies that apply to its destination,
    /// evaluating HTTP attributes for real. A request whose path cannot be normalized or whose
    /// method is not upper case is denied with [`DenyReason::BadRequest`]: answer 400.
    pub fn check_http(&self, conn: &Connection<'_>, req: &HttpRequest<'_>) -> Verdict {
        let Ok(attrs) = HttpAttributes::new(req) else {
            return Verdict {
                decision: BAD_REQUEST,
                audits: Vec::new(),
            };
        };
        let peer =
            Peer::new(conn.src_identity, conn.src_ip, conn.dst_ip, conn.dst_port).with_http(&attrs);
        self.verdict(conn.dst, &peer)
    }

    /// Explains the decision [`Authz::check_http`] makes for `req`.
    pub fn explain_http(&self, conn: &Connection<'_>, req: &HttpRequest<'_>) -> Explanation {
        let mut summary = RequestExplanation {
            method: req.method.to_string(),
            host: req.host.to_string(),
            path: req.path.to_string(),
            normalized_path: None,
            error: None,
        };
        match HttpAttributes::new(req) {
            Ok(attrs) => {
                summary.normalized_path = Some(attrs.path.clone());
                let peer = Peer::new(conn.src_identity, conn.src_ip, conn.dst_ip, conn.dst_port)
                    .with_http(&attrs);
                self.explain_peer(conn, &peer, Some(summary))
            }
            Err(e) => {
                summary.error = Some(e.to_string());
                self.explain_refused(conn, BAD_REQUEST, summary)
            }
        }
    }
}
