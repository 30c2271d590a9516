//! The L7 conformance table: Istio's AuthorizationPolicy semantics for HTTP requests at the
//! waypoint, parsed through the real mesh parser, with `explain_http` held to `check_http`.

use ::http::{HeaderMap, HeaderName, HeaderValue};

use super::tests::{build, conn_to, expected, first, identity, Doc, A, B, DST_IP, ROOT, SRC_IP};
use super::*;

/// The JWT a case carries: `""` none, `alice` or `bob`.
fn jwt(name: &str) -> Option<RequestAuth> {
    let (sub, audiences, presenter, extra) = match name {
        "" => return None,
        "alice" => (
            "alice",
            vec!["web".to_string(), "api".to_string()],
            Some("cli".to_string()),
            serde_json::json!({
                "groups": ["dev", "admin"],
                "org": {"team": "payments", "level": 3},
            }),
        ),
        "bob" => (
            "bob",
            vec!["web".to_string()],
            None,
            serde_json::json!({"groups": "dev", "org": {"team": "search"}}),
        ),
        other => panic!("unknown JWT {other}"),
    };
    let mut claims = extra;
    claims["iss"] = "https://idp.example.com".into();
    claims["sub"] = sub.into();
    Some(RequestAuth {
        principal: format!("https://idp.example.com/{sub}"),
        audiences,
        presenter,
        claims,
    })
}

struct HttpCase {
    name: &'static str,
    docs: &'static [Doc],
    /// Peer identity URI, or "" for plaintext.
    src: &'static str,
    src_ip: &'static str,
    port: u16,
    method: &'static str,
    host: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// `""`, `alice` or `bob`.
    jwt: &'static str,
    /// As in the L4 table, plus `bad` for a request refused with 400.
    expect: &'static str,
    audits: &'static [&'static str],
}

const BASE: HttpCase = HttpCase {
    name: "",
    docs: &[],
    src: A,
    src_ip: SRC_IP,
    port: 8080,
    method: "GET",
    host: "web.foo.svc.cluster.local",
    path: "/",
    headers: &[],
    jwt: "",
    expect: "allow",
    audits: &[],
};

const ALLOW_ALL: &str = "{rules: [{}]}";

