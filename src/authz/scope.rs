//! Which policies apply to a workload: Istio's scope rules for AuthorizationPolicy,
//! PeerAuthentication and RequestAuthentication, in one place (ARCHITECTURE.md, "Policy
//! scope"). The compiler (`compile`), PeerAuthentication resolution (`peer`) and the
//! waypoint's RequestAuthentication lookup all ask [`Scope::of`] and [`Scope::applies_to`].
//!
//! Istio's rules, as its shared matcher decides them (`pilot/pkg/model/policyattachment.go`
//! `isSelected`, and `ListAuthorizationPolicies` / `getConfigsForWorkload`, which look in the
//! root namespace and the workload's own):
//!
//! | policy | AuthorizationPolicy, RequestAuthentication | PeerAuthentication |
//! |---|---|---|
//! | root namespace, no selector or `selector: {}` | every workload of the mesh | mesh-wide |
//! | root namespace, `matchLabels` | matching workloads of every namespace | ignored |
//! | other namespace, no selector or `selector: {}` | every workload of that namespace | namespace-wide |
//! | other namespace, `matchLabels` | matching workloads of that namespace | workload-wide |
//! | `targetRef(s)` | none here: waypoints and gateways enforce it | (no such field) |
//!
//! `selector: {}` counts as no selector for all three, as Istio's matcher and its
//! PeerAuthentication composition (`ComposePeerAuthentication`: `len(MatchLabels) == 0`)
//! treat it. istiod's ambient translation for ztunnel departs from this: it scopes an
//! AuthorizationPolicy with `selector: {}` as a workload selector that selects nothing, and
//! leaves a root-namespace PeerAuthentication with `selector: {}` out of other namespaces.
//! weft keeps the matcher's reading there: a `selector: {}` DENY still denies (fail closed),
//! and `weft check` users see the scope they wrote.
//!
//! Must not touch: rule evaluation, modes, the state store.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::policy::WorkloadSelector;
use crate::model::{Labels, PolicyKind};

/// The workloads a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Root namespace, no selector: every workload.
    Mesh,
    /// Selector in the root namespace: matching workloads of every namespace.
    MeshWorkloads(BTreeMap<String, String>),
    /// No selector: every workload of the policy's namespace.
    Namespace,
    /// Selector in an ordinary namespace: matching workloads of that namespace.
    Workloads(BTreeMap<String, String>),
    /// Exactly these workloads, by uid: istiod resolved the selector itself (xDS
    /// `WORKLOAD_SELECTOR`; xDS workloads carry no labels).
    Uids(BTreeSet<String>),
}

/// Why a policy applies to no workload at the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unscoped {
    /// `targetRef`/`targetRefs`: attached to a waypoint or gateway, which enforce it.
    Targeted,
    /// A PeerAuthentication with a selector in the root namespace: Istio ignores it.
    RootSelector,
}

impl Unscoped {
    /// The warning that explains it.
    pub fn reason(self) -> &'static str {
        match self {
            Unscoped::Targeted => {
                "targetRef/targetRefs attach it to a waypoint or gateway, which enforce it"
            }
            Unscoped::RootSelector => {
                "a PeerAuthentication with a selector in the root namespace applies to nothing \
                 (Istio ignores it)"
            }
        }
    }
}

impl Scope {
    /// The scope of a `kind` policy in `namespace` with this selector; `targeted` when it has
    /// `targetRef` or `targetRefs`.
    pub fn of(
        kind: PolicyKind,
        namespace: &str,
        selector: Option<&WorkloadSelector>,
        targeted: bool,
        root_namespace: &str,
    ) -> Result<Scope, Unscoped> {
        if targeted {
            return Err(Unscoped::Targeted);
        }
        let labels = selector
            .map(|s| &s.match_labels)
            .filter(|l| !l.is_empty())
            .cloned();
        let root = namespace == root_namespace;
        Ok(match (labels, root) {
            (None, true) => Scope::Mesh,
            (None, false) => Scope::Namespace,
            (Some(_), true) if kind == PolicyKind::PeerAuthentication => {
                return Err(Unscoped::RootSelector)
            }
            (Some(l), true) => Scope::MeshWorkloads(l),
            (Some(l), false) => Scope::Workloads(l),
        })
    }

    /// True when a policy of `policy_namespace` with this scope applies to the workload with
    /// this uid, namespace and labels.
    pub fn applies_to(
        &self,
        policy_namespace: &str,
        uid: &str,
        namespace: &str,
        labels: &Labels,
    ) -> bool {
        match self {
            Scope::Uids(uids) => uids.contains(uid),
            Scope::Mesh => true,
            Scope::Namespace => policy_namespace == namespace,
            Scope::Workloads(sel) => {
                policy_namespace == namespace && crate::model::selector_matches(sel, labels)
            }
            Scope::MeshWorkloads(sel) => crate::model::selector_matches(sel, labels),
        }
    }

    /// Widest first: the order policies are listed and indexed in.
    pub fn rank(&self) -> u8 {
        match self {
            Scope::Mesh => 0,
            Scope::MeshWorkloads(_) => 1,
            Scope::Namespace => 2,
            Scope::Workloads(_) | Scope::Uids(_) => 3,
        }
    }

