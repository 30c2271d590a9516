//! The waypoint: weft's in-binary L7 proxy, for the policies a node tunnel cannot enforce
//! because they need to see HTTP requests (Istio's waypoint role, without an Envoy).
//!
//! Owns, one file per Istio concern:
//! - [`jwt`]: `RequestAuthentication` — finding JWTs in a request, verifying them against the
//!   issuers' key sets (inline or fetched and cached), and the request rewrites the policy asks
//!   for (token removal, payload and claim headers).
//! - [`http`]: the HTTP/1.1 and HTTP/2 server on inbound connections that need L7, one policy
//!   decision per request, forwarding over [`upstream`] pools that keep the client's IP.
//!
//! When it runs: for a destination workload whose applicable AuthorizationPolicies use L7
//! attributes, or whose pod, namespace or backing Service is labelled `istio.io/use-waypoint`
//! with the value [`BUILTIN_WAYPOINT`] (`weft`), naming this built-in waypoint. Everything else keeps the L4
//! byte copy and never pays for HTTP parsing.
//!
//! Must not touch: the L4 data path's decisions (`proxy` hands connections over after
//! PeerAuthentication), the snapshot store (`state`) except reading it.

pub mod counting;
pub mod framing;
pub mod http;

pub mod jwt;
pub mod upstream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::authz::Authz;
use crate::identity::Identity;
use crate::metrics::{HttpMetrics, RequestLabels};
use crate::model::{Policy, RequestAuthentication, Workload};
use crate::proxy::ProxyCtx;
use crate::state::Snapshot;
use jwt::{JwksCache, JwtAuthenticator, JwtError};

/// The label that sends a workload's traffic through a waypoint.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// The label value naming weft's built-in waypoint.
pub const BUILTIN_WAYPOINT: &str = "weft";

/// Whether inbound traffic to `w` goes through the waypoint: its policies need L7, or the
/// pod, its namespace, or a Service it backs names the built-in waypoint.
pub fn applies(snap: &Snapshot, authz: &Authz, w: &Workload) -> bool {
    let named = |labels: &std::collections::BTreeMap<String, String>| {
        labels
            .get(USE_WAYPOINT_LABEL)
            .is_some_and(|v| v == BUILTIN_WAYPOINT)
    };
    authz.needs_l7(w)
        || named(&w.labels)
        || snap
            .mesh
            .namespaces
            .get(&w.namespace)
            .is_some_and(|ns| named(&ns.labels))
        || snap.services_of(&w.uid).any(|s| named(&s.labels))
}

/// The RequestAuthentications that apply to `w` (mesh-wide from the root namespace, its
/// namespace's, and those whose selector matches), in a stable order.
pub fn request_authentications<'a>(
    snap: &'a Snapshot,
    root_namespace: &str,
    w: &Workload,
) -> Vec<&'a RequestAuthentication> {
    snap.mesh
        .policies
        .iter()
        .filter_map(|p| match p {
            Policy::RequestAuthentication(ra) => Some(ra),
            _ => None,
        })
        .filter(|ra| {
            let in_scope = ra.namespace == w.namespace
                || (ra.namespace == root_namespace && ra.spec.selector.is_none());
            let targeted = ra.spec.target_ref.is_some() || !ra.spec.target_refs.is_empty();
            in_scope
                && !targeted
                && ra
                    .spec
                    .selector
                    .as_ref()
                    .is_none_or(|s| crate::model::selector_matches(&s.match_labels, &w.labels))
        })
        .collect()
}

type AuthnCache = HashMap<String, (u64, Arc<Result<JwtAuthenticator, JwtError>>)>;

/// The waypoint's shared state.
pub struct Waypoint {
    /// Issuers' key sets.
    pub jwks: Arc<JwksCache>,
    /// Connections to apps.
    pub upstream: upstream::Upstream,
    /// Request metrics.
    pub metrics: HttpMetrics,
    root_namespace: String,
    authenticators: Mutex<AuthnCache>,
}

impl Waypoint {
    /// A waypoint using `jwks` for token keys and reporting to `metrics`.
    pub fn new(jwks: Arc<JwksCache>, metrics: HttpMetrics, root_namespace: &str) -> Waypoint {
        Waypoint {
            jwks,
            upstream: upstream::Upstream::default(),
            metrics,
            root_namespace: root_namespace.to_string(),
            authenticators: Mutex::new(HashMap::new()),
        }
    }

