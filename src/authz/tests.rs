//! Conformance tables derived from Istio's documented semantics (and ztunnel's where Istio's
//! docs are silent), parsed through the real mesh parser; PeerAuthentication resolution;
//! explain agreeing with check; compile-time warnings.

use super::*;
use crate::source::file::parse_mesh;

pub(super) const ROOT: &str = "istio-system";
/// `spiffe://cluster.local/ns/bar/sa/client`.
pub(super) const A: &str = "spiffe://cluster.local/ns/bar/sa/client";
/// `spiffe://cluster.local/ns/foo/sa/admin`.
pub(super) const B: &str = "spiffe://cluster.local/ns/foo/sa/admin";
/// Same namespace and account as [`A`], another trust domain.
const A_OTHER_TD: &str = "spiffe://other.td/ns/bar/sa/client";
pub(super) const DST_IP: &str = "10.1.0.10";
pub(super) const SRC_IP: &str = "10.2.0.20";

/// `(kind, namespace, name, spec as YAML flow)`; kind `AP` or `PA`.
pub(super) type Doc = (&'static str, &'static str, &'static str, &'static str);

/// The mesh file for a case: namespaces foo, bar and the root namespace (all ambient), the
/// destination pod `dst` (10.1.0.10 and fd00::10) and the policies.
fn mesh_yaml(dst_ns: &str, labels: &str, docs: &[Doc]) -> String {
    let mut y = String::new();
    for ns in ["foo", "bar", ROOT] {
        y.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n"
        ));
    }
    let labels = labels
        .split(',')
        .filter(|l| !l.is_empty())
        .map(|l| l.replace('=', ": "))
        .collect::<Vec<_>>()
        .join(", ");
    y.push_str(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: dst, namespace: {dst_ns}, labels: {{{labels}}}}}\nspec: {{serviceAccountName: web, nodeName: node-1}}\nstatus: {{podIP: {DST_IP}, podIPs: [{{ip: {DST_IP}}}, {{ip: \"fd00::10\"}}]}}\n"
    ));
    for (kind, ns, name, spec) in docs {
        let kind = match *kind {
            "AP" => "AuthorizationPolicy",
            "PA" => "PeerAuthentication",
            other => panic!("unknown kind {other}"),
        };
        y.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
        ));
    }
    y
}

pub(super) fn build(dst_ns: &str, labels: &str, docs: &[Doc]) -> (Mesh, Authz) {
    let text = mesh_yaml(dst_ns, labels, docs);
    let parsed = parse_mesh("case.yaml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let authz = Authz::new(&parsed.mesh, ROOT);
    (parsed.mesh, authz)
}

pub(super) fn identity(s: &str) -> Option<Identity> {
    (!s.is_empty()).then(|| s.parse().unwrap())
}

struct Case {
    name: &'static str,
    docs: &'static [Doc],
    /// Destination namespace and labels (`k=v,k=v`).
    dst: (&'static str, &'static str),
    /// Peer identity URI, or "" for plaintext.
    src: &'static str,
    src_ip: &'static str,
    dst_ip: &'static str,
    port: u16,
    /// `allow`, `allow ns/name`, `deny`, `deny ns/name`, `custom ns/name`.
    expect: &'static str,
    /// `ns/name` of the AUDIT policies expected to match.
    audits: &'static [&'static str],
}

const BASE: Case = Case {
    name: "",
    docs: &[],
    dst: ("foo", "app=web,version=v1"),
    src: A,
    src_ip: SRC_IP,
    dst_ip: DST_IP,
    port: 8080,
    expect: "allow",
    audits: &[],
};

pub(super) fn expected(expect: &str) -> Decision {
    let policy = |s: &str, action| {
        let (ns, name) = s.split_once('/').unwrap();
        PolicyRef {
            namespace: ns.into(),
            name: name.into(),
            action,
        }
    };
    match expect.split_once(' ') {
        None if expect == "allow" => Decision::Allow { by: None },
        None if expect == "deny" => Decision::Deny {
            by: None,
            reason: DenyReason::NotAllowed,
        },
        Some(("allow", p)) => Decision::Allow {
            by: Some(policy(p, Action::Allow)),
        },
        Some(("deny", p)) => Decision::Deny {
            by: Some(policy(p, Action::Deny)),
            reason: DenyReason::Denied,
        },
        Some(("custom", p)) => Decision::Deny {
            by: Some(policy(p, Action::Custom)),
            reason: DenyReason::CustomUnsupported,
        },
        _ => panic!("bad expectation {expect:?}"),
    }
}

const ALLOW_ALL: &str = "{rules: [{}]}";
const DENY_ALL: &str = "{action: DENY, rules: [{}]}";

