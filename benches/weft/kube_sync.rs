//! The Kubernetes source at scale: a weft process syncing N pods from an API server (the test
//! stand-in, `tests/support/apiserver.rs`, on loopback: paginated lists, then watches) beside
//! a weft process loading the same pods from a mesh file, in the same run. Rows: time to
//! ready and resident memory of each (the file source is the baseline: the Kubernetes source
//! must keep no more per pod), one pod event from the API server to the state in force, and
//! the applier's own time for one pod event on N workloads (in-process).
//!
//! Owns these cases only.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use super::*;

#[path = "../../tests/support/apiserver.rs"]
#[allow(dead_code)]
mod apiserver;

/// The stand-in's loopback address (it asks its parent module for one).
pub(crate) fn unique_loopback() -> IpAddr {
    let pid = std::process::id();
    IpAddr::V4(Ipv4Addr::new(127, 90, (pid >> 8) as u8, pid as u8))
}

/// Pod `i` of `big`: as a kubelet reports a Deployment's running pod (owner, labels, one
/// container with a named port, conditions, IPs), about 1.5 KB of JSON.
fn pod_json(i: usize) -> Value {
    let ip = Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1);
    let app = format!("a{}", i % 100);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("p{i}"), "namespace": "big",
            "labels": {"app": app, "pod-template-hash": "7d9c6b5f4", "version": "v1"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-30T10:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{app}-7d9c6b5f4"), "uid": format!("rs-{}", i % 100),
                "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "nodeName": format!("node-{}", i % 50),
            "serviceAccountName": format!("sa{}", i % 100),
            "containers": [{"name": "app", "image": "registry.example/app:1.2.3",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
        },
        "status": {
            "phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "hostIP": "172.18.0.1", "qosClass": "Burstable", "startTime": "2026-11-30T10:00:00Z",
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "PodScheduled", "status": "True"},
            ],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0,
                "image": "registry.example/app:1.2.3", "imageID": "sha256:0123456789abcdef",
                "containerID": "containerd://0123456789abcdef", "started": true,
                "state": {"running": {"startedAt": "2026-11-30T10:00:01Z"}}}],
        },
    })
}

fn namespace_json() -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "big", "labels": {"istio.io/dataplane-mode": "ambient"}}})
}

/// A weft process and where it answers.
struct Daemon {
    child: Child,
    log: PathBuf,
    admin: SocketAddr,
    metrics: SocketAddr,
    readiness: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_daemon(weft_bin: &Path, dir: &Path, name: &str, mesh: &str, ip: IpAddr) -> Daemon {
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!(
            "nodeName: node-1\nmesh: {mesh}\nca: {{builtin: {{dir: {}}}}}\nlisten:\n  outbound: {ip}:15001\n  inboundPlaintext: {ip}:15006\n  hbone: {ip}:15008\n  admin: {ip}:15000\n  metrics: {ip}:15020\n  readiness: {ip}:15021\nredirect: none\n",
            dir.join("ca").display()
        ),
    )
    .unwrap();
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(weft_bin)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Daemon {
        child,
        log,
        admin: SocketAddr::new(ip, 15000),
        metrics: SocketAddr::new(ip, 15020),
        readiness: SocketAddr::new(ip, 15021),
    }
}

/// `GET path` on `addr`: (status, body); (0, "") when nothing answers.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    if s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .is_err()
    {
        return (0, String::new());
    }
    let mut r = std::io::BufReader::new(s);
    let mut status = String::new();
    if r.read_line(&mut status).is_err() {
        return (0, String::new());
    }
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut rest = String::new();
    let _ = r.read_to_string(&mut rest);
    let body = rest
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}

