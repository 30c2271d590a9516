//! `weft check --mesh FILE`: the mesh parser, offline. Prints `file:line: message` for each
//! error and each warning; the exit status says whether the file would be accepted (warnings
//! alone never fail it).
//!
//! Warnings are the parser's (skipped objects) and the policy engine's risky-policy findings
//! ([`crate::authz::lint_findings`], evaluated with Istio's default root namespace), each
//! located at its policy's `metadata.name` when the file can be read again.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use crate::authz::{self, Finding};

/// Checks `path`, writing findings to `out`; success when the file would be accepted.
pub fn run(path: &Path, out: &mut impl Write) -> ExitCode {
    use crate::source::file::{parse, read_bytes};
    match read_bytes(path).and_then(|b| Ok((parse(path, &b)?, b))) {
        Ok((parsed, bytes)) => {
            for w in &parsed.warnings {
                let _ = writeln!(out, "{w} (warning)");
            }
            // Parsed, so the bytes are UTF-8 text.
            let text = String::from_utf8_lossy(&bytes);
            for f in authz::lint_findings(&parsed.mesh, authz::DEFAULT_ROOT_NAMESPACE) {
                let _ = writeln!(out, "{} (warning)", locate(path, &text, &f));
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

/// `file:line: finding`, or `file: finding` when the policy cannot be located.
fn locate(path: &Path, text: &str, f: &Finding) -> String {
    let line = f.policy.as_ref().and_then(|(kind, ns, name)| {
        crate::source::file::locate_object(text, &format!("{kind:?}"), ns, name)
    });
    match line {
        Some(l) => format!("{}:{l}: {f}", path.display()),
        None => format!("{}: {f}", path.display()),
    }
}
