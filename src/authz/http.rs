//! The HTTP attributes of AuthorizationPolicy, for the in-binary waypoint: the request as
//! policy sees it ([`HttpRequest`], [`RequestAuth`]) and the HTTP tests of the compiled rules
//! ([`HttpCheck`]: how each HTTP field and `when` key is compiled and matched). The entry
//! points that decide one request, [`Authz::check_http`] and [`Authz::explain_http`], are in
//! `l7`.
//!
//! A leaf of `authz`: it knows nothing of the compiled rule's shape (`compile` wraps each
//! [`HttpTest`] into a rule test). Does not own path normalization (`path`), JWT validation
//! (whoever fills [`RequestAuth`] did it), or answering the client: a request that cannot be
//! evaluated safely is denied with [`DenyReason::BadRequest`] and the proxy answers 400.
//!
//! Everything L4 evaluates applies unchanged (principals, namespaces, ipBlocks, ports and the
//! L4 `when` keys), with the same ordering: a matching DENY (or CUSTOM, failing closed)
//! denies; otherwise, when ALLOW policies apply, one must match; otherwise allow. The HTTP
//! attributes follow Istio (the `authorization_policy.proto` comments, the "Authorization
//! Policy Normalization" and "Authorization Policy Conditions" references, and istiod's Envoy
//! RBAC generation):
//!
//! - `hosts`/`notHosts` match the `:authority`/`Host` value *as received*, case-insensitively
//!   and port included: `example.com` does not match `Host: example.com:8080` (istio/istio
//!   #44080, #39810: write `example.com:*` or list both).
//! - `methods`/`notMethods` match the method exactly; a method that is not upper case is
//!   refused (Istio answers 400).
//! - `paths`/`notPaths` match the normalized path without its query
//!   ([`normalize_path`](super::normalize_path)), by exact, prefix, suffix, presence, or path
//!   template (`{*}`, `{**}`, see [`PathTemplate`](crate::model::policy::PathTemplate)).
//! - `requestPrincipals` and `request.auth.principal` match `<iss>/<sub>` of the validated JWT;
//!   a request without one has no principal, so `*` does not match it and `notValues` do.
//! - `request.headers[name]`: the name is case-insensitive; several fields of one name are
//!   joined with `,` and matched as one string (`x: a` + `x: b` is `a,b`).
//! - `request.auth.audiences` (any audience may match), `request.auth.presenter` (`azp`),
//!   `request.auth.claims[a][b]` (nested objects; a string claim, or any string element of a
//!   list claim; other JSON types never match).
//! - `remoteIpBlocks` and `remote.ip`: weft's waypoint trusts no forwarding proxy (Istio's
//!   default `numTrustedProxies: 0`), so the remote address is the connection's source.
//! - `connection.sni` and `experimental.*` keys are not evaluated; they resolve fail closed as
//!   at L4 (an ALLOW rule using them never matches, a DENY rule is enforced without them).
//!
//! An attribute that is absent (no JWT, no such header or claim) matches no value, so a
//! `values` test fails and a `notValues` test passes, as Envoy's negated matchers do.

use std::net::IpAddr;

use ::http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use serde::Serialize;
use thiserror::Error;

use crate::model::policy::{ConditionKey, Operation, PathMatch, Source, StringMatch};

use super::path::{normalize_path, PathError};
use super::{list, BadValue};

/// What an HTTP-aware proxy knows about one request.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    /// The method, as received (`GET`).
    pub method: &'a str,
    /// The `:authority` / `Host` header value as received, port included when the client sent
    /// one.
    pub host: &'a str,
    /// The request target's path (and query), as received or already normalized (the
    /// waypoint passes the path it forwards; normalizing is idempotent).
    pub path: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// Set when RequestAuthentication validated a JWT on this request.
    pub auth: Option<&'a RequestAuth>,
}

/// A JWT that RequestAuthentication validated, as authorization sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestAuth {
    /// `<iss>/<sub>`.
    pub principal: String,
    /// The `aud` claim.
    pub audiences: Vec<String>,
    /// The `azp` claim.
    pub presenter: Option<String>,
    /// The whole payload.
    pub claims: serde_json::Value,
}

/// Why a request cannot be evaluated safely; the proxy should answer 400.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RequestError {
    /// The path cannot be normalized.
    #[error("request path {path:?} cannot be normalized: {source}")]
    Path {
        /// The path as received.
        path: String,
        /// Why.
        #[source]
        source: PathError,
    },
    /// Istio refuses methods that are not upper case.
    #[error("method {0:?} is not upper case")]
    Method(String),
}

impl HttpRequest<'_> {
    /// The normalized path policy matching sees, or why the request must be refused with 400.
    pub fn normalized_path(&self) -> Result<String, RequestError> {
        if self.method.is_empty() || self.method.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(RequestError::Method(self.method.to_string()));
        }
        normalize_path(self.path).map_err(|source| RequestError::Path {
            path: self.path.to_string(),
            source,
        })
    }
}

/// A request prepared for matching, once per request.
pub(crate) struct HttpAttributes<'a> {
    method: &'a str,
    /// Lowercase: hosts match case-insensitively.
    host: String,
    /// Normalized, without the query.
    pub(crate) path: String,
    headers: &'a HeaderMap,
    auth: Option<&'a RequestAuth>,
}

