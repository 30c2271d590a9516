//! The `weft` binary as a user runs it: `ca init`, `run` until ready and SIGTERM, `check`.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn weft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft"))
}

#[test]
fn check_accepts_the_example_and_prints_file_line_for_each_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, example_mesh()).unwrap();
    let out = weft()
        .args(["check", "--mesh"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok: 2 namespaces, 5 pods (3 enrolled), 1 services, 2 policies"),
        "{stdout}"
    );

    let bad = dir.path().join("bad.yaml");
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\nstatus:\n  podIP: 10.0.0.1\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  action: MAYBE\n";
    std::fs::write(&bad, text).unwrap();
    let out = weft().args(["check", "--mesh"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let name = bad.display().to_string();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with(&format!("{name}:16: spec.action: unknown variant `MAYBE`")),
        "{stdout}"
    );
    assert_eq!(
        lines[1],
        format!("{name}:10: duplicate IP 10.0.0.1: Pod default/b and Pod default/a both claim it")
    );

    let out = weft()
        .args(["check", "--mesh", "/nonexistent/mesh.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("/nonexistent/mesh.yaml: cannot read"));
}

#[test]
fn check_with_the_node_config_names_the_ipv6_addresses_capture_would_refuse_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
                apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n---\n\
                apiVersion: v1\nkind: Pod\nmetadata:\n  name: dual\n  namespace: mesh\nstatus:\n  podIPs:\n  - ip: 10.0.0.1\n  - ip: fd00::1\n---\n\
                apiVersion: v1\nkind: Pod\nmetadata: {name: outside, namespace: plain}\nstatus:\n  podIPs:\n  - ip: 10.0.0.2\n  - ip: fd00::2\n---\n\
                apiVersion: v1\nkind: Pod\nmetadata: {name: v4, namespace: mesh}\nstatus: {podIP: 10.0.0.3}\n";
    std::fs::write(&mesh, text).unwrap();
    let check = |config: Option<&str>| {
        let mut cmd = weft();
        cmd.args(["check", "--mesh"]).arg(&mesh);
        if let Some(c) = config {
            let path = dir.path().join("weft.yaml");
            std::fs::write(&path, c).unwrap();
            cmd.arg("--config").arg(path);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let base = "nodeName: n1\nmesh: {file: mesh.yaml}\nca: {builtin: {dir: ca}}\n";
    let name = mesh.display().to_string();
    // Refused by the config: the enrolled dual-stack pod, at its line, with the reason; not
    // the pod outside the mesh, not the IPv4-only one.
    let out = check(Some(&format!("{base}ipv6: refuse\n")));
    let v6_warnings = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.contains("IPv6") && l.ends_with("(warning)"))
            .map(str::to_string)
            .collect()
    };
    let warnings = v6_warnings(&out);
    assert_eq!(warnings.len(), 1, "{out}");
    assert!(
        warnings[0].starts_with(&format!(
            "{name}:12: Pod mesh/dual: its IPv6 address fd00::1 is not captured (ipv6: refuse in the config): weft refuses its IPv6 TCP connections"
        )),
        "{out}"
    );
    // A listener bound to an IPv4 address has no IPv6 counterpart.
    let out = check(Some(&format!(
        "{base}listen: {{outbound: '10.0.0.9:15001'}}\n"
    )));
    assert!(
        out.contains("listen.outbound is 10.0.0.9:15001, not 0.0.0.0:<port>"),
        "{out}"
    );
    // Without a config (or with one that captures IPv6 on a machine that can): no warning.
    assert!(v6_warnings(&check(None)).is_empty());
    if std::path::Path::new("/proc/sys/net/ipv6").exists()
        && Command::new("ip6tables")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        assert!(v6_warnings(&check(Some(base))).is_empty());
    }
    // A broken config fails the check with its error.
    let out = weft()
        .args(["check", "--mesh"])
        .arg(&mesh)
        .arg("--config")
        .arg(dir.path().join("nonexistent.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn check_warns_about_risky_policy_at_its_line_and_still_succeeds() {
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/risky-policies.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let out = weft()
        .args(["check", "--mesh"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "warnings alone must not fail the check"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let name = file.display().to_string();
    // The line of `name: <policy>` in the file.
    let line_of = |policy: &str| {
        text.lines()
            .position(|l| l.trim() == format!("name: {policy}"))
            .map(|i| i + 1)
            .unwrap_or_else(|| panic!("{policy} not in the file"))
    };
    let expect = [
        ("shop-permissive", "PeerAuthentication shop/shop-permissive: mTLS mode PERMISSIVE"),
        ("web-metrics-plaintext", "PeerAuthentication shop/web-metrics-plaintext: port 9090: mTLS mode DISABLE"),
        ("allow-everything", "AuthorizationPolicy shop/allow-everything: rule 0 matches every connection"),
        ("deny-nothing", "AuthorizationPolicy shop/deny-nothing: rule 0 can never match"),
        ("web-allow-frontend", "AuthorizationPolicy shop/web-allow-frontend: fully shadowed by DENY shop/web-lockdown"),
        ("web-get-only", "AuthorizationPolicy shop/web-get-only: uses attributes only a waypoint (L7) can evaluate (rule 0: methods)"),
    ];
    for (policy, message) in expect {
        let prefix = format!("{name}:{}: {message}", line_of(policy));
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&prefix) && l.ends_with("(warning)")),
            "missing {prefix:?} in\n{stdout}"
        );
    }
    assert!(
        stdout.lines().any(|l| l.starts_with(&format!(
            "{name}: no mesh-wide PeerAuthentication (namespace istio-system, no selector)"
        ))),
        "{stdout}"
    );
    assert!(stdout.contains("ok: 1 namespaces, 1 pods (1 enrolled), 0 services, 7 policies"));
}

/// `weft check` on `tests/data/<name>`: its stdout (the check must succeed) and the file's
/// path and text.
fn check_data(name: &str) -> (String, String, String) {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    let text = std::fs::read_to_string(&file).unwrap();
    let out = weft()
        .args(["check", "--mesh"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "warnings alone must not fail the check"
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        file.display().to_string(),
        text,
    )
}

#[test]
fn check_warns_about_each_documented_policy_mistake_at_its_line_and_not_once_corrected() {
    let (stdout, name, text) = check_data("policy-mistakes.yaml");
    // The line of the first line holding `needle` after `name: <policy>`.
    let line_of = |policy: &str, needle: &str| {
        let lines: Vec<&str> = text.lines().collect();
        let start = lines
            .iter()
            .position(|l| l.trim() == format!("name: {policy}"))
            .unwrap_or_else(|| panic!("{policy} not in the file"));
        start
            + 1
            + lines[start..]
                .iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle:?} not in {policy}"))
    };
    let expect: &[(&str, &str, &[&str])] = &[
        ("payments-post", "- from:", &[
            "AuthorizationPolicy payments/payments-post: rules[0] has only `from` and rules[1] only `to`, but a policy's rules are alternatives (Istio ORs them)",
            "rules[0] alone admits principals [cluster.local/ns/default/sa/order-service] to any operation",
            "rules[1] alone admits any source, plaintext included, to methods [POST], paths [/api/payments]",
        ]),
        ("deny-legacy", "spiffe://", &[
            "AuthorizationPolicy payments/deny-legacy: rules[0].from[0].source.principals[0] \"spiffe://cluster.local/ns/legacy/sa/old\" starts with spiffe://",
            "write \"cluster.local/ns/legacy/sa/old\"; in this DENY it denies no one",
        ]),
        ("payments-from-orders", "example.org", &[
            "AuthorizationPolicy payments/payments-from-orders: rules[0].from[0].source.principals[0] \"example.org/ns/default/sa/order-service\" is in trust domain example.org, not the mesh's (cluster.local)",
            "write \"cluster.local/ns/default/sa/order-service\"; in this ALLOW it admits no one",
        ]),
        ("payments-from-default", "principals: [default]", &[
            "AuthorizationPolicy payments/payments-from-default: rules[0].from[0].source.principals[0] \"default\" is a namespace of the mesh, not a principal",
            "write namespaces: [default]",
        ]),
        ("payments-metrics", "namespaces: [", &[
            "AuthorizationPolicy payments/payments-metrics: rules[0].from[0].source.namespaces[0] \"cluster.local/ns/default/sa/order-service\" is a principal, not a namespace",
            "write principals: [\"cluster.local/ns/default/sa/order-service\"], or namespaces: [default]",
        ]),
        ("payments-lockdown", "app: payment", &[
            "AuthorizationPolicy payments/payments-lockdown: selector app=payment matches no pod of namespace payments: the policy applies to no workload weft captures",
        ]),
        ("legacy-lockdown", "namespace: legacy", &[
            "AuthorizationPolicy legacy/legacy-lockdown: namespace legacy is not enrolled (no label istio.io/dataplane-mode=ambient) and none of its 1 pods enrolls itself",
        ]),
    ];
    for (policy, needle, parts) in expect {
        let prefix = format!("{name}:{}: {}", line_of(policy, needle), parts[0]);
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("missing {prefix:?} in\n{stdout}"));
        assert!(line.ends_with("(warning)"), "{line}");
        for part in &parts[1..] {
            assert!(line.contains(part), "{part:?} not in {line}");
        }
    }
    // Nothing else but the notice that payments-post needs a waypoint for its HTTP attributes.
    let l7 = "AuthorizationPolicy payments/payments-post: uses attributes only a waypoint (L7) can evaluate";
    let warnings = |stdout: &str| -> Vec<String> {
        stdout
            .lines()
            .filter(|l| l.ends_with("(warning)") && !l.contains(l7))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(warnings(&stdout).len(), expect.len(), "{stdout}");

    let (stdout, name, _) = check_data("policy-mistakes-fixed.yaml");
    assert!(warnings(&stdout).is_empty(), "{stdout}");
    assert!(stdout.contains(l7), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{name}: ok: 3 namespaces, 3 pods (3 enrolled), 0 services, 8 policies"
        )),
        "{stdout}"
    );

    // The mesh's trust domain is the check's: with example.org's, the example.org principal
    // is right and every cluster.local one is not.
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/policy-mistakes.yaml");
    let out = weft()
        .args(["check", "--trust-domain", "example.org", "--mesh"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("is in trust domain example.org"),
        "{stdout}"
    );
    assert!(
        stdout.contains("is in trust domain cluster.local, not the mesh's (example.org)"),
        "{stdout}"
    );
}

#[test]
fn ca_init_refuses_to_overwrite_an_existing_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    assert!(weft()
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .status()
        .unwrap()
        .success());
    for f in [
        "root-cert.pem",
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
    ] {
        assert!(ca.join(f).exists(), "{f} missing");
    }
    let out = weft()
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ca_init_then_run_turns_ready_and_sigterm_exits_cleanly() {
    let ip = unique_loopback();
    let dir = node_dir(ip);
    let mut child = weft()
        .args(["run", "--config"])
        .arg(dir.path().join("weft.yaml"))
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ok = wait_ready(ip);
    let dump = get_json(std::net::SocketAddr::new(ip, 15000), "/config_dump");
    assert_eq!(dump["certificates"].as_array().unwrap().len(), 2);
    // `weft ctl` reads the same endpoint and prints tables.
    let admin = format!("{ip}:15000");
    let ctl = |args: &[&str]| {
        let out = weft()
            .args(["ctl", "--admin", &admin])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let workloads = ctl(&["workloads"]);
    assert!(workloads.starts_with("NAMESPACE"), "{workloads}");
    assert!(
        workloads.lines().any(|l| l.contains("frontend-0")
            && l.contains("enrolled")
            && l.contains("spiffe://cluster.local/ns/shop/sa/frontend")),
        "{workloads}"
    );
    let certs = ctl(&["certs"]);
    assert_eq!(
        certs.lines().count(),
        3,
        "header and two certificates:\n{certs}"
    );
    assert!(ctl(&["services"]).contains("10.96.0.20"));
    assert!(ctl(&["policies"]).contains("cart-from-frontend"));
    assert!(ctl(&["connections"]).contains("0 pooled HBONE connection(s)"));
    let explain = ctl(&[
        "explain",
        "--src",
        "10.244.1.12",
        "--dst",
        "10.244.1.11",
        "--port",
        "8080",
    ]);
    assert!(
        explain.to_lowercase().contains("deny") && explain.contains("cart-from-frontend"),
        "debug-0 is not frontend:\n{explain}"
    );
    let explain = ctl(&[
        "explain",
        "--src",
        "10.244.1.10",
        "--dst",
        "10.244.1.11",
        "--port",
        "8080",
    ]);
    assert!(explain.to_lowercase().contains("allow"), "{explain}");
    let out = weft()
        .args([
            "ctl",
            "--admin",
            &admin,
            "explain",
            "--src",
            "x",
            "--dst",
            "10.244.1.11",
            "--port",
            "8080",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("400"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, stderr) = stop_with_sigterm(&mut child);
    assert!(ok, "not ready; stderr:\n{stderr}");
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    // JSON logs, one object per line.
    let first = stderr.lines().next().unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "{first}"
    );
    assert!(stderr.contains("SIGTERM"), "{stderr}");
}

#[test]
fn run_started_with_sigint_and_sigterm_blocked_unblocks_them_and_drains_on_sigterm() {
    use nix::sys::signal::{SigSet, Signal};
    let ip = unique_loopback();
    let dir = node_dir(ip);
    // As a parent that blocks them would (the mask is inherited across fork and exec): only
    // this test's thread, and only while it spawns.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    stop.thread_block().unwrap();
    let spawned = weft()
        .args(["run", "--config"])
        .arg(dir.path().join("weft.yaml"))
        .stderr(Stdio::piped())
        .spawn();
    stop.thread_unblock().unwrap();
    let mut child = spawned.unwrap();
    let ok = wait_ready(ip);
    // The main thread and the runtime's workers take the stop signals. (Helper threads that
    // some libraries start with every signal blocked are theirs to block.)
    let pid = nix_pid(child.id());
    let mut masks = Vec::new();
    for task in procfs::process::Process::new(pid).unwrap().tasks().unwrap() {
        let status = task.unwrap().status().unwrap();
        if status.pid == pid || status.name.starts_with("weft-worker") {
            masks.push((status.name, status.sigblk));
        }
    }
    let stop_bits = (1u64 << (Signal::SIGINT as u32 - 1)) | (1u64 << (Signal::SIGTERM as u32 - 1));
    let (status, stderr) = stop_with_sigterm(&mut child);
    assert!(ok, "not ready; stderr:\n{stderr}");
    assert!(
        masks.len() > 1,
        "the main thread and the workers: {masks:x?}"
    );
    assert!(
        masks.iter().all(|(_, mask)| mask & stop_bits == 0),
        "{masks:x?}"
    );
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(stderr.contains("SIGTERM: shutting down"), "{stderr}");
}

#[test]
fn a_rust_log_weft_cannot_apply_is_reported_and_info_is_in_force() {
    // A span directive, which weft's target-and-level filters do not take.
    let ip = unique_loopback();
    let dir = node_dir(ip);
    let mut child = weft()
        .args(["run", "--config"])
        .arg(dir.path().join("weft.yaml"))
        .env("RUST_LOG", "weft[conn]=debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let admin = std::net::SocketAddr::new(ip, 15000);
    let start = Instant::now();
    let mut logging = None;
    while start.elapsed() < Duration::from_secs(20) && logging.is_none() {
        if std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(200)).is_ok() {
            logging = Some(http(admin, "GET", "/logging"));
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (_, stderr) = stop_with_sigterm(&mut child);
    let (status, body) = logging.expect("the admin port never opened");
    assert_eq!(status, 200, "{body}");
    // The filter in force is what /logging reports, not the refused text.
    assert!(body.contains("info") && !body.contains("conn"), "{body}");
    assert!(
        stderr.contains("RUST_LOG not applied") && stderr.contains("weft[conn]=debug"),
        "{stderr}"
    );
    // And info is in force: the start-up lines are there.
    assert!(stderr.contains("INFO"), "{stderr}");
}

/// A directory for one `weft run --config DIR/weft.yaml`: a CA made by `weft ca init`, the
/// example mesh, and a daemon config listening on `ip` with no capture.
fn node_dir(ip: std::net::IpAddr) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    assert!(weft()
        .args(["ca", "init", "--dir"])
        .arg(dir.path().join("ca"))
        .args(["--trust-domain", "cluster.local"])
        .status()
        .unwrap()
        .success());
    std::fs::write(dir.path().join("mesh.yaml"), example_mesh()).unwrap();
    std::fs::write(
        dir.path().join("weft.yaml"),
        format!(
            "nodeName: node-1\nmesh: {{file: mesh.yaml}}\nca: {{builtin: {{dir: ca}}}}\nlisten:\n  outbound: {ip}:15001\n  inboundPlaintext: {ip}:15006\n  hbone: {ip}:15008\n  admin: {ip}:15000\n  metrics: {ip}:15020\n  readiness: {ip}:15021\nredirect: none\n"
        ),
    )
    .unwrap();
    dir
}

/// Whether the daemon listening on `ip` answers 200 on its readiness port within 20 s.
fn wait_ready(ip: std::net::IpAddr) -> bool {
    let ready = std::net::SocketAddr::new(ip, 15021);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if std::net::TcpStream::connect_timeout(&ready, Duration::from_millis(200)).is_ok()
            && http(ready, "GET", "/healthz/ready").0 == 200
        {
            eprintln!("ready after {:?}", start.elapsed());
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Stops a `weft run` child started with a piped stderr: SIGTERM, waits for it (10 s at most),
/// and returns its exit status and everything it wrote on stderr.
fn stop_with_sigterm(child: &mut std::process::Child) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    kill_term(nix_pid(child.id()));
    let status = wait_timeout(child, Duration::from_secs(10)).expect("did not exit on SIGTERM");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

fn nix_pid(id: u32) -> i32 {
    i32::try_from(id).unwrap()
}

fn kill_term(pid: i32) {
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn wait_timeout(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}