/// Istio's AuthorizationPolicy semantics at L4, one connection per case.
#[rustfmt::skip]
const CASES: &[Case] = &[
    // --- nothing applies, empty forms ---
    Case { name: "no policy: allowed by default", ..BASE },
    Case { name: "spec {} (ALLOW without rules) applies and denies everything", docs: &[("AP", "foo", "deny-all", "{}")], expect: "deny", ..BASE },
    Case { name: "rules [{}] allows everything", docs: &[("AP", "foo", "allow-all", ALLOW_ALL)], expect: "allow foo/allow-all", ..BASE },
    Case { name: "rules [{}] allows plaintext too", docs: &[("AP", "foo", "allow-all", ALLOW_ALL)], src: "", expect: "allow foo/allow-all", ..BASE },
    Case { name: "a DENY without rules has no effect", docs: &[("AP", "foo", "d", "{action: DENY}")], expect: "allow", ..BASE },
    // --- scopes ---
    Case { name: "a policy in another namespace does not apply", docs: &[("AP", "bar", "deny-all", "{}")], expect: "allow", ..BASE },
    Case { name: "root namespace without selector applies mesh-wide (ALLOW nothing)", docs: &[("AP", ROOT, "deny-all", "{}")], expect: "deny", ..BASE },
    Case { name: "root namespace DENY applies mesh-wide", docs: &[("AP", ROOT, "d", DENY_ALL)], expect: "deny istio-system/d", ..BASE },
    Case { name: "namespace policy applies to every workload of its namespace", docs: &[("AP", "foo", "ns", "{rules: [{from: [{source: {namespaces: [bar]}}]}]}")], dst: ("foo", "app=other"), expect: "allow foo/ns", ..BASE },
    Case { name: "selector policy applies to a matching workload", docs: &[("AP", "foo", "d", "{selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]}")], expect: "deny foo/d", ..BASE },
    Case { name: "selector policy skips a workload without the label", docs: &[("AP", "foo", "d", "{selector: {matchLabels: {app: db}}, action: DENY, rules: [{}]}")], expect: "allow", ..BASE },
    Case { name: "selector needs every label", docs: &[("AP", "foo", "d", "{selector: {matchLabels: {app: web, version: v2}}, action: DENY, rules: [{}]}")], expect: "allow", ..BASE },
    Case { name: "selector with empty matchLabels selects the whole namespace", docs: &[("AP", "foo", "d", "{selector: {matchLabels: {}}, action: DENY, rules: [{}]}")], dst: ("foo", ""), expect: "deny foo/d", ..BASE },
    Case { name: "root namespace selector applies to matching workloads of every namespace", docs: &[("AP", ROOT, "d", "{selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]}")], dst: ("bar", "app=web"), expect: "deny istio-system/d", ..BASE },
    Case { name: "root namespace selector skips non-matching workloads", docs: &[("AP", ROOT, "d", "{selector: {matchLabels: {app: db}}, action: DENY, rules: [{}]}")], expect: "allow", ..BASE },
    Case { name: "selector policy of another namespace does not apply", docs: &[("AP", "bar", "d", "{selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]}")], expect: "allow", ..BASE },
    Case { name: "targetRefs policies are left to waypoints", docs: &[("AP", "foo", "wp", "{targetRefs: [{kind: Service, group: \"\", name: web}], action: DENY, rules: [{}]}")], expect: "allow", ..BASE },
    // --- actions and ordering ---
    Case { name: "DENY beats ALLOW", docs: &[("AP", "foo", "a", ALLOW_ALL), ("AP", "foo", "d", DENY_ALL)], expect: "deny foo/d", ..BASE },
    Case { name: "a DENY that does not match leaves the ALLOW to decide", docs: &[("AP", "foo", "a", ALLOW_ALL), ("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "once an ALLOW applies, no match means deny", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {principals: [\"cluster.local/ns/foo/sa/admin\"]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "a mesh-wide ALLOW counts for default deny", docs: &[("AP", ROOT, "a", "{rules: [{from: [{source: {namespaces: [foo]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "any ALLOW policy may match", docs: &[("AP", "foo", "a1", "{rules: [{from: [{source: {namespaces: [foo]}}]}]}"), ("AP", "foo", "a2", "{rules: [{from: [{source: {namespaces: [bar]}}]}]}")], expect: "allow foo/a2", ..BASE },
    Case { name: "mesh-wide DENY is reported before a namespace DENY", docs: &[("AP", "foo", "d", DENY_ALL), ("AP", ROOT, "d", DENY_ALL)], expect: "deny istio-system/d", ..BASE },
    Case { name: "AUDIT never blocks", docs: &[("AP", "foo", "audit", "{action: AUDIT, rules: [{}]}")], expect: "allow", audits: &["foo/audit"], ..BASE },
    Case { name: "AUDIT is reported even when denied", docs: &[("AP", "foo", "audit", "{action: AUDIT, rules: [{}]}"), ("AP", "foo", "d", DENY_ALL)], expect: "deny foo/d", audits: &["foo/audit"], ..BASE },
    Case { name: "AUDIT that does not match is not reported", docs: &[("AP", "foo", "audit", "{action: AUDIT, rules: [{to: [{operation: {ports: [\"9999\"]}}]}]}")], expect: "allow", ..BASE },
    Case { name: "AUDIT does not count as an ALLOW policy", docs: &[("AP", "foo", "audit", "{action: AUDIT, rules: [{}]}"), ("AP", "foo", "a", "{rules: [{to: [{operation: {ports: [\"9090\"]}}]}]}")], expect: "deny", audits: &["foo/audit"], ..BASE },
    Case { name: "a matching CUSTOM fails closed", docs: &[("AP", "foo", "c", "{action: CUSTOM, provider: {name: ext-authz}, rules: [{}]}")], expect: "custom foo/c", ..BASE },
    Case { name: "a CUSTOM that does not match lets the connection through", docs: &[("AP", "foo", "c", "{action: CUSTOM, provider: {name: ext-authz}, rules: [{to: [{operation: {ports: [\"9999\"]}}]}]}")], expect: "allow", ..BASE },
    Case { name: "CUSTOM is evaluated with the DENYs, before ALLOW", docs: &[("AP", "foo", "a", ALLOW_ALL), ("AP", "foo", "c", "{action: CUSTOM, provider: {name: ext}, rules: [{}]}")], expect: "custom foo/c", ..BASE },
    // --- principals ---
    Case { name: "principals: exact match", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {principals: [\"cluster.local/ns/bar/sa/client\"]}}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "principals: exact mismatch", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {principals: [\"cluster.local/ns/bar/sa/client\"]}}]}]}")], src: B, expect: "deny", ..BASE },
    Case { name: "principals: prefix", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {principals: [\"cluster.local/ns/bar/*\"]}}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "principals: suffix", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {principals: [\"*/sa/client\"]}}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "principals: * matches any mTLS peer", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {principals: [\"*\"]}}]}]}")], src: B, expect: "allow foo/a", ..BASE },
    Case { name: "principals: * does not match plaintext", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {principals: [\"*\"]}}]}]}")], src: "", expect: "deny", ..BASE },
    Case { name: "principals are written without spiffe://", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {principals: [\"spiffe://cluster.local/ns/bar/sa/client\"]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "a DENY principal written with spiffe:// denies no one", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {principals: [\"spiffe://cluster.local/ns/bar/sa/client\"]}}]}]}")], expect: "allow", ..BASE },
    Case { name: "a spiffe:// prefix match matches no one either", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {principals: [\"spiffe://cluster.local/*\"]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "principals include the trust domain", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {principals: [\"cluster.local/ns/bar/sa/client\"]}}]}]}")], src: A_OTHER_TD, expect: "deny", ..BASE },
    Case { name: "notPrincipals excludes the listed peer", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {notPrincipals: [\"cluster.local/ns/bar/sa/client\"]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "notPrincipals admits other peers", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {notPrincipals: [\"cluster.local/ns/bar/sa/client\"]}}]}]}")], src: B, expect: "allow foo/a", ..BASE },
    Case { name: "notPrincipals admits plaintext (no principal is not in the list)", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {notPrincipals: [\"cluster.local/ns/bar/sa/client\"]}}]}]}")], src: "", expect: "allow foo/a", ..BASE },
    Case { name: "DENY notPrincipals * refuses plaintext", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}")], src: "", expect: "deny foo/d", ..BASE },
    Case { name: "DENY notPrincipals * lets mTLS through", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}")], expect: "allow", ..BASE },
    // --- namespaces ---
    Case { name: "namespaces: match", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {namespaces: [bar]}}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "namespaces: mismatch", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {namespaces: [foo]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "namespaces: ignore the trust domain", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {namespaces: [bar]}}]}]}")], src: A_OTHER_TD, expect: "allow foo/a", ..BASE },
    Case { name: "namespaces: * does not match plaintext", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {namespaces: [\"*\"]}}]}]}")], src: "", expect: "deny", ..BASE },
    Case { name: "namespaces: prefix", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {namespaces: [\"ba*\"]}}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "notNamespaces excludes the listed namespace", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {notNamespaces: [bar]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "notNamespaces admits other namespaces", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {notNamespaces: [bar]}}]}]}")], src: B, expect: "allow foo/a", ..BASE },
    Case { name: "DENY notNamespaces matches plaintext (no namespace)", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {notNamespaces: [foo]}}]}]}")], src: "", expect: "deny foo/d", ..BASE },
    // --- source addresses ---
    Case { name: "ipBlocks: CIDR match", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {ipBlocks: [10.2.0.0/16]}}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "ipBlocks: single address", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {ipBlocks: [10.2.0.20]}}]}]}")], src: "", expect: "allow foo/a", ..BASE },
    Case { name: "ipBlocks: mismatch", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {ipBlocks: [10.3.0.0/16]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "notIpBlocks excludes the block", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {notIpBlocks: [10.2.0.0/16]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "DENY notIpBlocks denies outside the block", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {notIpBlocks: [10.0.0.0/8]}}]}]}")], src_ip: "192.168.1.5", expect: "deny foo/d", ..BASE },
    Case { name: "DENY notIpBlocks spares the block", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {notIpBlocks: [10.0.0.0/8]}}]}]}")], expect: "allow", ..BASE },
    Case { name: "ipBlocks: IPv6 CIDR match", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {ipBlocks: [\"fd00:2::/64\"]}}]}]}")], src_ip: "fd00:2::20", expect: "allow foo/a", ..BASE },
    Case { name: "ipBlocks: IPv6 CIDR mismatch", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {ipBlocks: [\"fd00:3::/64\"]}}]}]}")], src_ip: "fd00:2::20", expect: "deny", ..BASE },
    Case { name: "ipBlocks: an IPv4 block never matches IPv6", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {ipBlocks: [0.0.0.0/0]}}]}]}")], src_ip: "fd00:2::20", expect: "deny", ..BASE },
    Case { name: "ipBlocks: an IPv4-mapped IPv6 source matches the IPv4 block", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {ipBlocks: [10.2.0.0/16]}}]}]}")], src_ip: "::ffff:10.2.0.20", expect: "allow foo/a", ..BASE },
    Case { name: "remoteIpBlocks is an HTTP attribute in ambient: the ALLOW rule never matches", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {remoteIpBlocks: [10.2.0.0/16]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "notRemoteIpBlocks in a DENY is dropped: the DENY matches (fail closed)", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {notRemoteIpBlocks: [10.2.0.0/16]}}]}]}")], expect: "deny foo/d", ..BASE },
    // --- ports ---
    Case { name: "ports: match", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "ports: mismatch", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}")], port: 9090, expect: "deny", ..BASE },
    Case { name: "ports: any of the list", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {ports: [\"80\", 9090]}}]}]}")], port: 9090, expect: "allow foo/a", ..BASE },
    Case { name: "notPorts excludes the port", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {notPorts: [\"9090\"]}}]}]}")], port: 9090, expect: "deny", ..BASE },
    Case { name: "notPorts admits other ports", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {notPorts: [\"9090\"]}}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "DENY ports only denies those ports", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {ports: [\"22\"]}}]}]}")], expect: "allow", ..BASE },
    // --- L7 attributes ---
    Case { name: "ALLOW with methods never matches at L4", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {namespaces: [bar]}}], to: [{operation: {methods: [GET]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "an L7 rule does not spoil the policy's other rules", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [bar]}}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "DENY with paths is enforced on its L4 part (match)", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [bar]}}], to: [{operation: {paths: [\"/admin\"]}}]}]}")], expect: "deny foo/d", ..BASE },
    Case { name: "DENY with paths is enforced on its L4 part (no match)", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [bar]}}], to: [{operation: {paths: [\"/admin\"]}}]}]}")], src: B, expect: "allow", ..BASE },
    Case { name: "DENY with only HTTP attributes denies everything (fail closed)", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}")], expect: "deny foo/d", ..BASE },
    Case { name: "DENY notRequestPrincipals is dropped: denies everything", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {notRequestPrincipals: [\"*\"]}}]}]}")], expect: "deny foo/d", ..BASE },
    Case { name: "ALLOW requestPrincipals never matches", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "ALLOW when request.headers never matches", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.headers[x-user]\", values: [alice]}]}]}")], expect: "deny", ..BASE },
    Case { name: "DENY when request.auth.claims is dropped, the rest decides", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [foo]}}], when: [{key: \"request.auth.claims[group]\", values: [admin]}]}]}")], expect: "allow", ..BASE },
    Case { name: "connection.sni is not evaluated by ztunnel: ALLOW never matches", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: connection.sni, values: [web.foo]}]}]}")], expect: "deny", ..BASE },
    Case { name: "remote.ip is an HTTP attribute in ambient: ALLOW never matches", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: remote.ip, values: [10.2.0.20]}]}]}")], expect: "deny", ..BASE },
    // --- when ---
    Case { name: "when source.ip values", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: source.ip, values: [10.2.0.0/16]}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "when source.ip notValues", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: source.ip, notValues: [10.2.0.20]}]}]}")], expect: "deny", ..BASE },
    Case { name: "when source.namespace values", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: source.namespace, values: [bar]}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "when source.principal prefix", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: source.principal, values: [\"cluster.local/ns/bar/*\"]}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "when source.principal does not match plaintext", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: source.principal, values: [\"*\"]}]}]}")], src: "", expect: "deny", ..BASE },
    Case { name: "when source.principal notValues admits plaintext", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: source.principal, notValues: [\"cluster.local/ns/bar/sa/client\"]}]}]}")], src: "", expect: "allow foo/a", ..BASE },
    Case { name: "when destination.ip values", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: destination.ip, values: [10.1.0.0/24]}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "when destination.ip IPv6", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: destination.ip, values: [\"fd00::/112\"]}]}]}")], dst_ip: "fd00::10", src_ip: "fd00:2::20", expect: "allow foo/a", ..BASE },
    Case { name: "when destination.port notValues", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: destination.port, notValues: [\"8080\"]}]}]}")], expect: "deny", ..BASE },
    Case { name: "when destination.port values", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: destination.port, values: [\"8080\"]}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "when values and notValues both apply", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: source.ip, values: [10.2.0.0/16], notValues: [10.2.0.20]}]}]}")], expect: "deny", ..BASE },
    Case { name: "every when condition must hold", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: source.namespace, values: [bar]}, {key: destination.port, values: [\"9090\"]}]}]}")], expect: "deny", ..BASE },
    Case { name: "an unparsable when value makes an ALLOW rule never match", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: source.ip, values: [10.2.0.20, not-an-ip]}]}]}")], expect: "deny", ..BASE },
    Case { name: "an unparsable when value is dropped from a DENY (fail closed)", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{when: [{key: destination.port, values: [http]}]}]}")], expect: "deny foo/d", ..BASE },
    // --- rule structure ---
    Case { name: "from entries are alternatives", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {namespaces: [x]}}, {source: {ipBlocks: [10.2.0.0/16]}}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "every field of a source must match", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {namespaces: [bar], ipBlocks: [10.9.0.0/16]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "from and to must both match", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {namespaces: [bar]}}], to: [{operation: {ports: [\"9090\"]}}]}]}")], expect: "deny", ..BASE },
    Case { name: "rules are alternatives", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {ports: [\"9090\"]}}]}, {from: [{source: {namespaces: [bar]}}]}]}")], expect: "allow foo/a", ..BASE },
    Case { name: "an empty source never matches in an ALLOW (Istio refuses it)", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {}}]}]}")], expect: "deny", ..BASE },
    Case { name: "the destination's other namespace policies do not leak", docs: &[("AP", "bar", "a", ALLOW_ALL), ("AP", "foo", "d", "{}")], dst: ("foo", "app=web"), expect: "deny", ..BASE },
];

