//! The mesh-file source: reads a Kubernetes-style YAML file, publishes it, and watches it.
//!
//! A valid change is published as the next generation; an invalid one is rejected whole with
//! `file:line: message` and the snapshot in force stays. The load's warnings are the parser's
//! and the likely mistakes in its policies ([`crate::authz::mistakes`], located at their
//! field), logged and kept in the load status (`/config_dump`). The watch uses inotify (via
//! `notify`) on the file's directory, so editors that write a new file and rename it, and
//! Kubernetes ConfigMap volumes that swap a symlink, are both seen; a slow poll backs it up
//! in case an event is missed. Unchanged content is not republished.
//!
//! The file is Kubernetes-style YAML (as `kubectl get -o yaml` prints it): Namespaces, Pods,
//! Services and Istio's security CRDs, in multi-document files and `kind: List`s. Turning
//! its text into the model is split by concern:
//! - [`parse`](parse_mesh): the entry point, its result and `file:line` error types;
//! - `kinds`: the object kinds and the two reading passes (kinds first, then typed objects);
//! - `locate`: the line of a field or object, for errors found after reading;
//! - `translate`: objects → the model.
//!
//! Every error carries `file:line` (a contract: `weft check` and reload failures print it).
//! This module owns the file I/O and the watch; the submodules never touch files, state or
//! sockets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::authz::{Finding, LintContext};
use crate::state::StateStore;

mod kinds;
mod locate;
mod parse;
mod translate;

pub use locate::{locate_field, locate_object};
pub use parse::{parse_mesh, MeshError, MeshErrors, Parsed};

/// Why the mesh file could not be loaded; the text is what the status and logs show.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The bytes are not UTF-8 text.
    #[error("{}: not UTF-8 text: {source}", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Where the text stops being UTF-8.
        source: std::str::Utf8Error,
    },
    /// The text is not a valid mesh (every problem, `file:line: message` each).
    #[error(transparent)]
    Mesh(#[from] MeshErrors),
    /// The blocking task reading or parsing the file failed.
    #[error("{}: load task failed: {source}", path.display())]
    Task {
        /// The file.
        path: PathBuf,
        /// Why the task ended.
        source: tokio::task::JoinError,
    },
}

/// How long to let a burst of file events settle before reading.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Fallback poll in case a file event is lost.
const POLL: Duration = Duration::from_secs(5);

/// Whether a file event may mean new content: created, removed, renamed, written, closed after
/// writing. Not an open or a read: notify's inotify watch reports opens too, and our own read
/// of the file was then taken for a change and read it again 100 ms later, for ever (ten
/// reads of the whole file a second, per daemon watching it).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Reads and parses `path`; the error text is what the status and logs show.
pub fn read(path: &Path) -> Result<Parsed, FileError> {
    parse(path, &read_bytes(path)?)
}

/// The file's bytes; the error text is what the status and logs show.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses the bytes read from `path`.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed, FileError> {
    let text = std::str::from_utf8(bytes).map_err(|source| FileError::NotUtf8 {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_mesh(&path.display().to_string(), text)?)
}

/// A policy finding as `file:line: message`, at its field (else, or when the policy does not
/// write that field, at its `metadata.name`); `file: message` when it cannot be located in
/// `text`.
pub fn locate_finding(file: &str, text: &str, f: &Finding) -> String {
    let line = f.policy.as_ref().and_then(|(kind, ns, name)| {
        let kind = format!("{kind:?}");
        f.field
            .as_deref()
            .and_then(|field| locate_field(text, &kind, ns, name, field))
            .or_else(|| locate_object(text, &kind, ns, name))
    });
    match line {
        Some(l) => format!("{file}:{l}: {f}"),
        None => format!("{file}: {f}"),
    }
}

/// At most this many of a load's policy findings are located (each costs a walk over the
/// file); the rest are reported without their line.
const LOCATED_FINDINGS: usize = 50;

/// Parses the bytes read from `path` and reviews its policies: the mesh and the load's
/// warnings, the parser's first.
fn parse_and_review(
    path: &Path,
    bytes: &[u8],
    lint: &LintContext,
) -> Result<(crate::model::Mesh, Vec<String>), FileError> {
    let parsed = parse(path, bytes)?;
    let mut warnings: Vec<String> = parsed.warnings.iter().map(|w| w.to_string()).collect();
    // Parsed, so the bytes are UTF-8 text.
    let text = String::from_utf8_lossy(bytes);
    let file = path.display().to_string();
    for (i, f) in crate::authz::mistakes(&parsed.mesh, lint)
        .iter()
        .enumerate()
    {
        warnings.push(if i < LOCATED_FINDINGS {
            locate_finding(&file, &text, f)
        } else {
            format!("{file}: {f}")
        });
    }
    Ok((parsed.mesh, warnings))
}

