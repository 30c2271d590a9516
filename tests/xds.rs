//! The xDS source against an in-process istiod stand-in speaking delta ADS over TLS on
//! loopback: first sync, incremental changes, NACK of a malformed resource, and istiod going
//! away and coming back.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::istiod::{FakeIstiod, Seen, ADDRESS_TYPE, AUTHORIZATION_TYPE, CLUSTER_ID, TOKEN};
use tokio::sync::watch;
use weft::metrics::{XdsMetrics, XdsTermination, XdsTerminationLabels, XdsTypeLabels};
use weft::model::policy::{Action, PolicyScope};
use weft::model::{Enrollment, Policy, TargetPort};
use weft::proto::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use weft::proto::istio::security as xsec;
use weft::proto::istio::workload as xw;
use weft::source::xds::{NodeInfo, XdsClient};
use weft::state::StateStore;

const LIMIT: Duration = Duration::from_secs(10);

fn workload(uid: &str, ip: [u8; 4], node: &str, hbone: bool, svc: Option<&str>) -> xw::Address {
    xw::Address {
        r#type: Some(xw::address::Type::Workload(xw::Workload {
            uid: uid.into(),
            name: uid.rsplit('/').next().unwrap().into(),
            namespace: "shop".into(),
            addresses: vec![ip.to_vec()],
            tunnel_protocol: if hbone {
                xw::TunnelProtocol::Hbone as i32
            } else {
                xw::TunnelProtocol::None as i32
            },
            service_account: "cart".into(),
            node: node.into(),
            services: svc
                .map(|k| {
                    (
                        k.to_string(),
                        xw::PortList {
                            ports: vec![xw::Port {
                                service_port: 80,
                                target_port: 8080,
                            }],
                        },
                    )
                })
                .into_iter()
                .collect(),
            authorization_policies: vec!["shop/only-frontend".into()],
            ..Default::default()
        })),
    }
}

fn service() -> xw::Address {
    xw::Address {
        r#type: Some(xw::address::Type::Service(xw::Service {
            name: "cart".into(),
            namespace: "shop".into(),
            hostname: "cart.shop.svc.cluster.local".into(),
            addresses: vec![xw::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 10],
            }],
            ports: vec![xw::Port {
                service_port: 80,
                target_port: 8080,
            }],
            waypoint: None,
        })),
    }
}

const SVC_KEY: &str = "shop/cart.shop.svc.cluster.local";
const CART_0: &str = "Kubernetes//Pod/shop/cart-0";
const CART_1: &str = "Kubernetes//Pod/shop/cart-1";