#[rustfmt::skip]
const HTTP_CASES: &[HttpCase] = &[
    // --- hosts ---
    HttpCase { name: "hosts: exact match", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {hosts: [web.foo.svc.cluster.local]}}]}]}")], expect: "allow foo/a", ..BASE },
    HttpCase { name: "hosts: case-insensitive", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {hosts: [Web.Foo.svc.cluster.local]}}]}]}")], host: "WEB.foo.svc.cluster.local", expect: "allow foo/a", ..BASE },
    HttpCase { name: "hosts: a host without port does not match a Host header with one", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {hosts: [web.foo.svc.cluster.local]}}]}]}")], host: "web.foo.svc.cluster.local:8080", expect: "deny", ..BASE },
    HttpCase { name: "hosts: host:* matches any port", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {hosts: [\"web.foo.svc.cluster.local:*\"]}}]}]}")], host: "web.foo.svc.cluster.local:8080", expect: "allow foo/a", ..BASE },
    HttpCase { name: "hosts: suffix", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {hosts: [\"*.foo.svc.cluster.local\"]}}]}]}")], expect: "allow foo/a", ..BASE },
    HttpCase { name: "hosts: prefix mismatch", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {hosts: [\"api.*\"]}}]}]}")], expect: "deny", ..BASE },
    HttpCase { name: "DENY notHosts denies other hosts", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {notHosts: [web.foo.svc.cluster.local]}}]}]}")], host: "evil.example.com", expect: "deny foo/d", ..BASE },
    HttpCase { name: "DENY notHosts spares the listed host", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {notHosts: [web.foo.svc.cluster.local]}}]}]}")], expect: "allow", ..BASE },
    // --- methods ---
    HttpCase { name: "methods: match", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {methods: [GET, HEAD]}}]}]}")], expect: "allow foo/a", ..BASE },
    HttpCase { name: "methods: mismatch", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {methods: [POST]}}]}]}")], expect: "deny", ..BASE },
    HttpCase { name: "methods: prefix", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {methods: [\"P*\"]}}]}]}")], method: "PUT", expect: "allow foo/a", ..BASE },
    HttpCase { name: "notMethods excludes the method", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {notMethods: [DELETE]}}]}]}")], method: "DELETE", expect: "deny", ..BASE },
    HttpCase { name: "DENY methods applies precisely at L7: other methods pass", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}")], expect: "allow", ..BASE },
    HttpCase { name: "DENY methods denies the method", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}")], method: "DELETE", expect: "deny foo/d", ..BASE },
    HttpCase { name: "a method not in upper case is refused with 400", docs: &[("AP", "foo", "a", ALLOW_ALL)], method: "get", expect: "bad", ..BASE },
    // --- paths ---
    HttpCase { name: "paths: exact", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {paths: [/info]}}]}]}")], path: "/info", expect: "allow foo/a", ..BASE },
    HttpCase { name: "paths: exact does not match a longer path", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {paths: [/info]}}]}]}")], path: "/info/x", expect: "deny", ..BASE },
    HttpCase { name: "paths: prefix", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {paths: [\"/api/*\"]}}]}]}")], path: "/api/v1/users", expect: "allow foo/a", ..BASE },
    HttpCase { name: "paths: prefix /api/* does not match /apix", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {paths: [\"/api/*\"]}}]}]}")], path: "/apix", expect: "deny", ..BASE },
    HttpCase { name: "paths: suffix", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {paths: [\"*.png\"]}}]}]}")], path: "/img/logo.png", expect: "allow foo/a", ..BASE },
    HttpCase { name: "paths: presence", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {paths: [\"*\"]}}]}]}")], path: "/anything", expect: "allow foo/a", ..BASE },
    HttpCase { name: "paths: template {*} matches one segment", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {paths: [\"/api/{*}/items\"]}}]}]}")], path: "/api/v1/items", expect: "allow foo/a", ..BASE },
    HttpCase { name: "paths: template {*} does not cross a slash", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {paths: [\"/api/{*}/items\"]}}]}]}")], path: "/api/v1/v2/items", expect: "deny", ..BASE },
    HttpCase { name: "paths: template {**} matches several segments", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {paths: [\"/static/{**}\"]}}]}]}")], path: "/static/css/site.css", expect: "allow foo/a", ..BASE },
    HttpCase { name: "paths: template {**} matches nothing at all", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {paths: [\"/static/{**}\"]}}]}]}")], path: "/static/", expect: "allow foo/a", ..BASE },
    HttpCase { name: "notPaths admits other paths", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {notPaths: [\"/admin*\"]}}]}]}")], path: "/public", expect: "allow foo/a", ..BASE },
    HttpCase { name: "notPaths excludes the listed paths", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {notPaths: [\"/admin*\"]}}]}]}")], path: "/admin/users", expect: "deny", ..BASE },
    // --- path normalization ---
    HttpCase { name: "normalization: /a/../b is /b", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {paths: [\"/admin/*\"]}}]}]}")], path: "/public/../admin/x", expect: "deny foo/d", ..BASE },
    HttpCase { name: "normalization: /a/./b is /a/b", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {paths: [/a/b]}}]}]}")], path: "/a/./b", expect: "allow foo/a", ..BASE },
    HttpCase { name: "normalization: dots above the root stay at the root", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}")], path: "/../../admin", expect: "deny foo/d", ..BASE },
    HttpCase { name: "normalization: %2e%2e is a dot segment", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}")], path: "/x/%2e%2E/admin", expect: "deny foo/d", ..BASE },
    HttpCase { name: "normalization: %41 (unreserved) is decoded", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {paths: [/Admin]}}]}]}")], path: "/%41dmin", expect: "deny foo/d", ..BASE },
    HttpCase { name: "normalization: a backslash is a slash", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}")], path: "/x\\..\\admin", expect: "deny foo/d", ..BASE },
    HttpCase { name: "normalization: BASE keeps //, so /admin does not match //admin", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}")], path: "//admin", expect: "allow", ..BASE },
    HttpCase { name: "normalization: BASE keeps %2F encoded", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {paths: [/admin/users]}}]}]}")], path: "/admin%2Fusers", expect: "allow", ..BASE },
    HttpCase { name: "normalization: %2F is matched as written", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {paths: [\"/admin%2Fusers\"]}}]}]}")], path: "/admin%2Fusers", expect: "allow foo/a", ..BASE },
    HttpCase { name: "normalization: the query string is stripped", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {paths: [/info]}}]}]}")], path: "/info?user=alice&x=/admin", expect: "allow foo/a", ..BASE },
    HttpCase { name: "normalization: the query cannot smuggle a path", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {paths: [\"*/admin\"]}}]}]}")], path: "/ok?/admin", expect: "allow", ..BASE },
    HttpCase { name: "normalization: an invalid escape is refused with 400", docs: &[("AP", "foo", "a", ALLOW_ALL)], path: "/a%zz", expect: "bad", ..BASE },
    HttpCase { name: "normalization: %00 is refused with 400", docs: &[("AP", "foo", "a", ALLOW_ALL)], path: "/a%00b", expect: "bad", ..BASE },
    HttpCase { name: "normalization: a bad path is refused with no policy at all", path: "/a%2", expect: "bad", ..BASE },
    // --- request principals ---
    HttpCase { name: "requestPrincipals: exact", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {requestPrincipals: [\"https://idp.example.com/alice\"]}}]}]}")], jwt: "alice", expect: "allow foo/a", ..BASE },
    HttpCase { name: "requestPrincipals: another principal", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {requestPrincipals: [\"https://idp.example.com/alice\"]}}]}]}")], jwt: "bob", expect: "deny", ..BASE },
    HttpCase { name: "requestPrincipals: prefix", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {requestPrincipals: [\"https://idp.example.com/*\"]}}]}]}")], jwt: "bob", expect: "allow foo/a", ..BASE },
    HttpCase { name: "requestPrincipals: * needs a token", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]}")], expect: "deny", ..BASE },
    HttpCase { name: "requestPrincipals: * matches any token", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]}")], jwt: "bob", expect: "allow foo/a", ..BASE },
    HttpCase { name: "DENY notRequestPrincipals * refuses requests without a token", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {notRequestPrincipals: [\"*\"]}}]}]}")], expect: "deny foo/d", ..BASE },
    HttpCase { name: "DENY notRequestPrincipals * lets a token through", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {notRequestPrincipals: [\"*\"]}}]}]}")], jwt: "alice", expect: "allow", ..BASE },
    // --- when: request.* ---
    HttpCase { name: "when request.headers: match", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.headers[x-user]\", values: [alice]}]}]}")], headers: &[("x-user", "alice")], expect: "allow foo/a", ..BASE },
    HttpCase { name: "when request.headers: the name is case-insensitive", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.headers[X-User]\", values: [alice]}]}]}")], headers: &[("x-user", "alice")], expect: "allow foo/a", ..BASE },
    HttpCase { name: "when request.headers: an absent header matches no value", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.headers[x-user]\", values: [\"*\"]}]}]}")], expect: "deny", ..BASE },
    HttpCase { name: "when request.headers: notValues admit an absent header", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.headers[x-user]\", notValues: [mallory]}]}]}")], expect: "allow foo/a", ..BASE },
    HttpCase { name: "when request.headers: repeated fields are joined with commas", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.headers[x-role]\", values: [\"dev,admin\"]}]}]}")], headers: &[("x-role", "dev"), ("x-role", "admin")], expect: "allow foo/a", ..BASE },
    HttpCase { name: "when request.headers: one of repeated fields alone does not match exactly", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.headers[x-role]\", values: [admin]}]}]}")], headers: &[("x-role", "dev"), ("x-role", "admin")], expect: "deny", ..BASE },
    HttpCase { name: "when request.headers: DENY notValues on joined fields", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{when: [{key: \"request.headers[x-role]\", notValues: [\"dev*\"]}]}]}")], headers: &[("x-role", "dev"), ("x-role", "admin")], expect: "allow", ..BASE },
    HttpCase { name: "when request.auth.principal", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: request.auth.principal, values: [\"https://idp.example.com/alice\"]}]}]}")], jwt: "alice", expect: "allow foo/a", ..BASE },
    HttpCase { name: "when request.auth.principal without a token", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: request.auth.principal, values: [\"*\"]}]}]}")], expect: "deny", ..BASE },
    HttpCase { name: "when request.auth.audiences: any audience may match", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: request.auth.audiences, values: [api]}]}]}")], jwt: "alice", expect: "allow foo/a", ..BASE },
    HttpCase { name: "when request.auth.audiences: mismatch", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: request.auth.audiences, values: [api]}]}]}")], jwt: "bob", expect: "deny", ..BASE },
    HttpCase { name: "when request.auth.audiences notValues: no audience may match", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: request.auth.audiences, notValues: [api]}]}]}")], jwt: "alice", expect: "deny", ..BASE },
    HttpCase { name: "when request.auth.presenter", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: request.auth.presenter, values: [cli]}]}]}")], jwt: "alice", expect: "allow foo/a", ..BASE },
    HttpCase { name: "when request.auth.presenter: a token without azp", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: request.auth.presenter, values: [\"*\"]}]}]}")], jwt: "bob", expect: "deny", ..BASE },
    HttpCase { name: "when request.auth.claims: any element of a list claim", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.auth.claims[groups]\", values: [admin]}]}]}")], jwt: "alice", expect: "allow foo/a", ..BASE },
    HttpCase { name: "when request.auth.claims: a string claim", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.auth.claims[groups]\", values: [dev]}]}]}")], jwt: "bob", expect: "allow foo/a", ..BASE },
    HttpCase { name: "when request.auth.claims: a string claim mismatch", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.auth.claims[groups]\", values: [admin]}]}]}")], jwt: "bob", expect: "deny", ..BASE },
    HttpCase { name: "when request.auth.claims: nested", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.auth.claims[org][team]\", values: [payments]}]}]}")], jwt: "alice", expect: "allow foo/a", ..BASE },
    HttpCase { name: "when request.auth.claims: nested mismatch", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.auth.claims[org][team]\", values: [payments]}]}]}")], jwt: "bob", expect: "deny", ..BASE },
    HttpCase { name: "when request.auth.claims: a number claim never matches", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.auth.claims[org][level]\", values: [\"3\"]}]}]}")], jwt: "alice", expect: "deny", ..BASE },
    HttpCase { name: "when request.auth.claims: no token matches no value", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: \"request.auth.claims[groups]\", values: [\"*\"]}]}]}")], expect: "deny", ..BASE },
    HttpCase { name: "DENY request.auth.claims notValues: no token is denied", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{when: [{key: \"request.auth.claims[groups]\", notValues: [admin]}]}]}")], expect: "deny foo/d", ..BASE },
    HttpCase { name: "DENY request.auth.claims notValues: an admin passes", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{when: [{key: \"request.auth.claims[groups]\", notValues: [admin]}]}]}")], jwt: "alice", expect: "allow", ..BASE },
    HttpCase { name: "when remote.ip is the connection's source at the waypoint", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: remote.ip, values: [10.2.0.0/16]}]}]}")], expect: "allow foo/a", ..BASE },
    HttpCase { name: "remoteIpBlocks is the connection's source at the waypoint", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {notRemoteIpBlocks: [10.0.0.0/8]}}]}]}")], src_ip: "192.168.1.5", expect: "deny foo/d", ..BASE },
    HttpCase { name: "connection.sni is not evaluated at L7: the ALLOW rule never matches", docs: &[("AP", "foo", "a", "{rules: [{when: [{key: connection.sni, values: [web.foo]}]}]}")], expect: "deny", ..BASE },
    HttpCase { name: "connection.sni is dropped from a DENY rule: the rest decides", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {methods: [POST]}}], when: [{key: connection.sni, values: [web.foo]}]}]}")], method: "POST", expect: "deny foo/d", ..BASE },
    // --- L4 and L7 together ---
    HttpCase { name: "L4 when keys still apply at L7", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {methods: [GET]}}], when: [{key: source.namespace, values: [bar]}]}]}")], expect: "allow foo/a", ..BASE },
    HttpCase { name: "from namespaces and to methods must both match", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {namespaces: [bar]}}], to: [{operation: {methods: [GET]}}]}]}")], src: B, expect: "deny", ..BASE },
    HttpCase { name: "ports and paths in one operation", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {ports: [\"8080\"], paths: [/x]}}]}]}")], port: 9090, path: "/x", expect: "deny", ..BASE },
    HttpCase { name: "principals and requestPrincipals in one source", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {principals: [\"cluster.local/ns/bar/sa/client\"], requestPrincipals: [\"*\"]}}]}]}")], jwt: "alice", expect: "allow foo/a", ..BASE },
    HttpCase { name: "plaintext with a token does not satisfy principals", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {principals: [\"*\"], requestPrincipals: [\"*\"]}}]}]}")], src: "", jwt: "alice", expect: "deny", ..BASE },
    HttpCase { name: "DENY principals+paths applies precisely at L7 (other path passes)", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [bar]}}], to: [{operation: {paths: [\"/admin\"]}}]}]}")], path: "/public", expect: "allow", ..BASE },
    HttpCase { name: "DENY principals+paths denies its path", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [bar]}}], to: [{operation: {paths: [\"/admin\"]}}]}]}")], path: "/admin", expect: "deny foo/d", ..BASE },
    HttpCase { name: "ALLOW with methods matches at L7", docs: &[("AP", "foo", "a", "{rules: [{from: [{source: {namespaces: [bar]}}], to: [{operation: {methods: [GET]}}]}]}")], expect: "allow foo/a", ..BASE },
    // --- actions and ordering ---
    HttpCase { name: "DENY by path beats ALLOW all", docs: &[("AP", "foo", "a", ALLOW_ALL), ("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}")], path: "/admin/x", expect: "deny foo/d", ..BASE },
    HttpCase { name: "a DENY by path that does not match leaves ALLOW to decide", docs: &[("AP", "foo", "a", ALLOW_ALL), ("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}")], path: "/public", expect: "allow foo/a", ..BASE },
    HttpCase { name: "any ALLOW policy may match at L7", docs: &[("AP", "foo", "a1", "{rules: [{to: [{operation: {methods: [GET]}}]}]}"), ("AP", "foo", "a2", "{rules: [{to: [{operation: {paths: [/x]}}]}]}")], method: "POST", path: "/x", expect: "allow foo/a2", ..BASE },
    HttpCase { name: "once an ALLOW applies, no L7 match means deny", docs: &[("AP", "foo", "a", "{rules: [{to: [{operation: {methods: [GET]}}]}]}")], method: "POST", expect: "deny", ..BASE },
    HttpCase { name: "a matching CUSTOM by path fails closed", docs: &[("AP", "foo", "c", "{action: CUSTOM, provider: {name: ext}, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}")], path: "/admin", expect: "custom foo/c", ..BASE },
    HttpCase { name: "a CUSTOM by path that does not match lets the request through", docs: &[("AP", "foo", "c", "{action: CUSTOM, provider: {name: ext}, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}")], path: "/public", expect: "allow", ..BASE },
    HttpCase { name: "mesh-wide DENY by method before a namespace DENY", docs: &[("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}"), ("AP", ROOT, "d", "{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}")], method: "DELETE", expect: "deny istio-system/d", ..BASE },
    HttpCase { name: "AUDIT by path is reported and never blocks", docs: &[("AP", "foo", "audit", "{action: AUDIT, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}")], path: "/admin/x", audits: &["foo/audit"], ..BASE },
    HttpCase { name: "AUDIT by path that does not match is not reported", docs: &[("AP", "foo", "audit", "{action: AUDIT, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}")], path: "/public", ..BASE },
    HttpCase { name: "AUDIT is reported even when a DENY by method denies", docs: &[("AP", "foo", "audit", "{action: AUDIT, rules: [{to: [{operation: {methods: [DELETE]}}]}]}"), ("AP", "foo", "d", "{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}")], method: "DELETE", expect: "deny foo/d", audits: &["foo/audit"], ..BASE },
    HttpCase { name: "rules [{}] allows every request", docs: &[("AP", "foo", "a", ALLOW_ALL)], method: "PATCH", path: "/anything", expect: "allow foo/a", ..BASE },
];

