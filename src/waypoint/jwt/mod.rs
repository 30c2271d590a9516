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
//!
//! # Files
//!
//! - `authn`: [`JwtAuthenticator`]: which rule a token answers to, where tokens are looked for
//!   (headers with prefixes, query parameters, cookies), the checks of a token against its
//!   rule (issuer, time, audiences), [`AuthnResult`] and [`Claims`], and the rewrite of the
//!   forwarded request;
//! - `token`: a compact JWS split and decoded, its registered claims type-checked, before any
//!   key is involved;
//! - `keys`: [`KeySet`]: JWKs parsed and validated per key type, which algorithm fits which
//!   key, and signature verification (ES512 on P-521 outside `jsonwebtoken`);
//! - `jwks`: [`JwksCache`]: where a rule's key set comes from (inline, `jwksUri`, OpenID
//!   discovery), fetching it over HTTP(S) with redirects, caching and refreshing it;
//! - this file: [`JwtError`], what goes wrong building an authenticator or fetching keys,
//!   shared by `authn` and `jwks`.

mod authn;
mod jwks;
mod keys;
#[cfg(test)]
mod test_support;
mod token;

use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;

use crate::model::policy::RequestAuthentication;

pub use authn::{AuthnResult, Claims, JwtAuthenticator, CLOCK_SKEW};
pub use jwks::{
    CaFileError, DiscoveryError, JwksCache, JwksConfig, UriError, DEFAULT_FETCH_TIMEOUT,
    DEFAULT_MIN_REFETCH_INTERVAL, DEFAULT_REFRESH_INTERVAL,
};
pub use keys::{JwksError, KeyError, KeySet, KeyType, SkippedKey};

/// base64url that accepts the segment with or without padding, as `jwt_verify_lib` does.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A token as the authenticator first meets it, for the fuzz targets (`crate::fuzzing`):
/// split and type-checked (`token`), then tried against every key of `keys` that may have
/// signed it (`keys`). `Ok` only for a verified token; errors flattened to text.
pub(crate) fn check_token(raw: &str, keys: &KeySet) -> Result<(), String> {
    let token = token::Token::parse(raw).map_err(|e| e.to_string())?;
    keys.verify(&token).map_err(|e| e.to_string())
}

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
    #[error("jwtRule for issuer {issuer:?}: inline jwks: {source}")]
    InlineJwks {
        /// The rule's issuer.
        issuer: String,
        /// Why it cannot be used.
        #[source]
        source: JwksError,
    },
    /// A `jwksUri` that is not an absolute http(s) URI.
    #[error("jwtRule for issuer {issuer:?}: jwksUri {uri:?}: {source}")]
    JwksUri {
        /// The rule's issuer.
        issuer: String,
        /// The URI as written.
        uri: String,
        /// Why it cannot be used.
        #[source]
        source: UriError,
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
    #[error("fetching JWKS {uri}: {source}")]
    FetchedJwks {
        /// The `jwksUri`.
        uri: String,
        /// Why it cannot be used.
        #[source]
        source: JwksError,
    },
    /// The issuer's OpenID configuration names no usable `jwks_uri`.
    #[error("OpenID discovery {uri}: {source}")]
    Discovery {
        /// The configuration document's URL.
        uri: String,
        /// Why it cannot be used.
        #[source]
        source: DiscoveryError,
    },
    /// The extra CA file could not be read or holds no certificate.
    #[error("JWKS client: extra CA file {path}: {source}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: CaFileError,
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