/// The outcome of one load attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// Published as this generation.
    Published(u64),
    /// Same content as in force; nothing published.
    Unchanged,
    /// Rejected; the previous snapshot stays.
    Rejected,
}

/// What [`load_once`] remembers of a file's content to tell an unchanged file: its SHA-256
/// digest, not its bytes (a mesh file of 100,000 pods is 16 MB; the digest is 32 bytes).
pub type Seen = Option<[u8; 32]>;

/// The SHA-256 digest of a file's content.
fn digest(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// Loads the file once into `store`, skipping content identical to `last`, reviewing its
/// policies with `lint` (the mesh's root namespace and trust domain).
/// `last` remembers the digest of the previous attempt's content (`None`: no attempt yet;
/// `Some(None)`: the file could not be read).
pub async fn load_once(
    path: &Path,
    store: &StateStore,
    lint: &LintContext,
    last: &mut Option<Seen>,
) -> Loaded {
    // Read, and compare before parsing: the poll comes back every few seconds, and a large
    // mesh takes seconds of CPU to parse.
    let p = path.to_path_buf();
    let read = blocking(path, move || {
        read_bytes(&p).map(|b| {
            let d = digest(&b);
            (b, d)
        })
    })
    .await;
    let seen = read.as_ref().ok().map(|(_, d)| *d);
    if *last == Some(seen) {
        return Loaded::Unchanged;
    }
    // The bytes are dropped once parsed (on the blocking thread): only the mesh is kept.
    let parsed = match read {
        Err(e) => Err(e),
        Ok((b, _)) => {
            let (p, lint) = (path.to_path_buf(), lint.clone());
            blocking(path, move || Ok(parse_and_review(&p, &b, &lint)))
                .await
                .and_then(|parsed| parsed)
        }
    };
    match parsed {
        Ok((mesh, warnings)) => {
            for w in &warnings {
                tracing::warn!(target: "weft::config", "{w}");
            }
            let generation = store.publish(mesh, warnings);
            tracing::info!(target: "weft::config", file = %path.display(), generation, "mesh loaded");
            *last = Some(seen);
            Loaded::Published(generation)
        }
        Err(e) => {
            tracing::error!(target: "weft::config", file = %path.display(), "mesh rejected, previous state stays in force:\n{e}");
            store.reject(e.to_string());
            // Remember the bad content too, so the poll does not report the same error again.
            *last = Some(seen);
            Loaded::Rejected
        }
    }
}

/// Runs `f` (file I/O or a parse of `path`) on a blocking thread.
async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, FileError> + Send + 'static,
) -> Result<T, FileError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|source| {
            Err(FileError::Task {
                path: path.to_path_buf(),
                source,
            })
        })
}

