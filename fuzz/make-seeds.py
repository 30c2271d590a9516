#!/usr/bin/env python3
"""Writes the hand-made seeds of fuzz/corpus/ (run from any directory; idempotent).

Protobuf bodies are encoded by hand (the wire format is small) from the field numbers of
proto/istio/workload/workload.proto, proto/istio/security/authorization.proto and
proto/istio/v1/auth/ca.proto; the CA seeds use the fixtures in fuzz/fixtures/.
Repository files (tests/data/*.yaml, deploy/local/*.yaml) are added by scripts/fuzz.
"""
import base64, json, os, struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, value):
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def msg(*fields):
    return b"".join(field(n, v) for n, v in fields)


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


# --- xds_resources: records of tag, u16 length, body ---
def record(tag, body):
    return bytes([tag]) + struct.pack(">H", len(body)) + body


def workload(uid, ip, sa="default", services=(), waypoint=None):
    svc = b"".join(
        field(22, msg((1, key), (2, msg((1, msg((1, sp), (2, tp)))))))
        for key, sp, tp in services
    )
    w = msg((1, uid), (2, "ns1"), (3, bytes(ip)), (5, 1), (7, sa), (9, "n1"),
            (16, "ns1/allow-frontend"), (20, uid)) + svc
    if waypoint is not None:
        w += field(8, waypoint)
    return msg((1, w))


def service(name, ip, port, target, waypoint=None):
    s = msg((1, name), (2, "ns1"), (3, f"{name}.ns1.svc.cluster.local"),
            (4, msg((1, ""), (2, bytes(ip)))), (5, msg((1, port), (2, target))))
    if waypoint is not None:
        s += field(7, waypoint)
    return msg((2, s))


# GatewayAddress: hostname = 1 (NamespacedHostname), address = 2 (NetworkAddress),
# hbone_mtls_port = 3.
def waypoint_at(ip, port=15008):
    return msg((2, msg((1, ""), (2, bytes(ip)))), (3, port))


def waypoint_named(host, port=15008):
    return msg((1, msg((1, "ns1"), (2, host))), (3, port))


def authorization(name, action, scope, matches):
    clause = msg(*[(2, m) for m in matches])
    rule = msg((1, clause))
    return msg((1, name), (2, "ns1"), (3, scope), (4, action), (5, rule))


exact = lambda s: msg((1, s))
prefix = lambda s: msg((2, s))
cidr = lambda ip, n: msg((1, bytes(ip)), (2, n))
a = workload("Kubernetes//Pod/ns1/a", [10, 244, 1, 10], "frontend",
             [("ns1/web.ns1.svc.cluster.local", 80, 8080)])
b = workload("Kubernetes//Pod/ns1/b", [0xfd, 0] + [0] * 13 + [2], "backend")
svc = service("web", [10, 96, 0, 10], 80, 8080)
allow = authorization("allow-frontend", 0, 1, [
    msg((3, prefix("cluster.local/ns/ns1/sa/front")), (9, 8080)),
    msg((1, exact("ns1")), (5, cidr([10, 244, 0, 0], 16)), (12, msg((1, "ns1"), (2, "x")))),
])
deny = authorization("deny-all", 1, 0, [msg((10, 22), (7, cidr([10, 0, 0, 0], 8)))])
write("xds_resources", "workloads-service", record(0, a) + record(4, b) + record(8, svc))
write("xds_resources", "policies", record(1, allow) + record(5, deny))
wa = workload("Kubernetes//Pod/ns1/c", [10, 244, 1, 11], "backend",
              [("ns1/api.ns1.svc.cluster.local", 80, 8080)], waypoint_at([10, 244, 1, 20]))
wsvc = service("api", [10, 96, 0, 11], 80, 8080,
               waypoint_named("waypoint.ns1.svc.cluster.local"))
write("xds_resources", "waypoints", record(0, wa) + record(8, wsvc))
write("xds_resources", "mixed-remove",
      record(0, a) + record(1, allow) + record(2, b"") + record(4, b) + record(3, b""))

# --- ca_response: IstioCertificateResponse { repeated string cert_chain = 1 } ---
fx = os.path.join(HERE, "fixtures")
leaf = open(os.path.join(fx, "ca-leaf.pem")).read()
root = open(os.path.join(fx, "ca-root.pem")).read()
write("ca_response", "leaf-root", msg((1, leaf), (1, root)))
write("ca_response", "one-entry", msg((1, leaf + root)))
write("ca_response", "leaf-only", msg((1, leaf)))

