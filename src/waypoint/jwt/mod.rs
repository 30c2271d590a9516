//! `RequestAuthentication`: the JWTs a workload accepts, verified per request.
//!
//! Owns:
//! - [`JwtAuthenticator`]: built from the `jwtRules` of the RequestAuthentications that apply to
//!   one workload; finds tokens in a request, verifies them, and says [`AuthnResult`];
//! - [`JwtAuthenticator::rewrite`]: what the forwarded request looks like afterwards;
//! - [`JwksCache`]: the issuers' public keys, inline (parsed once) or fetched from `jwksUri`
//!   over HTTPS, cached, refreshed, and kept when a refresh fails.
//!
//! Must not touch: which policies apply to a workload (the caller selects them), the HTTP
//! response (the caller answers `401` to [`AuthnResult::Invalid`]), and authorization: a
//! request without a token passes here, and only an AuthorizationPolicy that requires
//! `requestPrincipals` makes a token mandatory.
//!
//! # Semantics, and where they come from
//!
//! Istio does not verify tokens itself: istiod turns the rules into the configuration of
//! Envoy's `jwt_authn` filter (`pilot/pkg/security/authn/policy_applier.go`,
//! `convertToEnvoyJwtConfig`), and Envoy (`source/extensions/filters/http/jwt_authn/
//! {extractor,authenticator}.cc`, with `jwt_verify_lib`) does the work. weft reproduces that
//! composition; the facts it relies on:
//!
//! - **Locations** (`security/v1/jwt.proto`; Envoy `extractor.cc`). A rule with none of
//!   `fromHeaders`/`fromParams`/`fromCookies` reads `Authorization: Bearer <token>` and the
//!   `access_token` query parameter. A header location with a prefix yields a token only when
//!   the prefix occurs in the value (`Authorization: Basic ...` is *no* token, not a bad one);
//!   the token is then the run of base64url characters and dots after the prefix. Header
//!   locations are read first, then query parameters, then cookies.
//! - **Which rule** (`convertToEnvoyJwtConfig`): for rules `P1..Pn` Istio requires
//!   `ANY{P1, .., Pn, ALL{ANY{P1, allow_missing}, .., ANY{Pn, allow_missing}}}`, and a provider
//!   `Pi` passes when every token found at *its* locations carries its issuer and verifies
//!   (Envoy `authenticator.cc`: "If a request has multiple tokens, all of them must be
//!   valid"). So: one rule passing makes the request [`AuthnResult::Valid`]; no token at any
//!   location makes it [`AuthnResult::NoToken`]; anything else is [`AuthnResult::Invalid`].
//!   The token's `iss` selects the rule among those reading the location it was found at; an
//!   issuer no such rule names is invalid. Istio documents requests with tokens at several
//!   locations as unsupported ("the output principal of such requests is undefined"); weft
//!   reports the first token (in the order above) of the first passing rule.
//! - **Time** (Envoy `authenticator.cc`, `jwt_verify_lib`): `exp` and `nbf` are checked with a
//!   60 s clock skew ([`CLOCK_SKEW`]); Istio sets no `clock_skew_seconds`, so Envoy's default
//!   holds. Neither claim is required (Envoy's `require_expiration` defaults to false).
//! - **Audiences** (`jwt.proto`: "The service name will be accepted if audiences is empty").
//!   istiod passes `audiences` to Envoy verbatim and Envoy skips the check when the list is
//!   empty, so an empty list accepts any `aud` (and none). When set, one of the token's `aud`
//!   must be in the list, compared as Envoy does: without an `http://`/`https://` scheme and a
//!   trailing `/`.
//! - **Keys** (`jwt_verify_lib` `verify.cc`): a key is tried when its `kid` equals the token's
//!   (or either has none), its `alg` (if any) equals the token's, and its type fits the
//!   algorithm (RSA for `RS*`/`PS*`, EC P-256/P-384/P-521 for `ES256`/`ES384`/`ES512`, OKP
//!   Ed25519 for `EdDSA`). `ES512`, which `jsonwebtoken` lacks, is verified with `p521`. weft departs from Envoy in one place, to fail closed: HMAC (`HS*`) tokens and
//!   symmetric (`oct`) keys are never accepted, since a JWKS is public; `alg: none` is
//!   refused as in Envoy.
//! - **Principal** (Istio's authn filter): `request.auth.principal` is `<iss>/<sub>`, and is
//!   absent without `sub`. `request.auth.claims[..]` reads the payload; the `scope` and
//!   `permission` claims are split on spaces first (Istio's default
//!   `normalize_payload_in_metadata.space_delimited_claims`).
//! - **Outputs** (`jwt.proto`, Envoy `authenticator.cc`/`extractor.cc`): the headers named by
//!   `outputPayloadToHeader` and `outputClaimToHeaders` are always removed from the incoming
//!   request first (a client cannot forge them); a verified token then writes its payload
//!   segment (base64url, as in the token) and the claims (strings as is, numbers and booleans
//!   printed, objects and lists as base64 JSON; nested claims by `a.b`). Without
//!   `forwardOriginalToken` the header carrying the token is removed; tokens in query
//!   parameters and cookies stay, as in Envoy.
//! - **Keys over the network** (`policy_applier.go`; istio release note for
//!   `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`): the fetch timeout is the rule's `timeout`, 5 s by
//!   default; istiod refreshes `jwksUri` every 20 minutes ([`DEFAULT_REFRESH_INTERVAL`]). When
//!   `jwks` and `jwksUri` are both set, `jwks` wins ("jwks_uri will be ignored"). Like istiod,
//!   weft accepts a plain `http://` `jwksUri` (with a warning), and follows up to 10
//!   redirects, as istiod's Go client does. weft also
//!   refetches (rate-limited) when a token names a `kid` the cached set lacks, keeps the last
//!   good keys when a refresh fails, and treats tokens of an issuer whose keys were never
//!   fetched as invalid (`401`), like Envoy's `JwksFetchFail`.
//! - **OpenID discovery** (istiod's `resolveJwksURIUsingOpenID`): a rule with neither `jwks`
//!   nor `jwksUri` finds its key set from the issuer, as istiod does: a GET of
//!   `<issuer without a trailing />/.well-known/openid-configuration`, whose `jwks_uri`
//!   (a string) is then fetched. It is looked up again on every fetch of the keys, as
//!   istiod does on every push, so a moved key set is followed. An issuer that is not an
//!   absolute http(s) URL cannot be discovered from: such a rule is refused with
//!   [`JwtError::NoJwksSource`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, COOKIE};
use http::request::Parts;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::policy::{JwtRule, RequestAuthentication};

