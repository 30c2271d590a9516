//! The Kubernetes manifests in `deploy/kubernetes/` are valid Kubernetes objects (typed with
//! k8s-openapi, with no field the types do not know) and reference only what exists: the
//! ServiceAccount, the ConfigMap and its key, volumes, ports, and the paths weft's config
//! reads (istio-cni's ZDS socket among them); the Helm values and the IstioOperator make
//! istiod trust that ServiceAccount as a node proxy.

#[path = "support/manifests.rs"]
mod manifests;
use manifests::typed;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount};
use serde::de::DeserializeOwned;
use weft::config::{CaSource, Config, MeshSource, Redirect};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// Every YAML document of `file` as (kind, value).
fn docs(file: &str) -> Vec<(String, serde_yaml_ng::Value)> {
    manifests::docs_in(&dir(), file)
}

/// The one object of `kind` in `file`, typed.
fn one<T: DeserializeOwned + serde::Serialize>(file: &str, kind: &str) -> T {
    manifests::one_in(&dir(), file, kind)
}

fn container(spec: &PodSpec) -> &Container {
    assert_eq!(spec.containers.len(), 1);
    &spec.containers[0]
}

#[test]
fn every_manifest_parses_as_kubernetes_objects_and_kustomize_lists_them_all() {
    let kustomization = docs("kustomization.yaml");
    let listed: BTreeSet<String> = kustomization[0].1["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present);
    for file in &present {
        for (kind, v) in docs(file) {
            match kind.as_str() {
                "DaemonSet" => drop(typed::<DaemonSet>(file, &v)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(file, &v)),
                "ConfigMap" => drop(typed::<ConfigMap>(file, &v)),
                other => panic!("{file}: unexpected kind {other}"),
            }
            assert_eq!(v["metadata"]["namespace"], "istio-system", "{file}");
        }
    }
}

#[test]
fn the_daemonset_references_only_what_exists() {
    let ds: DaemonSet = one("daemonset.yaml", "DaemonSet");
    let sa: ServiceAccount = one("rbac.yaml", "ServiceAccount");
    let cm: ConfigMap = one("configmap.yaml", "ConfigMap");
    let spec = ds.spec.unwrap();
    let selector = spec.selector.match_labels.unwrap();
    let template_labels = spec.template.metadata.unwrap().labels.unwrap();
    assert!(selector
        .iter()
        .all(|(k, v)| template_labels.get(k) == Some(v)));
    let pod = spec.template.spec.unwrap();

    assert_eq!(pod.service_account_name, sa.metadata.name);
    // In-pod mode works in the pods' network namespaces, not the node's (as ztunnel).
    assert_ne!(pod.host_network, Some(true));
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert!(pod.termination_grace_period_seconds.unwrap() >= 10);
    let tolerations = pod.tolerations.clone().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );

    let c = container(&pod);
    let caps = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(
        caps.add
            .clone()
            .unwrap()
            .into_iter()
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "NET_ADMIN".to_string(),
            "NET_RAW".to_string(),
            "SYS_ADMIN".to_string()
        ])
    );
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(false));
    let node_name = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    // The drain's default follows the pod's grace period: the two must agree.
    let tgps = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "TERMINATION_GRACE_PERIOD_SECONDS")
        .and_then(|e| e.value.clone())
        .expect("TERMINATION_GRACE_PERIOD_SECONDS");
    assert_eq!(
        Some(tgps.parse::<i64>().unwrap()),
        pod.termination_grace_period_seconds,
        "TERMINATION_GRACE_PERIOD_SECONDS and terminationGracePeriodSeconds differ"
    );

    // Volumes: every mount names a volume; the config volume names the ConfigMap and a key
    // it has; the token is projected for istiod's audience.
    let volumes = pod.volumes.clone().unwrap();
    let volume = |name: &str| volumes.iter().find(|v| v.name == name);
    for m in c.volume_mounts.as_ref().unwrap() {
        assert!(
            volume(&m.name).is_some(),
            "mount of missing volume {}",
            m.name
        );
    }
    let config_volume = volumes
        .iter()
        .find_map(|v| {
            v.config_map
                .as_ref()
                .filter(|c| c.name == cm.metadata.name.clone().unwrap())
        })
        .expect("a volume of the weft ConfigMap");
    let data = cm.data.clone().unwrap();
    for item in config_volume.items.as_ref().unwrap() {
        assert!(
            data.contains_key(&item.key),
            "ConfigMap has no key {}",
            item.key
        );
    }
    let token = volumes
        .iter()
        .find_map(|v| v.projected.as_ref())
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s.iter().find_map(|s| s.service_account_token.clone()))
        .expect("a projected ServiceAccount token");
    assert_eq!(token.audience.as_deref(), Some("istio-ca"));

    // The config in the ConfigMap is valid and reads exactly the files the pod mounts.
    let mount_of = |volume_name: &str| {
        c.volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == volume_name)
            .map(|m| PathBuf::from(&m.mount_path))
            .unwrap_or_else(|| panic!("volume {volume_name} not mounted"))
    };
    let config_path = mount_of(
        &volumes
            .iter()
            .find(|v| {
                v.config_map
                    .as_ref()
                    .is_some_and(|c| c.name == "weft-config")
            })
            .unwrap()
            .name,
    )
    .join("weft.yaml");
    let args = c.args.clone().unwrap();
    assert!(args
        .windows(2)
        .any(|w| w[0] == "--config" && Path::new(&w[1]) == config_path));
    let config = Config::parse(
        &config_path,
        &data["weft.yaml"],
        &weft::config::Env {
            node_name: Some("node-1".into()),
            ..Default::default()
        },
    )
    .expect("the ConfigMap's weft.yaml is a valid config");
    let MeshSource::Xds(xds) = &config.mesh else {
        panic!("not in istiod mode")
    };
    let CaSource::Istio(ca) = &config.ca else {
        panic!("not Istio's CA")
    };
    let token_path = mount_of("istio-token").join(&token.path);
    let root_volume = volumes
        .iter()
        .find(|v| {
            v.config_map
                .as_ref()
                .is_some_and(|c| c.name == "istio-ca-root-cert")
        })
        .expect("istiod's root ConfigMap");
    let root_path = mount_of(&root_volume.name).join("root-cert.pem");
    for cp in [xds, ca] {
        assert_eq!(cp.token_file, token_path);
        assert_eq!(cp.root_cert_file, root_path);
    }

    // In-pod capture: istio-cni's socket folder comes from the host, where istio-cni's node
    // agent listens (its default, /var/run/ztunnel/ztunnel.sock).
    assert_eq!(config.redirect, Redirect::Inpod);
    let zds_volume = volumes
        .iter()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/var/run/ztunnel")
        })
        .expect("istio-cni's socket folder from the host");
    assert_eq!(
        Some(mount_of(&zds_volume.name).as_path()),
        config.zds_socket.parent()
    );
    assert_eq!(
        config.zds_socket,
        Path::new("/var/run/ztunnel/ztunnel.sock")
    );

    // Ports: the probe hits the readiness listener, and every listener is a declared port.
    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    let probe_port = match &probe.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => {
            c.ports
                .as_ref()
                .unwrap()
                .iter()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap()
                .container_port
        }
    };
    assert_eq!(probe_port, i32::from(config.listen.readiness.port()));
    let declared: BTreeSet<i32> = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| p.container_port)
        .collect();
    for l in [
        config.listen.outbound,
        config.listen.inbound_plaintext,
        config.listen.hbone,
        config.listen.metrics,
        config.listen.readiness,
    ] {
        assert!(
            declared.contains(&i32::from(l.port())),
            "port {} not declared",
            l.port()
        );
    }
}