fn run_case(c: &Case) {
    let (mesh, authz) = build(c.dst.0, c.dst.1, c.docs);
    let dst = first(&mesh);
    let id = identity(c.src);
    let conn = Connection {
        src_ip: c.src_ip.parse().unwrap(),
        src_identity: id.as_ref(),
        dst,
        dst_ip: c.dst_ip.parse().unwrap(),
        dst_port: c.port,
    };
    let verdict = authz.check(&conn);
    assert_eq!(verdict.decision, expected(c.expect), "{}", c.name);
    let audits: Vec<String> = verdict
        .audits
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    assert_eq!(audits, c.audits, "{}: audits", c.name);

    // explain agrees with check.
    let e = authz.explain(&conn);
    assert_eq!(
        e.decision, verdict.decision,
        "{}: explain disagrees",
        c.name
    );
    assert_eq!(e.audits, verdict.audits, "{}: explain audits", c.name);
    assert_eq!(e.summary, verdict.decision.to_string());
    if let Some(p) = verdict.decision.policy() {
        let pe = e.policies.iter().find(|x| &x.policy == p).unwrap();
        assert!(pe.matched, "{}: deciding policy not marked matched", c.name);
    }
    serde_json::to_string(&e).unwrap();

    // A workload the index was not built with takes the slow path to the same answer.
    let mut stranger = crate::model::Workload::clone(dst);
    stranger.uid = "Kubernetes//Pod/elsewhere/x".into();
    let conn2 = Connection {
        dst: &stranger,
        ..conn
    };
    assert_eq!(
        authz.check(&conn2),
        verdict,
        "{}: unindexed workload",
        c.name
    );
}