/// Clock skew allowed on `exp` and `nbf`: Envoy's default, which Istio does not change.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// JWKS fetch timeout when a rule sets none (istiod's default).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often fetched key sets are refreshed (istiod's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(20 * 60);
/// The least time between two on-demand fetches of one key set (unknown `kid`, keys never
/// fetched), so a stream of forged `kid`s cannot turn weft into a load generator.
pub const DEFAULT_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Claims Istio asks Envoy to split on spaces before they are matched.
const SPACE_DELIMITED_CLAIMS: [&str; 2] = ["scope", "permission"];
/// The default location's header prefix and query parameter (RFC 6750).
const BEARER_PREFIX: &str = "Bearer ";
const ACCESS_TOKEN_PARAM: &str = "access_token";

/// base64url that accepts the segment with or without padding, as `jwt_verify_lib` does.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What went wrong building an authenticator or key cache, or fetching keys.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// An error in one RequestAuthentication, named `namespace/name`.
    #[error("RequestAuthentication {policy}: {source}")]
    Policy {
        /// `namespace/name` of the policy.
        policy: String,
        /// What is wrong with it.
        #[source]
        source: Box<JwtError>,
    },
    /// A rule without an issuer.
    #[error("a jwtRule has an empty issuer")]
    EmptyIssuer,
    /// A rule with neither `jwks` nor `jwksUri`, whose issuer is no URL to discover them from.
    #[error(
        "jwtRule for issuer {issuer:?}: neither jwks nor jwksUri is set, and the issuer is \
         not an http(s) URL to discover the key set from (OpenID discovery)"
    )]
    NoJwksSource {
        /// The rule's issuer.
        issuer: String,
    },
    /// An inline `jwks` that is not a usable key set.
    #[error("jwtRule for issuer {issuer:?}: inline jwks: {reason}")]
    InlineJwks {
        /// The rule's issuer.
        issuer: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A `jwksUri` that is not an absolute http(s) URI.
    #[error("jwtRule for issuer {issuer:?}: jwksUri {uri:?}: {reason}")]
    JwksUri {
        /// The rule's issuer.
        issuer: String,
        /// The URI as written.
        uri: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A `timeout` that is not a duration.
    #[error("jwtRule for issuer {issuer:?}: timeout {value:?}: {source}")]
    Timeout {
        /// The rule's issuer.
        issuer: String,
        /// The value as written.
        value: String,
        /// The parse error.
        #[source]
        source: humantime::DurationError,
    },
    /// A header name (`fromHeaders`, `outputPayloadToHeader`, `outputClaimToHeaders`) that is
    /// not a valid HTTP header name.
    #[error("jwtRule for issuer {issuer:?}: {field}: {name:?} is not a valid header name")]
    HeaderName {
        /// The rule's issuer.
        issuer: String,
        /// The field it appears in.
        field: &'static str,
        /// The name as written.
        name: String,
    },
    /// The JWKS request failed (connection, TLS, HTTP).
    #[error("fetching JWKS {uri}: {source}")]
    Fetch {
        /// The `jwksUri`.
        uri: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The JWKS request took longer than the rule's timeout.
    #[error("fetching JWKS {uri}: no answer within {timeout:?}")]
    FetchTimeout {
        /// The `jwksUri`.
        uri: String,
        /// The timeout that ran out.
        timeout: Duration,
    },
    /// The JWKS server answered with an error status.
    #[error("fetching JWKS {uri}: HTTP status {status}")]
    FetchStatus {
        /// The `jwksUri`.
        uri: String,
        /// The status received.
        status: http::StatusCode,
    },
    /// The fetched document is not a usable key set.
    #[error("fetching JWKS {uri}: {reason}")]
    FetchedJwks {
        /// The `jwksUri`.
        uri: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The issuer's OpenID configuration names no usable `jwks_uri`.
    #[error("OpenID discovery {uri}: {reason}")]
    Discovery {
        /// The configuration document's URL.
        uri: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The extra CA file could not be read or holds no certificate.
    #[error("JWKS client: extra CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The TLS client configuration could not be built.
    #[error("JWKS client: TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

impl JwtError {
    fn in_policy(self, policy: &RequestAuthentication) -> JwtError {
        JwtError::Policy {
            policy: format!("{}/{}", policy.namespace, policy.name),
            source: Box::new(self),
        }
    }
}

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
        let mut parsed: HashMap<&str, Result<Token<'_>, String>> = HashMap::new();
        for (_, token) in &found {
            parsed
                .entry(token.as_str())
                .or_insert_with(|| Token::parse(token));
        }
        let now = unix_now();
        let mut first_error: Option<String> = None;
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
                    Err(e) => Err(e.clone()),
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
            return AuthnResult::Invalid(
                first_error.unwrap_or_else(|| "token not accepted".to_string()),
            );
        };
        // Invariant: a passing rule verified at least one token, recorded above.
        let Some(primary) = verified.iter().find(|v| v.rule == rule) else {
            return AuthnResult::Invalid("token not accepted".to_string());
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
    async fn verify(&self, rule: &Rule, token: &Token<'_>, now: u64) -> Result<(), String> {
        if token.issuer != rule.issuer {
            return Err(format!(
                "issuer {:?} is not accepted at this location",
                token.issuer
            ));
        }
        let skew = CLOCK_SKEW.as_secs();
        if let Some(nbf) = token.nbf {
            if now.saturating_add(skew) < nbf {
                return Err(format!("token of {:?} is not valid yet", rule.issuer));
            }
        }
        if let Some(exp) = token.exp {
            if now > exp.saturating_add(skew) {
                return Err(format!("token of {:?} has expired", rule.issuer));
            }
        }
        if !audience_allowed(&rule.audiences, &token.audiences) {
            return Err(format!(
                "token of {:?}: audiences {:?} are not accepted",
                rule.issuer, token.audiences
            ));
        }
        let keys = self.jwks.keys(&rule.keys, None).await;
        let Some(keys) = keys else {
            return Err(format!(
                "no keys for issuer {:?} (JWKS not fetched)",
                rule.issuer
            ));
        };
        match keys.verify(token) {
            Ok(()) => Ok(()),
            Err(reason) => {
                // A kid the set lacks may be a rotated key: fetch again (rate-limited).
                let unknown_kid = token.kid.as_deref().is_some_and(|kid| !keys.has_kid(kid));
                if !unknown_kid {
                    return Err(format!("token of {:?}: {reason}", rule.issuer));
                }
                match self.jwks.keys(&rule.keys, Some(&keys)).await {
                    Some(fresh) if !Arc::ptr_eq(&fresh, &keys) => fresh
                        .verify(token)
                        .map_err(|r| format!("token of {:?}: {r}", rule.issuer)),
                    _ => Err(format!("token of {:?}: {reason}", rule.issuer)),
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

/// `aud` as a list (a string is one audience).
fn audiences_of(payload: &Value) -> Vec<String> {
    match payload.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// === impl Token ===

/// A token split and decoded, not yet verified.
#[derive(Debug)]
struct Token<'a> {
    alg: Alg,
    kid: Option<String>,
    /// `header.payload`, the signed bytes.
    signing_input: &'a str,
    signature: &'a str,
    payload_b64: &'a str,
    payload: Value,
    issuer: String,
    audiences: Vec<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

impl<'a> Token<'a> {
    /// Splits and decodes a compact JWS, checking what `jwt_verify_lib` checks before any
    /// key is used: three segments, base64url JSON objects, a supported `alg`, well-typed
    /// registered claims.
    fn parse(raw: &'a str) -> Result<Token<'a>, String> {
        let mut parts = raw.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("malformed token: not three dot-separated segments".to_string());
        };
        if h.is_empty() || p.is_empty() {
            return Err("malformed token: empty header or payload".to_string());
        }
        let header_bytes = B64URL
            .decode(h)
            .map_err(|e| format!("malformed token header: {e}"))?;
        let header: RawHeader = serde_json::from_slice(&header_bytes)
            .map_err(|e| format!("malformed token header: {e}"))?;
        let alg = match header.alg.as_deref() {
            None => return Err("token header has no alg".to_string()),
            Some("none") => return Err("alg none is not accepted".to_string()),
            Some(a @ ("HS256" | "HS384" | "HS512")) => {
                return Err(format!(
                    "alg {a} is not accepted: keys of a JWKS are public, HMAC keys are secrets"
                ))
            }
            Some("ES512") => Alg::ES512,
            Some(a) => {
                Alg::Jws(Algorithm::from_str(a).map_err(|_| format!("unsupported alg {a:?}"))?)
            }
        };
        if s.is_empty() {
            return Err("token has no signature".to_string());
        }
        let payload_bytes = B64URL
            .decode(p)
            .map_err(|e| format!("malformed token payload: {e}"))?;
        let payload: Value = serde_json::from_slice(&payload_bytes)
            .map_err(|e| format!("malformed token payload: {e}"))?;
        if !payload.is_object() {
            return Err("malformed token payload: not a JSON object".to_string());
        }
        let issuer = match payload.get("iss") {
            Some(Value::String(s)) => s.clone(),
            None => return Err("token has no iss".to_string()),
            Some(_) => return Err("token iss is not a string".to_string()),
        };
        match payload.get("sub") {
            None | Some(Value::String(_)) => {}
            Some(_) => return Err("token sub is not a string".to_string()),
        }
        match payload.get("aud") {
            None | Some(Value::String(_)) => {}
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
            Some(_) => return Err("token aud is not a string or list of strings".to_string()),
        }
        let time = |k: &str| match payload.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("token {k} is not a non-negative integer")),
        };
        let exp = time("exp")?;
        let nbf = time("nbf")?;
        time("iat")?;
        let audiences = audiences_of(&payload);
        Ok(Token {
            alg,
            kid: header.kid,
            signing_input: &raw[..h.len() + 1 + p.len()],
            signature: s,
            payload_b64: p,
            payload,
            issuer,
            audiences,
            exp,
            nbf,
        })
    }
}

// === impl KeySet ===

/// A signature algorithm weft verifies: `jsonwebtoken`'s, and ES512, which it lacks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Alg {
    Jws(Algorithm),
    ES512,
}

impl std::fmt::Debug for Alg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Alg::Jws(a) => a.fmt(f),
            Alg::ES512 => f.write_str("ES512"),
        }
    }
}

/// The type of a public key, as far as the algorithms care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyType {
    Rsa,
    P256,
    P384,
    P521,
    Ed25519,
}

impl KeyType {
    fn fits(self, alg: Alg) -> bool {
        use Algorithm::*;
        match alg {
            Alg::ES512 => self == KeyType::P521,
            Alg::Jws(RS256 | RS384 | RS512 | PS256 | PS384 | PS512) => self == KeyType::Rsa,
            Alg::Jws(ES256) => self == KeyType::P256,
            Alg::Jws(ES384) => self == KeyType::P384,
            Alg::Jws(EdDSA) => self == KeyType::Ed25519,
            Alg::Jws(HS256 | HS384 | HS512) => false,
        }
    }
}

/// One usable public key.
struct VerifyKey {
    kid: Option<String>,
    alg: Option<Alg>,
    ty: KeyType,
    key: KeyMaterial,
}

/// A public key as its verifier wants it.
enum KeyMaterial {
    Jws(DecodingKey),
    P521(Box<p521::ecdsa::VerifyingKey>),
}

impl KeyMaterial {
    /// Whether `signature` (base64url) is `alg`'s signature of `input` by this key.
    fn verifies(&self, alg: Alg, input: &[u8], signature: &str) -> bool {
        match (self, alg) {
            (KeyMaterial::Jws(key), Alg::Jws(alg)) => {
                jsonwebtoken::crypto::verify(signature, input, key, alg).unwrap_or(false)
            }
            (KeyMaterial::P521(key), Alg::ES512) => {
                use p521::ecdsa::signature::Verifier as _;
                // JWS: the fixed-size r || s (RFC 7518 §3.4), 2 × 66 bytes for P-521.
                B64URL
                    .decode(signature)
                    .ok()
                    .and_then(|raw| p521::ecdsa::Signature::from_slice(&raw).ok())
                    .is_some_and(|sig| key.verify(input, &sig).is_ok())
            }
            _ => false,
        }
    }
}

/// A parsed JWKS: its usable signing keys.
pub struct KeySet {
    keys: Vec<VerifyKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (&k.kid, k.alg, k.ty)))
            .finish()
    }
}

