//! Kubernetes objects → the mesh [`model`](crate::model): Namespaces, Pods (workloads, with
//! their enrollment, identity and owning workload), Services (VIPs and ports) and Istio's
//! security policies, checking what spans objects (duplicate objects, IPs claimed twice).
//!
//! Owns the translation rules. Does not read YAML (`kinds` does) and never touches files,
//! state or sockets; errors and warnings go to the [`Parser`], located at their field.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::kinds::Object;
use super::locate::Seg;
use super::parse::Origin;
use super::parse::Parser;
use crate::model::{
    AuthorizationPolicy, Enrollment, Mesh, Namespace, PeerAuthentication, Policy,
    RequestAuthentication, Service, Workload,
};
use crate::source::objects;

impl Parser<'_> {
    /// Checks metadata.name and returns (namespace, name).
    fn name_of(
        &mut self,
        origin: Origin,
        meta: &ObjectMeta,
        namespaced: bool,
    ) -> Option<(String, String)> {
        objects::name_of(meta, namespaced)
            .map_err(|e| self.error_in(origin, &e.path, e.message))
            .ok()
    }

    pub(super) fn translate(&mut self, objects: Vec<(Origin, Object)>) -> Mesh {
        let mut mesh = Mesh::default();
        // Namespaces first: pods need their labels whatever the order in the file.
        for (origin, obj) in &objects {
            if let Object::Namespace(ns) = obj {
                let Some((_, name)) = self.name_of(*origin, &ns.metadata, false) else {
                    continue;
                };
                if mesh.namespaces.contains_key(&name) {
                    self.error_in(
                        *origin,
                        &[Seg::Key("metadata"), Seg::Key("name")],
                        format!("duplicate Namespace {name:?}"),
                    );
                    continue;
                }
                let labels = ns.metadata.labels.clone().unwrap_or_default();
                mesh.namespaces
                    .insert(name.clone(), Namespace { name, labels });
            }
        }
        let mut pod_keys: HashSet<String> = HashSet::new();
        let mut ip_owner: HashMap<IpAddr, String> = HashMap::new();
        let mut services_seen: HashSet<String> = HashSet::new();
        let mut policies_seen: HashSet<(crate::model::PolicyKind, String, String)> = HashSet::new();
        for (origin, obj) in objects {
            match obj {
                Object::Namespace(_) => {}
                Object::Pod(read) => {
                    if let Some(w) = self.workload(origin, read, &mesh.namespaces) {
                        let key = format!("{}/{}", w.namespace, w.name);
                        if !pod_keys.insert(key.clone()) {
                            self.error_in(
                                origin,
                                &[Seg::Key("metadata"), Seg::Key("name")],
                                format!("duplicate Pod {key}"),
                            );
                            continue;
                        }
                        if w.enrollment != Enrollment::HostNetwork {
                            for (i, ip) in w.ips.iter().enumerate() {
                                if let Some(other) = ip_owner.insert(*ip, format!("Pod {key}")) {
                                    self.error_in(
                                        origin,
                                        &[Seg::Key("status"), Seg::Key("podIPs"), Seg::Index(i)],
                                        format!("duplicate IP {ip}: Pod {key} and {other} both claim it"),
                                    );
                                }
                            }
                        }
                        mesh.insert_workload(w);
                    }
                }
                Object::Service(svc) => {
                    if let Some(s) = self.service(origin, &svc) {
                        let key = s.key();
                        if !services_seen.insert(key.clone()) {
                            self.error_in(
                                origin,
                                &[Seg::Key("metadata"), Seg::Key("name")],
                                format!("duplicate Service {key}"),
                            );
                            continue;
                        }
                        for ip in &s.vips {
                            if let Some(other) = ip_owner.insert(*ip, format!("Service {key}")) {
                                self.error_in(
                                    origin,
                                    &[Seg::Key("spec"), Seg::Key("clusterIP")],
                                    format!("duplicate IP {ip}: Service {key} and {other} both claim it"),
                                );
                            }
                        }
                        mesh.insert_service(s);
                    }
                }
                Object::AuthorizationPolicy(crd) => {
                    if let Some((namespace, name)) = self.name_of(origin, &crd.metadata, true) {
                        let p = Policy::AuthorizationPolicy(AuthorizationPolicy {
                            name,
                            namespace,
                            spec: crd.spec,
                        });
                        self.push_policy(origin, p, &mut policies_seen, &mut mesh);
                    }
                }
                Object::PeerAuthentication(crd) => {
                    if let Some((namespace, name)) = self.name_of(origin, &crd.metadata, true) {
                        let p = Policy::PeerAuthentication(PeerAuthentication {
                            name,
                            namespace,
                            spec: crd.spec,
                        });
                        self.push_policy(origin, p, &mut policies_seen, &mut mesh);
                    }
                }
                Object::RequestAuthentication(crd) => {
                    if let Some((namespace, name)) = self.name_of(origin, &crd.metadata, true) {
                        let p = Policy::RequestAuthentication(RequestAuthentication {
                            name,
                            namespace,
                            spec: crd.spec,
                        });
                        self.push_policy(origin, p, &mut policies_seen, &mut mesh);
                    }
                }
            }
        }
        mesh
    }

    fn push_policy(
        &mut self,
        origin: Origin,
        p: Policy,
        seen: &mut HashSet<(crate::model::PolicyKind, String, String)>,
        mesh: &mut Mesh,
    ) {
        let (ns, name) = p.key();
        let key = (p.kind(), ns.to_string(), name.to_string());
        if !seen.insert(key) {
            self.error_in(
                origin,
                &[Seg::Key("metadata"), Seg::Key("name")],
                format!("duplicate {:?} {ns}/{name}", p.kind()),
            );
            return;
        }
        mesh.policies.push_back(p);
    }

    /// The workload a Pod was read as ([`Object::Pod`]), its bad fields reported, enrolled as
    /// its namespace's labels and its own decide.
    fn workload(
        &mut self,
        origin: Origin,
        read: Result<Option<Workload>, Vec<objects::FieldError>>,
        namespaces: &imbl::OrdMap<String, Namespace>,
    ) -> Option<Workload> {
        let mut w = match read {
            Ok(w) => w?,
            Err(errors) => {
                for e in errors {
                    self.error_in(origin, &e.path, e.message);
                }
                return None;
            }
        };
        // Read without its namespace's labels: decided here, once every namespace is known.
        w.enroll_in(namespaces);
        Some(w)
    }

    fn service(&mut self, origin: Origin, svc: &core::Service) -> Option<Service> {
        objects::service(svc)
            .map_err(|e| self.error_in(origin, &e.path, e.message))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse::fixtures::{errors, line_of, LIST};
    use super::super::parse_mesh;
    use super::*;
    use crate::model::policy::{
        Action, AuthorizationPolicySpec, ConditionKey, IpBlock, MtlsMode, PortNumber, StringMatch,
    };
    use crate::model::{ServicePort, TargetPort, DATAPLANE_MODE_LABEL};

    #[test]
    fn a_kubectl_list_becomes_the_expected_model() {
        let parsed = parse_mesh("list.yaml", LIST).unwrap();
        let m = &parsed.mesh;
        assert_eq!(m.namespaces.len(), 2);
        assert_eq!(m.namespaces["shop"].labels[DATAPLANE_MODE_LABEL], "ambient");

        // Workloads are keyed by uid: `Kubernetes//Pod/<namespace>/<name>`.
        let names: Vec<_> = m.workloads.values().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "old-0",
                "cart-0",
                "web-7d9c6b5f4-abcde",
                "web-7d9c6b5f4-fghij",
            ]
        );
        let pod = |name: &str| {
            m.workloads
                .values()
                .find(|w| w.name == name)
                .unwrap()
                .clone()
        };
        let web = pod("web-7d9c6b5f4-abcde");
        assert_eq!(web.uid, "Kubernetes//Pod/shop/web-7d9c6b5f4-abcde");
        assert_eq!(web.namespace, "shop");
        assert_eq!(web.service_account, "web");
        assert_eq!(web.node, "node-1");
        assert_eq!(
            web.ips.to_vec(),
            vec![
                "10.244.1.10".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::a".parse().unwrap()
            ]
        );
        assert_eq!(web.named_ports.get("http"), Some(&8080));
        assert_eq!(
            web.labels.get("app").map(crate::model::ArcStr::as_str),
            Some("web")
        );
        assert_eq!(web.enrollment, Enrollment::Enrolled);
        assert_eq!(
            web.workload_name, "web",
            "the Deployment behind the ReplicaSet"
        );
        assert_eq!(
            (web.canonical_name.as_str(), web.canonical_revision.as_str()),
            ("web", "latest")
        );
        assert_eq!(
            pod("cart-0").workload_name,
            "cart-0",
            "no owner: the pod itself"
        );
        assert_eq!(pod("web-7d9c6b5f4-fghij").node, "node-2");
        assert_eq!(pod("cart-0").enrollment, Enrollment::OptedOut);
        assert_eq!(pod("old-0").enrollment, Enrollment::NotEnrolled);
        assert_eq!(pod("old-0").service_account, "default");

        assert_eq!(m.services.len(), 2);
        let svc = &m.services["shop/web"];
        assert_eq!(svc.vips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            svc.ports,
            vec![
                ServicePort {
                    name: "http".into(),
                    port: 80,
                    target_port: TargetPort::Named("http".into())
                },
                ServicePort {
                    name: "metrics".into(),
                    port: 9090,
                    target_port: TargetPort::Number(9090)
                },
            ]
        );
        // Endpoints are resolved from the selector by the snapshot (one owner of that rule).
        let snap = crate::state::Snapshot::new(1, m.clone());
        assert_eq!(
            snap.mesh.services["shop/web"].endpoints,
            vec![
                "Kubernetes//Pod/shop/web-7d9c6b5f4-abcde".to_string(),
                "Kubernetes//Pod/shop/web-7d9c6b5f4-fghij".to_string()
            ]
        );
        let headless = &m.services["shop/web-headless"];
        assert!(headless.vips.is_empty(), "headless service has no VIP");
        assert_eq!(headless.ports[0].target_port, TargetPort::Number(8080));

        assert_eq!(m.policies.len(), 7);
        let Policy::AuthorizationPolicy(ap) = &m.policies[0] else {
            panic!()
        };
        assert_eq!(
            (ap.namespace.as_str(), ap.name.as_str()),
            ("shop", "web-allow-frontend")
        );
        assert_eq!(ap.spec.action, Action::Allow);
        assert_eq!(
            ap.spec.selector.as_ref().unwrap().match_labels["app"],
            "web"
        );
        let rule = &ap.spec.rules[0];
        let src = &rule.from[0].source;
        assert_eq!(
            src.principals,
            vec![
                StringMatch::Exact("cluster.local/ns/shop/sa/frontend".into()),
                StringMatch::Prefix("cluster.local/ns/ops/".into())
            ]
        );
        assert_eq!(src.namespaces, vec![StringMatch::Exact("shop".into())]);
        assert_eq!(
            src.ip_blocks,
            vec![IpBlock("10.244.0.0/16".parse().unwrap())]
        );
        assert_eq!(
            src.not_ip_blocks,
            vec![IpBlock("10.244.9.9/32".parse().unwrap())]
        );
        let op = &rule.to[0].operation;
        assert_eq!(op.ports, vec![PortNumber(8080)]);
        assert_eq!(op.not_ports, vec![PortNumber(9090)]);
        assert_eq!(rule.when[0].key, ConditionKey::SourceNamespace);
        assert_eq!(
            rule.when[1].key,
            ConditionKey::RequestAuthClaims(vec!["groups".into(), "admin".into()])
        );
        assert_eq!(
            rule.when[1].not_values,
            vec![StringMatch::Exact("false".into())]
        );

        let Policy::AuthorizationPolicy(deny) = &m.policies[1] else {
            panic!()
        };
        assert_eq!(deny.spec.action, Action::Deny);
        assert_eq!(deny.namespace, "istio-system");
        let Policy::AuthorizationPolicy(all) = &m.policies[2] else {
            panic!()
        };
        assert_eq!(
            all.spec,
            AuthorizationPolicySpec::default(),
            "spec: {{}} is an ALLOW with no rules"
        );

        let Policy::PeerAuthentication(pa) = &m.policies[3] else {
            panic!()
        };
        assert_eq!(pa.spec.mtls.unwrap().mode, MtlsMode::Strict);
        let Policy::PeerAuthentication(pa) = &m.policies[4] else {
            panic!()
        };
        assert_eq!(pa.spec.mtls.unwrap().mode, MtlsMode::Permissive);
        assert_eq!(pa.spec.port_level_mtls[&9090].mode, MtlsMode::Disable);

        let Policy::RequestAuthentication(ra) = &m.policies[5] else {
            panic!()
        };
        let rule = &ra.spec.jwt_rules[0];
        assert_eq!(rule.issuer, "https://issuer.example");
        assert_eq!(rule.from_headers[0].prefix.as_deref(), Some("Bearer "));
        assert!(rule.forward_original_token);
        let Policy::RequestAuthentication(ra) = &m.policies[6] else {
            panic!()
        };
        assert_eq!(ra.spec.jwt_rules[0].output_claim_to_headers[0].claim, "sub");

        // The Deployment is skipped with a warning that points at it (the dual-stack enrolled
        // pod's IPv6 address is captured like its IPv4 one: no warning).
        assert_eq!(parsed.warnings.len(), 1, "{:?}", parsed.warnings);
        let w = parsed.warnings[0].to_string();
        let line = line_of(LIST, "kind: Deployment", 0) - 1;
        assert!(
            w.starts_with(&format!(
                "list.yaml:{line}: skipping unsupported object Deployment"
            )),
            "{w}"
        );
    }

    #[test]
    fn duplicate_pod_ips_are_refused_at_the_second_claim() {
        let text = "\
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: n}
status:
  podIP: 10.0.0.1
  podIPs:
  - ip: 10.0.0.1
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: n}
status:
  podIP: 10.0.0.1
  podIPs:
  - ip: 10.0.0.1
