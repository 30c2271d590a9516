//! `weft check --mesh FILE`: the mesh parser, offline. Prints `file:line: message` for each
//! error and each warning; the exit status says whether the file would be accepted (warnings
//! alone never fail it).
//!
//! Warnings are the parser's (skipped objects) and the policy engine's risky-policy findings
//! and likely mistakes ([`crate::authz::lint_findings`]), each located at its field or its
//! policy's `metadata.name` ([`crate::source::file::locate_finding`], which the daemon's load
//! warnings share). Policies are read with the root namespace and trust domain of `--config`
//! (Istio's defaults without one); `--trust-domain` overrides the latter.
//!
//! With `--config` (the daemon config of the node it runs on), it also says what capture
//! would do there: when IPv6 cannot be captured (the config refuses it, a listener has no
//! IPv6 counterpart, the kernel has no IPv6, ip6tables is missing), each enrolled pod's IPv6
//! address is a warning at its Pod, with the reason: its IPv6 connections will be refused.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use crate::authz::{self, LintContext};
use crate::config::{Config, Env, Ipv6, Redirect};

/// Why weft, run on this machine with `config`, could not capture IPv6 (its connections then
/// refused), as far as the config and the machine's tools tell without changing anything.
/// Rules the kernel refuses at run time show in readiness and `/config_dump` instead.
pub fn ipv6_capture_blocked(config: &Config) -> Option<String> {
    if config.redirect != Redirect::Tproxy {
        return None;
    }
    if config.ipv6 == Ipv6::Refuse {
        return Some("ipv6: refuse in the config".into());
    }
    let l = &config.listen;
    if let Err(why) = crate::proxy::ipv6_listeners(&crate::proxy::Listeners {
        outbound: l.outbound,
        inbound_plaintext: l.inbound_plaintext,
        hbone: l.hbone,
    }) {
        return Some(why);
    }
    if !Path::new("/proc/sys/net/ipv6").exists() {
        return Some("the kernel has no IPv6".into());
    }
    match std::process::Command::new("ip6tables")
        .arg("--version")
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "ip6tables --version failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run ip6tables: {e}")),
    }
}

/// Checks `path` (and, given the node's daemon `config`, how capture would treat its pods
/// there), writing findings to `out`; success when both files would be accepted.
/// `trust_domain`, when given, is the mesh's (else the config's, else Istio's default).
pub fn run(
    path: &Path,
    config: Option<&Path>,
    trust_domain: Option<&str>,
    out: &mut impl Write,
) -> ExitCode {
    use crate::source::file::{locate_finding, parse, read_bytes};
    let mut lint = LintContext::default();
    let ipv6_blocked = match config.map(|c| Config::load(c, &Env::from_process())) {
        None => None,
        Some(Ok(c)) => {
            lint.root_namespace = c.root_namespace.clone();
            lint.trust_domain = c.trust_domain.clone();
            ipv6_capture_blocked(&c)
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(td) = trust_domain {
        if crate::identity::Identity::new(td, "ns", "sa").is_err() {
            let _ = writeln!(out, "--trust-domain: {td:?} is not a valid trust domain");
            return ExitCode::FAILURE;
        }
        lint.trust_domain = td.to_string();
    }
    match read_bytes(path).and_then(|b| Ok((parse(path, &b)?, b))) {
        Ok((parsed, bytes)) => {
            for w in &parsed.warnings {
                let _ = writeln!(out, "{w} (warning)");
            }
            // Parsed, so the bytes are UTF-8 text.
            let text = String::from_utf8_lossy(&bytes);
            let file = path.display().to_string();
            for f in authz::lint_findings(&parsed.mesh, &lint) {
                let _ = writeln!(out, "{} (warning)", locate_finding(&file, &text, &f));
            }
            if let Some(why) = &ipv6_blocked {
                for w in parsed.mesh.workloads.values() {
                    if !w.enrollment.is_enrolled() {
                        continue;
                    }
                    for ip in w.ips.iter().filter(|ip| ip.is_ipv6()) {
                        let at =
                            crate::source::file::locate_object(&text, "Pod", &w.namespace, &w.name)
                                .map(|l| format!("{}:{l}", path.display()))
                                .unwrap_or_else(|| path.display().to_string());
                        let _ = writeln!(
                            out,
                            "{at}: Pod {}/{}: its IPv6 address {ip} is not captured ({why}): weft refuses its IPv6 TCP connections (warning)",
                            w.namespace, w.name
                        );
                    }
                }
            }
            let m = &parsed.mesh;
            let _ = writeln!(
                out,
                "{}: ok: {} namespaces, {} pods ({} enrolled), {} services, {} policies",
                path.display(),
                m.namespaces.len(),
                m.workloads.len(),
                m.workloads
                    .values()
                    .filter(|w| w.enrollment.is_enrolled())
                    .count(),
                m.services.len(),
                m.policies.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(out, "{e}");
            ExitCode::FAILURE
        }
    }
}
