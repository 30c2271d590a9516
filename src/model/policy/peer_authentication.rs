//! The `PeerAuthentication` CRD: [`PeerAuthentication`], its spec and the mTLS modes
//! ([`MtlsMode`]), including port-level overrides keyed by port.
//!
//! Owns: the CRD's shape. Does not own: deciding a connection's mode (`authz::peer`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use super::scalar::PortNumber;
use super::selection::WorkloadSelector;

/// A `PeerAuthentication`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerAuthentication {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// The spec as written.
    pub spec: PeerAuthenticationSpec,
}

/// `PeerAuthentication.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Workloads in scope; absent: the whole namespace (or mesh in the root namespace).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// The mode for all ports.
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Per target port overrides (workload-selector policies only).
    #[serde(default, deserialize_with = "port_map")]
    pub port_level_mtls: BTreeMap<u16, MutualTls>,
}

/// `{ mode: ... }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MutualTls {
    /// The mTLS mode.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// PeerAuthentication modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent scope.
    #[default]
    Unset,
    /// Plaintext only (weft still accepts HBONE).
    Disable,
    /// Both mTLS and plaintext.
    Permissive,
    /// mTLS only.
    Strict,
}

fn port_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u16, MutualTls>, D::Error> {
    let raw = BTreeMap::<PortKey, MutualTls>::deserialize(d)?;
    Ok(raw.into_iter().map(|(k, v)| (k.0, v)).collect())
}

/// A map key that is a port, written as a number or a string.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct PortKey(u16);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PortNumber::deserialize(d).map(|p| PortKey(p.0))
    }
}