";
        let e = errors(text);
        assert_eq!(
            e,
            ["mesh.yaml:15: duplicate IP 10.0.0.1: Pod n/b and Pod n/a both claim it"]
        );
    }

    #[test]
    fn a_service_vip_may_not_reuse_a_pod_ip() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  clusterIP: 10.0.0.1\n";
        let e = errors(text);
        assert_eq!(e, ["mesh.yaml:10: duplicate IP 10.0.0.1: Service default/s and Pod default/a both claim it"]);
    }

    #[test]
    fn invalid_service_addresses_and_ports_are_refused_where_they_stand() {
        let svc = |spec: &str| {
            errors(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: a}}\nspec:\n{spec}"
            ))
        };
        let e = svc("  clusterIPs:\n  - 10.96.0.1\n  - 10.96.0.300\n  ports: [{port: 80}]\n");
        assert_eq!(
            e,
            ["mesh.yaml:7: spec.clusterIPs[1]: invalid IP address \"10.96.0.300\""]
        );
        let e = svc("  clusterIP: banana\n  ports: [{port: 80}]\n");
        assert_eq!(
            e,
            ["mesh.yaml:5: spec.clusterIP: invalid IP address \"banana\""]
        );
        for bad in ["0", "70000"] {
            let e = svc(&format!(
                "  clusterIP: 10.96.0.1\n  ports: [{{port: {bad}}}]\n"
            ));
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(e[0].starts_with("mesh.yaml:6: spec.ports[0]"), "{e:?}");
        }
    }

    #[test]
    fn invalid_pod_ips_and_missing_names_are_refused() {
        let e = errors("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus:\n  podIPs:\n  - ip: 10.0.0.300\n");
        assert_eq!(
            e,
            ["mesh.yaml:6: status.podIPs[0].ip: invalid IP address \"10.0.0.300\""]
        );
        let e = errors("apiVersion: v1\nkind: Namespace\nmetadata:\n  labels: {a: b}\n");
        assert_eq!(e, ["mesh.yaml:4: metadata.name is required"]);
        let e = errors("apiVersion: v1\nmetadata: {name: x}\n");
        assert!(
            e[0].starts_with("mesh.yaml:1: object has no `kind`"),
            "{e:?}"
        );
    }

    #[test]
    fn pods_are_enrolled_by_their_namespace_wherever_it_stands_in_the_file() {
        // Pods are translated as they are read (`kinds::Object::Pod`), before a Namespace
        // further down is: their enrollment must still follow it.
        let pod = |name: &str, ns: &str, extra: &str| {
            format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}{extra}}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: 10.0.0.{}}}\n", name.len())
        };
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n";
        let docs = [
            pod("a", "shop", ""),
            pod("bb", "shop", ", labels: {istio.io/dataplane-mode: none}"),
            pod("ccc", "other", ""),
            ns.to_string(),
        ]
        .join("---\n");
        let host = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: dddd, namespace: shop}\nspec: {nodeName: n1, hostNetwork: true}\nstatus: {podIP: 10.0.0.4}\n";
        let list = {
            let item = |doc: &str| {
                doc.lines()
                    .enumerate()
                    .map(|(i, l)| format!("{}{l}\n", if i == 0 { "- " } else { "  " }))
                    .collect::<String>()
            };
            format!(
                "apiVersion: v1\nkind: List\nitems:\n{}{}{}",
                item(&pod("a", "shop", "")),
                item(&pod(
                    "bb",
                    "shop",
                    ", labels: {istio.io/dataplane-mode: none}"
                )),
                item(ns)
            )
        };
        let enrollment = |text: &str, name: &str| {
            let mesh = parse_mesh("mesh.yaml", text).unwrap().mesh;
            mesh.workloads
                .values()
                .find(|w| w.name == name)
                .map(|w| w.enrollment)
                .unwrap()
        };
        let text = format!("{docs}{host}");
        assert_eq!(enrollment(&text, "a"), Enrollment::Enrolled);
        assert_eq!(enrollment(&text, "bb"), Enrollment::OptedOut);
        assert_eq!(enrollment(&text, "ccc"), Enrollment::NotEnrolled);
        assert_eq!(enrollment(&text, "dddd"), Enrollment::HostNetwork);
        assert_eq!(enrollment(&list, "a"), Enrollment::Enrolled);
        assert_eq!(enrollment(&list, "bb"), Enrollment::OptedOut);
    }

    #[test]
    fn duplicate_objects_are_refused() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n";
        assert_eq!(errors(text), ["mesh.yaml:8: duplicate Pod default/a"]);
    }
}
