//! What a mesh test needs from the machine, and the skip-or-fail policy of TESTING.md:
//! outside CI a missing prerequisite skips the test with a printed reason; with `CI=true`
//! it fails.
//!
//! Owns: the checks (root, tools on `PATH`, a namespace can be created and run iptables).

use std::path::Path;
use std::sync::OnceLock;

use nix::unistd::geteuid;

use crate::registry;

/// The programs the mesh and weft's mesh tests run.
pub const REQUIRED_TOOLS: [&str; 5] = ["ip", "iptables", "iptables-restore", "nft", "tcpdump"];

/// Why the machine cannot run mesh tests (the reason a skip message prints). `Clone`, since
/// the answer is cached for the process: causes are kept as their text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unmet {
    /// Not running as root.
    #[error("mesh tests need root (euid is {0})")]
    NotRoot(u32),
    /// Tools missing from `PATH`.
    #[error("mesh tests need {} on PATH", .0.join(", "))]
    Tools(Vec<String>),
    /// The testbed registry could not be used.
    #[error("{0}")]
    Registry(String),
    /// A network namespace could not be created or could not run iptables.
    #[error("cannot use a network namespace: {0}")]
    Namespace(String),
    /// The probe namespace could not be deleted.
    #[error("cannot delete a network namespace: {0}")]
    Cleanup(String),
}

/// The machine's readiness for mesh tests. See [`Prereqs::check`].
#[derive(Clone, Copy, Debug)]
pub struct Prereqs;

// === impl Prereqs ===

impl Prereqs {
    /// Checks, once per process (the result is cached): running as root (euid 0), the
    /// [`REQUIRED_TOOLS`] on `PATH`, and that a network namespace can be created and can
    /// run `iptables`. The error is the reason, for a skip message.
    pub fn check() -> Result<(), Unmet> {
        static RESULT: OnceLock<Result<(), Unmet>> = OnceLock::new();
        RESULT.get_or_init(check_uncached).clone()
    }
}

fn check_uncached() -> Result<(), Unmet> {
    let euid = geteuid();
    if !euid.is_root() {
        return Err(Unmet::NotRoot(euid.as_raw()));
    }
    let missing: Vec<String> = REQUIRED_TOOLS
        .into_iter()
        .filter(|tool| !on_path(tool))
        .map(str::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(Unmet::Tools(missing));
    }
    probe_namespace()
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program)))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Creates a throwaway namespace (named like a testbed's, so a crash leaves nothing that
/// `cleanup_stale` would not remove) and runs `iptables` in it.
fn probe_namespace() -> Result<(), Unmet> {
    let prefix = registry::register_bed(None).map_err(|e| Unmet::Registry(e.to_string()))?;
    let result = registry::create_namespace(&prefix, &format!("{prefix}-probe"))
        .and_then(|ns| ns.exec("iptables", ["-t", "mangle", "-S"]).map(drop))
        .map_err(|e| Unmet::Namespace(e.to_string()));
    let errors = registry::remove_bed(&prefix);
    result?;
    match errors.first() {
        Some(e) => Err(Unmet::Cleanup(e.to_string())),
        None => Ok(()),
    }
}

/// The policy for tests that need the mesh: `Some(())` if [`Prereqs::check`] passes;
/// otherwise prints `skipping: <reason>` and returns `None`, unless the environment has
/// `CI=true`, where it panics with the reason instead.
///
/// ```no_run
/// # fn a_mesh_test() {
/// let Some(()) = weft_testbed::require() else { return };
/// # }
/// ```
pub fn require() -> Option<()> {
    match Prereqs::check() {
        Ok(()) => Some(()),
        Err(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("mesh test prerequisites missing (CI=true): {reason}")
        }
        Err(reason) => {
            eprintln!("skipping: {reason}");
            None
        }
    }
}