/// The first workload of a test mesh.
pub(super) fn first(mesh: &Mesh) -> &Workload {
    mesh.workloads
        .values()
        .next()
        .expect("the test mesh has a workload")
}

/// A connection from `SRC_IP` (with identity `id`) to `dst` at `DST_IP:port`.
pub(super) fn conn_to<'a>(
    dst: &'a Workload,
    id: &'a Option<Identity>,
    port: u16,
) -> Connection<'a> {
    Connection {
        src_ip: SRC_IP.parse().unwrap(),
        src_identity: id.as_ref(),
        dst,
        dst_ip: DST_IP.parse().unwrap(),
        dst_port: port,
    }
}

#[test]
fn conformance_table_follows_istio_semantics() {
    assert!(CASES.len() >= 60, "{} cases", CASES.len());
    let mut names = std::collections::HashSet::new();
    for c in CASES {
        assert!(names.insert(c.name), "duplicate case name {}", c.name);
        run_case(c);
    }
}

#[test]
fn explain_names_each_failing_field() {
    let (mesh, authz) = build(
        "foo",
        "app=web",
        &[(
            "AP",
            "foo",
            "a",
            "{rules: [{from: [{source: {principals: [\"cluster.local/ns/foo/sa/admin\"]}}]}, {to: [{operation: {methods: [GET]}}]}]}",
        )],
    );
    let id = identity(A);
    let conn = conn_to(first(&mesh), &id, 8080);
    let e = authz.explain(&conn);
    assert_eq!(e.policies.len(), 1);
    let rules = &e.policies[0].rules;
    assert_eq!(
        rules[0].details,
        ["from[0].source.principals: no match: cluster.local/ns/bar/sa/client not in [cluster.local/ns/foo/sa/admin]"]
    );
    assert!(
        rules[1].details[0].starts_with("never matches at L4: uses L7 attributes (methods)"),
        "{:?}",
        rules[1].details
    );
    assert_eq!(
        e.summary,
        "denied: ALLOW policies apply and none matched (default deny)"
    );
    assert_eq!(e.mtls.mode, MtlsMode::Permissive);
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["decision"]["result"], "deny");
    assert_eq!(json["decision"]["reason"], "notAllowed");
}

