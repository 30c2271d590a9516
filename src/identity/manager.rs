#![allow(missing_docs, dead_code)]
use super::ca::*;
use super::*;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
pub struct CertManager;
impl CertManager {
    pub fn new(_ca: Arc<dyn CertificateAuthority>, _ttl: Duration) -> Arc<CertManager> {
        Arc::new(CertManager)
    }
    pub fn run(
        self: &Arc<Self>,
        _w: tokio::sync::watch::Receiver<BTreeSet<Identity>>,
        _s: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async {})
    }
    pub fn get(&self, _id: &Identity) -> Option<Arc<IssuedCert>> {
        None
    }
    pub fn certs(&self) -> Vec<Arc<IssuedCert>> {
        vec![]
    }
    pub fn has_all(&self, _w: &BTreeSet<Identity>) -> bool {
        false
    }
}
