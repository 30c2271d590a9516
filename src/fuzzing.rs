//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz) and their replay in `cargo test`
//! (`tests/fuzz_regressions.rs`): one function per parser that takes outside input, fed the
//! raw bytes an attacker controls, running the real parser and then what weft does next with
//! an accepted value (index a mesh, compile its policies, check a built request parses back).
//!
//! Owns no parsing of its own: each function only shapes bytes into the parser's argument
//! type. A panic anywhere below is the bug a fuzzer looks for; the few `assert!`s here state
//! properties of the parsers (a round trip, an idempotence) that must hold for every input.
//! Not an API: hidden from the documentation, changed with the targets.

use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use prost::Message as _;
use tokio::io::{AsyncRead, ReadBuf};

use crate::identity::Identity;
use crate::proto::istio::security::Authorization;
use crate::proto::istio::workload::Address;
use crate::source::xds::translate;
use crate::waypoint::jwt::KeySet;

/// The targets, by name: the names of `fuzz/fuzz_targets/*.rs`, `fuzz/corpus/*` and
/// `fuzz/regressions/*`.
pub const TARGETS: &[&str] = &[
    "mesh_yaml",
    "daemon_config",
    "hbone_connect",
    "http1_framing",
    "path_normalize",
    "jwt_token",
    "jwks",
    "xds_resources",
    "ca_response",
    "admin_query",
];

/// Runs target `name` on `bytes`; `false` for an unknown name.
pub fn run(name: &str, bytes: &[u8], fixtures: &Fixtures) -> bool {
    match name {
        "mesh_yaml" => mesh_yaml(bytes),
        "daemon_config" => daemon_config(bytes),
        "hbone_connect" => hbone_connect(bytes),
        "http1_framing" => http1_framing(bytes),
        "path_normalize" => path_normalize(bytes),
        "jwt_token" => jwt_token(bytes, fixtures),
        "jwks" => jwks(bytes),
        "xds_resources" => xds_resources(bytes),
        "ca_response" => ca_response(bytes, fixtures),
        "admin_query" => admin_query(bytes),
        _ => return false,
    }
    true
}

/// What the targets need besides their input: a key set to verify tokens against, and the
/// key a CSR was made with, which a CA response's leaf must certify (the response brings its
/// own roots, in its last entry). Public material and a throwaway key, kept in
/// `fuzz/fixtures/`.
pub struct Fixtures {
    keys: KeySet,
    ca_identity: Identity,
    ca_key: rcgen::KeyPair,
}

impl Fixtures {
    /// From the texts of `fuzz/fixtures/`: `jwks.json` and `ca-leaf-key.pem` (PKCS#8). The
    /// CA responses are for `spiffe://cluster.local/ns/fuzz/sa/fuzz`.
    pub fn from_texts(jwks: &str, ca_key_pem: &str) -> Result<Fixtures, String> {
        let keys = KeySet::parse(jwks).map_err(|e| format!("jwks.json: {e}"))?;
        let ca_key =
            rcgen::KeyPair::from_pem(ca_key_pem).map_err(|e| format!("ca-leaf-key.pem: {e}"))?;
        let ca_identity =
            Identity::new("cluster.local", "fuzz", "fuzz").map_err(|e| e.to_string())?;
        Ok(Fixtures {
            keys,
            ca_identity,
            ca_key,
        })
    }
}

/// The mesh file (`source::file::parse`), then what a reload does with it: the snapshot's
/// indexes, the compiled policies and the linter.
pub fn mesh_yaml(bytes: &[u8]) {
    let Ok(parsed) = crate::source::file::parse(Path::new("mesh.yaml"), bytes) else {
        return;
    };
    let authz = crate::authz::Authz::new(&parsed.mesh, "istio-system");
    let _ = authz.warnings();
    let _ = crate::authz::lint(&parsed.mesh, &crate::authz::LintContext::default());
    let snap = crate::state::Snapshot::new(1, parsed.mesh);
    let _ = snap.ip_conflicts().count();
}

/// The daemon config (`Config::parse`). Bytes before a first NUL, if any, are the value of
/// `TERMINATION_GRACE_PERIOD_SECONDS`.
pub fn daemon_config(bytes: &[u8]) {
    let (grace, text) = match bytes.iter().position(|b| *b == 0) {
        Some(i) => (
            Some(String::from_utf8_lossy(&bytes[..i]).into_owned()),
            &bytes[i + 1..],
        ),
        None => (None, bytes),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let env = crate::config::Env {
        node_name: None,
        termination_grace_period_seconds: grace,
    };
    let _ = crate::config::Config::parse(Path::new("/etc/weft/weft.yaml"), text, &env);
}

/// The HBONE CONNECT (`proxy::hbone::Connect::parse`). Lines: the request target (the
/// `:authority` h2 hands over), then the values of `forwarded`, `baggage` and
/// `traceparent`. A request that parses must build a request that parses back to itself.
pub fn hbone_connect(bytes: &[u8]) {
    use crate::proxy::hbone::{Connect, BAGGAGE_HEADER, FORWARDED_HEADER, TRACEPARENT_HEADER};
    let mut lines = bytes.split(|b| *b == b'\n');
    let target = lines.next().unwrap_or_default();
    let mut builder = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target);
    for name in [FORWARDED_HEADER, BAGGAGE_HEADER, TRACEPARENT_HEADER] {
        if let Some(value) = lines.next() {
            builder = builder.header(name, value);
        }
    }
    let Ok(req) = builder.body(()) else {
        return;
    };
    let Ok(connect) = Connect::parse(&req) else {
        return;
    };
    let rebuilt = connect
        .request()
        .map(|r| Connect::parse(&r))
        .map_err(|e| e.to_string());
    assert_eq!(
        rebuilt,
        Ok(Ok(connect)),
        "a parsed CONNECT does not parse back"
    );
}

