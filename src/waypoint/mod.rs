//! The waypoint: weft's in-binary L7 proxy, for the policies a node tunnel cannot enforce
//! because they need to see HTTP requests (Istio's waypoint role, without an Envoy).
//!
//! Owns, one file per Istio concern:
//! - [`jwt`]: `RequestAuthentication` — finding JWTs in a request, verifying them against the
//!   issuers' key sets (inline or fetched and cached), and the request rewrites the policy asks
//!   for (token removal, payload and claim headers).
//!
//! Must not touch: the L4 data path (`proxy`), the snapshot store (`state`), or the decision
//! of what to answer a request: it computes results (for example
//! [`jwt::AuthnResult::Invalid`]) and the HTTP listener turns them into responses.

pub mod jwt;
