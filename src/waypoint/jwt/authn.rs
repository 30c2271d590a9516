//! The authenticator of one workload: its `jwtRules`, where their tokens are found, which
//! rule a token answers to, and what the forwarded request looks like afterwards.
//!
//! Owns [`JwtAuthenticator`] (built per workload, called per request), [`AuthnResult`],
//! [`Claims`], the token locations (headers with a prefix, query parameters, cookies; the
//! default `Authorization: Bearer` and `access_token`), the checks of a token against a rule
//! (issuer, `exp`/`nbf` with [`CLOCK_SKEW`], audiences), and the rewrites: token removal,
//! `outputPayloadToHeader`, `outputClaimToHeaders`.
//!
//! Must not touch: how a token is decoded (`token`), how a signature is checked (`keys`),
//! where keys come from or when they are fetched (`jwks`; this file only asks for them), and
//! the HTTP answer (the caller turns [`AuthnResult::Invalid`] into a `401`).

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, COOKIE};
use http::request::Parts;
use serde_json::Value;

use super::jwks::{JwksCache, KeySource};
use super::keys::SignatureError;
use super::token::{audiences_of, Token, TokenError};
use super::JwtError;
use crate::model::policy::{JwtRule, RequestAuthentication};

/// Clock skew allowed on `exp` and `nbf`: Envoy's default, which Istio does not change.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Claims Istio asks Envoy to split on spaces before they are matched.
const SPACE_DELIMITED_CLAIMS: [&str; 2] = ["scope", "permission"];
/// The default location's header prefix and query parameter (RFC 6750).
const BEARER_PREFIX: &str = "Bearer ";
const ACCESS_TOKEN_PARAM: &str = "access_token";

// === impl AuthnResult ===

/// The outcome of [`JwtAuthenticator::authenticate`].
#[derive(Clone, Debug)]
pub enum AuthnResult {
    /// No token at any configured location: the request passes RequestAuthentication, with
    /// no request principal.
    NoToken,
    /// A token verified; the request carries these claims.
    Valid(Claims),
    /// A token was found and is not acceptable: the caller answers `401`. The reason is for
    /// logs, not for the client.
    Invalid(String),
}

impl AuthnResult {
    /// The verified claims, if any.
    pub fn claims(&self) -> Option<&Claims> {
        match self {
            AuthnResult::Valid(c) => Some(c),
            _ => None,
        }
    }
}

/// What a verified token says, in the terms AuthorizationPolicy conditions use.
#[derive(Clone, Debug)]
pub struct Claims {
    /// `iss`.
    pub issuer: String,
    /// `sub`, when the token has one.
    pub subject: Option<String>,
    /// `request.auth.principal`: `<iss>/<sub>`; absent without `sub`.
    pub principal: Option<String>,
    /// `request.auth.audiences`: `aud` as a list.
    pub audiences: Vec<String>,
    /// `request.auth.presenter`: `azp`.
    pub presenter: Option<String>,
    /// The whole payload, for `request.auth.claims[..]`.
    pub payload: Value,
    /// Every token that verified, for [`JwtAuthenticator::rewrite`].
    verified: Vec<VerifiedToken>,
}

impl Claims {
    /// What AuthorizationPolicy's `requestPrincipals` and `request.auth.*` see of these claims.
    pub fn request_auth(&self) -> crate::authz::RequestAuth {
        crate::authz::RequestAuth {
            principal: self.principal.clone().unwrap_or_default(),
            audiences: self.audiences.clone(),
            presenter: self.presenter.clone(),
            claims: self.payload.clone(),
        }
    }