impl KeySet {
    /// Parses a JWKS document, keeping the keys that can verify a signature. Keys of other
    /// kinds (symmetric, encryption, unknown curves) are skipped; a set with no usable key
    /// is an error.
    pub fn parse(text: &str) -> Result<KeySet, String> {
        #[derive(Deserialize)]
        struct Doc {
            keys: Vec<Value>,
        }
        let doc: Doc = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, raw) in doc.keys.into_iter().enumerate() {
            match VerifyKey::from_json(raw) {
                Ok(k) => keys.push(k),
                Err(why) => skipped.push(format!("key {i}: {why}")),
            }
        }
        if keys.is_empty() {
            return Err(if skipped.is_empty() {
                "the key set is empty".to_string()
            } else {
                format!("no usable signing key ({})", skipped.join("; "))
            });
        }
        if !skipped.is_empty() {
            tracing::debug!(skipped = %skipped.join("; "), "JWKS: keys skipped");
        }
        Ok(KeySet { keys })
    }

    fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// Tries every key that may have signed the token (`jwt_verify_lib`'s selection).
    fn verify(&self, token: &Token<'_>) -> Result<(), String> {
        let mut tried = 0;
        for key in &self.keys {
            let kid_fits = match (&token.kid, &key.kid) {
                (Some(t), Some(k)) => t == k,
                _ => true,
            };
            if !kid_fits || key.alg.is_some_and(|a| a != token.alg) || !key.ty.fits(token.alg) {
                continue;
            }
            tried += 1;
            if key
                .key
                .verifies(token.alg, token.signing_input.as_bytes(), token.signature)
            {
                return Ok(());
            }
        }
        Err(match (tried, &token.kid) {
            (0, Some(kid)) => format!("no {:?} key with kid {kid:?}", token.alg),
            (0, None) => format!("no {:?} key", token.alg),
            _ => "signature verification failed".to_string(),
        })
    }
}

