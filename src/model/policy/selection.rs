//! How a policy names the workloads it applies to: a `matchLabels` [`WorkloadSelector`] and
//! a Gateway-API style [`PolicyTargetReference`] (`targetRef`/`targetRefs`), shared by the
//! three CRDs.
//!
//! Owns: their shape as the CRDs write them. Does not own: resolving them to workloads
//! (`authz`, `state`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A `matchLabels` workload selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must carry to be selected.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// A Gateway-API style reference a policy attaches to (`targetRef`/`targetRefs`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    /// API group of the target.
    #[serde(default)]
    pub group: String,
    /// Kind of the target (`Service`, `Gateway`, ...).
    pub kind: String,
    /// Name of the target.
    pub name: String,
    /// Namespace of the target (defaults to the policy's).
    #[serde(default)]
    pub namespace: Option<String>,
}