    /// The token checks for `w` in `snap` (built once per workload and generation).
    pub fn authenticator(
        &self,
        snap: &Snapshot,
        w: &Workload,
    ) -> Arc<Result<JwtAuthenticator, JwtError>> {
        let mut cache = crate::sync::lock(&self.authenticators);
        if let Some((generation, a)) = cache.get(&w.uid) {
            if *generation == snap.generation {
                return a.clone();
            }
        }
        let policies = request_authentications(snap, &self.root_namespace, w);
        let built = Arc::new(JwtAuthenticator::for_policies(&policies, self.jwks.clone()));
        cache.retain(|_, (g, _)| *g == snap.generation);
        cache.insert(w.uid.clone(), (snap.generation, built.clone()));
        built
    }

    /// Registers the key sets of every RequestAuthentication of `snap` with the cache.
    pub fn update(&self, snap: &Snapshot) {
        let ras: Vec<RequestAuthentication> = snap
            .mesh
            .policies
            .iter()
            .filter_map(|p| match p {
                Policy::RequestAuthentication(ra) => Some(ra.clone()),
                _ => None,
            })
            .collect();
        if let Err(errors) = self.jwks.update(&ras) {
            for e in errors {
                tracing::warn!(error = %e, "RequestAuthentication refused");
            }
        }
    }
}

impl HttpMetrics {
    /// Counts one request.
    pub fn record(
        &self,
        src_identity: Option<&Identity>,
        src: Option<&Workload>,
        dst: Option<&Workload>,
        ctx: &ProxyCtx,
        status: u16,
        ms: f64,
    ) {
        let unknown = || "unknown".to_string();
        let labels = RequestLabels {
            reporter: "destination",
            source_workload: src.map(|w| w.workload_name.clone()).unwrap_or_else(unknown),
            source_workload_namespace: src.map(|w| w.namespace.clone()).unwrap_or_else(unknown),
            source_principal: src_identity.map(|i| i.to_string()).unwrap_or_else(unknown),
            source_canonical_service: src
                .map(|w| w.canonical_name.clone())
                .unwrap_or_else(unknown),
            destination_workload: dst.map(|w| w.workload_name.clone()).unwrap_or_else(unknown),
            destination_workload_namespace: dst
                .map(|w| w.namespace.clone())
                .unwrap_or_else(unknown),
            destination_principal: dst
                .and_then(|w| ctx.identity_of(w))
                .map(|i| i.to_string())
                .unwrap_or_else(unknown),
            destination_canonical_service: dst
                .map(|w| w.canonical_name.clone())
                .unwrap_or_else(unknown),
            request_protocol: "http",
            response_code: status,
            connection_security_policy: if src_identity.is_some() {
                "mutual_tls"
            } else {
                "unknown"
            },
        };
        self.requests.get_or_create(&labels).inc();
        self.duration.get_or_create(&labels).observe(ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(extra: &str) -> Snapshot {
        let text = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, labels: {{app: web}}}}\nstatus: {{podIP: 10.0.0.1}}\n{extra}"
        );
        Snapshot::new(
            1,
            crate::source::file::parse_mesh("m.yaml", &text)
                .unwrap()
                .mesh,
        )
    }

    #[test]
    fn the_waypoint_is_chosen_by_l7_policy_or_by_label_on_pod_namespace_or_service() {
        let check = |extra: &str| {
            let s = snap(extra);
            let authz = Authz::new(&s.mesh, "istio-system");
            applies(&s, &authz, s.workload("Kubernetes//Pod/shop/web").unwrap())
        };
        assert!(!check(""), "plain L4 workload");
        assert!(check("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec: {rules: [{to: [{operation: {methods: [GET]}}]}]}\n"));
        assert!(check("---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: weft}}\nspec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80}]}\n"));
        assert!(!check("---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: other}}\nspec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80}]}\n"), "another waypoint's name");
        let s = snap("");
        let mut mesh = s.mesh.clone();
        let mut web = crate::model::Workload::clone(&mesh.workloads["Kubernetes//Pod/shop/web"]);
        web.labels
            .insert(USE_WAYPOINT_LABEL.into(), BUILTIN_WAYPOINT.into());
        mesh.insert_workload(web);
        let s = Snapshot::new(2, mesh);
        assert!(applies(
            &s,
            &Authz::new(&s.mesh, "istio-system"),
            s.workload("Kubernetes//Pod/shop/web").unwrap()
        ));
    }
}