    /// `request.auth.claims[path[0]][path[1]]..` as Istio matches it: the string values at
    /// that path, a list of strings flattened, other types ignored; `scope` and `permission`
    /// split on spaces. Empty when the path leads nowhere.
    pub fn claim(&self, path: &[String]) -> Vec<String> {
        let Some((first, rest)) = path.split_first() else {
            return Vec::new();
        };
        let Some(mut value) = self.payload.get(first) else {
            return Vec::new();
        };
        for segment in rest {
            match value.get(segment) {
                Some(v) if value.is_object() => value = v,
                _ => return Vec::new(),
            }
        }
        match value {
            Value::String(s) if rest.is_empty() && SPACE_DELIMITED_CLAIMS.contains(&&**first) => s
                .split(' ')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
            Value::String(s) => vec![s.clone()],
            Value::Array(items) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// A token that verified under a rule: what `rewrite` needs.
#[derive(Clone, Debug)]
struct VerifiedToken {
    rule: usize,
    location: usize,
    payload_b64: String,
    payload: Value,
}

/// Why a request's token is not accepted: the text of [`AuthnResult::Invalid`].
#[derive(Debug, thiserror::Error)]
enum Rejection {
    /// The token cannot be decoded.
    #[error(transparent)]
    Malformed(TokenError),
    /// Its `iss` is no rule's that reads the location it was found at.
    #[error("issuer {issuer:?} is not accepted at this location")]
    Issuer { issuer: String },
    #[error("token of {issuer:?} is not valid yet")]
    NotYetValid { issuer: String },
    #[error("token of {issuer:?} has expired")]
    Expired { issuer: String },
    #[error("token of {issuer:?}: audiences {audiences:?} are not accepted")]
    Audiences {
        issuer: String,
        audiences: Vec<String>,
    },
    /// The issuer's key set was never fetched.
    #[error("no keys for issuer {issuer:?} (JWKS not fetched)")]
    NoKeys { issuer: String },
    #[error("token of {issuer:?}: {source}")]
    Signature {
        issuer: String,
        #[source]
        source: SignatureError,
    },
    /// No rule passed and none said why (cannot happen: a token is read by some rule).
    #[error("token not accepted")]
    NotAccepted,
}

// === impl JwtAuthenticator ===

/// Where a token may be found.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Location {
    /// A header, and the prefix before the token (empty: the whole value).
    Header { name: HeaderName, prefix: String },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

impl Location {
    /// Envoy's reading order: headers (by name and prefix), then parameters, then cookies.
    fn order(&self) -> (u8, String) {
        match self {
            Location::Header { name, prefix } => (0, format!("{}{prefix}", name.as_str())),
            Location::Param(p) => (1, p.clone()),
            Location::Cookie(c) => (2, c.clone()),
        }
    }
}

/// One rule, compiled.
struct Rule {
    issuer: String,
    audiences: Vec<String>,
    keys: Arc<KeySource>,
    forward: bool,
    payload_header: Option<HeaderName>,
    claim_headers: Vec<(HeaderName, String)>,
}

/// The RequestAuthentication of one workload: every `jwtRule` of the policies applying to it.
///
/// Built when the policies or the workload change; [`authenticate`](Self::authenticate) is
/// called per request and only reads (key sets may be fetched, behind their own locks).
pub struct JwtAuthenticator {
    rules: Vec<Rule>,
    /// Every distinct location, in Envoy's reading order (headers, params, cookies; each
    /// sorted), with the rules that read it.
    locations: Vec<(Location, Vec<usize>)>,
    /// Headers removed from every request before outputs are written.
    sanitize: Vec<HeaderName>,
    jwks: Arc<JwksCache>,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field(
                "issuers",
                &self.rules.iter().map(|r| &r.issuer).collect::<Vec<_>>(),
            )
            .field("locations", &self.locations)
            .finish()
    }
}

impl JwtAuthenticator {
    /// Compiles the rules of the RequestAuthentications applying to one workload. Key sets
    /// are taken from (or registered in) `jwks`; inline ones are parsed here.
    pub fn new(rules: Vec<JwtRule>, jwks: Arc<JwksCache>) -> Result<Self, JwtError> {
        let mut compiled = Vec::with_capacity(rules.len());
        let mut by_location: BTreeMap<(u8, String), (Location, Vec<usize>)> = BTreeMap::new();
        let mut sanitize = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            if rule.issuer.is_empty() {
                return Err(JwtError::EmptyIssuer);
            }
            let header = |field: &'static str, name: &str| {
                HeaderName::from_str(name).map_err(|_| JwtError::HeaderName {
                    issuer: rule.issuer.clone(),
                    field,
                    name: name.to_string(),
                })
            };
            let mut locations = Vec::new();
            for h in &rule.from_headers {
                locations.push(Location::Header {
                    name: header("fromHeaders", &h.name)?,
                    prefix: h.prefix.clone().unwrap_or_default(),
                });
            }
            locations.extend(rule.from_params.iter().cloned().map(Location::Param));
            locations.extend(rule.from_cookies.iter().cloned().map(Location::Cookie));
            if locations.is_empty() {
                locations.push(Location::Header {
                    name: AUTHORIZATION,
                    prefix: BEARER_PREFIX.to_string(),
                });
                locations.push(Location::Param(ACCESS_TOKEN_PARAM.to_string()));
            }
            for loc in locations {
                let (_, readers) = by_location
                    .entry(loc.order())
                    .or_insert_with(|| (loc, Vec::new()));
                if !readers.contains(&i) {
                    readers.push(i);
                }
            }
            let payload_header = rule
                .output_payload_to_header
                .as_deref()
                .filter(|h| !h.is_empty())
                .map(|h| header("outputPayloadToHeader", h))
                .transpose()?;
            let mut claim_headers = Vec::new();
            for c in &rule.output_claim_to_headers {
                claim_headers.push((header("outputClaimToHeaders", &c.header)?, c.claim.clone()));
            }
            sanitize.extend(payload_header.iter().cloned());
            sanitize.extend(claim_headers.iter().map(|(h, _)| h.clone()));
            compiled.push(Rule {
                issuer: rule.issuer.clone(),
                audiences: rule.audiences.clone(),
                keys: jwks.source_for(rule)?,
                forward: rule.forward_original_token,
                payload_header,
                claim_headers,
            });
        }
        sanitize.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        sanitize.dedup();
        Ok(JwtAuthenticator {
            rules: compiled,
            locations: by_location.into_values().collect(),
            sanitize,
            jwks,
        })
    }

