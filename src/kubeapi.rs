//! The Kubernetes API client, made once for whoever talks to the API server: the mesh watch
//! (`source::kube`) and `weft ca serve` (`ca_server`). kube-rs does the talking; this module
//! only picks its configuration: a kubeconfig file's current context (server, CA, token or
//! client certificate), else in-cluster (the pod's ServiceAccount token and CA,
//! `KUBERNETES_SERVICE_HOST`/`_PORT`).

use std::path::Path;

/// Why no client could be made, naming where its configuration came from.
#[derive(Debug, thiserror::Error)]
pub enum KubeApiError {
    /// The kubeconfig file is unreadable or unusable.
    #[error("{path}: {message}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// Not in a pod, or the pod's ServiceAccount files are missing.
    #[error("in-cluster Kubernetes config: {0}")]
    InCluster(String),
    /// kube-rs refused the configuration (TLS settings, proxy, ...).
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// A client for the API server `kubeconfig` names, or the in-cluster one without it.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeApiError> {
    let config = match kubeconfig {
        Some(path) => {
            let fail = |e: &dyn std::fmt::Display| KubeApiError::Kubeconfig {
                path: path.display().to_string(),
                message: e.to_string(),
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| fail(&e))?
        }
        None => kube::Config::incluster().map_err(|e| KubeApiError::InCluster(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| KubeApiError::Client(e.to_string()))
}
