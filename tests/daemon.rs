//! The daemon in-process on loopback: readiness, config dump, hot reload, certificates
//! following pods, and every admin endpoint including bad requests.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use support::*;

fn set(v: &Value, key: &str, pick: impl Fn(&Value) -> Option<String>) -> BTreeSet<String> {
    v[key].as_array().unwrap().iter().filter_map(pick).collect()
}

fn cert_ids(dump: &Value) -> BTreeSet<String> {
    set(dump, "certificates", |c| {
        c["identity"].as_str().map(String::from)
    })
}

fn enrolled_local(dump: &Value) -> BTreeSet<String> {
    set(dump, "workloads", |w| {
        (w["enrollment"] == "enrolled" && w["local"] == true)
            .then(|| w["name"].as_str().unwrap().to_string())
    })
}

const READY: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_turns_ready_and_dumps_workloads_and_certificates() {
    let node = NodeDir::new(&example_mesh());
    let d = start(&node, "node-1").await;
    assert!(
        wait_ready(node.readiness(), READY).await,
        "not ready in time"
    );
    assert!(wait_ready(node.admin(), READY).await);

    let dump = get_json(node.admin(), "/config_dump");
    assert_eq!(dump["generation"], 1);
    assert_eq!(dump["node"], "node-1");
    assert_eq!(
        enrolled_local(&dump),
        BTreeSet::from(["frontend-0".into(), "cart-0".into()])
    );
    let debug = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "debug-0")
        .unwrap();
    assert_eq!(debug["enrollment"], "optedOut");
    let billing = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "billing-0")
        .unwrap();
    assert_eq!(billing["enrollment"], "notEnrolled");
    // Certificates exist for exactly the local enrolled ServiceAccounts (cart-1 is on node-2,
    // debug-0 opted out, billing-0 is not enrolled).
    assert_eq!(
        cert_ids(&dump),
        BTreeSet::from([
            "spiffe://cluster.local/ns/shop/sa/cart".to_string(),
            "spiffe://cluster.local/ns/shop/sa/frontend".to_string()
        ])
    );
    for c in dump["certificates"].as_array().unwrap() {
        assert!(c["serial"].as_str().unwrap().len() >= 8);
        assert!(c["notBefore"].as_str().unwrap().ends_with('Z'));
        assert!(c["notAfter"].as_str().unwrap().ends_with('Z'));
        let chain = c["chain"].as_array().unwrap();
        assert!(chain.len() >= 2, "leaf and intermediate at least");
        assert!(chain[0]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"));
    }
    let svc = &dump["services"][0];
    assert_eq!(svc["name"], "cart");
    assert_eq!(svc["endpoints"].as_object().unwrap().len(), 2);
    assert_eq!(dump["meshPolicies"].as_array().unwrap().len(), 2);
    assert_eq!(dump["config"]["lastAttemptOk"], true);

    let (status, metrics) = http(node.metrics(), "GET", "/metrics");
    assert_eq!(status, 200);
    for needle in [
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "weft_config_generation 1",
        "weft_config_loads_total{result=\"success\"} 1",
        "weft_config_loads_total{result=\"failure\"} 0",
        "weft_config_last_load_success 1",
        "weft_workload_certificates 2",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle:?} not in metrics:\n{metrics}"
        );
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_edits_take_effect_and_certificates_follow_pods() {
    let mesh = example_mesh();
    let node = NodeDir::new(&mesh);
    let d = start(&node, "node-1").await;
    assert!(wait_ready(node.readiness(), READY).await);

    // frontend-0 moves to node-2 and a new enrolled pod with a new ServiceAccount arrives.
    let edited = mesh.replacen("    nodeName: node-1\n    serviceAccountName: frontend", "    nodeName: node-2\n    serviceAccountName: frontend", 1)
        + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: pay-0, namespace: shop}\nspec: {nodeName: node-1, serviceAccountName: pay}\nstatus: {podIP: 10.244.1.40}\n";
    assert_ne!(edited, mesh);
    let started = std::time::Instant::now();
    node.write_mesh(&edited);
    let store = d.store.clone();
    let gen = eventually(Duration::from_secs(5), || {
        (store.snapshot().generation == 2).then_some(())
    })
    .await;
    assert!(gen.is_some(), "edit not applied");
    eprintln!("edit applied after {:?}", started.elapsed());

    let want = BTreeSet::from([
        "spiffe://cluster.local/ns/shop/sa/cart".to_string(),
        "spiffe://cluster.local/ns/shop/sa/pay".to_string(),
    ]);
    let admin = node.admin();
    let got = eventually(Duration::from_secs(5), || {
        let dump = get_json(admin, "/config_dump");
        (cert_ids(&dump) == want).then_some(dump)
    })
    .await;
    assert!(got.is_some(), "certificates did not follow the pods");
    assert!(wait_ready(node.readiness(), READY).await);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_mesh_edit_is_refused_and_the_previous_state_stays() {
    let mesh = example_mesh();
    let node = NodeDir::new(&mesh);
    let d = start(&node, "node-1").await;
    assert!(wait_ready(node.readiness(), READY).await);
    let before = get_json(node.admin(), "/config_dump");

    // An invalid CIDR deep in a policy: the whole file is refused.
    let broken = mesh.replace(
        "principals: [cluster.local/ns/shop/sa/frontend]",
        "ipBlocks: [10.0.0.0/40]",
    );
    node.write_mesh(&broken);
    let store = d.store.clone();
    let st = eventually(Duration::from_secs(5), || {
        let st = store.status();
        (!st.last_attempt_ok).then_some(st)
    })
    .await
    .expect("broken edit not noticed");
    let err = st.last_error.clone().unwrap();
    let line = broken
        .lines()
        .position(|l| l.contains("10.0.0.0/40"))
        .unwrap()
        + 1;
    assert!(err.contains(&format!("mesh.yaml:{line}: ")), "{err}");
    assert!(
        err.contains("invalid IP address or CIDR \"10.0.0.0/40\""),
        "{err}"
    );

    let after = get_json(node.admin(), "/config_dump");
    assert_eq!(after["generation"], 1);
    assert_eq!(after["workloads"], before["workloads"]);
    assert_eq!(after["policies"], before["policies"]);
    assert_eq!(after["config"]["lastAttemptOk"], false);
    assert!(after["config"]["lastError"]
        .as_str()
        .unwrap()
        .contains("10.0.0.0/40"));
    let (_, metrics) = http(node.metrics(), "GET", "/metrics");
    assert!(
        metrics.contains("weft_config_last_load_success 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_config_loads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("weft_config_generation 1"), "{metrics}");
    // Still ready: the state in force is fine.
    assert_eq!(http(node.readiness(), "GET", "/healthz/ready").0, 200);

    // An empty file (an editor truncating it) is refused the same way.
    node.write_mesh("");
    let store = d.store.clone();
    eventually(Duration::from_secs(5), || {
        (store.status().loads_failed == 2).then_some(())
    })
    .await
    .expect("empty file not refused");
    assert_eq!(store.snapshot().generation, 1);

    // Fixing the file applies it.
    node.write_mesh(&mesh.replace("cart-0", "cart-9"));
    eventually(Duration::from_secs(5), || {
        (store.snapshot().generation == 2).then_some(())
    })
    .await
    .expect("fix not applied");
    assert!(store.status().last_attempt_ok);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn likely_policy_mistakes_are_load_warnings_with_their_line_in_the_config_dump() {
    let mesh = example_mesh();
    let node = NodeDir::new(&mesh);
    let d = start(&node, "node-1").await;
    assert!(wait_ready(node.readiness(), READY).await);
    let dump = get_json(node.admin(), "/config_dump");
    assert_eq!(dump["config"]["warnings"], serde_json::json!([]), "{dump}");

    // "Only frontend may POST /cart", written as two rules.
    let edited = mesh
        + "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: cart-post\n  namespace: shop\n\
           spec:\n  selector:\n    matchLabels: {app: cart}\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/frontend]\n\
           \x20 - to:\n    - operation: {methods: [POST], paths: [/cart]}\n";
    let line = edited
        .lines()
        .enumerate()
        .skip_while(|(_, l)| !l.contains("name: cart-post"))
        .find(|(_, l)| l.contains("- from:"))
        .map(|(i, _)| i + 1)
        .unwrap();
    node.write_mesh(&edited);
    let store = d.store.clone();
    eventually(Duration::from_secs(5), || {
        (store.snapshot().generation == 2).then_some(())
    })
    .await
    .expect("edit not applied");
    let dump = get_json(node.admin(), "/config_dump");
    let warnings = dump["config"]["warnings"].as_array().unwrap();
    let expected = format!(
        "{}:{line}: AuthorizationPolicy shop/cart-post: rules[0] has only `from` and rules[1] only `to`",
        node.mesh_path().display()
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.starts_with(&expected))),
        "{expected:?} not in {warnings:#?}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_a_loadable_mesh() {
    let node = NodeDir::new("");
    std::fs::remove_file(node.mesh_path()).unwrap();
    let d = start(&node, "node-1").await;
    let (status, body) = http(node.readiness(), "GET", "/healthz/ready");
    assert_eq!(status, 503);
    assert!(body.contains("mesh not loaded"), "{body}");
    assert!(
        body.contains("mesh.yaml"),
        "the reason names the file: {body}"
    );
    node.write_mesh(&example_mesh());
    assert!(wait_ready(node.readiness(), READY).await);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_as_specified_including_bad_requests() {
    let node = NodeDir::new(&example_mesh());
    let d = start(&node, "node-1").await;
    assert!(wait_ready(node.admin(), READY).await);
    let admin = node.admin();

    let (s, body) = http(admin, "GET", "/nope");
    assert_eq!(s, 404);
    assert!(
        body.contains("/config_dump"),
        "404 lists the endpoints: {body}"
    );
    assert_eq!(http(node.metrics(), "GET", "/nope").0, 404);
    assert_eq!(http(node.readiness(), "GET", "/nope").0, 404);

    let (s, body) = http(admin, "GET", "/logging");
    assert_eq!((s, body.trim()), (200, "level: info"));
    let (s, body) = http(admin, "POST", "/logging?level=loud");
    assert_eq!(s, 400);
    assert!(
        body.contains("trace, debug, info, warn, error, off"),
        "{body}"
    );
    // As ztunnel's admin (istioctl zc log): a POST without a level, or with an empty one,
    // reads the filter.
    let (s, body) = http(admin, "POST", "/logging");
    assert_eq!((s, body.trim()), (200, "level: info"));
    let (s, body) = http(admin, "POST", "/logging?level=");
    assert_eq!((s, body.trim()), (200, "level: info"));
    let (s, _) = http(admin, "POST", "/logging?level=weft%3A%3Aproxy%3Ddebug,info");
    assert_eq!(s, 200);
    let (_, body) = http(admin, "GET", "/logging");
    assert_eq!(body.trim(), "level: weft::proxy=debug,info");
    // `reset` goes back to the default.
    let (s, body) = http(admin, "POST", "/logging?level=&reset");
    assert_eq!((s, body.trim()), (200, "level: info"));
    assert_eq!(http(admin, "GET", "/logging?level=warn").0, 200);

    // /debug/explain: every bad parameter is a 400 that says what is wrong.
    let w = "10.244.1.10";
    for (q, says) in [
        (format!("dst={w}&port=80"), "missing src".to_string()),
        (format!("src=banana&dst={w}&port=80"), "src \"banana\" is not an IP address".into()),
        ("src=10.0.0.1&port=80".into(), "missing dst".into()),
        ("src=10.0.0.1&dst=nowhere&port=80".into(), "dst \"nowhere\" is not an IP address or IP:port".into()),
        (format!("src=10.0.0.1&dst={w}"), "missing port".into()),
        (format!("src=10.0.0.1&dst={w}&port=0"), "port \"0\" is not a port (1-65535)".into()),
        (format!("src=10.0.0.1&dst={w}:0"), "has port 0".into()),
        (format!("src=10.0.0.1&dst={w}&port=70000"), "port \"70000\" is not a port".into()),
        ("src=10.0.0.1&dst=10.9.9.9&port=80".into(), "dst 10.9.9.9 is not a workload in the mesh".into()),
        (format!("src=10.0.0.1&dst={w}&port=80&identity=spiffe://cluster.local/ns/a/sa/b&plaintext=true"), "contradict".into()),
        (format!("src=10.0.0.1&dst={w}&port=80&identity=not-a-spiffe-id"), "identity \"not-a-spiffe-id\"".into()),
        (format!("src=10.0.0.1&dst={w}&port=80&method=GET&header=no-colon"), "header \"no-colon\" is not name:value".into()),
        (format!("src=10.0.0.1&dst={w}&port=80&method=GET&header=bad%20name:v"), "request:".into()),
        (format!("src=10.0.0.1&dst={w}&port=80&method=G%20T"), "request:".into()),
    ] {
        let (s, body) = http(admin, "GET", &format!("/debug/explain?{q}"));
        assert_eq!(s, 400, "{q}: {body}");
        assert!(body.contains(&says), "{q}: expected {says:?} in {body}");
        assert!(body.contains("usage: GET /debug/explain"), "{q}: {body}");
    }
    let (s, body) = http(
        admin,
        "GET",
        &format!("/debug/explain?src=10.0.0.1&dst={w}&port=80"),
    );
    assert_eq!(s, 200, "a good request still works: {body}");

    assert_eq!(http(admin, "DELETE", "/config_dump").0, 405);
    assert_eq!(http(admin, "GET", "/quitquitquit").0, 405);
    assert_eq!(http(node.metrics(), "POST", "/metrics").0, 405);

    let mut requested = d.shutdown_requested();
    assert_eq!(http(admin, "POST", "/quitquitquit").0, 200);
    tokio::time::timeout(Duration::from_secs(5), requested.wait_for(|s| *s))
        .await
        .unwrap()
        .unwrap();
    d.stop().await;
    // The listeners are gone after stop.
    assert!(std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ca_files_fail_start_up_with_a_message_naming_the_file() {
    let node = NodeDir::new(&example_mesh());
    std::fs::write(node.path("ca/ca-key.pem"), "not a key").unwrap();
    let err = match weft::daemon::Daemon::start(node.config("node-1"), quiet_log()).await {
        Ok(_) => panic!("started with a broken CA key"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("ca-key.pem"), "{err}");

    let node = NodeDir::new(&example_mesh());
    std::fs::remove_file(node.path("ca/root-cert.pem")).unwrap();
    let err = match weft::daemon::Daemon::start(node.config("node-1"), quiet_log()).await {
        Ok(_) => panic!("started without a root cert"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("root-cert.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_admin_port_fails_start_up() {
    let node = NodeDir::new(&example_mesh());
    let _hold = std::net::TcpListener::bind(node.admin()).unwrap();
    let err = match weft::daemon::Daemon::start(node.config("node-1"), quiet_log()).await {
        Ok(_) => panic!("started on a taken port"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("cannot listen on {} (admin)", node.admin())),
        "{err}"
    );
}
