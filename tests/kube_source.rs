//! The Kubernetes source (`mesh.kubernetes`) of an in-process daemon against the API-server
//! stand-in on loopback: Istio's CRDs at v1beta1 only or not at all, a slow relist that keeps
//! the state in force and readiness, and a kubeconfig that cannot be used. No root.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::apiserver::{self, FakeApiServer};
use support::{get_json, http, wait_ready, NodeDir};

/// A daemon on node-1 whose mesh comes only from `api` (or from `kubeconfig`, if given).
async fn daemon(dir: &NodeDir, kubeconfig: &std::path::Path) -> weft::daemon::Daemon {
    let text = dir.config_text("node-1").replace(
        "mesh: {file: mesh.yaml}",
        &format!(
            "mesh: {{kubernetes: {{kubeconfig: {}}}}}",
            kubeconfig.display()
        ),
    );
    let path = dir.path("weft.yaml");
    std::fs::write(&path, text).unwrap();
    let config = weft::config::Config::load(&path, &weft::config::Env::default()).unwrap();
    weft::daemon::Daemon::start(config, support::quiet_log())
        .await
        .unwrap()
}

/// A namespace enrolled, with pod `a` on node-1.
fn seed(api: &FakeApiServer) {
    api.apply(apiserver::namespace(
        "shop",
        &[("istio.io/dataplane-mode", "ambient")],
    ));
    let mut a = apiserver::pod("shop", "a", "a", "node-1");
    a["status"]["podIP"] = json!("10.244.1.10");
    a["metadata"]["labels"] = json!({"app": "a"});
    api.apply(a);
}

async fn dump(dir: &NodeDir) -> serde_json::Value {
    let admin = dir.admin();
    tokio::task::spawn_blocking(move || get_json(admin, "/config_dump"))
        .await
        .unwrap()
}

async fn ready(dir: &NodeDir) -> bool {
    let addr = dir.readiness();
    tokio::task::spawn_blocking(move || http(addr, "GET", "/healthz/ready").0 == 200)
        .await
        .unwrap()
}

/// Polls `f` on the dump until it holds, for up to `limit`.
async fn dump_until(dir: &NodeDir, limit: Duration, f: impl Fn(&serde_json::Value) -> bool) {
    let start = Instant::now();
    loop {
        let d = dump(dir).await;
        if f(&d) {
            return;
        }
        assert!(start.elapsed() < limit, "not within {limit:?}: {d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_come_from_v1beta1_where_v1_is_not_served() {
    let api = FakeApiServer::start().await;
    api.serve_version("security.istio.io/v1", false);
    seed(&api);
    api.apply(apiserver::istio(
        "AuthorizationPolicy",
        "shop",
        "deny-all",
        json!({"action": "DENY", "rules": [{}]}),
    ));
    let dir = NodeDir::new("");
    let d = daemon(&dir, &api.kubeconfig()).await;
    assert!(wait_ready(dir.readiness(), Duration::from_secs(20)).await);
    let dump = dump(&dir).await;
    assert!(
        dump["meshPolicies"].to_string().contains("deny-all"),
        "{}",
        dump["meshPolicies"]
    );
    assert_eq!(dump["config"]["warnings"], json!([]));
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /apis/security.istio.io/v1beta1/authorizationpolicies?")),
        "{requests:#?}"
    );
    assert!(
        !requests
            .iter()
            .any(|r| r.starts_with("GET /apis/security.istio.io/v1/authorizationpolicies")),
        "{requests:#?}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_istios_crds_weft_is_ready_with_a_warning_and_no_policies() {
    let api = FakeApiServer::start().await;
    api.serve_version("security.istio.io/v1", false);
    api.serve_version("security.istio.io/v1beta1", false);
    seed(&api);
    let dir = NodeDir::new("");
    let d = daemon(&dir, &api.kubeconfig()).await;
    assert!(wait_ready(dir.readiness(), Duration::from_secs(20)).await);
    let dump = dump(&dir).await;
    let warnings = dump["config"]["warnings"].to_string();
    for kind in [
        "AuthorizationPolicy",
        "PeerAuthentication",
        "RequestAuthentication",
    ] {
        assert!(
            warnings.contains(&format!("{kind} is not served")),
            "{kind}: {warnings}"
        );
    }
    assert_eq!(dump["meshPolicies"], json!([]));
    assert!(
        dump["workloads"].to_string().contains("10.244.1.10"),
        "the rest of the mesh is in force"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_relist_keeps_the_state_and_readiness_until_it_ends() {
    let api = FakeApiServer::start().await;
    seed(&api);
    let dir = NodeDir::new("");
    let d = daemon(&dir, &api.kubeconfig()).await;
    assert!(wait_ready(dir.readiness(), Duration::from_secs(20)).await);
    let before = dump(&dir).await;
    assert!(before["workloads"].to_string().contains("10.244.1.10"));

    // Every watch expires and must relist; each list takes 3 s; meanwhile pod `b` is added
    // and `a` removed.
    api.set_list_delay(Duration::from_secs(3));
    api.compact();
    let mut b = apiserver::pod("shop", "b", "b", "node-2");
    b["status"]["podIP"] = json!("10.244.2.20");
    api.apply(b);
    api.delete("v1", "Pod", Some("shop"), "a");
    api.compact();
    api.drop_watches();
    let relisting = Instant::now();
    while relisting.elapsed() < Duration::from_secs(2) {
        assert!(ready(&dir).await, "readiness stays during the relist");
        let now = dump(&dir).await;
        assert_eq!(
            now["generation"], before["generation"],
            "nothing changes before the relist ends"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Then the state converges: b in, a out.
    dump_until(&dir, Duration::from_secs(30), |d| {
        let w = d["workloads"].to_string();
        w.contains("10.244.2.20") && !w.contains("10.244.1.10")
    })
    .await;
    assert!(ready(&dir).await);
    let lists = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="))
        .count();
    assert!(lists >= 2, "{lists} pod lists");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_kubeconfig_is_named_and_weft_is_not_ready() {
    let dir = NodeDir::new("");
    let missing = dir.path("no-such-kubeconfig");
    let d = daemon(&dir, &missing).await;
    let start = Instant::now();
    let dump = loop {
        let d = dump(&dir).await;
        if d["config"]["lastError"].is_string() || start.elapsed() > Duration::from_secs(10) {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let error = dump["config"]["lastError"].as_str().unwrap_or_default();
    assert!(
        error.contains("no-such-kubeconfig"),
        "the error names the file: {}",
        dump["config"]
    );
    assert!(!ready(&dir).await);
    let (status, body) = {
        let addr = dir.readiness();
        tokio::task::spawn_blocking(move || http(addr, "GET", "/healthz/ready"))
            .await
            .unwrap()
    };
    assert_eq!(status, 503);
    assert!(body.contains("no-such-kubeconfig"), "{body}");
    d.stop().await;
}
