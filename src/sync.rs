//! Small synchronisation helpers shared by the modules.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

/// Locks `m`. A holder that panicked left nothing half-written behind in weft's short
/// critical sections, so a poisoned lock is still good.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub(crate) async fn shut_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
