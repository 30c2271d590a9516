//! The manifests of `deploy/kubernetes/standalone/` (weft's CA as a Deployment) are valid
//! Kubernetes objects (typed with k8s-openapi, with no field the types do not know), the CA's
//! RBAC is exactly what `weft ca serve` uses, and the Deployment references only what exists
//! and starts `weft ca serve` with arguments the CLI takes.

#[path = "support/manifests.rs"]
mod manifests;
use manifests::typed;

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule};
use serde::de::DeserializeOwned;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/standalone")
}

/// Every YAML document of `file` as (kind, value).
fn docs(file: &str) -> Vec<(String, serde_yaml_ng::Value)> {
    manifests::docs_in(&dir(), file)
}

/// The one object of `kind` in `file`, typed.
fn one<T: DeserializeOwned + serde::Serialize>(file: &str, kind: &str) -> T {
    manifests::one_in(&dir(), file, kind)
}

#[test]
fn every_standalone_manifest_parses_and_kustomize_lists_them_all() {
    let kustomization = &docs("kustomization.yaml")[0].1;
    let listed: Vec<String> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let mut present: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    present.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, present, "kustomization.yaml lists every manifest");
    for file in &listed {
        for (kind, v) in docs(file) {
            match kind.as_str() {
                "ServiceAccount" => drop(typed::<ServiceAccount>(file, &v)),
                "ClusterRole" => drop(typed::<ClusterRole>(file, &v)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(file, &v)),
                "Service" => drop(typed::<Service>(file, &v)),
                "Deployment" => drop(typed::<Deployment>(file, &v)),
                "DaemonSet" => drop(typed::<DaemonSet>(file, &v)),
                "ConfigMap" => drop(typed::<ConfigMap>(file, &v)),
                other => panic!("{file}: unexpected kind {other}"),
            }
        }
    }
}

fn rule(group: &str, resource: &str, verbs: &[&str]) -> PolicyRule {
    rules(group, &[resource], verbs)
}

fn rules(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    }
}

#[test]
fn the_ca_may_review_tokens_and_read_pods_and_nothing_else() {
    let role: ClusterRole = one("ca.yaml", "ClusterRole");
    assert_eq!(
        role.rules.unwrap(),
        vec![
            rule("authentication.k8s.io", "tokenreviews", &["create"]),
            rule("", "pods", &["get", "list"]),
        ]
    );
    let binding: ClusterRoleBinding = one("ca.yaml", "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let sa: ServiceAccount = one("ca.yaml", "ServiceAccount");
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
}

#[test]
fn the_deployment_serves_the_secret_in_the_cacerts_layout_behind_the_service() {
    let deployment: Deployment = one("ca.yaml", "Deployment");
    let service: Service = one("ca.yaml", "Service");
    let sa: ServiceAccount = one("ca.yaml", "ServiceAccount");
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name, sa.metadata.name);
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    for (k, v) in service.spec.as_ref().unwrap().selector.as_ref().unwrap() {
        assert_eq!(labels.get(k), Some(v), "the Service selects the pods");
    }
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap();
    assert_eq!(args[..2], ["ca".to_string(), "serve".to_string()]);
    let arg = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("--{name} in {args:?}"))
            .to_string()
    };
    // The port it listens on is the container's and the Service's 15012.
    assert!(arg("listen").ends_with(":15012"));
    let port = &c.ports.as_ref().unwrap()[0];
    assert_eq!(port.container_port, 15012);
    let sport = &service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(sport.port, 15012);
    // The CA directory is the mounted Secret.
    let ca_dir = arg("ca-dir");
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == ca_dir)
        .expect("the CA directory is mounted");
    let volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == mount.name)
        .expect("the mount's volume exists");
    assert_eq!(
        volume.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("cacerts")
    );
    // The serving certificate names the Service.
    let names = arg("server-name");
    let svc_name = format!(
        "{}.{}.svc",
        service.metadata.name.unwrap(),
        service.metadata.namespace.unwrap()
    );
    assert!(names.split(',').any(|n| n == svc_name), "{names}");
    assert_eq!(arg("trusted-node-accounts"), "istio-system/weft");
}