fn policy() -> xsec::Authorization {
    xsec::Authorization {
        name: "only-frontend".into(),
        namespace: "shop".into(),
        scope: xsec::Scope::WorkloadSelector as i32,
        action: xsec::Action::Allow as i32,
        rules: vec![xsec::Rule {
            clauses: vec![xsec::Clause {
                matches: vec![xsec::Match {
                    principals: vec![xsec::StringMatch {
                        match_type: Some(xsec::string_match::MatchType::Exact(
                            "cluster.local/ns/shop/sa/frontend".into(),
                        )),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}

/// A running client publishing into a fresh store.
struct Client {
    store: Arc<StateStore>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    metrics: XdsMetrics,
}

impl Client {
    fn start(istiod: &FakeIstiod) -> Client {
        let store = StateStore::new("xds test");
        let node = NodeInfo {
            node_name: "node-1".into(),
            pod_name: "weft-x1".into(),
            pod_namespace: "istio-system".into(),
            ip: Some("127.0.0.1".parse().unwrap()),
            cluster_id: CLUSTER_ID.into(),
        };
        let (shutdown, rx) = watch::channel(false);
        let metrics = XdsMetrics::default();
        let task = XdsClient::new(
            istiod.control_plane(),
            node,
            "cluster.local",
            store.clone(),
            metrics.clone(),
        )
        .spawn(rx);
        Client {
            store,
            shutdown,
            task,
            metrics,
        }
    }

    async fn until(&self, what: &str, f: impl Fn(&StateStore) -> bool) {
        let mut rx = self.store.subscribe();
        let store = self.store.clone();
        tokio::time::timeout(LIMIT, rx.wait_for(|_| f(&store)))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "not within {LIMIT:?}: {what}; status {:?}",
                    self.store.status()
                )
            })
            .unwrap();
    }

    fn uids(&self) -> Vec<String> {
        self.store
            .snapshot()
            .mesh
            .workloads
            .values()
            .map(|w| w.uid.to_string())
            .collect()
    }

    async fn stop(self) {
        self.shutdown.send_replace(true);
        tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("client stops")
            .unwrap();
    }
}

fn acks(seen: &[Seen], type_url: &str) -> usize {
    seen.iter()
        .filter(|s| {
            s.request.type_url == type_url
                && !s.request.response_nonce.is_empty()
                && s.request.error_detail.is_none()
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_sync_publishes_workloads_services_and_policies_once_both_types_arrive() {
    let istiod = FakeIstiod::start().await;
    istiod.xds.put(
        ADDRESS_TYPE,
        CART_0,
        &workload(CART_0, [10, 1, 0, 5], "node-1", true, Some(SVC_KEY)),
    );
    istiod.xds.put(
        ADDRESS_TYPE,
        CART_1,
        &workload(CART_1, [10, 1, 0, 6], "node-2", false, Some(SVC_KEY)),
    );
    istiod.xds.put(ADDRESS_TYPE, SVC_KEY, &service());
    istiod
        .xds
        .put(AUTHORIZATION_TYPE, "shop/only-frontend", &policy());
    let client = Client::start(&istiod);
    client.until("loaded", |s| s.loaded()).await;
    let snap = client.store.snapshot();
    assert_eq!(snap.generation, 1, "one publish for the whole first sync");

    // Workloads: HBONE ones are enrolled; the local enrolled one wants a certificate.
    let cart0 = snap.workload(CART_0).unwrap();
    assert_eq!(cart0.enrollment, Enrollment::Enrolled);
    assert_eq!(
        cart0.ips.to_vec(),
        vec!["10.1.0.5".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        (cart0.namespace.as_str(), cart0.service_account.as_str()),
        ("shop", "cart")
    );
    assert_eq!(
        snap.workload(CART_1).unwrap().enrollment,
        Enrollment::NotEnrolled
    );
    let ids: Vec<String> = snap
        .local_identities("node-1", "cluster.local")
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(ids, ["spiffe://cluster.local/ns/shop/sa/cart"]);

    // The service: VIP, port mapping, endpoints.
    let svc = snap.service("shop", "cart").unwrap();
    assert_eq!(
        svc.vips,
        vec!["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(svc.ports[0].port, 80);
    assert_eq!(svc.ports[0].target_port, TargetPort::Number(8080));
    assert_eq!(svc.endpoints, vec![CART_0.to_string(), CART_1.to_string()]);

    // The policy, scoped to the workloads that name it.
    let Policy::AuthorizationPolicy(p) = &snap.mesh.policies[0] else {
        panic!("not an AuthorizationPolicy")
    };
    assert_eq!(
        (p.namespace.as_str(), p.name.as_str()),
        ("shop", "only-frontend")
    );
    assert_eq!(p.spec.action, Action::Allow);
    assert_eq!(
        p.spec.scope,
        PolicyScope::Workloads([CART_0.to_string(), CART_1.to_string()].into())
    );
    assert_eq!(
        p.spec.rules[0].from[0].source.principals[0].to_string(),
        "cluster.local/ns/shop/sa/frontend"
    );

    // What istiod saw: ztunnel's node, credentials, wildcard subscriptions, then ACKs.
    let seen = istiod.xds.seen();
    let first = &seen[0];
    let node = first
        .request
        .node
        .as_ref()
        .expect("node on the first request");
    assert_eq!(
        node.id,
        "ztunnel~127.0.0.1~weft-x1.istio-system~istio-system.svc.cluster.local"
    );
    assert!(node
        .metadata
        .as_ref()
        .unwrap()
        .fields
        .contains_key("NODE_NAME"));
    assert_eq!(
        first.authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(first.cluster_id.as_deref(), Some(CLUSTER_ID));
    let subscribed: Vec<&str> = seen
        .iter()
        .filter(|s| s.request.response_nonce.is_empty())
        .map(|s| s.request.type_url.as_str())
        .collect();
    assert_eq!(subscribed, [ADDRESS_TYPE, AUTHORIZATION_TYPE]);
    assert!(seen
        .iter()
        .all(|s| s.request.resource_names_subscribe.is_empty()));
    istiod
        .xds
        .wait_for("ACK of the policies", |s| {
            s.request.type_url == AUTHORIZATION_TYPE && !s.request.response_nonce.is_empty()
        })
        .await;
    assert!(acks(&istiod.xds.seen(), ADDRESS_TYPE) >= 1);
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_published_until_both_types_have_been_answered() {
    let istiod = FakeIstiod::start().await;
    istiod.xds.put(
        ADDRESS_TYPE,
        CART_0,
        &workload(CART_0, [10, 1, 0, 5], "node-1", true, None),
    );
    istiod.xds.hold(AUTHORIZATION_TYPE);
    let client = Client::start(&istiod);
    istiod
        .xds
        .wait_for("ACK of the addresses", |s| {
            s.request.type_url == ADDRESS_TYPE && !s.request.response_nonce.is_empty()
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !client.store.loaded(),
        "published before the policies arrived"
    );
    istiod.xds.release(AUTHORIZATION_TYPE);
    client.until("loaded", |s| s.loaded()).await;
    assert_eq!(client.uids(), [CART_0]);
    assert_eq!(client.store.snapshot().generation, 1);
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_adds_and_removals_are_applied() {
    let istiod = FakeIstiod::start().await;
    istiod.xds.put(
        ADDRESS_TYPE,
        CART_0,
        &workload(CART_0, [10, 1, 0, 5], "node-1", true, None),
    );
    let client = Client::start(&istiod);
    client.until("loaded", |s| s.loaded()).await;
    assert_eq!(client.uids(), [CART_0]);

    istiod.xds.put(
        ADDRESS_TYPE,
        CART_1,
        &workload(CART_1, [10, 1, 0, 6], "node-1", true, None),
    );
    client
        .until("cart-1 added", |s| s.snapshot().workload(CART_1).is_some())
        .await;
    assert_eq!(client.uids(), [CART_0, CART_1]);

    istiod
        .xds
        .put(AUTHORIZATION_TYPE, "shop/only-frontend", &policy());
    client
        .until("policy added", |s| s.snapshot().mesh.policies.len() == 1)
        .await;

    istiod.xds.remove(ADDRESS_TYPE, CART_0);
    client
        .until("cart-0 removed", |s| {
            s.snapshot().workload(CART_0).is_none()
        })
        .await;
    assert_eq!(client.uids(), [CART_1]);
    istiod.xds.remove(AUTHORIZATION_TYPE, "shop/only-frontend");
    client
        .until("policy removed", |s| s.snapshot().mesh.policies.is_empty())
        .await;
    assert_eq!(client.store.status().loads_failed, 0);
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_applies_its_good_resources_and_the_nack_names_only_the_bad() {
    let istiod = FakeIstiod::start().await;
    istiod.xds.put(
        ADDRESS_TYPE,
        CART_0,
        &workload(CART_0, [10, 1, 0, 5], "node-1", true, None),
    );
    let client = Client::start(&istiod);
    client.until("loaded", |s| s.loaded()).await;
    let before = client.store.snapshot();

    // A response with two good workloads, one bad (a 5-byte address) and one undecodable.
    let mut bad = workload(
        "Kubernetes//Pod/shop/bad",
        [10, 1, 0, 9],
        "node-1",
        true,
        None,
    );
    if let Some(xw::address::Type::Workload(w)) = &mut bad.r#type {
        w.addresses = vec![vec![10, 1, 0, 9, 9]];
    }
    let good = workload(CART_1, [10, 1, 0, 6], "node-1", true, None);
    let cart2 = "Kubernetes//Pod/shop/cart-2";
    let good2 = workload(cart2, [10, 1, 0, 7], "node-1", true, None);
    let any = |m: &xw::Address| prost_types::Any {
        type_url: ADDRESS_TYPE.into(),
        value: prost::Message::encode_to_vec(m),
    };
    let resource = |name: &str, body: prost_types::Any| Resource {
        name: name.into(),
        version: "x1".into(),
        resource: Some(body),
        ..Default::default()
    };
    let nonce = istiod.xds.push_raw(DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE.into(),
        resources: vec![
            resource(CART_1, any(&good)),
            resource("Kubernetes//Pod/shop/bad", any(&bad)),
            resource(
                "Kubernetes//Pod/shop/garbage",
                prost_types::Any {
                    type_url: ADDRESS_TYPE.into(),
                    value: vec![0xff, 0xff, 0xff],
                },
            ),
            resource(cart2, any(&good2)),
        ],
        ..Default::default()
    });
    let nack = istiod
        .xds
        .wait_for("NACK", |s| s.request.response_nonce == nonce)
        .await;
    let detail = nack
        .request
        .error_detail
        .expect("a NACK carries error_detail");
    assert!(
        detail.message.contains("Kubernetes//Pod/shop/bad"),
        "{}",
        detail.message
    );
    assert!(detail.message.contains("5 bytes"), "{}", detail.message);
    assert!(
        detail
            .message
            .contains("Kubernetes//Pod/shop/garbage: undecodable"),
        "{}",
        detail.message
    );
    for name in [CART_0, CART_1, cart2] {
        assert!(
            !detail.message.contains(name),
            "{name} is not named: {}",
            detail.message
        );
    }
    assert_eq!(detail.code, 3);

    // The two good ones are applied; the bad ones are not; what was there stays.
    client
        .until("the good resources applied", |s| {
            let snap = s.snapshot();
            snap.workload(CART_1).is_some() && snap.workload(cart2).is_some()
        })
        .await;
    let after = client.store.snapshot();
    assert!(after.generation > before.generation);
    assert!(after.workload(CART_0).is_some());
    assert!(after.workload("Kubernetes//Pod/shop/bad").is_none());
    assert!(after.workload("Kubernetes//Pod/shop/garbage").is_none());
    client
        .until("rejection recorded", |s| s.status().loads_failed == 1)
        .await;
    assert!(client
        .store
        .status()
        .last_error
        .as_deref()
        .unwrap()
        .contains("5 bytes"));

    // A resource whose body is of another type is refused too; the next good push applies.
    let nonce = istiod.xds.push_raw(DeltaDiscoveryResponse {
        type_url: AUTHORIZATION_TYPE.into(),
        resources: vec![Resource {
            name: "shop/x".into(),
            version: "x2".into(),
            resource: Some(any(&good)),
            ..Default::default()
        }],
        ..Default::default()
    });
    let nack = istiod
        .xds
        .wait_for("NACK 2", |s| s.request.response_nonce == nonce)
        .await;
    assert!(nack.request.error_detail.unwrap().message.contains("not a"));
    let moved = workload(CART_1, [10, 1, 0, 16], "node-1", true, None);
    istiod.xds.put(ADDRESS_TYPE, CART_1, &moved);
    client
        .until("good push applied", |s| {
            s.snapshot()
                .workload(CART_1)
                .is_some_and(|w| *w.ips == ["10.1.0.16".parse::<std::net::IpAddr>().unwrap()])
        })
        .await;
    assert!(client.store.status().last_attempt_ok);
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_going_away_keeps_the_state_and_the_client_resyncs_from_what_it_knows() {
    let mut istiod = FakeIstiod::start().await;
    istiod.xds.put(
        ADDRESS_TYPE,
        CART_0,
        &workload(CART_0, [10, 1, 0, 5], "node-1", true, None),
    );
    istiod.xds.put(
        ADDRESS_TYPE,
        CART_1,
        &workload(CART_1, [10, 1, 0, 6], "node-1", true, None),
    );
    istiod
        .xds
        .put(AUTHORIZATION_TYPE, "shop/only-frontend", &policy());
    let client = Client::start(&istiod);
    client
        .until("loaded", |s| {
            s.loaded() && s.snapshot().mesh.policies.len() == 1
        })
        .await;
    let generation = client.store.snapshot().generation;

    istiod.stop().await;
    // While istiod is away (and the client retries): the state stays as it was.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let snap = client.store.snapshot();
    assert_eq!(snap.generation, generation);
    assert_eq!(client.uids(), [CART_0, CART_1]);

    // Changes made while away: cart-0 removed, cart-2 added, cart-1 unchanged.
    let cart2 = "Kubernetes//Pod/shop/cart-2";
    istiod.xds.remove(ADDRESS_TYPE, CART_0);
    istiod.xds.put(
        ADDRESS_TYPE,
        cart2,
        &workload(cart2, [10, 1, 0, 7], "node-1", true, None),
    );
    istiod.serve().await;
    client
        .until("resynced", |s| {
            let snap = s.snapshot();
            snap.workload(CART_0).is_none() && snap.workload(cart2).is_some()
        })
        .await;
    assert_eq!(client.uids(), [CART_1, cart2]);
    assert_eq!(client.store.snapshot().mesh.policies.len(), 1);

    // ztunnel's xDS counters: the stream istiod ended, the connects that failed while it was
    // away, and the responses of each type with their bytes.
    let ended = |reason| {
        client
            .metrics
            .terminations
            .get_or_create(&XdsTerminationLabels { reason })
            .get()
    };
    assert!(
        ended(XdsTermination::Reconnect) + ended(XdsTermination::Error) >= 1,
        "the stream istiod ended is counted"
    );
    assert!(
        ended(XdsTermination::ConnectionError) >= 1,
        "failed connects are counted"
    );
    for url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        let labels = XdsTypeLabels { url: url.into() };
        assert!(
            client.metrics.messages.get_or_create(&labels).get() >= 1,
            "{url}"
        );
        assert!(
            client.metrics.bytes.get_or_create(&labels).get() > 0,
            "{url}"
        );
    }

    // The new stream announced what the client already held.
    let resub = istiod
        .xds
        .wait_for("resubscription", |s| {
            s.stream > 1
                && s.request.type_url == ADDRESS_TYPE
                && s.request.response_nonce.is_empty()
        })
        .await;
    let versions = &resub.request.initial_resource_versions;
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert!(versions.contains_key(CART_0) && versions.contains_key(CART_1));
    let auth_resub = istiod
        .xds
        .wait_for("policy resubscription", |s| {
            s.stream > 1
                && s.request.type_url == AUTHORIZATION_TYPE
                && s.request.response_nonce.is_empty()
        })
        .await;
    assert!(auth_resub
        .request
        .initial_resource_versions
        .contains_key("shop/only-frontend"));
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_and_retried_without_loading() {
    let istiod = FakeIstiod::start().await;
    std::fs::write(istiod.token_file(), "wrong").unwrap();
    let client = Client::start(&istiod);
    client
        .until("rejection recorded", |s| s.status().last_error.is_some())
        .await;
    assert!(!client.store.loaded());
    let err = client.store.status().last_error.clone().unwrap();
    assert!(
        err.contains("Unauthenticated: bad or missing bearer token"),
        "{err}"
    );
    // The token is read again on reconnect.
    std::fs::write(istiod.token_file(), TOKEN).unwrap();
    client.until("loaded", |s| s.loaded()).await;
    client.stop().await;
}