impl VerifyKey {
    fn from_json(raw: Value) -> Result<VerifyKey, String> {
        if raw.get("kty").and_then(Value::as_str) == Some("EC")
            && raw.get("crv").and_then(Value::as_str) == Some("P-521")
        {
            return VerifyKey::p521_from_json(&raw);
        }
        let jwk: Jwk = serde_json::from_value(raw).map_err(|e| format!("not a JWK: {e}"))?;
        if let Some(u) = &jwk.common.public_key_use {
            if *u != PublicKeyUse::Signature {
                return Err("not a signature key (use)".to_string());
            }
        }
        let alg = match &jwk.common.key_algorithm {
            None => None,
            Some(a) => Some(Alg::Jws(
                signature_alg(a).ok_or_else(|| format!("alg {a:?} is not accepted"))?,
            )),
        };
        let ty = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyType::Rsa,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => KeyType::P256,
                EllipticCurve::P384 => KeyType::P384,
                ref c => return Err(format!("unsupported EC curve {c:?}")),
            },
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => KeyType::Ed25519,
                ref c => return Err(format!("unsupported OKP curve {c:?}")),
            },
            AlgorithmParameters::OctetKey(_) => {
                return Err("symmetric (oct) keys are not accepted".to_string())
            }
        };
        if let Some(a) = alg {
            if !ty.fits(a) {
                return Err(format!("alg {a:?} does not fit a {ty:?} key"));
            }
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("bad key material: {e}"))?;
        Ok(VerifyKey {
            kid: jwk.common.key_id,
            alg,
            ty,
            key: KeyMaterial::Jws(key),
        })
    }

    /// An EC P-521 JWK (RFC 7518 §6.2.1), which `jsonwebtoken` cannot read: the same checks
    /// as the others (`use`, `alg`), and a point on the curve.
    fn p521_from_json(raw: &Value) -> Result<VerifyKey, String> {
        let field = |name: &str| match raw.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("not a JWK: {name} is not a string")),
        };
        if field("use")?.is_some_and(|u| u != "sig") {
            return Err("not a signature key (use)".to_string());
        }
        let alg = match field("alg")? {
            None => None,
            Some("ES512") => Some(Alg::ES512),
            Some(a) => return Err(format!("alg {a:?} does not fit a P521 key")),
        };
        // RFC 7518 wants 66 bytes; like Envoy, shorter ones (leading zeros dropped, as some
        // issuers publish them) are taken as the same number.
        let coordinate = |name: &str| -> Result<Vec<u8>, String> {
            let text = field(name)?.ok_or_else(|| format!("not a JWK: no {name}"))?;
            let bytes = B64URL
                .decode(text)
                .map_err(|e| format!("bad key material: {name}: {e}"))?;
            if bytes.len() > 66 {
                return Err(format!(
                    "bad key material: {name} has {} bytes, P-521 takes at most 66",
                    bytes.len()
                ));
            }
            Ok([vec![0; 66 - bytes.len()], bytes].concat())
        };
        // SEC1 uncompressed point: 0x04 || x || y.
        let point = [&[4u8][..], &coordinate("x")?, &coordinate("y")?].concat();
        let key = p521::ecdsa::VerifyingKey::from_sec1_bytes(&point)
            .map_err(|_| "bad key material: not a point on P-521".to_string())?;
        Ok(VerifyKey {
            kid: field("kid")?.map(str::to_string),
            alg,
            ty: KeyType::P521,
            key: KeyMaterial::P521(Box::new(key)),
        })
    }
}