#[test]
fn the_node_daemon_may_only_list_and_watch_the_kinds_it_watches() {
    let role: ClusterRole = one("weft.yaml", "ClusterRole");
    let lw = ["list", "watch"];
    assert_eq!(
        role.rules.unwrap(),
        vec![
            rules("", &["namespaces", "pods", "services"], &lw),
            rules("discovery.k8s.io", &["endpointslices"], &lw),
            rules(
                "security.istio.io",
                &[
                    "authorizationpolicies",
                    "peerauthentications",
                    "requestauthentications"
                ],
                &lw
            ),
        ]
    );
    let binding: ClusterRoleBinding = one("weft.yaml", "ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let sa: ServiceAccount = one("weft.yaml", "ServiceAccount");
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
}

#[test]
fn the_node_daemon_watches_the_api_server_and_asks_the_ca_service() {
    use weft::config::{CaSource, Config, MeshSource, Redirect};
    let ds: DaemonSet = one("weft.yaml", "DaemonSet");
    let cm: ConfigMap = one("weft.yaml", "ConfigMap");
    let sa: ServiceAccount = one("weft.yaml", "ServiceAccount");
    let ca_service: Service = one("ca.yaml", "Service");
    let ca_deployment: Deployment = one("ca.yaml", "Deployment");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(
        pod.automount_service_account_token,
        Some(true),
        "in-cluster config needs the API token"
    );
    assert_eq!(pod.host_network, Some(true), "node-level capture");
    let c = &pod.containers[0];
    let caps = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(
        caps.add.clone().unwrap(),
        ["NET_ADMIN".to_string(), "NET_RAW".to_string()]
    );
    let volumes = pod.volumes.clone().unwrap();
    let mounts = c.volume_mounts.clone().unwrap();
    for m in &mounts {
        assert!(
            volumes.iter().any(|v| v.name == m.name),
            "mount {} has a volume",
            m.name
        );
    }
    let mount_of = |volume: &str| {
        PathBuf::from(
            &mounts
                .iter()
                .find(|m| m.name == volume)
                .unwrap_or_else(|| panic!("{volume} is mounted"))
                .mount_path,
        )
    };
    let config_volume = volumes
        .iter()
        .find(|v| {
            v.config_map
                .as_ref()
                .is_some_and(|c| Some(&c.name) == cm.metadata.name.as_ref())
        })
        .expect("the ConfigMap is a volume");
    let config_path = mount_of(&config_volume.name).join("weft.yaml");
    let args = c.args.clone().unwrap();
    assert!(args
        .windows(2)
        .any(|w| w[0] == "--config" && Path::new(&w[1]) == config_path));
    let data = cm.data.unwrap();
    let config = Config::parse(
        &config_path,
        &data["weft.yaml"],
        &weft::config::Env {
            node_name: Some("node-1".into()),
            ..Default::default()
        },
    )
    .expect("the ConfigMap's weft.yaml is a valid config");
    assert_eq!(
        config.mesh,
        MeshSource::Kubernetes(weft::config::KubeSettings { kubeconfig: None }),
        "in-cluster Kubernetes source"
    );
    assert_eq!(config.redirect, Redirect::Tproxy);
    let CaSource::Istio(ca) = &config.ca else {
        panic!("not the CA service")
    };
    // The CA client asks ca.yaml's Service, on its port, with a token of audience istio-ca
    // and the root from the root-only ConfigMap.
    let svc_port = ca_service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port;
    assert_eq!(
        ca.address,
        format!(
            "https://{}.{}.svc:{svc_port}",
            ca_service.metadata.name.as_ref().unwrap(),
            ca_service.metadata.namespace.as_ref().unwrap()
        )
    );
    let token_volume = volumes
        .iter()
        .find(|v| v.name == "istio-token")
        .unwrap()
        .projected
        .as_ref()
        .unwrap()
        .sources
        .as_ref()
        .unwrap()[0]
        .service_account_token
        .clone()
        .unwrap();
    assert_eq!(token_volume.audience.as_deref(), Some("istio-ca"));
    assert_eq!(
        ca.token_file,
        mount_of("istio-token").join(&token_volume.path)
    );
    let root_volume = volumes
        .iter()
        .find(|v| {
            v.config_map
                .as_ref()
                .is_some_and(|c| c.name == "weft-ca-root")
        })
        .expect("the root-only ConfigMap, never the Secret");
    assert!(
        volumes.iter().all(|v| v.secret.is_none()),
        "no Secret on a node"
    );
    assert_eq!(
        ca.root_cert_file,
        mount_of(&root_volume.name).join("root-cert.pem")
    );
    // The CA trusts exactly this DaemonSet's ServiceAccount as a node account.
    let ca_args = ca_deployment
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap();
    let trusted = format!(
        "--trusted-node-accounts={}/{}",
        sa.metadata.namespace.unwrap(),
        sa.metadata.name.unwrap()
    );
    assert!(ca_args.contains(&trusted), "{ca_args:?}");
}
