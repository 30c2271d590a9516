//! The manifests of `deploy/kubernetes/standalone/` (weft's CA as a Deployment) are valid
//! Kubernetes objects (typed with k8s-openapi, with no field the types do not know), the CA's
//! RBAC is exactly what `weft ca serve` uses, and the Deployment references only what exists
//! and starts `weft ca serve` with arguments the CLI takes.

#[path = "support/manifests.rs"]
mod manifests;
use manifests::typed;

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
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
                other => panic!("{file}: unexpected kind {other}"),
            }
        }
    }
}

#[test]
fn the_ca_may_review_tokens_and_read_pods_and_nothing_else() {
    let role: ClusterRole = one("ca.yaml", "ClusterRole");
    let rule = |group: &str, resource: &str, verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(vec![resource.into()]),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    };
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