/// The signature algorithm a JWK's `alg` names; `None` for anything weft does not verify.
fn signature_alg(a: &KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

// === impl JwksCache ===

/// Settings of the [`JwksCache`].
#[derive(Clone, Debug)]
pub struct JwksConfig {
    /// A PEM file of extra CA certificates trusted for `jwksUri` (besides the system roots).
    pub extra_ca_file: Option<PathBuf>,
    /// Trust the system's root certificates.
    pub system_roots: bool,
    /// How often fetched key sets are refreshed.
    pub refresh_interval: Duration,
    /// The least time between two on-demand fetches of one key set.
    pub min_refetch_interval: Duration,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            extra_ca_file: None,
            system_roots: true,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            min_refetch_interval: DEFAULT_MIN_REFETCH_INTERVAL,
        }
    }
}

/// Where a key set comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum SourceKey {
    Inline(String),
    Remote(String),
    /// Found through the issuer's OpenID configuration (its URL).
    Discovered(String),
}

/// Where an issuer publishes its OpenID configuration (OpenID Connect Discovery 1.0 §4).
const OPENID_CONFIGURATION: &str = "/.well-known/openid-configuration";

/// One key set: inline (fixed) or remote (fetched, swapped on refresh).
struct KeySource {
    remote: Option<Remote>,
    /// The current keys; `None` until a first fetch succeeds.
    keys: ArcSwapOption<KeySet>,
}

