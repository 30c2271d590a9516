//! A weft daemon as its own process (its memory and its stderr are its own), for the tests
//! that read either.

use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft::identity::{BuiltinCa, Identity, IssuedCert};

use super::{wait_ready, NodeDir};

/// `weft run` on `node`'s loopback address as node `node-b`, killed on drop; with the CA of
/// the node and a certificate for the test's client.
pub struct WeftProcess {
    pub node: NodeDir,
    pub child: Child,
    pub client_ip: IpAddr,
    pub ca: BuiltinCa,
    pub cert: Arc<IssuedCert>,
}

impl Drop for WeftProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl WeftProcess {
    /// Starts `weft run <run_args> --config ...` on `node` (its mesh file already written),
    /// with `config_extra` added to the config and stderr kept in `weft.log`; issues `client`
    /// a certificate; waits until the daemon is ready.
    pub async fn start(
        node: NodeDir,
        client_ip: IpAddr,
        client: &Identity,
        run_args: &[&str],
        config_extra: &str,
    ) -> WeftProcess {
        let config = node.path("weft.yaml");
        std::fs::write(
            &config,
            format!("{}{config_extra}", node.config_text("node-b")),
        )
        .unwrap();
        let log = std::fs::File::create(node.path("weft.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_weft"))
            .arg("run")
            .args(run_args)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let ca = BuiltinCa::load(&node.path("ca")).unwrap();
        let cert = Arc::new(ca.issue(client, Duration::from_secs(3600)).unwrap());
        let w = WeftProcess {
            node,
            child,
            client_ip,
            ca,
            cert,
        };
        // The process takes a moment to listen at all.
        let started = Instant::now();
        while std::net::TcpStream::connect(w.node.readiness()).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "weft never listened:\n{}",
                w.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            wait_ready(w.node.readiness(), Duration::from_secs(15)).await,
            "weft not ready:\n{}",
            w.log()
        );
        w
    }

    /// What the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.node.path("weft.log")).unwrap_or_default()
    }
}