fn expected_http(expect: &str) -> Decision {
    if expect == "bad" {
        Decision::Deny {
            by: None,
            reason: DenyReason::BadRequest,
        }
    } else {
        expected(expect)
    }
}

fn run_http_case(c: &HttpCase) {
    let (mesh, authz) = build("foo", "app=web,version=v1", c.docs);
    let dst = first(&mesh);
    let id = identity(c.src);
    let conn = Connection {
        src_ip: c.src_ip.parse().unwrap(),
        src_identity: id.as_ref(),
        dst,
        dst_ip: DST_IP.parse().unwrap(),
        dst_port: c.port,
    };
    let mut headers = HeaderMap::new();
    for (k, v) in c.headers {
        headers.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    let auth = jwt(c.jwt);
    let req = HttpRequest {
        method: c.method,
        host: c.host,
        path: c.path,
        headers: &headers,
        auth: auth.as_ref(),
    };
    let verdict = authz.check_http(&conn, &req);
    assert_eq!(verdict.decision, expected_http(c.expect), "{}", c.name);
    let audits: Vec<String> = verdict
        .audits
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    assert_eq!(audits, c.audits, "{}: audits", c.name);

    // explain_http agrees with check_http.
    let e = authz.explain_http(&conn, &req);
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
    let r = e.request.as_ref().unwrap();
    assert_eq!(r.normalized_path.is_none(), c.expect == "bad", "{}", c.name);
    assert_eq!(r.error.is_some(), c.expect == "bad", "{}", c.name);
    serde_json::to_string(&e).unwrap();

    // A workload the index was not built with takes the slow path to the same answer.
    let mut stranger = crate::model::Workload::clone(dst);
    stranger.uid = "Kubernetes//Pod/elsewhere/x".into();
    let conn2 = Connection {
        dst: &stranger,
        ..conn
    };
    assert_eq!(
        authz.check_http(&conn2, &req),
        verdict,
        "{}: unindexed workload",
        c.name
    );
}

#[test]
fn http_conformance_table_follows_istio_semantics() {
    assert!(HTTP_CASES.len() >= 40, "{} cases", HTTP_CASES.len());
    let mut names = std::collections::HashSet::new();
    for c in HTTP_CASES {
        assert!(names.insert(c.name), "duplicate case name {}", c.name);
        run_http_case(c);
    }
}

#[test]
fn l4_check_still_fails_closed_on_the_same_policies() {
    // The L7 compile does not leak into the L4 decision.
    let (mesh, authz) = build(
        "foo",
        "app=web",
        &[(
            "AP",
            "foo",
            "d",
            "{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}",
        )],
    );
    let id = identity(A);
    let conn = conn_to(first(&mesh), &id, 8080);
    assert!(!authz.check(&conn).decision.is_allow());
    let headers = HeaderMap::new();
    let req = HttpRequest {
        method: "GET",
        host: "web",
        path: "/",
        headers: &headers,
        auth: None,
    };
    assert!(authz.check_http(&conn, &req).decision.is_allow());
    assert!(authz.needs_l7(first(&mesh)));
}

#[test]
fn explain_http_describes_http_tests() {
    let (mesh, authz) = build(
        "foo",
        "app=web",
        &[(
            "AP",
            "foo",
            "a",
            "{rules: [{from: [{source: {requestPrincipals: [\"*\"]}}], to: [{operation: {paths: [\"/api/{*}\"], methods: [GET]}}], when: [{key: \"request.headers[x-user]\", values: [alice]}]}]}",
        )],
    );
    let id = identity(A);
    let conn = conn_to(first(&mesh), &id, 8080);
    let headers = HeaderMap::new();
    let req = HttpRequest {
        method: "GET",
        host: "web",
        path: "/api/./v1?q=1",
        headers: &headers,
        auth: None,
    };
    let e = authz.explain_http(&conn, &req);
    assert_eq!(
        e.policies[0].rules[0].details,
        [
            "from[0].source.requestPrincipals: no match: the request has no validated JWT (values [*])",
            "to[0].operation.methods: ok: GET in [GET]",
            "to[0].operation.paths: ok: /api/v1 in [/api/{*}]",
            "when[0](request.headers[x-user]).values: no match: the request has no such header (values [alice])",
        ]
    );
    assert_eq!(
        e.request.unwrap().normalized_path.as_deref(),
        Some("/api/v1")
    );

    let bad = HttpRequest {
        path: "/a%00",
        ..req
    };
    let e = authz.explain_http(&conn, &bad);
    assert_eq!(
        e.summary,
        "denied: the request cannot be evaluated safely (answer 400)"
    );
    assert!(e.policies.is_empty());
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["decision"]["reason"], "badRequest");
    assert!(json["request"]["error"]
        .as_str()
        .unwrap()
        .contains("%00 (an encoded NUL)"));
    assert!(bad.normalized_path().is_err());
}

