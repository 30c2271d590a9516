//! [`Authz::explain`]: the decision for one connection (and, through `http`,
//! [`Authz::explain_http`] for one request) with the reasons, policy by policy and rule by
//! rule, for `weft ctl explain` and `/debug/explain`.
//!
//! It runs the same evaluator as [`Authz::check`] in its recording mode, which evaluates every
//! rule instead of stopping at the first answer, and derives the decision from those results by
//! the same ordering; a test holds the two to the same answer on every conformance case.

use serde::Serialize;

use super::compile::{eval_rule, Peer, Record};
use super::{
    Action, Authz, Connection, Decision, MtlsDecision, MtlsMode, PolicyRef, RequestExplanation,
};

/// Why a connection is allowed or denied.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// The decision, exactly as [`Authz::check`] gives it.
    pub decision: Decision,
    /// The decision in words, naming the deciding policy or the default.
    pub summary: String,
    /// AUDIT policies that matched.
    pub audits: Vec<PolicyRef>,
    /// The effective mTLS mode for the destination port and the PeerAuthentication that set it.
    pub mtls: MtlsDecision,
    /// Set when the connection is plaintext and the mode is STRICT: the proxy refuses it before
    /// authorization is consulted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls_note: Option<String>,
    /// Every AuthorizationPolicy that applies to the destination, in evaluation order (DENY and
    /// CUSTOM, then AUDIT, then ALLOW); empty when an HTTP request was refused before policy.
    pub policies: Vec<PolicyExplanation>,
    /// The HTTP request, for [`Authz::explain_http`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestExplanation>,
}

/// One applicable AuthorizationPolicy and whether it matched.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyExplanation {
    /// The policy.
    pub policy: PolicyRef,
    /// Where it applies, in words (mesh-wide, namespace, selector).
    pub scope: String,
    /// Whether any of its rules matched.
    pub matched: bool,
    /// Each rule's outcome (none: the policy has no rules and matches nothing).
    pub rules: Vec<RuleExplanation>,
}

/// One rule's outcome.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleExplanation {
    /// Its index in `spec.rules`.
    pub index: usize,
    /// Whether it matched.
    pub matched: bool,
    /// Each test, e.g. `from[0].source.principals: no match: cluster.local/ns/a/sa/x not in
    /// [cluster.local/ns/b/sa/y]`.
    pub details: Vec<String>,
}

impl Authz {
    /// Explains the decision [`Authz::check`] makes for `conn`.
    pub fn explain(&self, conn: &Connection<'_>) -> Explanation {
        let peer = Peer::new(conn.src_identity, conn.src_ip, conn.dst_ip, conn.dst_port);
        self.explain_peer(conn, &peer, None)
    }

    /// The explanation for `peer` (at L4, or at L7 when it carries a request).
    pub(crate) fn explain_peer(
        &self,
        conn: &Connection<'_>,
        peer: &Peer<'_>,
        request: Option<RequestExplanation>,
    ) -> Explanation {
        let app = self.lookup(conn.dst);
        let order = app.deny.iter().chain(&app.audit).chain(&app.allow);
        let mut policies = Vec::new();
        let mut matched_policies = Vec::new();
        for &i in order {
            let p = &self.policies[i as usize];
            let rules: Vec<RuleExplanation> = p
                .rules_at(peer.layer())
                .iter()
                .enumerate()
                .map(|(index, r)| {
                    let mut rec = Record::default();
                    let matched = eval_rule(r, peer, &mut rec);
                    RuleExplanation {
                        index,
                        matched,
                        details: rec.0,
                    }
                })
                .collect();
            let matched = rules.iter().any(|r| r.matched);
            if matched {
                matched_policies.push(i);
            }
            policies.push(PolicyExplanation {
                policy: p.reference.clone(),
                scope: p.describe_scope(),
                matched,
                rules,
            });
        }
        let matched_ref = |p: &super::CompiledPolicy| {
            matched_policies
                .iter()
                .any(|&i| std::ptr::eq(&self.policies[i as usize], p))
        };
        let decision = self.decide(&app, matched_ref);
        let audits = policies
            .iter()
            .filter(|e| e.matched && e.policy.action == Action::Audit)
            .map(|e| e.policy.clone())
            .collect();
        self.explanation(conn, decision, audits, policies, request)
    }

    /// The explanation for a request refused before any policy was evaluated.
    pub(crate) fn explain_refused(
        &self,
        conn: &Connection<'_>,
        decision: Decision,
        request: RequestExplanation,
    ) -> Explanation {
        self.explanation(conn, decision, Vec::new(), Vec::new(), Some(request))
    }

    fn explanation(
        &self,
        conn: &Connection<'_>,
        decision: Decision,
        audits: Vec<PolicyRef>,
        policies: Vec<PolicyExplanation>,
        request: Option<RequestExplanation>,
    ) -> Explanation {
        let mtls = self.mtls(conn.dst, conn.dst_port);
        let mtls_note = (conn.src_identity.is_none() && mtls.mode == MtlsMode::Strict).then(|| {
            let by = mtls
                .policy
                .as_ref()
                .map(|p| format!(" (PeerAuthentication {}/{})", p.namespace, p.name))
                .unwrap_or_default();
            format!("plaintext connection to a STRICT port{by}: refused before authorization")
        });
        Explanation {
            summary: decision.to_string(),
            decision,
            audits,
            mtls,
            mtls_note,
            policies,
            request,
        }
    }
}