/// `CA_TRUSTED_NODE_ACCOUNTS` as a chart value or IstioOperator setting lists `account`.
fn trusts(value: &serde_yaml_ng::Value, account: &str) -> bool {
    value
        .as_str()
        .unwrap_or_default()
        .split(',')
        .any(|a| a.trim() == account)
}

#[test]
fn istiod_is_told_through_its_chart_values_to_trust_wefts_service_account() {
    let sa: ServiceAccount = one("rbac.yaml", "ServiceAccount");
    let account = format!(
        "{}/{}",
        sa.metadata.namespace.unwrap(),
        sa.metadata.name.unwrap()
    );
    let read = |file: &str| -> serde_yaml_ng::Value {
        let text = std::fs::read_to_string(dir().join(file)).unwrap();
        serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    // The istiod chart reads `.Values.env` (its deployment template sets each as a variable,
    // and its own CA_TRUSTED_NODE_ACCOUNTS only when env has none).
    let values = read("helm/istiod-values.yaml");
    assert!(
        trusts(&values["env"]["CA_TRUSTED_NODE_ACCOUNTS"], &account),
        "helm/istiod-values.yaml does not trust {account}"
    );
    // istioctl: the same under values.pilot.env, ztunnel not installed.
    let iop = read("helm/istio-operator.yaml");
    assert_eq!(iop["kind"], "IstioOperator");
    assert_eq!(iop["spec"]["profile"], "ambient");
    assert_eq!(
        iop["spec"]["components"]["ztunnel"]["enabled"],
        serde_yaml_ng::Value::Bool(false)
    );
    assert!(
        trusts(
            &iop["spec"]["values"]["pilot"]["env"]["CA_TRUSTED_NODE_ACCOUNTS"],
            &account
        ),
        "helm/istio-operator.yaml does not trust {account}"
    );
}