#[test]
fn parts_the_waypoint_cannot_evaluate_are_named_once() {
    let (_, authz) = build(
        "foo",
        "app=web",
        &[
            (
                "AP",
                "foo",
                "sni",
                "{rules: [{when: [{key: connection.sni, values: [x]}]}]}",
            ),
            (
                "AP",
                "foo",
                "bad",
                "{rules: [{when: [{key: destination.port, values: [http]}]}]}",
            ),
            (
                "AP",
                "foo",
                "ok",
                "{rules: [{to: [{operation: {methods: [GET]}}]}]}",
            ),
        ],
    );
    let w = authz.warnings();
    let about = |name: &str| w.iter().filter(|l| l.starts_with(name)).count();
    assert!(
        w.iter().any(|l| l.starts_with("AuthorizationPolicy foo/sni: at L7 (waypoint): rule 0: when[0](connection.sni) is not evaluated")),
        "{w:#?}"
    );
    // Problems the L4 pass reported are not repeated for L7.
    assert_eq!(about("AuthorizationPolicy foo/bad:"), 1, "{w:#?}");
    assert_eq!(about("AuthorizationPolicy foo/ok:"), 1, "{w:#?}");
}

#[test]
fn invalid_path_templates_are_refused_by_the_parser() {
    for bad in [
        "/a/{*}.txt",
        "/{**}/foo/{*}",
        "/*/baz/{*}",
        "/a//{*}",
        "a/{*}",
        "/a={*}/{*}",
    ] {
        let spec = format!("{{rules: [{{to: [{{operation: {{paths: [\"{bad}\"]}}}}]}}]}}");
        let docs = [("AP", "foo", "a", spec.as_str())];
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {}, namespace: {}}}\nspec: {}\n",
            docs[0].2, docs[0].1, docs[0].3
        );
        assert!(
            crate::source::file::parse_mesh("case.yaml", &text).is_err(),
            "{bad} should be refused"
        );
        let good = text.replace(bad, "/a/{*}/b/{**}");
        assert!(
            crate::source::file::parse_mesh("case.yaml", &good).is_ok(),
            "{good}"
        );
    }
}
