//! The `RequestAuthentication` CRD: [`RequestAuthentication`], its spec and the JWT rules
//! ([`JwtRule`]) it lists.
//!
//! Owns: the CRD's shape. Does not own: fetching keys or verifying tokens (`waypoint::jwt`).

use serde::{Deserialize, Serialize};

use super::selection::{PolicyTargetReference, WorkloadSelector};

/// A `RequestAuthentication`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestAuthentication {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// The spec as written.
    pub spec: RequestAuthenticationSpec,
}

/// `RequestAuthentication.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    /// Workloads in scope.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Single target reference.
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    /// Target references.
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Accepted token issuers.
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

/// One accepted JWT issuer.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// `iss` to accept.
    pub issuer: String,
    /// Accepted `aud` values (empty: any).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where to fetch the JWKS.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Inline JWKS (JSON text).
    #[serde(default)]
    pub jwks: Option<String>,
    /// Headers to read the token from.
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters to read the token from.
    #[serde(default)]
    pub from_params: Vec<String>,
    /// Cookies to read the token from.
    #[serde(default)]
    pub from_cookies: Vec<String>,
    /// Header to write the verified payload to.
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the forwarded request.
    #[serde(default)]
    pub forward_original_token: bool,
    /// Claims copied to headers.
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// JWKS fetch timeout (a duration string such as `5s`).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `fromHeaders[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    /// Header name.
    pub name: String,
    /// Prefix before the token (e.g. `Bearer `).
    #[serde(default)]
    pub prefix: Option<String>,
}

/// `outputClaimToHeaders[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    /// Header to set.
    pub header: String,
    /// Claim to copy.
    pub claim: String,
}
