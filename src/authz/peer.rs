//! PeerAuthentication: which mTLS mode is in force for a workload's port, and which policy set it.
//!
//! Istio's resolution, as istiod computes it for ambient (`convertedSelectorPeerAuthentications`
//! and `fetchPeerAuthentications` in `pilot/pkg/serviceregistry/kube/controller/ambient`):
//! - three scopes, decided by [`Scope::of`] (`scope`, shared with the other kinds): mesh
//!   (root namespace, no selector), namespace (no selector), workload (a `matchLabels`
//!   selector in the workload's namespace). A selector with no labels counts as none. A
//!   selector policy in the root namespace is ignored.
//! - the narrowest scope whose mode is not `UNSET` wins; `UNSET` inherits from the next wider
//!   scope; nothing set anywhere means PERMISSIVE.
//! - `portLevelMtls` counts only in workload-selector policies; a port entry overrides the
//!   policy's own mode for that (target) port, and an `UNSET` port entry inherits.
//! - several policies at one scope: Istio keeps the oldest. The mesh file has no creation
//!   times, so weft keeps the first by name and warns.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::model::policy::{MtlsMode as SpecMode, PeerAuthentication};
use crate::model::{Labels, PolicyKind};

use super::scope::Scope;
use super::Finding;

/// The effective mTLS mode of a workload port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Only mTLS (HBONE) connections are accepted.
    Strict,
    /// mTLS and plaintext are both accepted.
    Permissive,
    /// Plaintext is expected. In ambient mode mTLS over HBONE is still accepted (ztunnel treats
    /// DISABLE like PERMISSIVE); only the policy's intent differs.
    Disable,
}

impl MtlsMode {
    fn from_spec(m: SpecMode) -> Option<MtlsMode> {
        match m {
            SpecMode::Unset => None,
            SpecMode::Strict => Some(MtlsMode::Strict),
            SpecMode::Permissive => Some(MtlsMode::Permissive),
            SpecMode::Disable => Some(MtlsMode::Disable),
        }
    }
}

/// Which scope decided a mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum MtlsLevel {
    /// No policy sets a mode: Istio's default, PERMISSIVE.
    Default,
    /// The mesh-wide policy (root namespace, no selector).
    Mesh,
    /// The namespace-wide policy.
    Namespace,
    /// A workload-selector policy's own mode.
    Workload,
    /// A workload-selector policy's `portLevelMtls` entry for the port.
    Port,
}

/// A PeerAuthentication's name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PeerAuthRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// The effective mode of one workload port and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MtlsDecision {
    /// The mode in force.
    pub mode: MtlsMode,
    /// The scope that set it.
    pub level: MtlsLevel,
    /// The policy that set it (`None` for the default).
    pub policy: Option<PeerAuthRef>,
}

/// A mode one policy sets, for `weft check`.
#[derive(Clone, Debug)]
pub(crate) struct ModeSetting {
    pub policy: PeerAuthRef,
    /// `None`: the policy's own mode; else a `portLevelMtls` entry.
    pub port: Option<u16>,
    pub mode: MtlsMode,
    /// Where the policy applies, in words.
    pub scope: String,
}

#[derive(Clone, Debug)]
struct Compiled {
    reference: PeerAuthRef,
    mode: SpecMode,
    ports: BTreeMap<u16, SpecMode>,
    selector: BTreeMap<String, String>,
}

/// The PeerAuthentications of a mesh, by scope.
#[derive(Debug, Default)]
pub(crate) struct PeerAuths {
    all: Vec<Compiled>,
    mesh: Option<usize>,
    namespace: HashMap<String, usize>,
    /// Selector policies by namespace, sorted by name.
    workload: HashMap<String, Vec<usize>>,
}

/// The policies that apply to one workload, resolved once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PeerAuthChoice {
    namespace: Option<usize>,
    workload: Option<usize>,
}

