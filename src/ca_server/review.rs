//! Who is asking and what they may have, decided against the Kubernetes API server as istiod
//! decides it (`security/pkg/server/ca`: `kubeauth`, `tokenreview`, `node_auth.go`).
//!
//! Owns: the TokenReview of a caller's bearer token (audience `istio-ca`) and what its status
//! means ([`Caller`]), and node authorization ([`Reviewer::authorize`]): a trusted node
//! account may ask for an identity only if a pod with that ServiceAccount runs on its own node,
//! its node being the `spec.nodeName` of the pod its token is bound to. Reads the API server
//! on every request (nothing cached), so replicas share nothing but the API server.
//!
//! Does not own: gRPC (the parent module), signing (`identity::ca`).
//!
//! Every refusal is a [`Refusal`] whose message names the token problem, the account, the
//! node or the identity, and which becomes the gRPC status the caller sees.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};

use crate::identity::Identity;

/// The audience a node's token must carry (istiod's `security.TokenAudiences`).
pub const AUDIENCE: &str = "istio-ca";
/// TokenReview `status.user.extra` key of the pod a bound token belongs to.
const POD_NAME_KEY: &str = "authentication.kubernetes.io/pod-name";
/// TokenReview `status.user.extra` key of that pod's UID.
const POD_UID_KEY: &str = "authentication.kubernetes.io/pod-uid";
/// The group every ServiceAccount is in.
const SERVICE_ACCOUNTS_GROUP: &str = "system:serviceaccounts";

/// A ServiceAccount, `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl std::str::FromStr for ServiceAccount {
    type Err = String;

    /// Parses `namespace/name`.
    fn from_str(s: &str) -> Result<ServiceAccount, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ServiceAccount {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!("{s:?} is not NAMESPACE/SERVICEACCOUNT")),
        }
    }
}

/// Why a request is refused; its message is what the caller reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The token is missing or the API server did not authenticate it as a ServiceAccount.
    Unauthenticated(String),
    /// The caller may not have the identity it asked for.
    PermissionDenied(String),
    /// The request is malformed (the identity asked for, the CSR, the lifetime).
    InvalidArgument(String),
    /// The API server could not be asked.
    Unavailable(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unauthenticated(m)
            | Refusal::PermissionDenied(m)
            | Refusal::InvalidArgument(m)
            | Refusal::Unavailable(m) => f.write_str(m),
        }
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> tonic::Status {
        match r {
            Refusal::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            Refusal::PermissionDenied(m) => tonic::Status::permission_denied(m),
            Refusal::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            Refusal::Unavailable(m) => tonic::Status::unavailable(m),
        }
    }
}

/// An authenticated caller: the ServiceAccount of its token and the pod the token is bound
/// to, if it is bound (a projected token is; a legacy Secret token is not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's ServiceAccount.
    pub service_account: ServiceAccount,
    /// `(name, uid)` of the pod the token is bound to.
    pub pod: Option<(String, String)>,
}

/// Reviews tokens and authorizes identities against the API server.
#[derive(Clone)]
pub struct Reviewer {
    client: kube::Client,
    trust_domain: String,
    trusted_node_accounts: BTreeSet<ServiceAccount>,
}

impl fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reviewer")
            .field("trust_domain", &self.trust_domain)
            .field("trusted_node_accounts", &self.trusted_node_accounts)
            .finish_non_exhaustive()
    }
}

fn api_error(what: &str, e: kube::Error) -> Refusal {
    Refusal::Unavailable(format!("the API server could not be asked {what}: {e}"))
}

impl Reviewer {
    /// A reviewer for `trust_domain` trusting `trusted_node_accounts` to ask for the
    /// identities of pods on their node.
    pub fn new(
        client: kube::Client,
        trust_domain: String,
        trusted_node_accounts: BTreeSet<ServiceAccount>,
    ) -> Reviewer {
        Reviewer {
            client,
            trust_domain,
            trusted_node_accounts,
        }
    }