impl<'a> HttpAttributes<'a> {
    /// Prepares `req`; a path that cannot be normalized or a method that is not upper case
    /// is refused.
    pub fn new(req: &HttpRequest<'a>) -> Result<Self, RequestError> {
        Ok(HttpAttributes {
            path: req.normalized_path()?,
            method: req.method,
            host: req.host.to_ascii_lowercase(),
            headers: req.headers,
            auth: req.auth,
        })
    }

    /// All fields named `name`, joined with `,`; `None` when there is none.
    fn header(&self, name: &HeaderName) -> Option<String> {
        let mut values = self.headers.get_all(name).iter();
        let mut joined = String::from_utf8_lossy(values.next()?.as_bytes()).into_owned();
        for v in values {
            joined.push(',');
            joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
        }
        Some(joined)
    }

    /// The claim at `path` in the JWT payload.
    fn claim(&self, path: &[String]) -> Option<&'a serde_json::Value> {
        path.iter()
            .try_fold(&self.auth?.claims, |v, key| v.as_object()?.get(key))
    }
}

// === compiled tests ===

/// An HTTP attribute a compiled L7 test looks at, and the values it accepts.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum HttpCheck {
    /// `:authority`; the values are lowercased at compile time.
    Host(Vec<StringMatch>),
    /// The method.
    Method(Vec<StringMatch>),
    /// The normalized path.
    Path(Vec<PathMatch>),
    /// The JWT principal `<iss>/<sub>`.
    RequestPrincipal(Vec<StringMatch>),
    /// The remote address (the connection's source: no trusted proxies).
    RemoteIp(Vec<IpNet>),
    /// A header, its fields joined with `,`.
    Header(HeaderName, Vec<StringMatch>),
    /// Any of the JWT's audiences.
    Audiences(Vec<StringMatch>),
    /// The JWT's `azp`.
    Presenter(Vec<StringMatch>),
    /// A (nested) claim: a string, or any string element of a list.
    Claim(Vec<String>, Vec<StringMatch>),
}

/// One test's attribute and values, in words, for `explain`.
pub(crate) struct Described {
    pub value: String,
    pub values: String,
    /// What "absent" means for this attribute.
    pub absent: &'static str,
}

fn any(values: &[StringMatch], s: &str) -> bool {
    values.iter().any(|m| m.matches(s))
}

impl HttpCheck {
    /// Does the attribute match any value; `None` when the request does not have it.
    pub fn hit(&self, r: &HttpAttributes<'_>, src_ip: IpAddr) -> Option<bool> {
        match self {
            HttpCheck::Host(v) => Some(any(v, &r.host)),
            HttpCheck::Method(v) => Some(any(v, r.method)),
            HttpCheck::Path(v) => Some(v.iter().any(|m| m.matches(&r.path))),
            HttpCheck::RequestPrincipal(v) => r.auth.map(|a| any(v, &a.principal)),
            HttpCheck::RemoteIp(v) => Some(v.iter().any(|n| n.contains(&src_ip))),
            HttpCheck::Header(name, v) => r.header(name).map(|h| any(v, &h)),
            HttpCheck::Audiences(v) => r.auth.map(|a| a.audiences.iter().any(|x| any(v, x))),
            HttpCheck::Presenter(v) => r
                .auth
                .and_then(|a| a.presenter.as_deref())
                .map(|p| any(v, p)),
            HttpCheck::Claim(path, v) => match r.claim(path)? {
                serde_json::Value::String(s) => Some(any(v, s)),
                serde_json::Value::Array(items) => Some(
                    items
                        .iter()
                        .filter_map(serde_json::Value::as_str)
                        .any(|s| any(v, s)),
                ),
                _ => None,
            },
        }
    }

    /// The request's value and the accepted values, in words.
    pub fn describe(&self, r: Option<&HttpAttributes<'_>>, src_ip: IpAddr) -> Described {
        let d = |value: Option<String>, values: String, absent| Described {
            value: value.unwrap_or_default(),
            values,
            absent,
        };
        const NO_JWT: &str = "the request has no validated JWT";
        let auth = r.and_then(|r| r.auth);
        match self {
            HttpCheck::Host(v) => d(r.map(|r| r.host.clone()), list(v), "no request"),
            HttpCheck::Method(v) => d(r.map(|r| r.method.to_string()), list(v), "no request"),
            HttpCheck::Path(v) => d(r.map(|r| r.path.clone()), list(v), "no request"),
            HttpCheck::RequestPrincipal(v) => d(auth.map(|a| a.principal.clone()), list(v), NO_JWT),
            HttpCheck::RemoteIp(v) => d(Some(src_ip.to_string()), list(v), "no address"),
            HttpCheck::Header(name, v) => d(
                r.and_then(|r| r.header(name)),
                list(v),
                "the request has no such header",
            ),
            HttpCheck::Audiences(v) => d(
                auth.map(|a| format!("[{}]", a.audiences.join(", "))),
                list(v),
                NO_JWT,
            ),
            HttpCheck::Presenter(v) => d(
                auth.and_then(|a| a.presenter.clone()),
                list(v),
                if auth.is_some() {
                    "the JWT has no azp claim"
                } else {
                    NO_JWT
                },
            ),
            HttpCheck::Claim(path, v) => d(
                r.and_then(|r| r.claim(path)).map(|c| c.to_string()),
                list(v),
                if auth.is_some() {
                    "the JWT has no such claim of type string or list of strings"
                } else {
                    NO_JWT
                },
            ),
        }
    }
}

