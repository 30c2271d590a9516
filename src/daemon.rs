//! `weft run`: wires the parts together and owns their lifetime.
//!
//! Start-up order: CA (a bad CA fails start-up), state store and mesh source, certificate
//! manager following the local identities of the state, then the admin servers. Shutdown:
//! every task gets the same shutdown signal and is awaited. This module holds no logic of its
//! own beyond that wiring; it is what `main.rs` and in-process tests call.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::admin::{self, AdminContext};
use crate::authz::AuthzCache;
use crate::config::{CaSource, Config, Ipv6, MeshSource, Redirect};
use crate::identity::ca::{BuiltinCa, CertificateAuthority};
use crate::identity::istio::IstioCa;
use crate::identity::manager::CertManager;
use crate::identity::{Identity, IdentityError};
use crate::logging::LogControl;
use crate::metrics::Metrics;
use crate::proxy::conntrack::ConnTable;
use crate::proxy::pool::Pool;
use crate::proxy::socket::SocketMode;
use crate::proxy::{Listeners, Proxy, ProxyCtx};
use crate::redirect::{Ports as RedirectPorts, Redirector};
use crate::source;
use crate::state::StateStore;
use crate::tls::TlsConfigs;
use crate::waypoint::{Waypoint, WaypointCtx};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The CA could not be loaded.
    #[error("certificate authority: {0}")]
    Ca(#[from] IdentityError),
    /// An admin listener could not be started.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// TLS configs could not be built from the trust roots.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A data-path listener could not be started.
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    /// The capture rules could not be installed.
    #[error("traffic capture: {0}")]
    Redirect(#[from] crate::redirect::RedirectError),
    /// A start-up task failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A running daemon.
pub struct Daemon {
    /// How long live connections may finish after shutdown is asked for (`drainGrace`).
    pub drain_grace: Duration,
    /// The state store (read-only use outside).
    pub store: Arc<StateStore>,
    /// Workload certificates.
    pub certs: Arc<CertManager>,
    /// Bound admin, metrics and readiness addresses.
    pub admin_addrs: [SocketAddr; 3],
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    admin: admin::AdminServers,
    proxy: Proxy,
    redirector: Option<Arc<Redirector>>,
}

impl Daemon {
    /// Starts every part; returns once the listeners are bound (not yet ready).
    pub async fn start(config: Config, log: Arc<LogControl>) -> Result<Daemon, DaemonError> {
        let config = Arc::new(config);
        let (shutdown, shutdown_rx) = watch::channel(false);

        let certs = CertManager::new(ca(&config).await?, config.cert_ttl);
        let store = StateStore::new(match &config.mesh {
            MeshSource::File(path) => path.display().to_string(),
            MeshSource::Xds(cp) => format!("xds {}", cp.address),
            MeshSource::Kubernetes(k) => source::kube::describe(k),
        });
        // Everything that can fail on bad input comes before any task is started.
        let tls = Arc::new(TlsConfigs::new());
        let jwks_config = crate::waypoint::jwt::JwksConfig {
            extra_ca_file: config.waypoint.jwks_ca_file.clone(),
            ..Default::default()
        };
        let jwks =
            tokio::task::spawn_blocking(move || crate::waypoint::jwt::JwksCache::new(jwks_config))
                .await
                .map_err(|e| DaemonError::Internal(format!("JWKS client: {e}")))?
                .map_err(|e| DaemonError::Internal(format!("JWKS client: {e}")))?;
        let jwks = Arc::new(jwks);
        let mut tasks = Vec::new();

        // Certificates follow the local enrolled ServiceAccounts of the state in force.
        let (wanted_tx, wanted_rx) = watch::channel(BTreeSet::<Identity>::new());
        tasks.push(follow_identities(
            store.clone(),
            config.clone(),
            wanted_tx,
            shutdown_rx.clone(),
        ));
        tasks.push(certs.run(wanted_rx, shutdown_rx.clone()));
        let metrics = Arc::new(Metrics::new(
            store.clone(),
            certs.clone(),
            log.clone(),
            crate::metrics::Cluster(Arc::from(config.cluster_id())),
        ));
        tasks.push(mesh_source(
            &config,
            store.clone(),
            &metrics,
            shutdown_rx.clone(),
        ));
        let mode = match config.redirect {
            Redirect::Tproxy => SocketMode::Transparent,
            // In-pod, the node itself neither listens nor connects: each pod's data path has
            // sockets of its own (`inpod`).
            Redirect::None | Redirect::Inpod => SocketMode::Plain,
        };
        let keepalive = crate::proxy::socket::Keepalive {
            idle: config.limits.tcp_keepalive.idle,
            interval: config.limits.tcp_keepalive.interval,
            probes: config.limits.tcp_keepalive.probes,
        };
        let pool = Pool::new(
            tls.clone(),
            mode.clone(),
            config.listen.hbone.port(),
            keepalive,
        );
        let conns = ConnTable::new(metrics.tcp.clone());
        let jwks_stop = tokio_util::sync::CancellationToken::new();
        tasks.push(jwks.spawn_refresher(jwks_stop.clone()));
        {
            let stop = jwks_stop.clone();
            let mut rx = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move {
                crate::sync::shut_down(&mut rx).await;
                stop.cancel();
            }));
        }
        let policies = Arc::new(AuthzCache::new(&config.root_namespace));
        let waypoint = Arc::new(Waypoint::new(
            WaypointCtx {
                store: store.clone(),
                policies: policies.clone(),
                mode: mode.clone(),
                trust_domain: config.trust_domain.clone(),
            },
            jwks,
            metrics.http.clone(),
        ));
        let proxy_ctx = Arc::new(ProxyCtx {
            waypoint,
            node: config.node_name.clone(),
            trust_domain: config.trust_domain.clone(),
            policies,
            denials: metrics.denials.clone(),
            mode,
            store: store.clone(),
            certs: certs.clone(),
            tls,
            pool: pool.clone(),
            conns: conns.clone(),
            draining: tokio_util::sync::CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
            limits: crate::proxy::limit::Limits {
                total: config.limits.connections_per_listener,
                per_source: config.limits.connections_per_source,
            },
            limit_metrics: metrics.limits.clone(),
            handshakes: Arc::new(tokio::sync::Semaphore::new(
                config.limits.handshakes_in_progress,
            )),
            keepalive,
        });
        let listeners = Listeners {
            outbound: config.listen.outbound,
            inbound_plaintext: config.listen.inbound_plaintext,
            hbone: config.listen.hbone,
        };
        let stop_tasks = |shutdown: &watch::Sender<bool>,
                          tasks: Vec<tokio::task::JoinHandle<()>>| {
            shutdown.send_replace(true);
            async move {
                for t in tasks {
                    let _ = t.await;
                }
            }
        };
        // The listeners are bound first (capturing, they listen only once weft can serve):
        // whether IPv6 has listeners decides whether it is captured or refused.
        let started = match config.redirect {
            // In-pod, the listeners are in the pods, opened as istio-cni hands them over.
            Redirect::Inpod => Ok(Proxy::without_listeners(
                proxy_ctx.clone(),
                shutdown_rx.clone(),
            )),
            Redirect::Tproxy | Redirect::None => {
                Proxy::start(proxy_ctx.clone(), listeners, shutdown_rx.clone())
            }
        };
        let proxy = match started {
            Ok(p) => p,
            Err(e) => {
                stop_tasks(&shutdown, tasks).await;
                return Err(e.into());
            }
        };
        // Capture: a missing iptables or a refused rule fails start-up; kept in step with the
        // state by a task.
        let mut inpod = None;
        let redirector = match config.redirect {
            Redirect::None => None,
            // istio-cni programs the capture inside each pod; weft programs none on the node.
            Redirect::Inpod => {
                let (task, status) = crate::inpod::spawn(
                    proxy_ctx.clone(),
                    crate::inpod::Settings {
                        zds_socket: config.zds_socket.clone(),
                        ports: listeners,
                        drain_grace: config.drain_grace,
                    },
                    shutdown_rx.clone(),
                );
                tasks.push(task);
                inpod = Some(status);
                None
            }
            Redirect::Tproxy => {
                let r = Arc::new(Redirector::new(
                    RedirectPorts {
                        outbound: listeners.outbound,
                        inbound_plaintext: listeners.inbound_plaintext,
                        hbone: listeners.hbone,
                    },
                    metrics.capture.clone(),
                    match (config.ipv6, proxy.ipv6_unavailable()) {
                        (Ipv6::Refuse, _) => Some("ipv6: refuse in the config".to_string()),
                        (Ipv6::Capture, why) => why.map(str::to_string),
                    },
                ));
                let installer = r.clone();
                let installed = tokio::task::spawn_blocking(move || installer.install())
                    .await
                    .map_err(|e| DaemonError::Internal(format!("redirect task: {e}")));
                match installed {
                    Ok(Ok(())) => {}
                    // The rules in force (if any) stay: fail closed.
                    Ok(Err(e)) => {
                        stop_tasks(&shutdown, tasks).await;
                        proxy.drain(Duration::ZERO).await;
                        return Err(e.into());
                    }
                    Err(e) => {
                        stop_tasks(&shutdown, tasks).await;
                        proxy.drain(Duration::ZERO).await;
                        return Err(e);
                    }
                }
                if let Err(e) = crate::proxy::socket::enable_listener_handover() {
                    tracing::warn!(error = %e, "cannot enable net.ipv4.tcp_migrate_req: connections queued on a stopping weft's listeners are reset instead of handed to the next");
                }
                tasks.push(r.clone().follow(
                    store.clone(),
                    config.node_name.clone(),
                    shutdown_rx.clone(),
                ));
                Some(r)
            }
        };
        let ctx = Arc::new(AdminContext {
            config: config.clone(),
            store: store.clone(),
            certs: certs.clone(),
            log,
            metrics,
            proxy: proxy_ctx,
            redirect: redirector.clone(),
            inpod,
            shutdown: shutdown.clone(),
        });
        let admin = match admin::start(ctx, shutdown_rx) {
            Ok(a) => a,
            Err(e) => {
                stop_tasks(&shutdown, tasks).await;
                proxy.drain(Duration::ZERO).await;
                return Err(e.into());
            }
        };
        tracing::info!(
            node = %config.node_name,
            admin = %admin.addrs[0],
            metrics = %admin.addrs[1],
            readiness = %admin.addrs[2],
            "weft started"
        );
        Ok(Daemon {
            drain_grace: config.drain_grace,
            store,
            certs,
            admin_addrs: admin.addrs,
            shutdown,
            tasks,
            admin,
            proxy,
            redirector,
        })
    }

    /// The data path's shared context (benches drive the outbound handler with it).
    pub fn proxy_ctx(&self) -> Arc<ProxyCtx> {
        self.proxy.ctx()
    }

    /// A receiver that turns true when shutdown was requested (signal or `/quitquitquit`).
    pub fn shutdown_requested(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Requests shutdown.
    pub fn request_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Stops everything and waits for it.
    pub async fn stop(self) {
        self.shutdown.send_replace(true);
        self.proxy.drain(self.drain_grace).await;
        for t in self.tasks {
            let _ = t.await;
        }
        let admin = self.admin;
        let _ = tokio::task::spawn_blocking(move || admin.join()).await;
        if self.redirector.is_some() {
            // Fail closed: captured connections are dropped until the next weft listens.
            tracing::info!("capture rules left in force (`weft uninstall` removes them)");
        }
        tracing::info!("weft stopped");
    }
}

/// The certificate authority the config names: the built-in CA (its files are checked now)
/// or Istio's (its root file is read now; istiod itself may come up later).
async fn ca(config: &Config) -> Result<Arc<dyn CertificateAuthority>, DaemonError> {
    let source = config.ca.clone();
    tokio::task::spawn_blocking(
        move || -> Result<Arc<dyn CertificateAuthority>, IdentityError> {
            Ok(match source {
                CaSource::Builtin { dir } => Arc::new(BuiltinCa::load(&dir)?),
                CaSource::Istio(cp) => Arc::new(IstioCa::new(cp)?),
            })
        },
    )
    .await
    .map_err(|e| DaemonError::Internal(format!("CA load task: {e}")))?
    .map_err(DaemonError::Ca)
}

/// Starts the mesh source the config names: the watched file, the xDS client of istiod, or
/// the watch of the API server.
fn mesh_source(
    config: &Config,
    store: Arc<StateStore>,
    metrics: &crate::metrics::Metrics,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    match &config.mesh {
        MeshSource::File(path) => {
            let lint = crate::authz::LintContext {
                root_namespace: config.root_namespace.clone(),
                trust_domain: config.trust_domain.clone(),
            };
            source::file::spawn(path.clone(), store, lint, shutdown)
        }
        MeshSource::Xds(cp) => {
            let node = source::xds::NodeInfo::from_env(&config.node_name, &cp.cluster_id);
            source::xds::XdsClient::new(
                cp.clone(),
                node,
                &config.trust_domain,
                store,
                metrics.xds.clone(),
            )
            .spawn(shutdown)
        }
        MeshSource::Kubernetes(k) => {
            source::kube::spawn(k.clone(), store, metrics.kube.clone(), shutdown)
        }
    }
}

/// Keeps `wanted` equal to the local identities of the snapshot in force.
fn follow_identities(
    store: Arc<StateStore>,
    config: Arc<Config>,
    wanted: watch::Sender<BTreeSet<Identity>>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut changes = store.subscribe();
    tokio::spawn(async move {
        loop {
            let ids = store
                .snapshot()
                .local_identities(&config.node_name, &config.trust_domain);
            wanted.send_if_modified(|cur| {
                if *cur == ids {
                    false
                } else {
                    *cur = ids;
                    true
                }
            });
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = crate::sync::shut_down(&mut shutdown) => return,
            }
        }
    })
}

/// Unblocks SIGINT and SIGTERM in the calling thread, and so in every thread it starts
/// afterwards: call it first, before any thread is started. The signal mask is inherited
/// across exec, and a parent that blocks these signals (a supervisor, a test harness) would
/// otherwise start a weft that never sees SIGTERM, never drains, and is killed at the end of
/// the grace period with its connections cut.
pub fn unblock_stop_signals() -> std::io::Result<()> {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGINT);
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.thread_unblock()
        .map_err(|e| std::io::Error::other(format!("unblock SIGINT and SIGTERM: {e}")))
}

/// Runs the daemon until SIGTERM, SIGINT or `/quitquitquit`.
pub async fn run(config: Config, log: Arc<LogControl>) -> Result<(), DaemonError> {
    let daemon = Daemon::start(config, log).await?;
    let mut requested = daemon.shutdown_requested();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {
            tracing::info!("SIGTERM: shutting down")
        }
        _ = crate::sync::shut_down(&mut requested) => {}
    }
    daemon.stop().await;
    Ok(())
}