#[test]
fn explain_notes_plaintext_refused_under_strict() {
    let (mesh, authz) = build(
        "foo",
        "app=web",
        &[("PA", ROOT, "default", "{mtls: {mode: STRICT}}")],
    );
    let conn = conn_to(first(&mesh), &None, 8080);
    let e = authz.explain(&conn);
    assert_eq!(e.mtls.mode, MtlsMode::Strict);
    assert_eq!(e.mtls.level, MtlsLevel::Mesh);
    assert!(e
        .mtls_note
        .unwrap()
        .contains("PeerAuthentication istio-system/default"));
}

// === PeerAuthentication ===

struct PaCase {
    name: &'static str,
    docs: &'static [Doc],
    labels: &'static str,
    port: u16,
    mode: MtlsMode,
    level: MtlsLevel,
    /// `ns/name` of the deciding policy, "" for the default.
    policy: &'static str,
}

const PA_BASE: PaCase = PaCase {
    name: "",
    docs: &[],
    labels: "app=web",
    port: 8080,
    mode: MtlsMode::Permissive,
    level: MtlsLevel::Default,
    policy: "",
};

const STRICT: &str = "{mtls: {mode: STRICT}}";
const PERMISSIVE: &str = "{mtls: {mode: PERMISSIVE}}";