    /// A human description, for `explain` and `weft check`.
    pub fn describe(&self, policy_namespace: &str) -> String {
        let labels = |sel: &BTreeMap<String, String>| {
            sel.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Scope::Mesh => format!("mesh-wide (root namespace {policy_namespace}, no selector)"),
            Scope::Namespace => format!("namespace {policy_namespace}"),
            Scope::Workloads(sel) => format!(
                "workloads in namespace {policy_namespace} with {}",
                labels(sel)
            ),
            Scope::MeshWorkloads(sel) => format!(
                "workloads in every namespace with {} (root namespace selector)",
                labels(sel)
            ),
            Scope::Uids(uids) => {
                format!("{} workload(s) selected by the control plane", uids.len())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PolicyKind::{
        AuthorizationPolicy as Ap, PeerAuthentication as Pa, RequestAuthentication as Ra,
    };

    const ROOT: &str = "istio-system";

    /// How a policy's selector is written.
    #[derive(Clone, Copy, Debug)]
    enum Sel {
        /// No `selector` field.
        Absent,
        /// `selector: {}`.
        Empty,
        /// `selector: {matchLabels: {app: x}}`.
        AppX,
        /// No selector, `targetRef` set.
        TargetRef,
    }

    /// The workloads every case is tried on: (namespace, has `app: x`).
    const ROOT_X: (&str, bool) = (ROOT, true);
    const SHOP_X: (&str, bool) = ("shop", true);
    const SHOP_PLAIN: (&str, bool) = ("shop", false);
    const OTHER_X: (&str, bool) = ("other", true);
    const OTHER_PLAIN: (&str, bool) = ("other", false);
    const ALL: [(&str, bool); 5] = [ROOT_X, SHOP_X, SHOP_PLAIN, OTHER_X, OTHER_PLAIN];

    fn applies(
        kind: PolicyKind,
        ns: &str,
        sel: Sel,
    ) -> Result<Vec<(&'static str, bool)>, Unscoped> {
        let selector = match sel {
            Sel::Absent | Sel::TargetRef => None,
            Sel::Empty => Some(WorkloadSelector::default()),
            Sel::AppX => Some(WorkloadSelector {
                match_labels: [("app".to_string(), "x".to_string())].into(),
            }),
        };
        let scope = Scope::of(
            kind,
            ns,
            selector.as_ref(),
            matches!(sel, Sel::TargetRef),
            ROOT,
        )?;
        Ok(ALL
            .into_iter()
            .filter(|(wns, x)| {
                let labels: Labels = if *x {
                    [("app".into(), "x".into())].into_iter().collect()
                } else {
                    Labels::new()
                };
                scope.applies_to(ns, "uid", wns, &labels)
            })
            .collect())
    }

    #[test]
    fn each_kind_applies_to_the_workloads_istio_attaches_it_to() {
        let everyone = Ok(ALL.to_vec());
        let shop = Ok(vec![SHOP_X, SHOP_PLAIN]);
        let app_x_everywhere = Ok(vec![ROOT_X, SHOP_X, OTHER_X]);
        let app_x_in_shop = Ok(vec![SHOP_X]);
        #[rustfmt::skip]
        let table = [
            // AuthorizationPolicy and RequestAuthentication share Istio's matcher.
            (Ap, ROOT, Sel::Absent, everyone.clone()),
            (Ap, ROOT, Sel::Empty, everyone.clone()),
            (Ap, ROOT, Sel::AppX, app_x_everywhere.clone()),
            (Ap, "shop", Sel::Absent, shop.clone()),
            (Ap, "shop", Sel::Empty, shop.clone()),
            (Ap, "shop", Sel::AppX, app_x_in_shop.clone()),
            (Ap, ROOT, Sel::TargetRef, Err(Unscoped::Targeted)),
            (Ap, "shop", Sel::TargetRef, Err(Unscoped::Targeted)),
            (Ra, ROOT, Sel::Absent, everyone.clone()),
            (Ra, ROOT, Sel::Empty, everyone.clone()),
            (Ra, ROOT, Sel::AppX, app_x_everywhere.clone()),
            (Ra, "shop", Sel::Absent, shop.clone()),
            (Ra, "shop", Sel::Empty, shop.clone()),
            (Ra, "shop", Sel::AppX, app_x_in_shop.clone()),
            (Ra, "shop", Sel::TargetRef, Err(Unscoped::Targeted)),
            // PeerAuthentication: a root-namespace selector is ignored.
            (Pa, ROOT, Sel::Absent, everyone.clone()),
            (Pa, ROOT, Sel::Empty, everyone.clone()),
            (Pa, ROOT, Sel::AppX, Err(Unscoped::RootSelector)),
            (Pa, "shop", Sel::Absent, shop.clone()),
            (Pa, "shop", Sel::Empty, shop.clone()),
            (Pa, "shop", Sel::AppX, app_x_in_shop.clone()),
        ];
        for (kind, ns, sel, want) in table {
            assert_eq!(
                applies(kind, ns, sel),
                want,
                "{kind:?} in {ns} with {sel:?}"
            );
        }
    }

    #[test]
    fn uids_chosen_by_the_control_plane_apply_to_those_workloads_only() {
        let scope = Scope::Uids(["a".to_string()].into());
        assert!(scope.applies_to("shop", "a", "other", &Labels::new()));
        assert!(!scope.applies_to("shop", "b", "shop", &Labels::new()));
    }
}