impl PeerAuths {
    /// Indexes the policies, warning about those Istio ignores and about conflicts.
    pub fn new(
        policies: &[&PeerAuthentication],
        root_namespace: &str,
        findings: &mut Vec<Finding>,
    ) -> PeerAuths {
        let mut sorted: Vec<&PeerAuthentication> = policies.to_vec();
        sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut out = PeerAuths::default();
        for p in sorted {
            let mut warn = |message: String| {
                findings.push(Finding::about(
                    PolicyKind::PeerAuthentication,
                    &p.namespace,
                    &p.name,
                    message,
                ))
            };
            let scope = Scope::of(
                PolicyKind::PeerAuthentication,
                &p.namespace,
                p.spec.selector.as_ref(),
                false,
                root_namespace,
            );
            let (root, selector) = match scope {
                Ok(Scope::Mesh) => (true, BTreeMap::new()),
                Ok(Scope::Namespace) => (false, BTreeMap::new()),
                Ok(Scope::Workloads(labels)) => (false, labels),
                // Not given to a PeerAuthentication (a root selector is refused below, and
                // only AuthorizationPolicies come with control-plane uids).
                Ok(Scope::MeshWorkloads(_) | Scope::Uids(_)) => continue,
                Err(why) => {
                    warn(format!("ignored: {}", why.reason()));
                    continue;
                }
            };
            let mut ports = p
                .spec
                .port_level_mtls
                .iter()
                .map(|(port, m)| (*port, m.mode))
                .collect::<BTreeMap<_, _>>();
            if selector.is_empty() && !ports.is_empty() {
                warn(
                    "portLevelMtls ignored: Istio honours it only in policies with a workload \
                     selector"
                        .to_string(),
                );
                ports.clear();
            }
            let index = out.all.len();
            let c = Compiled {
                reference: PeerAuthRef {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                },
                mode: p.spec.mtls.map(|m| m.mode).unwrap_or_default(),
                ports,
                selector,
            };
            let kept = if !c.selector.is_empty() {
                out.workload
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(index);
                None
            } else if root {
                Some(*out.mesh.get_or_insert(index))
            } else {
                Some(*out.namespace.entry(p.namespace.clone()).or_insert(index))
            };
            if let Some(k) = kept.filter(|k| *k != index) {
                let scope = if root { "mesh-wide" } else { "namespace-wide" };
                warn(format!(
                    "ignored: {}/{} is also {scope}; Istio keeps the oldest, weft (without \
                     creation times) keeps the first by name",
                    out.all[k].reference.namespace, out.all[k].reference.name
                ));
            }
            out.all.push(c);
        }
        out
    }

    /// The namespace and workload policies for a workload; conflicts between several selector
    /// policies are reported through `conflict`.
    pub fn choose(
        &self,
        namespace: &str,
        labels: &Labels,
        conflict: &mut dyn FnMut(&PeerAuthRef, &PeerAuthRef),
    ) -> PeerAuthChoice {
        let mut matching = self
            .workload
            .get(namespace)
            .into_iter()
            .flatten()
            .copied()
            .filter(|&i| crate::model::selector_matches(&self.all[i].selector, labels));
        let workload = matching.next();
        if let Some(first) = workload {
            for other in matching {
                conflict(&self.all[first].reference, &self.all[other].reference);
            }
        }
        PeerAuthChoice {
            namespace: self.namespace.get(namespace).copied(),
            workload,
        }
    }

    /// Whether two selector policies of `namespace` may select one workload (then
    /// [`PeerAuths::choose`] reports a conflict for it).
    pub fn may_conflict(&self, namespace: &str) -> bool {
        self.workload.get(namespace).is_some_and(|v| v.len() > 1)
    }

    /// The effective mode for a port.
    pub fn resolve(&self, choice: PeerAuthChoice, port: u16) -> MtlsDecision {
        let mut decision = MtlsDecision {
            mode: MtlsMode::Permissive,
            level: MtlsLevel::Default,
            policy: None,
        };
        let mut apply = |i: usize, mode: SpecMode, level: MtlsLevel| {
            if let Some(m) = MtlsMode::from_spec(mode) {
                decision = MtlsDecision {
                    mode: m,
                    level,
                    policy: Some(self.all[i].reference.clone()),
                };
            }
        };
        if let Some(i) = self.mesh {
            apply(i, self.all[i].mode, MtlsLevel::Mesh);
        }
        if let Some(i) = choice.namespace {
            apply(i, self.all[i].mode, MtlsLevel::Namespace);
        }
        if let Some(i) = choice.workload {
            apply(i, self.all[i].mode, MtlsLevel::Workload);
            if let Some(m) = self.all[i].ports.get(&port) {
                apply(i, *m, MtlsLevel::Port);
            }
        }
        decision
    }

    /// Every mode set by a policy in force (not ignored). For `weft check`.
    pub fn modes(&self) -> Vec<ModeSetting> {
        let mut in_force: Vec<usize> = self.mesh.into_iter().collect();
        let mut ns: Vec<usize> = self.namespace.values().copied().collect();
        ns.sort_unstable();
        in_force.extend(ns);
        let mut wl: Vec<usize> = self.workload.values().flatten().copied().collect();
        wl.sort_unstable();
        in_force.extend(wl);
        let mut out = Vec::new();
        for i in in_force {
            let c = &self.all[i];
            let scope = if Some(i) == self.mesh {
                "mesh-wide".to_string()
            } else if c.selector.is_empty() {
                format!("namespace {}", c.reference.namespace)
            } else {
                let labels: Vec<String> =
                    c.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!(
                    "workloads in {} with {}",
                    c.reference.namespace,
                    labels.join(",")
                )
            };
            if let Some(m) = MtlsMode::from_spec(c.mode) {
                out.push(ModeSetting {
                    policy: c.reference.clone(),
                    port: None,
                    mode: m,
                    scope: scope.clone(),
                });
            }
            for (port, mode) in &c.ports {
                if let Some(m) = MtlsMode::from_spec(*mode) {
                    out.push(ModeSetting {
                        policy: c.reference.clone(),
                        port: Some(*port),
                        mode: m,
                        scope: scope.clone(),
                    });
                }
            }
        }
        out
    }

    /// True when a mesh-wide policy sets a mode.
    pub fn has_mesh_mode(&self) -> bool {
        self.mesh
            .is_some_and(|i| MtlsMode::from_spec(self.all[i].mode).is_some())
    }
}