#[rustfmt::skip]
const PA_CASES: &[PaCase] = &[
    PaCase { name: "no policy: PERMISSIVE by default", ..PA_BASE },
    PaCase { name: "mesh STRICT", docs: &[("PA", ROOT, "default", STRICT)], mode: MtlsMode::Strict, level: MtlsLevel::Mesh, policy: "istio-system/default", ..PA_BASE },
    PaCase { name: "mesh DISABLE", docs: &[("PA", ROOT, "default", "{mtls: {mode: DISABLE}}")], mode: MtlsMode::Disable, level: MtlsLevel::Mesh, policy: "istio-system/default", ..PA_BASE },
    PaCase { name: "mesh UNSET is the default", docs: &[("PA", ROOT, "default", "{mtls: {mode: UNSET}}")], ..PA_BASE },
    PaCase { name: "namespace overrides mesh", docs: &[("PA", ROOT, "default", STRICT), ("PA", "foo", "ns", PERMISSIVE)], mode: MtlsMode::Permissive, level: MtlsLevel::Namespace, policy: "foo/ns", ..PA_BASE },
    PaCase { name: "namespace UNSET inherits from mesh", docs: &[("PA", ROOT, "default", STRICT), ("PA", "foo", "ns", "{}")], mode: MtlsMode::Strict, level: MtlsLevel::Mesh, policy: "istio-system/default", ..PA_BASE },
    PaCase { name: "another namespace's policy does not apply", docs: &[("PA", "bar", "ns", STRICT)], ..PA_BASE },
    PaCase { name: "workload overrides namespace", docs: &[("PA", "foo", "ns", STRICT), ("PA", "foo", "wl", "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}")], mode: MtlsMode::Disable, level: MtlsLevel::Workload, policy: "foo/wl", ..PA_BASE },
    PaCase { name: "workload UNSET inherits from namespace", docs: &[("PA", "foo", "ns", STRICT), ("PA", "foo", "wl", "{selector: {matchLabels: {app: web}}, mtls: {mode: UNSET}}")], mode: MtlsMode::Strict, level: MtlsLevel::Namespace, policy: "foo/ns", ..PA_BASE },
    PaCase { name: "workload selector that does not match falls back", docs: &[("PA", "foo", "ns", PERMISSIVE), ("PA", "foo", "wl", "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}")], mode: MtlsMode::Permissive, level: MtlsLevel::Namespace, policy: "foo/ns", ..PA_BASE },
    PaCase { name: "port-level overrides for its port", docs: &[("PA", "foo", "ns", STRICT), ("PA", "foo", "wl", "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: PERMISSIVE}}}")], mode: MtlsMode::Permissive, level: MtlsLevel::Port, policy: "foo/wl", ..PA_BASE },
    PaCase { name: "port-level leaves other ports to the wider scope", docs: &[("PA", "foo", "ns", STRICT), ("PA", "foo", "wl", "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: PERMISSIVE}}}")], port: 9090, mode: MtlsMode::Strict, level: MtlsLevel::Namespace, policy: "foo/ns", ..PA_BASE },
    PaCase { name: "port-level DISABLE under a workload STRICT", docs: &[("PA", "foo", "wl", "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {\"9090\": {mode: DISABLE}}}")], port: 9090, mode: MtlsMode::Disable, level: MtlsLevel::Port, policy: "foo/wl", ..PA_BASE },
    PaCase { name: "workload STRICT on the ports port-level does not list", docs: &[("PA", "foo", "wl", "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {\"9090\": {mode: DISABLE}}}")], mode: MtlsMode::Strict, level: MtlsLevel::Workload, policy: "foo/wl", ..PA_BASE },
    PaCase { name: "port-level UNSET inherits the workload mode", docs: &[("PA", "foo", "wl", "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {8080: {mode: UNSET}}}")], mode: MtlsMode::Permissive, level: MtlsLevel::Workload, policy: "foo/wl", ..PA_BASE },
    PaCase { name: "port-level in a namespace policy is ignored", docs: &[("PA", "foo", "ns", "{mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}")], mode: MtlsMode::Strict, level: MtlsLevel::Namespace, policy: "foo/ns", ..PA_BASE },
    PaCase { name: "a root-namespace selector policy is ignored", docs: &[("PA", ROOT, "wl", "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}")], ..PA_BASE },
    PaCase { name: "empty matchLabels is namespace-wide", docs: &[("PA", "foo", "ns", "{selector: {matchLabels: {}}, mtls: {mode: STRICT}}")], mode: MtlsMode::Strict, level: MtlsLevel::Namespace, policy: "foo/ns", ..PA_BASE },
    PaCase { name: "two namespace policies: the first by name wins", docs: &[("PA", "foo", "b", STRICT), ("PA", "foo", "a", PERMISSIVE)], mode: MtlsMode::Permissive, level: MtlsLevel::Namespace, policy: "foo/a", ..PA_BASE },
    PaCase { name: "two workload policies: the first by name wins", docs: &[("PA", "foo", "z", "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}"), ("PA", "foo", "m", "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}")], mode: MtlsMode::Disable, level: MtlsLevel::Workload, policy: "foo/m", ..PA_BASE },
];

#[test]
fn peer_authentication_resolves_narrowest_scope_first() {
    for c in PA_CASES {
        let (mesh, authz) = build("foo", c.labels, c.docs);
        let w = first(&mesh);
        let d = authz.mtls(w, c.port);
        assert_eq!((d.mode, d.level), (c.mode, c.level), "{}", c.name);
        let policy = d
            .policy
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .unwrap_or_default();
        assert_eq!(policy, c.policy, "{}", c.name);
        assert_eq!(authz.mtls_mode(w, c.port), c.mode, "{}", c.name);
    }
}

#[test]
fn ignored_peer_authentications_are_warned_about() {
    let (_, authz) = build(
        "foo",
        "app=web",
        &[
            (
                "PA",
                ROOT,
                "wl",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
            ),
            (
                "PA",
                "foo",
                "ns",
                "{mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}",
            ),
            ("PA", "foo", "ns2", STRICT),
            (
                "PA",
                "foo",
                "w1",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
            ),
            (
                "PA",
                "foo",
                "w2",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
            ),
        ],
    );
    let w = authz.warnings().join("\n");
    for needle in [
        "PeerAuthentication istio-system/wl: ignored: a PeerAuthentication with a selector in the root namespace",
        "PeerAuthentication foo/ns: portLevelMtls ignored",
        "PeerAuthentication foo/ns2: ignored: foo/ns is also namespace-wide",
        "PeerAuthentication foo/w2: ignored for the workloads foo/w1 also selects",
    ] {
        assert!(w.contains(needle), "missing {needle:?} in\n{w}");
    }
}

// === compile-time warnings, needs_l7 ===

