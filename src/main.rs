//! The `weft` command line: parses arguments and calls into the library. Nothing else.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use weft::logging::{self, LogFormat};

/// jemalloc rather than glibc's malloc (Cargo.toml, feature `jemalloc`: page faults on the
/// relay path).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "A node-level service-mesh tunnel (HBONE)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Certificate authority tools.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Run the daemon.
    Run {
        /// The daemon config file (weft.yaml).
        #[arg(long)]
        config: PathBuf,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Read a running daemon's admin endpoint.
    Ctl {
        /// The admin endpoint.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        #[command(subcommand)]
        command: weft::ctl::CtlCommand,
    },
    /// Remove every capture rule and route weft installed on this node (the `WEFT_PRE` chains
    /// and their jumps, the nftables tables, the IPv6 refusal chain, the policy-routing rules
    /// and table 100, for IPv4 and IPv6). For taking weft off a node: a
    /// stopped weft leaves its capture in force, so enrolled pods take no connection while
    /// no weft runs.
    Uninstall,
    /// Validate a mesh file offline: `file:line: message` per error, warnings for risky policy.
    Check {
        /// The mesh file (Kubernetes-style YAML).
        #[arg(long)]
        mesh: PathBuf,
        /// The daemon config of the node this runs on: also warn about enrolled pods' IPv6
        /// addresses that capture would refuse there, and why.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The mesh's trust domain, which principals are checked against (default: the
        /// config's `trustDomain`, else cluster.local).
        #[arg(long)]
        trust_domain: Option<String>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a root CA (10 y) and an intermediate (1 y) in Istio's plugin-CA layout.
    Init {
        /// Directory to create the CA files in.
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Serve Istio's certificate service (`IstioCertificateService`) from a plugin-CA
    /// directory, authorizing node daemons as istiod does (TokenReview, node authorization),
    /// so that node daemons never hold the CA key.
    Serve {
        /// The plugin-CA directory (Istio's `cacerts` layout).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: std::net::SocketAddr,
        /// ServiceAccounts (NAMESPACE/NAME, comma-separated) allowed to ask for the
        /// identities of the pods on their own node.
        #[arg(long, value_delimiter = ',', default_value = "istio-system/weft")]
        trusted_node_accounts: Vec<weft::ca_server::ServiceAccount>,
        /// The names clients dial this server by (DNS names or IP addresses, comma-separated):
        /// its serving certificate is issued for them from the same CA, so clients verify it
        /// with `root-cert.pem`.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "weft-ca.istio-system.svc"
        )]
        server_name: Vec<String>,
        /// SPIFFE trust domain of the identities issued.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// kubeconfig to reach the API server with (default: in-cluster).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weft: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    weft::tls::install_process_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Ca {
            command: CaCommand::Init { dir, trust_domain },
        } => {
            weft::identity::ca::init_dir(&dir, &trust_domain)?;
            println!(
                "created root and intermediate CA for trust domain {trust_domain} in {}",
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            command:
                CaCommand::Serve {
                    ca_dir,
                    listen,
                    trusted_node_accounts,
                    server_name,
                    trust_domain,
                    kubeconfig,
                    log_format,
                },
        } => {
            // First, before any thread: threads inherit the mask of the thread starting them.
            weft::daemon::unblock_stop_signals()?;
            let (_log, _flush) = logging::init(log_format, None)?;
            weft::identity::validate_trust_domain(&trust_domain)?;
            let settings = weft::ca_server::Settings {
                ca_dir,
                trust_domain,
                trusted_node_accounts: trusted_node_accounts.into_iter().collect(),
                server_names: server_name,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("weft-ca")
                .build()
                .context("cannot start the runtime")?;
            rt.block_on(async move {
                let shutdown = tokio_util::sync::CancellationToken::new();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    stop.cancel();
                });
                weft::ca_server::run(settings, listen, kubeconfig, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config, log_format } => {
            // First, before any thread: threads inherit the mask of the thread starting them.
            weft::daemon::unblock_stop_signals()?;
            // The config first: it says whether the access log is exported too.
            let cfg = weft::config::Config::load(&config, &weft::config::Env::from_process())?;
            let otlp = cfg
                .access_log
                .otlp
                .as_ref()
                .map(|o| (o, cfg.node_name.as_str()));
            let (log, _flush) = logging::init(log_format, otlp)?;
            // Every tunnelled connection costs descriptors on both sides: use what we may.
            match rlimit::increase_nofile_limit(u64::MAX) {
                Ok(n) => tracing::debug!(limit = n, "open file limit"),
                Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
            }
            if let Some(o) = &cfg.access_log.otlp {
                tracing::info!(endpoint = %o.endpoint, queue = o.queue_size, batch = o.batch_size, "access log exported over OTLP");
            }
            tracing::info!(threads = cfg.worker_threads, "data-path worker threads");
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cfg.worker_threads)
                .enable_all()
                .thread_name("weft-worker")
                .build()
                .context("cannot start the runtime")?;
            rt.block_on(weft::daemon::run(cfg, log))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Uninstall => {
            weft::redirect::Redirector::uninstall()?;
            println!("capture rules and routes removed");
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            mesh,
            config,
            trust_domain,
        } => Ok(weft::check::run(
            &mesh,
            config.as_deref(),
            trust_domain.as_deref(),
            &mut std::io::stdout(),
        )),
        Command::Ctl { admin, command } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            let out = rt.block_on(weft::ctl::run(admin, command))?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use rustls::crypto::CryptoProvider;

    /// In its own test binary: no test here touches TLS before, so the default is unset until
    /// `install_process_default` (which `real_main` calls first) sets it.
    #[test]
    fn the_process_default_provider_is_aws_lc_and_builders_use_it() {
        assert!(CryptoProvider::get_default().is_none());
        weft::tls::install_process_default();
        weft::tls::install_process_default(); // a second call keeps the first
        let installed = CryptoProvider::get_default().expect("a default");
        let aws_lc = rustls::crypto::aws_lc_rs::default_provider();
        let suites =
            |p: &CryptoProvider| -> Vec<_> { p.cipher_suites.iter().map(|s| s.suite()).collect() };
        let groups =
            |p: &CryptoProvider| -> Vec<_> { p.kx_groups.iter().map(|g| g.name()).collect() };
        assert_eq!(suites(installed), suites(&aws_lc));
        assert_eq!(groups(installed), groups(&aws_lc));
        // What kube-rs does: a builder that names no provider, which now takes the default.
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        assert_eq!(suites(config.crypto_provider()), suites(&aws_lc));
    }
}