    /// Compiles the rules of `policies` (all applying to one workload); an error names the
    /// policy it comes from.
    pub fn for_policies(
        policies: &[&RequestAuthentication],
        jwks: Arc<JwksCache>,
    ) -> Result<Self, JwtError> {
        for p in policies {
            // Validate per policy first, so an error can name it.
            JwtAuthenticator::new(p.spec.jwt_rules.clone(), jwks.clone())
                .map_err(|e| e.in_policy(p))?;
        }
        let rules = policies
            .iter()
            .flat_map(|p| p.spec.jwt_rules.iter().cloned())
            .collect();
        JwtAuthenticator::new(rules, jwks)
    }

    /// True when no rule applies (every request is [`AuthnResult::NoToken`]).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Finds and verifies the request's tokens.
    ///
    /// Async because a key set may have to be fetched: the first time an issuer's keys are
    /// needed, or when a token names a `kid` the cached set lacks (both rate-limited, and
    /// bounded by the rule's fetch timeout).
    pub async fn authenticate(&self, req: &Parts) -> AuthnResult {
        let found = self.extract(req);
        if found.is_empty() {
            return AuthnResult::NoToken;
        }
        let mut parsed: HashMap<&str, Result<Token<'_>, TokenError>> = HashMap::new();
        for (_, token) in &found {
            parsed
                .entry(token.as_str())
                .or_insert_with(|| Token::parse(token));
        }
        let now = unix_now();
        let mut first_error: Option<Rejection> = None;
        let mut passing: Option<usize> = None;
        let mut verified = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            // Envoy's provider `Pi`: every token at the rule's locations must verify.
            // Collected before any await: a lazy iterator held across `.await` would make this
            // future's Send-ness depend on a higher-ranked closure the compiler cannot prove.
            let at_rule: Vec<(usize, &str)> = found
                .iter()
                .filter(|(loc, _)| self.locations[*loc].1.contains(&i))
                .map(|(loc, raw)| (*loc, raw.as_str()))
                .collect();
            if at_rule.is_empty() {
                continue;
            }
            let mut all_ok = true;
            for (loc, raw) in at_rule {
                let outcome = match &parsed[raw] {
                    Ok(token) => self.verify(rule, token, now).await,
                    Err(e) => Err(Rejection::Malformed(e.clone())),
                };
                match outcome {
                    Ok(()) => {
                        if let Ok(token) = &parsed[raw] {
                            verified.push(VerifiedToken {
                                rule: i,
                                location: loc,
                                payload_b64: token.payload_b64.to_string(),
                                payload: token.payload.clone(),
                            });
                        }
                    }
                    Err(reason) => {
                        all_ok = false;
                        first_error.get_or_insert(reason);
                        break;
                    }
                }
            }
            if all_ok && passing.is_none() {
                passing = Some(i);
            }
        }
        let Some(rule) = passing else {
            return AuthnResult::Invalid(first_error.unwrap_or(Rejection::NotAccepted).to_string());
        };
        // Invariant: a passing rule verified at least one token, recorded above.
        let Some(primary) = verified.iter().find(|v| v.rule == rule) else {
            return AuthnResult::Invalid(Rejection::NotAccepted.to_string());
        };
        let payload = primary.payload.clone();
        let str_claim = |k: &str| payload.get(k).and_then(Value::as_str).map(str::to_owned);
        let issuer = str_claim("iss").unwrap_or_default();
        let subject = str_claim("sub");
        AuthnResult::Valid(Claims {
            principal: subject.as_ref().map(|s| format!("{issuer}/{s}")),
            audiences: audiences_of(&payload),
            presenter: str_claim("azp"),
            issuer,
            subject,
            payload,
            verified,
        })
    }

    /// Rewrites the request for forwarding, as Envoy's `jwt_authn` does: the output headers
    /// of every rule are removed (clients cannot forge them); for each verified token its
    /// rule's payload and claim headers are written, and the header that carried it is
    /// removed unless `forwardOriginalToken`.
    pub fn rewrite(&self, parts: &mut Parts, result: &AuthnResult) {
        for h in &self.sanitize {
            parts.headers.remove(h);
        }
        let AuthnResult::Valid(claims) = result else {
            return;
        };
        for v in &claims.verified {
            let Some(rule) = self.rules.get(v.rule) else {
                continue;
            };
            if let Some(h) = &rule.payload_header {
                if let Ok(value) = HeaderValue::from_str(&v.payload_b64) {
                    parts.headers.append(h.clone(), value);
                }
            }
            for (h, claim) in &rule.claim_headers {
                if let Some(value) = claim_header_value(&v.payload, claim) {
                    parts.headers.insert(h.clone(), value);
                }
            }
            if !rule.forward {
                if let Some((Location::Header { name, .. }, _)) = self.locations.get(v.location) {
                    parts.headers.remove(name);
                }
            }
        }
    }

    /// Every token at every location: `(location index, token)`, in reading order.
    fn extract(&self, req: &Parts) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        let mut query: Option<Vec<(String, String)>> = None;
        let mut cookies: Option<Vec<(String, String)>> = None;
        for (i, (loc, _)) in self.locations.iter().enumerate() {
            let token = match loc {
                Location::Header { name, prefix } => header_token(req, name, prefix),
                Location::Param(p) => {
                    let q = query.get_or_insert_with(|| {
                        req.uri
                            .query()
                            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
                            .unwrap_or_default()
                    });
                    q.iter().find(|(k, _)| k == p).map(|(_, v)| v.clone())
                }
                Location::Cookie(c) => {
                    let jar = cookies.get_or_insert_with(|| parse_cookies(req));
                    jar.iter().find(|(k, _)| k == c).map(|(_, v)| v.clone())
                }
            };
            if let Some(t) = token {
                out.push((i, t));
            }
        }
        out
    }

    /// Verifies one parsed token under one rule: issuer, time, audience, signature.
    async fn verify(&self, rule: &Rule, token: &Token<'_>, now: u64) -> Result<(), Rejection> {
        if token.issuer != rule.issuer {
            return Err(Rejection::Issuer {
                issuer: token.issuer.clone(),
            });
        }
        let of_rule = || rule.issuer.clone();
        let skew = CLOCK_SKEW.as_secs();
        if let Some(nbf) = token.nbf {
            if now.saturating_add(skew) < nbf {
                return Err(Rejection::NotYetValid { issuer: of_rule() });
            }
        }
        if let Some(exp) = token.exp {
            if now > exp.saturating_add(skew) {
                return Err(Rejection::Expired { issuer: of_rule() });
            }
        }
        if !audience_allowed(&rule.audiences, &token.audiences) {
            return Err(Rejection::Audiences {
                issuer: of_rule(),
                audiences: token.audiences.clone(),
            });
        }
        let signature = |source| Rejection::Signature {
            issuer: of_rule(),
            source,
        };
        let keys = self.jwks.keys(&rule.keys, None).await;
        let Some(keys) = keys else {
            return Err(Rejection::NoKeys { issuer: of_rule() });
        };
        match keys.verify(token) {
            Ok(()) => Ok(()),
            Err(reason) => {
                // A kid the set lacks may be a rotated key: fetch again (rate-limited).
                let unknown_kid = token.kid.as_deref().is_some_and(|kid| !keys.has_kid(kid));
                if !unknown_kid {
                    return Err(signature(reason));
                }
                match self.jwks.keys(&rule.keys, Some(&keys)).await {
                    Some(fresh) if !Arc::ptr_eq(&fresh, &keys) => {
                        fresh.verify(token).map_err(signature)
                    }
                    _ => Err(signature(reason)),
                }
            }
        }
    }
}