/// An in-memory connection that hands out its bytes in reads of at most `chunk` bytes.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// The HTTP/1 framing watch (`waypoint::framing::Watched`) over a connection whose bytes
/// arrive in reads of `1 + bytes[0]` bytes. The watch must pass every byte through unchanged.
pub fn http1_framing(bytes: &[u8]) {
    use crate::waypoint::framing::{Verdicts, Watched};
    let Some((first, data)) = bytes.split_first() else {
        return;
    };
    let verdicts = Verdicts::default();
    let mut watched = Watched::new(
        Chunked {
            data,
            chunk: 1 + usize::from(*first),
        },
        verdicts.clone(),
    );
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::with_capacity(data.len());
    let mut buf = [0u8; 4096];
    loop {
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(&mut watched).poll_read(&mut cx, &mut read) {
            Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                out.extend_from_slice(read.filled());
            }
            _ => break,
        }
    }
    assert!(out == data, "the framing watch changed the bytes");
    // Ask for a verdict per possible request: a lost framing answers "ambiguous" for every
    // later one, forever, so the asking is bounded.
    for _ in 0..=data.len() {
        if !verdicts.next_is_ambiguous() {
            break;
        }
    }
}

/// Path normalization (`authz::normalize_path`). A normalized path is absolute and
/// normalizes to itself.
pub fn path_normalize(bytes: &[u8]) {
    let raw = String::from_utf8_lossy(bytes);
    let Ok(once) = crate::authz::normalize_path(&raw) else {
        return;
    };
    assert!(once.starts_with('/'), "{raw:?} normalized to {once:?}");
    let twice = crate::authz::normalize_path(&once);
    assert_eq!(
        twice.as_ref(),
        Ok(&once),
        "normalizing {raw:?} twice differs"
    );
}

/// A token (`waypoint::jwt` token parsing, then signature verification against every key of
/// the fixtures' key set that may have signed it).
pub fn jwt_token(bytes: &[u8], fixtures: &Fixtures) {
    let raw = String::from_utf8_lossy(bytes);
    let _ = crate::waypoint::jwt::check_token(&raw, &fixtures.keys);
}

/// A JWKS document (`waypoint::jwt::KeySet::parse`); the keys of a set that parses are then
/// tried on a token of every algorithm weft accepts (signatures of the right length).
pub fn jwks(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(keys) = KeySet::parse(text) else {
        return;
    };
    let payload = URL_SAFE_NO_PAD.encode(br#"{"iss":"https://issuer.example"}"#);
    for (alg, signature_len) in [
        ("RS256", 256),
        ("PS384", 256),
        ("ES256", 64),
        ("ES384", 96),
        ("ES512", 132),
        ("EdDSA", 64),
    ] {
        let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}"}}"#));
        let signature = URL_SAFE_NO_PAD.encode(vec![0x5a; signature_len]);
        let _ =
            crate::waypoint::jwt::check_token(&format!("{header}.{payload}.{signature}"), &keys);
    }
}

/// xDS resources as istiod sends them (`source::xds::translate` of prost-decoded `Address`
/// and `Authorization` bodies), assembled into edits, applied to a store, then indexed and
/// compiled. Records: a tag byte (bit 0: an Authorization, else an Address; bit 1: remove
/// the resource instead; bits 2-3: which of four resource names), a big-endian `u16` length,
/// the body.
pub fn xds_resources(bytes: &[u8]) {
    let store = crate::state::StateStore::new("xds");
    let mut assembly = translate::Assembly::new("cluster.local");
    let mut rest = bytes;
    while let [tag, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (body, after) = tail.split_at(len);
        rest = after;
        let name = format!("resource-{}", (tag >> 2) & 3);
        let authorization = tag & 1 == 1;
        let edits = match (authorization, tag & 2 == 2) {
            (false, true) => assembly.update_addresses(Vec::new(), &[name]),
            (true, true) => assembly.update_policies(Vec::new(), &[name]),
            (false, false) => match Address::decode(body).map(translate::address) {
                Ok(Ok(entry)) => assembly.update_addresses(vec![(name, entry)], &[]),
                _ => continue,
            },
            (true, false) => match Authorization::decode(body).map(translate::authorization) {
                Ok(Ok(policy)) => assembly.update_policies(vec![(name, policy)], &[]),
                _ => continue,
            },
        };
        store.apply(edits);
    }
    let (mesh, _warnings) = assembly.mesh();
    let _ = crate::authz::Authz::new(&mesh, "istio-system");
    let snap = crate::state::Snapshot::new(1, mesh);
    let _ = snap.ip_conflicts().count();
    let _ = store.snapshot().ip_conflicts().count();
}

/// A `CreateCertificate` response from Istio's CA (`identity::istio`: protobuf, then the
/// PEM chain parsed and checked for the fixtures' identity, key and root).
pub fn ca_response(bytes: &[u8], fixtures: &Fixtures) {
    ca_response_accepted(bytes, fixtures);
}

/// [`ca_response`], saying whether the certificate was accepted.
pub fn ca_response_accepted(bytes: &[u8], fixtures: &Fixtures) -> bool {
    crate::identity::istio::accept_response_bytes(bytes, &fixtures.ca_identity, &fixtures.ca_key)
        .is_ok()
}

/// The admin query strings (`/debug/explain` and `/logging`, as `admin` reads them).
pub fn admin_query(bytes: &[u8]) {
    let query = String::from_utf8_lossy(bytes);
    let log = crate::logging::LogControl::new(
        "info",
        Box::new(|filter| crate::logging::targets(filter).map(drop)),
    );
    let _ = crate::admin::read_queries(&query, &log);
}