/// Seconds until `d` is ready (panics, with its log, if it exits or takes 10 minutes).
fn time_to_ready(d: &mut Daemon, start: Instant) -> f64 {
    while http_get(d.readiness, "/healthz/ready").0 != 200 {
        let exited = d.child.try_wait().ok().flatten();
        if exited.is_some() || start.elapsed() > Duration::from_secs(600) {
            panic!(
                "weft never became ready ({exited:?}):\n{}",
                std::fs::read_to_string(&d.log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed().as_secs_f64()
}

fn generation(d: &Daemon) -> u64 {
    let (_, body) = http_get(d.metrics, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix("weft_config_generation "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

pub(crate) fn run_kube(sz: Sizes, weft_bin: &Path, report: &mut Report) {
    let rt = app_runtime();
    for n in sz.workloads {
        let dir = tempfile::tempdir().unwrap();
        weft::identity::ca::init_dir(&dir.path().join("ca"), "cluster.local").unwrap();
        let api = rt.block_on(apiserver::FakeApiServer::start());
        // The same objects as a mesh file, for the file-sourced baseline.
        let mut file = String::new();
        let mut push = |v: Value| {
            file.push_str("---\n");
            file.push_str(&serde_yaml_ng::to_string(&v).unwrap());
            api.apply(v);
        };
        push(namespace_json());
        for i in 0..n {
            push(pod_json(i));
        }
        // A fresh history, as an API server's watch cache has after a while.
        api.compact();
        std::fs::write(dir.path().join("mesh.yaml"), &file).unwrap();
        drop(file);

        let pid = std::process::id();
        let ip = |last: u8| IpAddr::V4(Ipv4Addr::new(127, 91, (pid >> 8) as u8, last));
        let t = Instant::now();
        let mut from_file = spawn_daemon(
            weft_bin,
            dir.path(),
            "file",
            &format!("{{file: {}}}", dir.path().join("mesh.yaml").display()),
            ip(1),
        );
        let file_ready = time_to_ready(&mut from_file, t);
        let file_rss = process_rss(from_file.child.id());
        drop(from_file);

        let t = Instant::now();
        let mut from_api = spawn_daemon(
            weft_bin,
            dir.path(),
            "kube",
            &format!(
                "{{kubernetes: {{kubeconfig: {}}}}}",
                api.kubeconfig().display()
            ),
            ip(2),
        );
        let kube_ready = time_to_ready(&mut from_api, t);
        let kube_rss = process_rss(from_api.child.id());
        let lists = api
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="))
            .count();
        report.add(
            format!("Kubernetes sync to ready, {n} pods"),
            "process",
            kube_ready,
            Some(file_ready),
            "s",
            format!("API server list ({lists} pages of pods) + watch; baseline: the same pods from a mesh file"),
        );
        report.add(
            format!("RSS after Kubernetes sync, {n} pods"),
            "process",
            kube_rss as f64 / (1 << 20) as f64,
            Some(file_rss as f64 / (1 << 20) as f64),
            "MiB",
            "whole weft process once ready; baseline: the same pods from a mesh file",
        );

        // One pod event: a label change, from the API server's write to the generation it
        // makes in force (polled on /metrics).
        let mut times: Vec<f64> = (0..11)
            .map(|k| {
                let before = generation(&from_api);
                let mut p = pod_json(n / 2 + k);
                p["metadata"]["labels"]["version"] = json!("v2");
                let t = Instant::now();
                api.apply(p);
                while generation(&from_api) <= before {
                    assert!(
                        t.elapsed() < Duration::from_secs(60),
                        "the event never applied"
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        report.add(
            format!("pod event to new generation, {n} pods"),
            "process",
            times[times.len() / 2],
            None,
            "ms",
            format!(
                "API server write → watch → applied (median of {}, max {:.1} ms; polled on /metrics)",
                times.len(),
                times[times.len() - 1]
            ),
        );
        let _ = http_get(from_api.admin, "/quitquitquit");
        drop(from_api);
        drop(api);

        run_apply(n, report);
    }
}

/// The applier alone: N workloads listed, then one pod event applied to the state in force.
fn run_apply(n: usize, report: &mut Report) {
    use weft::source::kube::apply::{Applier, Change, Item, Kind, Object};
    let pod = |i: usize, version: &str| {
        let ip = Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1);
        let labels: weft::model::Labels = [
            ("app", format!("a{}", i % 100)),
            ("version", version.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (weft::model::intern(k), weft::model::intern(&v)))
        .collect();
        Object {
            kind: Kind::Pod,
            namespace: "big".into(),
            name: format!("p{i}"),
            item: Ok(Item::Pod(Some(weft::model::Workload {
                uid: weft::model::Workload::pod_uid("big", &format!("p{i}")),
                name: format!("p{i}").into(),
                // As the sources build them: the repeated strings held once.
                namespace: weft::model::intern("big"),
                service_account: weft::model::intern(&format!("sa{}", i % 100)),
                node: weft::model::intern(&format!("node-{}", i % 50)),
                ips: [IpAddr::V4(ip)].into(),
                labels,
                named_ports: [("http".to_string(), 8080)].into_iter().collect(),
                enrollment: weft::model::Enrollment::NotEnrolled,
                workload_name: weft::model::intern(&format!("a{}", i % 100)),
                canonical_name: weft::model::intern(&format!("a{}", i % 100)),
                canonical_revision: "v1".into(),
                waypoint: None,
            }))),
        }
    };
    let store = weft::state::StateStore::new("bench");
    let mut applier = Applier::new();
    let mut changes = Vec::with_capacity(n + 20);
    for kind in Kind::ALL {
        changes.push(Change::Listing(kind));
        if kind == Kind::Pod {
            changes.extend((0..n).map(|i| Change::Listed(pod(i, "v1"))));
        }
        changes.push(Change::ListDone(kind));
    }
    let t = Instant::now();
    applier.apply(changes, &store);
    let sync = t.elapsed().as_secs_f64() * 1e3;
    let mut times: Vec<f64> = (0..21)
        .map(|k| {
            let change = Change::Applied(pod(n / 2 + k, "v2"));
            let t = Instant::now();
            applier.apply(vec![change], &store);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    report.add(
        format!("Kubernetes source: apply one pod event, {n} pods"),
        "in-proc",
        times[times.len() / 2],
        None,
        "ms",
        format!(
            "median of {}, max {:.2} ms; the first sync of {n} pods: {sync:.0} ms",
            times.len(),
            times[times.len() - 1]
        ),
    );
}
