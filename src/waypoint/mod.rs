//! The waypoint: weft's in-binary L7 proxy, for the policies a node tunnel cannot enforce
//! because they need to see HTTP requests (Istio's waypoint role, without an Envoy).
//!
//! Owns, one file per Istio concern:
//! - [`jwt`]: `RequestAuthentication` — finding JWTs in a request, verifying them against the
//!   issuers' key sets (inline or fetched and cached), and the request rewrites the policy asks
//!   for (token removal, payload and claim headers).
//! - [`http`]: the HTTP/1.1 and HTTP/2 server on inbound connections that need L7, one policy
//!   decision per request, forwarding the request as decided (normalized path, matched
//!   authority, the waypoint's own `x-forwarded-client-cert`) over bounded [`upstream`] pools
//!   that keep the client's IP; WebSocket upgrades relayed inside the tracked connection.
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

use crate::authz::{Authz, AuthzCache, Scope};
use crate::metrics::HttpMetrics;
use crate::model::{Policy, PolicyKind, RequestAuthentication, Workload};
use crate::proxy::socket::SocketMode;
use crate::state::{Snapshot, StateStore};
use jwt::{JwksCache, JwtAuthenticator, JwtError};

/// The label that sends a workload's traffic through a waypoint.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// The label value naming weft's built-in waypoint.
pub const BUILTIN_WAYPOINT: &str = "weft";

/// Whether inbound traffic to `w` goes through the waypoint: its policies need L7, or the
/// pod, its namespace, or a Service it backs names the built-in waypoint.
pub fn applies(snap: &Snapshot, authz: &Authz, w: &Workload) -> bool {
    let named = |value: Option<&str>| value == Some(BUILTIN_WAYPOINT);
    authz.needs_l7(w)
        || named(
            w.labels
                .get(USE_WAYPOINT_LABEL)
                .map(crate::model::ArcStr::as_str),
        )
        || snap
            .mesh
            .namespaces
            .get(w.namespace.as_str())
            .is_some_and(|ns| named(ns.labels.get(USE_WAYPOINT_LABEL).map(String::as_str)))
        || snap
            .services_of(&w.uid)
            .any(|s| named(s.labels.get(USE_WAYPOINT_LABEL).map(String::as_str)))
}

/// The RequestAuthentications that apply to `w`, by Istio's scope rules (`authz::scope`: the
/// root namespace's for every workload or, with a selector, for matching workloads of every
/// namespace; its own namespace's; none with `targetRef`), in a stable order.
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
            let targeted = ra.spec.target_ref.is_some() || !ra.spec.target_refs.is_empty();
            Scope::of(
                PolicyKind::RequestAuthentication,
                &ra.namespace,
                ra.spec.selector.as_ref(),
                targeted,
                root_namespace,
            )
            .is_ok_and(|scope| scope.applies_to(&ra.namespace, &w.uid, &w.namespace, &w.labels))
        })
        .collect()
}

type AuthnCache = HashMap<String, (u64, Arc<Result<JwtAuthenticator, JwtError>>)>;

/// What the waypoint reads of the node it runs in: these four things and nothing else (it
/// never sees the L4 side's pool, listeners or certificates).
pub struct WaypointCtx {
    /// The mesh state, read once per request.
    pub store: Arc<StateStore>,
    /// The compiled policies, shared with the L4 side (one compile per generation).
    pub policies: Arc<AuthzCache>,
    /// How sockets to apps are opened (transparent when capturing, to keep the client's IP).
    pub mode: SocketMode,
    /// The SPIFFE trust domain, for destination principals in the telemetry.
    pub trust_domain: String,
}

/// The waypoint's shared state.
pub struct Waypoint {
    /// What it reads of the node.
    pub ctx: WaypointCtx,
    /// Issuers' key sets.
    pub jwks: Arc<JwksCache>,
    /// Connections to apps.
    pub upstream: upstream::Upstream,
    /// Request metrics.
    pub metrics: HttpMetrics,
    authenticators: Mutex<AuthnCache>,
}

impl Waypoint {
    /// A waypoint reading `ctx`, using `jwks` for token keys and reporting to `metrics`.
    pub fn new(ctx: WaypointCtx, jwks: Arc<JwksCache>, metrics: HttpMetrics) -> Waypoint {
        Waypoint {
            ctx,
            jwks,
            upstream: upstream::Upstream::default(),
            metrics,
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
        if let Some((generation, a)) = cache.get(w.uid.as_str()) {
            if *generation == snap.generation {
                return a.clone();
            }
        }
        let policies = request_authentications(snap, self.ctx.policies.root_namespace(), w);
        let built = Arc::new(JwtAuthenticator::for_policies(&policies, self.jwks.clone()));
        cache.retain(|_, (g, _)| *g == snap.generation);
        cache.insert(w.uid.to_string(), (snap.generation, built.clone()));
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
    fn request_authentications_apply_by_istios_scope_rules() {
        let ra = |ns: &str, name: &str, scope: &str| {
            format!(
                "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
                 metadata: {{name: {name}, namespace: {ns}}}\n\
                 spec: {{{scope}jwtRules: [{{issuer: https://issuer.example, jwksUri: https://issuer.example/jwks}}]}}\n"
            )
        };
        let extra = [
            ra("istio-system", "mesh-wide", ""),
            ra("istio-system", "mesh-empty-selector", "selector: {}, "),
            ra(
                "istio-system",
                "mesh-web",
                "selector: {matchLabels: {app: web}}, ",
            ),
            ra(
                "istio-system",
                "mesh-other",
                "selector: {matchLabels: {app: other}}, ",
            ),
            ra("shop", "shop-wide", ""),
            ra("shop", "shop-web", "selector: {matchLabels: {app: web}}, "),
            ra("other", "other-wide", ""),
            ra(
                "shop",
                "targeted",
                "targetRefs: [{kind: Service, group: '', name: web}], ",
            ),
        ]
        .concat();
        let s = snap(&extra);
        let web = s.workload("Kubernetes//Pod/shop/web").unwrap();
        let mut names: Vec<&str> = request_authentications(&s, "istio-system", web)
            .iter()
            .map(|ra| ra.name.as_str())
            .collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "mesh-empty-selector",
                "mesh-web",
                "mesh-wide",
                "shop-web",
                "shop-wide"
            ]
        );
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