struct Remote {
    /// The key set's URI, or the OpenID configuration's when `discover`.
    uri: Uri,
    discover: bool,
    timeout: Duration,
    /// When the last fetch started; the lock also makes fetches of one set single-flight.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
}

/// Follows up to 10 redirects, as istiod's Go HTTP client does.
type HttpsClient = tower_http::follow_redirect::FollowRedirect<
    Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    tower_http::follow_redirect::policy::Limited,
>;

/// The issuers' public keys, shared by every [`JwtAuthenticator`] of the process.
///
/// Inline `jwks` are parsed once. A `jwksUri` is fetched on first use (or by the refresher),
/// refreshed every [`JwksConfig::refresh_interval`] by [`spawn_refresher`](Self::spawn_refresher),
/// and again on demand when a token names an unknown `kid`. A failed fetch keeps the last
/// good keys (and logs); an issuer whose keys were never fetched has no keys, so its tokens
/// are invalid.
pub struct JwksCache {
    client: HttpsClient,
    config: JwksConfig,
    sources: RwLock<HashMap<SourceKey, Arc<KeySource>>>,
    /// Wakes the refresher when a new remote source is registered.
    added: Notify,
    fetches: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl JwksCache {
    /// Builds the cache and its HTTPS client. Reads the extra CA file (blocking: call at
    /// start-up).
    pub fn new(config: JwksConfig) -> Result<Self, JwtError> {
        let mut roots = rustls::RootCertStore::empty();
        if config.system_roots {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::warn!(error = %e, "JWKS client: loading system root certificates");
            }
            roots.add_parsable_certificates(native.certs);
        }
        if let Some(path) = &config.extra_ca_file {
            let ca_error = |reason: String| JwtError::CaFile {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
            let certs = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("no certificate in the file".to_string()));
            }
            for cert in certs {
                roots.add(cert)?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let client = tower_http::follow_redirect::FollowRedirect::with_policy(
            Client::builder(TokioExecutor::new()).build(https),
            tower_http::follow_redirect::policy::Limited::new(10),
        );
        Ok(JwksCache {
            client,
            config,
            sources: RwLock::new(HashMap::new()),
            added: Notify::new(),
            fetches: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Registers the key sets of `policies` and forgets those no policy names any more.
    /// Every bad policy is reported (named); the good ones are registered all the same.
    pub fn update(&self, policies: &[RequestAuthentication]) -> Result<(), Vec<JwtError>> {
        let mut errors = Vec::new();
        let mut wanted = HashSet::new();
        for p in policies {
            for rule in &p.spec.jwt_rules {
                match self.source_key(rule) {
                    Ok((key, _)) => {
                        if let Err(e) = self.source_for(rule) {
                            errors.push(e.in_policy(p));
                        } else {
                            wanted.insert(key);
                        }
                    }
                    Err(e) => errors.push(e.in_policy(p)),
                }
            }
        }
        // Authenticators hold their sources by Arc, so forgetting one here is safe.
        self.sources
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| wanted.contains(k));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// How many JWKS fetches were attempted (for metrics and tests).
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Refreshes every remote key set now (each bounded by its timeout); failures keep the
    /// old keys.
    pub async fn refresh_all(&self) {
        for source in self.remotes() {
            self.refresh(&source, None).await;
        }
    }

    /// Fetches the remote key sets never tried yet.
    async fn refresh_new(&self) {
        for source in self.remotes() {
            let untried = source
                .remote
                .as_ref()
                .is_some_and(|r| r.last_attempt.try_lock().is_ok_and(|last| last.is_none()));
            if untried {
                self.refresh(&source, None).await;
            }
        }
    }

    fn remotes(&self) -> Vec<Arc<KeySource>> {
        self.sources
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|s| s.remote.is_some())
            .cloned()
            .collect()
    }

    /// Runs the periodic refresh until `shutdown`: every key set at once and then every
    /// [`JwksConfig::refresh_interval`]; a newly registered `jwksUri` as soon as it appears.
    pub fn spawn_refresher(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let cache = self.clone();
        tokio::spawn(async move {
            let mut next_full = Instant::now();
            loop {
                if Instant::now() >= next_full {
                    cache.refresh_all().await;
                    next_full = Instant::now() + cache.config.refresh_interval;
                } else {
                    cache.refresh_new().await;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(next_full) => {}
                    _ = cache.added.notified() => {}
                }
            }
        })
    }

    /// The key source of a rule: `jwks` wins over `jwksUri`, as in Istio.
    fn source_key(&self, rule: &JwtRule) -> Result<(SourceKey, Option<Remote>), JwtError> {
        if let Some(jwks) = rule.jwks.as_deref().filter(|j| !j.trim().is_empty()) {
            return Ok((SourceKey::Inline(jwks.to_string()), None));
        }
        let timeout = match rule.timeout.as_deref().filter(|t| !t.is_empty()) {
            None => DEFAULT_FETCH_TIMEOUT,
            Some(t) => humantime::parse_duration(t).map_err(|source| JwtError::Timeout {
                issuer: rule.issuer.clone(),
                value: t.to_string(),
                source,
            })?,
        };
        let (key, uri, discover) = match rule.jwks_uri.as_deref().filter(|u| !u.is_empty()) {
            Some(uri) => {
                let parsed = http_uri(uri).map_err(|reason| JwtError::JwksUri {
                    issuer: rule.issuer.clone(),
                    uri: uri.to_string(),
                    reason,
                })?;
                if parsed.scheme_str() == Some("http") {
                    // istiod fetches plain http too; allowed, but the keys can then be
                    // forged in transit.
                    tracing::warn!(issuer = %rule.issuer, uri, "jwksUri is plain http");
                }
                (SourceKey::Remote(uri.to_string()), parsed, false)
            }
            None => {
                // One trailing slash dropped, as istiod's TrimSuffix does.
                let issuer = rule.issuer.strip_suffix('/').unwrap_or(&rule.issuer);
                let config = format!("{issuer}{OPENID_CONFIGURATION}");
                let parsed = http_uri(&config).map_err(|_| JwtError::NoJwksSource {
                    issuer: rule.issuer.clone(),
                })?;
                if parsed.scheme_str() == Some("http") {
                    tracing::warn!(issuer = %rule.issuer, "issuer is plain http: its key set is discovered over plain http");
                }
                (SourceKey::Discovered(config), parsed, true)
            }
        };
        Ok((
            key,
            Some(Remote {
                uri,
                discover,
                timeout,
                last_attempt: tokio::sync::Mutex::new(None),
            }),
        ))
    }

    /// The (shared) key source of a rule, registering it if new. Rules naming the same
    /// `jwksUri` share one source, fetched with the first rule's timeout.
    fn source_for(&self, rule: &JwtRule) -> Result<Arc<KeySource>, JwtError> {
        let (key, remote) = self.source_key(rule)?;
        if let Some(s) = self
            .sources
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(s.clone());
        }
        let source = match (&key, remote) {
            (SourceKey::Inline(text), _) => {
                let keys = KeySet::parse(text).map_err(|reason| JwtError::InlineJwks {
                    issuer: rule.issuer.clone(),
                    reason,
                })?;
                KeySource {
                    remote: None,
                    keys: ArcSwapOption::from_pointee(keys),
                }
            }
            (SourceKey::Remote(_) | SourceKey::Discovered(_), remote) => KeySource {
                remote,
                keys: ArcSwapOption::empty(),
            },
        };
        let is_remote = source.remote.is_some();
        let source = self
            .sources
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert_with(|| Arc::new(source))
            .clone();
        if is_remote {
            self.added.notify_one();
        }
        Ok(source)
    }

    /// The current keys of `source`. A remote source is fetched on demand (rate-limited)
    /// when it has no keys yet, or when `stale` is the set the caller found lacking.
    async fn keys(&self, source: &KeySource, stale: Option<&Arc<KeySet>>) -> Option<Arc<KeySet>> {
        let current = source.keys.load_full();
        let wanted = match (&current, stale) {
            (None, _) => true,
            (Some(c), Some(s)) => Arc::ptr_eq(c, s),
            (Some(_), None) => false,
        };
        if wanted && source.remote.is_some() {
            self.refresh(source, Some(current.as_ref())).await;
            return source.keys.load_full();
        }
        current
    }

    /// Fetches a remote source and swaps its keys in. On demand (`seen` is the set the
    /// caller had), it is skipped when another fetch already replaced that set or when the
    /// last attempt is more recent than `min_refetch_interval`.
    async fn refresh(&self, source: &KeySource, seen: Option<Option<&Arc<KeySet>>>) {
        let Some(remote) = &source.remote else {
            return;
        };
        let mut last = remote.last_attempt.lock().await;
        if let Some(seen) = seen {
            let now_keys = source.keys.load_full();
            let replaced = match (now_keys.as_ref(), seen) {
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                (Some(_), None) => true,
                _ => false,
            };
            let too_soon = last.is_some_and(|t| t.elapsed() < self.config.min_refetch_interval);
            if replaced || too_soon {
                return;
            }
        }
        *last = Some(Instant::now());
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.fetch_remote(remote).await {
            Ok(keys) => {
                tracing::debug!(uri = %remote.uri, keys = keys.keys.len(), "JWKS fetched");
                source.keys.store(Some(Arc::new(keys)));
            }
            Err(e) => {
                let kept = source.keys.load().is_some();
                tracing::warn!(error = %e, kept_previous_keys = kept, "JWKS refresh failed");
            }
        }
    }

    /// The keys of `remote`: its key set, found first through the issuer's OpenID
    /// configuration when it is discovered.
    /// Both GETs of a discovery share the rule's timeout: a request waiting for keys waits
    /// no longer than for a `jwksUri`.
    async fn fetch_remote(&self, remote: &Remote) -> Result<KeySet, JwtError> {
        let deadline = Instant::now() + remote.timeout;
        let jwks_uri = if remote.discover {
            let config = remote.uri.to_string();
            let doc = self.get(&remote.uri, deadline, remote.timeout).await?;
            let uri = std::str::from_utf8(&doc)
                .map_err(|e| e.to_string())
                .and_then(jwks_uri_of)
                .map_err(|reason| JwtError::Discovery {
                    uri: config.clone(),
                    reason,
                })?;
            if uri.scheme_str() == Some("http") {
                tracing::warn!(config, jwks_uri = %uri, "discovered jwksUri is plain http");
            }
            uri
        } else {
            remote.uri.clone()
        };
        let uri_s = jwks_uri.to_string();
        let doc = self.get(&jwks_uri, deadline, remote.timeout).await?;
        let text = std::str::from_utf8(&doc).map_err(|e| JwtError::FetchedJwks {
            uri: uri_s.clone(),
            reason: e.to_string(),
        })?;
        KeySet::parse(text).map_err(|reason| JwtError::FetchedJwks { uri: uri_s, reason })
    }

    /// One GET of a JSON document, bounded by `deadline` (`timeout` is for the message) and
    /// [`MAX_JWKS_BYTES`].
    async fn get(
        &self,
        uri: &Uri,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Bytes, JwtError> {
        let uri_s = uri.to_string();
        let work = async {
            let req = http::Request::get(uri.clone())
                .header(http::header::ACCEPT, "application/json")
                .body(Empty::<Bytes>::new())
                .map_err(|e| JwtError::Fetch {
                    uri: uri_s.clone(),
                    source: Box::new(e),
                })?;
            let resp = tower::ServiceExt::oneshot(self.client.clone(), req)
                .await
                .map_err(|e| JwtError::Fetch {
                    uri: uri_s.clone(),
                    source: Box::new(e),
                })?;
            if !resp.status().is_success() {
                return Err(JwtError::FetchStatus {
                    uri: uri_s.clone(),
                    status: resp.status(),
                });
            }
            let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| JwtError::Fetch {
                    uri: uri_s.clone(),
                    source: e,
                })?
                .to_bytes();
            Ok(body)
        };
        tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| JwtError::FetchTimeout {
                uri: uri_s.clone(),
                timeout,
            })?
    }
}

/// `text` as an absolute http(s) URI, or why not.
fn http_uri(text: &str) -> Result<Uri, String> {
    let parsed = Uri::from_str(text).map_err(|e| e.to_string())?;
    match parsed.scheme_str() {
        Some("https" | "http") if parsed.host().is_some() => Ok(parsed),
        _ => Err("not an absolute http(s) URI".to_string()),
    }
}

/// The `jwks_uri` of an OpenID configuration document: a string holding an absolute
/// http(s) URI (istiod refuses any other value as well).
fn jwks_uri_of(doc: &str) -> Result<Uri, String> {
    let value: Value = serde_json::from_str(doc).map_err(|e| format!("not JSON: {e}"))?;
    match value.get("jwks_uri") {
        Some(Value::String(uri)) => {
            http_uri(uri).map_err(|reason| format!("jwks_uri {uri:?}: {reason}"))
        }
        Some(other) => Err(format!("jwks_uri is not a string: {other}")),
        None => Err("no jwks_uri".to_string()),
    }
}

#[cfg(test)]
mod tests;