#[test]
fn each_policy_with_l7_attributes_is_named_once() {
    let (mesh, authz) = build(
        "foo",
        "app=web",
        &[
            ("AP", "foo", "a", "{rules: [{to: [{operation: {methods: [GET], paths: [\"/x\"]}}]}, {when: [{key: \"request.headers[x]\", values: [y]}]}]}"),
            ("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {remoteIpBlocks: [1.2.3.4]}}]}]}"),
            ("AP", "foo", "c", "{action: CUSTOM, provider: {name: ext}, rules: [{}]}"),
            ("AP", "foo", "t", "{targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: wp}}"),
            ("AP", "foo", "bad", "{rules: [{when: [{key: destination.port, values: [http]}]}]}"),
            ("AP", "bar", "plain", "{rules: [{from: [{source: {namespaces: [foo]}}]}]}"),
        ],
    );
    let w = authz.warnings();
    let about = |name: &str| w.iter().filter(|l| l.starts_with(name)).count();
    assert_eq!(about("AuthorizationPolicy foo/a:"), 1, "{w:#?}");
    assert!(w.iter().any(|l| l.starts_with("AuthorizationPolicy foo/a: uses attributes only a waypoint (L7) can evaluate (rule 0: methods, paths; rule 1: request.headers[x]); traffic to the workloads it applies to goes through weft's waypoint")));
    assert!(w.iter().any(|l| l.starts_with("AuthorizationPolicy foo/d:")
        && l.contains("remoteIpBlocks")
        && l.contains("L4 part only")));
    assert!(w
        .iter()
        .any(|l| l.starts_with("AuthorizationPolicy foo/c: CUSTOM action (provider \"ext\")")));
    assert!(w
        .iter()
        .any(|l| l.starts_with("AuthorizationPolicy foo/t: ignored at L4")));
    assert!(w
        .iter()
        .any(|l| l.starts_with("AuthorizationPolicy foo/bad:")
            && l.contains("\"http\" is not a valid value")));
    assert_eq!(about("AuthorizationPolicy bar/plain:"), 0);

    let web = first(&mesh);
    assert!(authz.needs_l7(web));
    let (mesh, authz) = build(
        "foo",
        "app=web",
        &[(
            "AP",
            "bar",
            "a",
            "{rules: [{to: [{operation: {methods: [GET]}}]}]}",
        )],
    );
    assert!(
        !authz.needs_l7(first(&mesh)),
        "bar's policy does not apply to foo"
    );
}

// === lint ===

#[test]
fn lint_flags_risky_policy() {
    let (mesh, _) = build(
        "foo",
        "app=web",
        &[
            ("PA", "foo", "perm", PERMISSIVE),
            ("PA", "foo", "wl", "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: DISABLE}}}"),
            ("AP", "foo", "open", ALLOW_ALL),
            ("AP", "foo", "any-peer", "{rules: [{from: [{source: {principals: [\"*\"]}}]}]}"),
            ("AP", "foo", "everyone", "{rules: [{from: [{source: {ipBlocks: [0.0.0.0/0, \"::/0\"]}}]}]}"),
            ("AP", "foo", "never-ns", "{action: DENY, rules: [{from: [{source: {namespaces: [bar], notNamespaces: [bar]}}]}]}"),
            ("AP", "foo", "never-port", "{action: DENY, rules: [{to: [{operation: {ports: [\"22\"], notPorts: [\"22\"]}}]}]}"),
            ("AP", "foo", "never-when", "{action: DENY, rules: [{from: [{source: {namespaces: [a]}}], when: [{key: source.namespace, values: [b]}]}]}"),
            ("AP", "foo", "never-principal", "{action: DENY, rules: [{from: [{source: {principals: [\"cluster.local/ns/a/sa/x\"], namespaces: [b]}}]}]}"),
            ("AP", "foo", "maybe", "{action: DENY, rules: [{from: [{source: {namespaces: [\"a*\"], notNamespaces: [ab]}}]}]}"),
            ("AP", "bar", "deny-all", DENY_ALL),
            ("AP", "bar", "shadowed", "{selector: {matchLabels: {app: web}}, rules: [{from: [{source: {namespaces: [foo]}}]}]}"),
            ("AP", "bar", "l7", "{rules: [{to: [{operation: {paths: [\"/x\"]}}]}]}"),
        ],
    );
    let l = lint(&mesh, &LintContext::default());
    let has = |needle: &str| {
        assert!(
            l.iter().any(|x| x.contains(needle)),
            "missing {needle:?} in\n{l:#?}"
        );
    };
    has("no mesh-wide PeerAuthentication (namespace istio-system, no selector) sets an mTLS mode");
    has("PeerAuthentication foo/perm: mTLS mode PERMISSIVE: plaintext connections are accepted (namespace foo)");
    has("PeerAuthentication foo/wl: port 9090: mTLS mode DISABLE");
    has("AuthorizationPolicy foo/open: rule 0 matches every connection");
    has("AuthorizationPolicy foo/any-peer: rule 0 allows any mTLS peer");
    has("AuthorizationPolicy foo/everyone: rule 0 matches every connection");
    has("AuthorizationPolicy foo/never-ns: rule 0 can never match (every value of from[0].source.namespaces is excluded by from[0].source.notNamespaces)");
    has("AuthorizationPolicy foo/never-port: rule 0 can never match");
    has("AuthorizationPolicy foo/never-when: rule 0 can never match (from[0].source.namespaces and when[0](source.namespace).values share no value)");
    has("AuthorizationPolicy foo/never-principal: rule 0 can never match (the namespaces of from[0].source.principals are not in from[0].source.namespaces)");
    has("AuthorizationPolicy bar/shadowed: fully shadowed by DENY bar/deny-all");
    has("AuthorizationPolicy bar/l7: uses attributes only a waypoint (L7) can evaluate");
    assert!(!l.iter().any(|x| x.contains("foo/maybe")), "{l:#?}");
    assert!(!l
        .iter()
        .any(|x| x.contains("PeerAuthentication foo/wl: mTLS mode STRICT")));

    // A mesh-wide STRICT silences the default warning.
    let (mesh, _) = build("foo", "app=web", &[("PA", ROOT, "default", STRICT)]);
    let l = lint(&mesh, &LintContext::default());
    assert!(l.is_empty(), "{l:#?}");
}

