//! `weft check --mesh FILE`: the mesh parser, offline. Prints `file:line: message` for each
//! error and each warning; the exit status says whether the file would be accepted.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// Checks `path`, writing findings to `out`; success when the file would be accepted.
pub fn run(path: &Path, out: &mut impl Write) -> ExitCode {
    match crate::source::file::read(path) {
        Ok(parsed) => {
            for w in &parsed.warnings {
                let _ = writeln!(out, "{w} (warning)");
            }
            let m = &parsed.mesh;
            let _ = writeln!(
                out,
                "{}: ok: {} namespaces, {} pods ({} enrolled), {} services, {} policies",
                path.display(),
                m.namespaces.len(),
                m.workloads.len(),
                m.workloads
                    .iter()
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