// === compilation (called by `compile` for L7 rules) ===

/// One HTTP field of a rule, compiled; `compile` makes it a test of the rule.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct HttpTest {
    /// What it looks at and the values it accepts.
    pub check: HttpCheck,
    /// `notValues`: none may match.
    pub negated: bool,
    /// Where it was written, e.g. `to[0].operation.paths`.
    pub field: String,
}

fn push<M: Clone>(
    tests: &mut Vec<HttpTest>,
    values: &[M],
    negated: bool,
    field: String,
    make: impl Fn(Vec<M>) -> HttpCheck,
) {
    if !values.is_empty() {
        tests.push(HttpTest {
            check: make(values.to_vec()),
            negated,
            field,
        });
    }
}

/// The HTTP fields of a `source`.
pub(crate) fn compile_source(s: &Source, at: &str, tests: &mut Vec<HttpTest>) {
    for (values, negated, name) in [
        (&s.request_principals, false, "requestPrincipals"),
        (&s.not_request_principals, true, "notRequestPrincipals"),
    ] {
        push(
            tests,
            values,
            negated,
            format!("{at}.{name}"),
            HttpCheck::RequestPrincipal,
        );
    }
    for (blocks, negated, name) in [
        (&s.remote_ip_blocks, false, "remoteIpBlocks"),
        (&s.not_remote_ip_blocks, true, "notRemoteIpBlocks"),
    ] {
        let nets: Vec<IpNet> = blocks.iter().map(|b| b.0).collect();
        push(
            tests,
            &nets,
            negated,
            format!("{at}.{name}"),
            HttpCheck::RemoteIp,
        );
    }
}

/// `abc` → a match on the lowercase value.
fn lowercase(m: &StringMatch) -> StringMatch {
    match m {
        StringMatch::Exact(s) => StringMatch::Exact(s.to_ascii_lowercase()),
        StringMatch::Prefix(s) => StringMatch::Prefix(s.to_ascii_lowercase()),
        StringMatch::Suffix(s) => StringMatch::Suffix(s.to_ascii_lowercase()),
        StringMatch::Any => StringMatch::Any,
    }
}

/// The HTTP fields of an `operation`.
pub(crate) fn compile_operation(o: &Operation, at: &str, tests: &mut Vec<HttpTest>) {
    for (values, negated, name) in [(&o.hosts, false, "hosts"), (&o.not_hosts, true, "notHosts")] {
        let lower: Vec<StringMatch> = values.iter().map(lowercase).collect();
        push(
            tests,
            &lower,
            negated,
            format!("{at}.{name}"),
            HttpCheck::Host,
        );
    }
    for (values, negated, name) in [
        (&o.methods, false, "methods"),
        (&o.not_methods, true, "notMethods"),
    ] {
        push(
            tests,
            values,
            negated,
            format!("{at}.{name}"),
            HttpCheck::Method,
        );
    }
    for (values, negated, name) in [(&o.paths, false, "paths"), (&o.not_paths, true, "notPaths")] {
        push(
            tests,
            values,
            negated,
            format!("{at}.{name}"),
            HttpCheck::Path,
        );
    }
}

/// Whether weft's waypoint evaluates a `when` key; why not otherwise.
pub(crate) fn supported_key(key: &ConditionKey) -> Result<(), &'static str> {
    match key {
        ConditionKey::ConnectionSni => {
            Err("is not evaluated by weft's waypoint (no TLS server name in the tunnel)")
        }
        ConditionKey::Experimental(_) => Err("is Envoy-specific and not evaluated by weft"),
        ConditionKey::RequestHeader(name) if HeaderName::from_bytes(name.as_bytes()).is_err() => {
            Err("does not name a valid HTTP header")
        }
        _ => Ok(()),
    }
}

/// A `when` condition's values for an HTTP key (`remote.ip` is parsed with the addresses).
pub(crate) fn parse_values(
    key: &ConditionKey,
    values: &[StringMatch],
) -> Result<HttpCheck, BadValue> {
    let values = values.to_vec();
    Ok(match key {
        ConditionKey::RequestHeader(name) => HttpCheck::Header(
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| BadValue(name.clone()))?,
            values,
        ),
        ConditionKey::RequestAuthPrincipal => HttpCheck::RequestPrincipal(values),
        ConditionKey::RequestAuthAudiences => HttpCheck::Audiences(values),
        ConditionKey::RequestAuthPresenter => HttpCheck::Presenter(values),
        ConditionKey::RequestAuthClaims(path) => HttpCheck::Claim(path.clone(), values),
        other => return Err(BadValue(other.to_string())),
    })
}