#[test]
fn authz_can_be_shared_across_tasks() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<Authz>();
}

#[test]
fn a_decision_with_many_policies_reads_only_the_destinations_own_from_the_index() {
    // 1,000 policies over 100 namespaces; the destination is selected by one of them. The
    // per-connection path must stay an index lookup of that one, not a walk over the rest
    // (what a decision costs is measured in the bench, `policy decision, 1000 policies`).
    let mut docs = String::new();
    for n in 0..100 {
        docs.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}}}\n"
        ));
        for p in 0..10 {
            docs.push_str(&format!(
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{p}, namespace: ns{n}}}\nspec: {{selector: {{matchLabels: {{app: a{p}}}}}, action: {}, rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/x/sa/{p}\"]}}}}], to: [{{operation: {{ports: [\"{}\"]}}}}]}}]}}\n",
                if p % 3 == 0 { "DENY" } else { "ALLOW" },
                8000 + p
            ));
        }
    }
    docs.push_str("---\napiVersion: v1\nkind: Pod\nmetadata: {name: dst, namespace: ns7, labels: {app: a1}}\nstatus: {podIP: 10.1.0.10}\n");
    let mesh = parse_mesh("big.yaml", &docs).unwrap().mesh;
    let authz = Authz::new(&mesh, ROOT);
    let dst = first(&mesh);
    let applicable = authz.lookup(dst);
    assert!(
        matches!(applicable, Cow::Borrowed(_)),
        "computed per connection instead of read from the index"
    );
    let names = |ids: &[u32]| -> Vec<String> {
        ids.iter()
            .map(|&i| {
                let r = &authz.policies[i as usize].reference;
                format!("{}/{}", r.namespace, r.name)
            })
            .collect()
    };
    assert_eq!(names(&applicable.allow), ["ns7/p1"]);
    assert!(applicable.deny.is_empty() && applicable.audit.is_empty());
    // And the decision is that policy's: its principal on its port, nobody else.
    let decide = |who: &str, port: u16| {
        let id = Some(who.parse().unwrap());
        authz.check(&conn_to(dst, &id, port)).decision.is_allow()
    };
    assert!(decide("spiffe://cluster.local/ns/x/sa/1", 8001));
    assert!(!decide("spiffe://cluster.local/ns/x/sa/1", 8002));
    assert!(!decide("spiffe://cluster.local/ns/x/sa/2", 8001));
    assert!(!decide(A, 8001));
}

#[test]
fn control_plane_scopes_and_dry_run_are_honoured() {
    use crate::model::policy::PolicyScope;
    // A DENY-all written in namespace foo, re-scoped the ways istiod sends policies.
    let (mut mesh, _) = build(
        "foo",
        "app=web",
        &[("AP", "foo", "deny-all", "{action: DENY, rules: [{}]}")],
    );
    let dst = first(&mesh).clone();
    let a = identity(A);
    let conn = |dst, a| conn_to(dst, a, 80);
    let set = |mesh: &mut Mesh, scope: PolicyScope, dry_run: bool| {
        if let Policy::AuthorizationPolicy(p) = &mut mesh.policies[0] {
            p.spec.scope = scope;
            p.spec.dry_run = dry_run;
        }
    };
    // Selected by uid: applies to exactly that workload, whatever its labels.
    set(
        &mut mesh,
        PolicyScope::Workloads([dst.uid.to_string()].into()),
        false,
    );
    assert!(!Authz::new(&mesh, ROOT)
        .check(&conn(&dst, &a))
        .decision
        .is_allow());
    set(
        &mut mesh,
        PolicyScope::Workloads(["Kubernetes//Pod/foo/other".to_string()].into()),
        false,
    );
    assert!(Authz::new(&mesh, ROOT)
        .check(&conn(&dst, &a))
        .decision
        .is_allow());
    // Namespace and mesh scope.
    set(&mut mesh, PolicyScope::Namespace, false);
    assert!(!Authz::new(&mesh, ROOT)
        .check(&conn(&dst, &a))
        .decision
        .is_allow());
    let mut other_ns = crate::model::Workload::clone(&dst);
    other_ns.namespace = "bar".into();
    other_ns.uid = "Kubernetes//Pod/bar/dst".into();
    assert!(Authz::new(&mesh, ROOT)
        .check(&conn(&other_ns, &a))
        .decision
        .is_allow());
    set(&mut mesh, PolicyScope::Mesh, false);
    assert!(!Authz::new(&mesh, ROOT)
        .check(&conn(&other_ns, &a))
        .decision
        .is_allow());
    // Dry run: reported as an audit, never enforced.
    set(&mut mesh, PolicyScope::Mesh, true);
    let authz = Authz::new(&mesh, ROOT);
    let v = authz.check(&conn(&dst, &a));
    assert!(v.decision.is_allow());
    assert_eq!(v.audits.len(), 1);
    assert!(
        authz.warnings().iter().any(|w| w.contains("dry-run")),
        "{:?}",
        authz.warnings()
    );
}