/// Loads the file now, then keeps watching it until `shutdown` turns true; `lint` (the
/// mesh's root namespace and trust domain) is what its policies are reviewed with.
pub fn spawn(
    path: PathBuf,
    store: Arc<StateStore>,
    lint: LintContext,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let file_name = path.file_name().map(|n| n.to_os_string());
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        // The watcher lives as long as this task.
        let _watcher = {
            let tx = tx.clone();
            let name = file_name.clone();
            let handler = move |ev: notify::Result<notify::Event>| {
                if let Ok(ev) = ev {
                    if !is_change(&ev.kind) {
                        return;
                    }
                    // Kubernetes ConfigMaps swap a `..data` symlink; accept those events too.
                    let relevant = ev.paths.iter().any(|p| {
                        p.file_name().map(|n| n.to_os_string()) == name
                            || p.file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with(".."))
                    });
                    if relevant {
                        let _ = tx.send(());
                    }
                }
            };
            let mut w = notify::recommended_watcher(handler);
            match &mut w {
                Ok(w) => {
                    if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch mesh file directory; polling only");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot start file watcher; polling only"),
            }
            w.ok()
        };
        let mut last = None;
        load_once(&path, &store, &lint, &mut last).await;
        let mut poll = tokio::time::interval(POLL);
        poll.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = rx.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                    load_once(&path, &store, &lint, &mut last).await;
                }
                _ = poll.tick() => {
                    load_once(&path, &store, &lint, &mut last).await;
                }
            }
            if *shutdown.borrow() {
                break;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";

    #[tokio::test]
    async fn only_changed_content_is_parsed_and_a_bad_file_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        let store = StateStore::new("test");
        let lint = LintContext::default();
        let mut last = None;
        std::fs::write(&path, GOOD).unwrap();
        assert_eq!(
            load_once(&path, &store, &lint, &mut last).await,
            Loaded::Published(1)
        );
        assert_eq!(
            load_once(&path, &store, &lint, &mut last).await,
            Loaded::Unchanged
        );
        // Broken: rejected once, then the same bytes are not reported again.
        std::fs::write(&path, "kind: [").unwrap();
        assert_eq!(
            load_once(&path, &store, &lint, &mut last).await,
            Loaded::Rejected
        );
        assert_eq!(
            load_once(&path, &store, &lint, &mut last).await,
            Loaded::Unchanged
        );
        assert_eq!(store.status().loads_failed, 1);
        // Gone: one rejection naming the file, then quiet.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            load_once(&path, &store, &lint, &mut last).await,
            Loaded::Rejected
        );
        assert!(
            store
                .status()
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("mesh.yaml: cannot read")),
            "{:?}",
            store.status().last_error
        );
        assert_eq!(
            load_once(&path, &store, &lint, &mut last).await,
            Loaded::Unchanged
        );
        // Back with new content: published; the snapshot in force never changed meanwhile.
        assert_eq!(store.snapshot().generation, 1);
        std::fs::write(&path, GOOD.replace("name: a", "name: b")).unwrap();
        assert_eq!(
            load_once(&path, &store, &lint, &mut last).await,
            Loaded::Published(2)
        );
    }

    #[tokio::test]
    async fn likely_policy_mistakes_are_load_warnings_at_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nstatus: {podIP: 10.0.0.1}\n---\n\
                    apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: pay, namespace: a}\nspec:\n  rules:\n\
                    \x20 - from:\n    - source: {principals: [\"spiffe://example.org/ns/a/sa/x\"]}\n";
        std::fs::write(&path, text).unwrap();
        let store = StateStore::new("test");
        let lint = LintContext {
            trust_domain: "example.org".into(),
            ..LintContext::default()
        };
        let mut last = None;
        assert_eq!(
            load_once(&path, &store, &lint, &mut last).await,
            Loaded::Published(1)
        );
        let warnings = &store.status().warnings;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let expected = format!(
            "{}:16: AuthorizationPolicy a/pay: rules[0].from[0].source.principals[0] \"spiffe://example.org/ns/a/sa/x\" starts with spiffe://",
            path.display()
        );
        assert!(warnings[0].starts_with(&expected), "{warnings:?}");
        assert!(
            warnings[0].contains("write \"example.org/ns/a/sa/x\""),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_finding_is_located_at_its_field_else_at_its_policy() {
        use crate::model::PolicyKind;
        let text = "kind: AuthorizationPolicy\nmetadata:\n  name: p\nspec:\n  action: DENY\n";
        let f = Finding::about(PolicyKind::AuthorizationPolicy, "default", "p", "m".into());
        let at = |f: &Finding| locate_finding("m.yaml", text, f);
        assert_eq!(
            at(&f.clone().at("spec.action")),
            "m.yaml:5: AuthorizationPolicy default/p: m"
        );
        // Not written (a policy in `default` may leave out its namespace): the policy's line.
        assert_eq!(
            at(&f.clone().at("metadata.namespace")),
            "m.yaml:3: AuthorizationPolicy default/p: m"
        );
        assert_eq!(at(&f), "m.yaml:3: AuthorizationPolicy default/p: m");
        let elsewhere = Finding::about(PolicyKind::AuthorizationPolicy, "other", "p", "m".into());
        assert_eq!(at(&elsewhere), "m.yaml: AuthorizationPolicy other/p: m");
    }

    /// Counts the opens of `path` that inotify reports, until the returned watcher drops.
    fn count_opens(
        path: &Path,
    ) -> (
        notify::RecommendedWatcher,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let opens = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (n, want) = (opens.clone(), path.to_path_buf());
        let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                if matches!(ev.kind, EventKind::Access(AccessKind::Open(_)))
                    && ev.paths.contains(&want)
                {
                    n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
        .unwrap();
        w.watch(path.parent().unwrap(), RecursiveMode::NonRecursive)
            .unwrap();
        (w, opens)
    }

    #[tokio::test]
    async fn reading_the_file_does_not_make_the_watcher_read_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let (_counter, opens) = count_opens(&path);
        let store = StateStore::new("test");
        let (stop, shutdown) = watch::channel(false);
        let task = spawn(
            path.clone(),
            store.clone(),
            LintContext::default(),
            shutdown,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.snapshot().generation == 0 {
            assert!(std::time::Instant::now() < deadline, "never loaded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Someone else reads it too (another daemon on the node, `weft check`, a backup).
        for _ in 0..5 {
            std::fs::read(&path).unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        // Longer than the debounce, shorter than the fallback poll.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let seen = opens.load(std::sync::atomic::Ordering::SeqCst);
        // Our five reads and the watcher's first load, and on a slow machine one or two
        // fallback polls (every 5 s). It was 19: each open (its own included) was taken for a
        // change and read the file again 100 ms later.
        assert!(seen <= 8, "{seen} opens of the file");
        // A real change is still seen at once.
        std::fs::write(&path, GOOD.replace("name: a", "name: b")).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while store.snapshot().generation == 1 {
            assert!(std::time::Instant::now() < deadline, "change not seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}