    /// The trust domain identities are issued in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Reviews `token` with audience `istio-ca` (istiod's `ValidateK8sJwt`): authenticated, a
    /// ServiceAccount's, its username `system:serviceaccount:NS:NAME`.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| api_error("to review the token", e))?;
        let status = review.status.unwrap_or_default();
        if let Some(error) = status.error.as_deref().filter(|e| !e.is_empty()) {
            return Err(Refusal::Unauthenticated(format!(
                "the token is not authenticated (audience {AUDIENCE}): the API server says: {error}"
            )));
        }
        if status.authenticated != Some(true) {
            return Err(Refusal::Unauthenticated(format!(
                "the token is not authenticated (audience {AUDIENCE})"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if !user
            .groups
            .unwrap_or_default()
            .iter()
            .any(|g| g == SERVICE_ACCOUNTS_GROUP)
        {
            return Err(Refusal::Unauthenticated(format!(
                "the token of {username:?} is not a ServiceAccount's"
            )));
        }
        let service_account = match username.split(':').collect::<Vec<_>>().as_slice() {
            ["system", "serviceaccount", ns, name] if !ns.is_empty() && !name.is_empty() => {
                ServiceAccount {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                }
            }
            _ => {
                return Err(Refusal::Unauthenticated(format!(
                    "the token's username {username:?} is not system:serviceaccount:NS:NAME"
                )))
            }
        };
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let pod = first(POD_NAME_KEY).zip(first(POD_UID_KEY));
        Ok(Caller {
            service_account,
            pod,
        })
    }

    /// The identity `caller` gets: its own without `impersonated` (as istiod), else
    /// `impersonated` if node authorization allows it (module doc).
    pub async fn authorize(
        &self,
        caller: &Caller,
        impersonated: Option<&str>,
    ) -> Result<Identity, Refusal> {
        let sa = &caller.service_account;
        let Some(wanted) = impersonated else {
            return Identity::new(self.trust_domain.as_str(), &sa.namespace, &sa.name).map_err(
                |e| Refusal::InvalidArgument(format!("no identity for the caller {sa}: {e}")),
            );
        };
        if !self.trusted_node_accounts.contains(sa) {
            return Err(Refusal::PermissionDenied(format!(
                "the caller {sa} is not a trusted node account (trusted: {}), so it may not \
                 ask for {wanted}",
                self.trusted_list()
            )));
        }
        let id: Identity = wanted.parse().map_err(|e| {
            Refusal::InvalidArgument(format!("the identity asked for, {wanted:?}: {e}"))
        })?;
        if id.trust_domain() != self.trust_domain {
            return Err(Refusal::PermissionDenied(format!(
                "{id} is not of this CA's trust domain {}",
                self.trust_domain
            )));
        }
        let Some((pod_name, pod_uid)) = &caller.pod else {
            return Err(Refusal::PermissionDenied(format!(
                "the token of {sa} is not bound to a pod, so its node is unknown; {id} refused"
            )));
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &sa.namespace);
        let pod = pods
            .get_opt(pod_name)
            .await
            .map_err(|e| api_error(&format!("for pod {}/{pod_name}", sa.namespace), e))?
            .ok_or_else(|| {
                Refusal::PermissionDenied(format!(
                    "the caller's pod {}/{pod_name} (of {sa}) does not exist; {id} refused",
                    sa.namespace
                ))
            })?;
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(Refusal::PermissionDenied(format!(
                "the caller's pod {}/{pod_name} has uid {:?}, not the token's {pod_uid:?} \
                 (re-created?); {id} refused",
                sa.namespace,
                pod.metadata.uid.unwrap_or_default()
            )));
        }
        let spec = pod.spec.unwrap_or_default();
        if spec.service_account_name.as_deref() != Some(sa.name.as_str()) {
            return Err(Refusal::PermissionDenied(format!(
                "the caller's pod {}/{pod_name} runs as {:?}, not the token's {sa}; {id} refused",
                sa.namespace,
                spec.service_account_name.unwrap_or_default()
            )));
        }
        let Some(node) = spec.node_name.filter(|n| !n.is_empty()) else {
            return Err(Refusal::PermissionDenied(format!(
                "the caller's pod {}/{pod_name} is on no node yet; {id} refused",
                sa.namespace
            )));
        };
        let on_node: Api<Pod> = Api::all(self.client.clone());
        let list = on_node
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| api_error(&format!("for the pods on node {node}"), e))?;
        // istiod's index leaves out failed pods (field selector status.phase!=Failed).
        let runs_there = list.items.iter().any(|p| {
            p.metadata.namespace.as_deref() == Some(id.namespace())
                && p.spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.as_deref())
                    == Some(id.service_account())
                && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Failed")
        });
        if !runs_there {
            return Err(Refusal::PermissionDenied(format!(
                "no pod with ServiceAccount {}/{} runs on node {node:?} (the node of the \
                 caller {sa}, pod {pod_name}); {id} refused",
                id.namespace(),
                id.service_account()
            )));
        }
        Ok(id)
    }

    fn trusted_list(&self) -> String {
        self.trusted_node_accounts
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}