# --- jwt_token, jwks ---
b64 = lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
j = lambda o: b64(json.dumps(o).encode())
for alg, kid, n in [("RS256", "rsa", 256), ("ES256", "p-256", 64), ("ES384", "p-384", 96),
                    ("ES512", "p-521", 132), ("EdDSA", "ed25519", 64), ("PS256", None, 256)]:
    header = {"alg": alg, "typ": "JWT"}
    if kid:
        header["kid"] = kid
    payload = {"iss": "https://issuer.example", "sub": "alice", "aud": ["a", "b"],
               "exp": 4102444800, "nbf": 1700000000, "iat": 1700000000}
    write("jwt_token", alg.lower(), f"{j(header)}.{j(payload)}.{b64(bytes(n))}")
write("jwks", "fixture", open(os.path.join(fx, "jwks.json")).read())
write("jwks", "mixed", json.dumps({"keys": [
    {"kty": "oct", "k": "c2VjcmV0"},
    {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"},
    {"kty": "EC", "crv": "P-256", "alg": "ES256", "x": b64(bytes(32)), "y": b64(bytes(32))},
    {"kty": "OKP", "crv": "X25519", "x": b64(bytes(32))},
]}))

# --- hbone_connect: target, forwarded, baggage, traceparent (one per line) ---
write("hbone_connect", "ipv4", '10.244.2.10:8080\nfor="10.244.1.10:40000"')
write("hbone_connect", "ipv6",
      '[fd00::2]:80\nproto=https;for="[fd00::1]:5000";by=x\nk8s.namespace.name=default\n'
      "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
write("hbone_connect", "uri-form", "http://10.0.0.1:443/\nfor=unknown, for=10.0.0.2:1")

# --- http1_framing: first byte = read size - 1 ---
write("http1_framing", "keep-alive",
      b"\x07POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
      b"GET /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
      b"3;ext=1\r\nabc\r\n0\r\nTrailer: t\r\n\r\n"
      b"GET /c HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
write("http1_framing", "upgrade",
      b"\xffGET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nbinary")
write("http1_framing", "h2", b"\x10PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

# --- path_normalize ---
for i, p in enumerate(["/a/b/../c/./d?x=1", "/%2e%2e/%2F%41%7e\\x//y/.", "a/b#frag",
                       "/public/%2e./%5C..", "/..;/admin", ""]):
    write("path_normalize", f"p{i}", p)

# --- admin_query ---
write("admin_query", "explain",
      "src=10.244.1.10&dst=10.244.2.10:8080&identity=spiffe://cluster.local/ns/a/sa/b")
write("admin_query", "explain-l7",
      "src=10.0.0.1&dst=fd00::2&port=80&method=POST&path=/x%20y&host=h&header=x-a:1"
      "&header=bad&token=a.b.c&plaintext=true")
write("admin_query", "logging", "level=weft%3A%3Aproxy%3Ddebug,info")

# --- daemon_config: an optional TERMINATION_GRACE_PERIOD_SECONDS, NUL, the config ---
write("daemon_config", "xds-istio-ca", "30\0" + """nodeName: n1
trustDomain: example.org
mesh:
  xds: { address: https://istiod.istio-system.svc:15012, rootCertFile: root.pem, tokenFile: t, clusterId: Kubernetes }
ca:
  istio: { address: https://istiod:15012, rootCertFile: /r.pem, tokenFile: /t, clusterId: c }
  certTtl: 1h
listen: { outbound: 15001, hbone: "[::1]:15008", admin: 0 }
ipv6: refuse
drainGrace: 25s
workerThreads: 0
""")

# --- mesh_yaml: a small mesh beside the repository's files ---
write("mesh_yaml", "small", """apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { istio.io/dataplane-mode: ambient } }
---
apiVersion: v1
kind: Pod
metadata: { name: web-0, namespace: shop, labels: { app: web } }
spec: { nodeName: node-1, serviceAccountName: web, containers: [{ name: c, ports: [{ containerPort: 8080 }] }] }
status: { podIP: 10.244.1.10, podIPs: [{ ip: 10.244.1.10 }, { ip: "fd00::10" }] }
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: web, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  action: ALLOW
  rules:
  - from: [{ source: { principals: ["cluster.local/ns/shop/sa/*"], ipBlocks: ["10.0.0.0/8"] } }]
    to: [{ operation: { ports: ["8080"], paths: ["/api/*"], methods: ["GET"] } }]
    when: [{ key: request.auth.claims[groups], values: ["admin"] }]
""")