/// The token at a header location, by Envoy's rules (`extractor.cc`): all values joined with
/// `,`; with a prefix, the prefix must occur, and the token is the base64url-and-dots run
/// after it (the whole value if there is none).
fn header_token(req: &Parts, name: &HeaderName, prefix: &str) -> Option<String> {
    let mut values = req.headers.get_all(name).iter().peekable();
    values.peek()?;
    let joined = values
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect::<Vec<_>>()
        .join(",");
    if prefix.is_empty() {
        return Some(joined);
    }
    let after = joined.find(prefix)? + prefix.len();
    let is_jwt_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let rest = &joined[after..];
    let Some(start) = rest.find(is_jwt_char) else {
        return Some(joined.clone());
    };
    let run = &rest[start..];
    let end = run.find(|c: char| !is_jwt_char(c)).unwrap_or(run.len());
    Some(run[..end].to_string())
}

/// `Cookie` headers as `(name, value)`, values unquoted.
fn parse_cookies(req: &Parts) -> Vec<(String, String)> {
    req.headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

/// Envoy's `CheckAudience`: empty configuration accepts anything; otherwise one audience
/// must match, ignoring an `http(s)://` scheme and a trailing `/`.
fn audience_allowed(configured: &[String], token: &[String]) -> bool {
    fn sanitize(a: &str) -> &str {
        let a = a
            .strip_prefix("https://")
            .or_else(|| a.strip_prefix("http://"))
            .unwrap_or(a);
        a.strip_suffix('/').unwrap_or(a)
    }
    configured.is_empty()
        || token
            .iter()
            .any(|t| configured.iter().any(|c| sanitize(c) == sanitize(t)))
}

/// The header value Envoy writes for a claim (`addJWTClaimToHeader`): nested claims by `.`;
/// strings as is, numbers as integers when integral (else with six decimals), booleans as
/// words, objects and lists as base64 of their JSON. `None` when absent or of another type.
fn claim_header_value(payload: &Value, claim: &str) -> Option<HeaderValue> {
    let mut value = payload;
    for segment in claim.split('.') {
        value = value.as_object()?.get(segment)?;
    }
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => u.to_string(),
            (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64 => {
                format!("{f:.0}")
            }
            (None, Some(f)) => format!("{f:.6}"),
            (None, None) => return None,
        },
        Value::Object(_) | Value::Array(_) => STANDARD.encode(value.to_string()),
        Value::Null => return None,
    };
    if text.is_empty() {
        return None;
    }
    HeaderValue::from_str(&text).ok()
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
