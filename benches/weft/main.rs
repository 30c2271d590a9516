//! weft's benchmarks: what the tunnel costs against plain TCP on the same path, measured in
//! the same run, on loopback (two daemons in this process, no root) and across the
//! network-namespace mesh (two weft processes with real TPROXY capture; needs root).
//!
//! `cargo bench --bench weft` runs everything (`-- --json FILE` also writes JSON; `-- --only
//! loopback|mesh|micro|kube` narrows it; `-- --loop CASE` repeats one loopback case for profiling,
//! see [`run_loop`]; `-- --peer PATH` measures the ztunnel binary at PATH beside weft on the
//! mesh, see [`peer`]; `-- --weft PATH` runs the weft binary at PATH in the process cases). Run
//! any other way (as `cargo test --all-targets` does)
//! it does one tiny iteration of every case, so CI proves the harness works without timing
//! anything. Numbers are never asserted: the machines are shared and noisy.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod accounting;
mod client;
mod kube_sync;
mod loopback;
mod measure;
mod mesh;
mod micro;
mod peer;
mod profile;
mod report;

use accounting::*;
use client::*;
use kube_sync::*;
use loopback::*;
use measure::*;
use mesh::*;
use micro::*;
use report::*;

// === sizes ===

#[derive(Clone, Copy)]
struct Sizes {
    stream_bytes: u64,
    pings: usize,
    conns: usize,
    idle: [usize; 2],
    workloads: [usize; 2],
    policies: [usize; 2],
    decisions: usize,
    crypto_bytes: u64,
    tokens: usize,
    /// Seconds of each paced HTTP run on the mesh (1,000 req/s of 1 KiB).
    http_secs: f64,
    /// Extra workloads given to each node proxy for the state-per-workload row on the mesh.
    extra_workloads: usize,
    /// Rounds of that measurement (each round starts every proxy twice).
    state_rounds: usize,
}

const FULL: Sizes = Sizes {
    stream_bytes: 2 << 30,
    pings: 20_000,
    conns: 2_000,
    idle: [1_000, 10_000],
    workloads: [10_000, 100_000],
    policies: [10, 1_000],
    decisions: 1_000_000,
    crypto_bytes: 2 << 30,
    tokens: 2_000,
    http_secs: 10.0,
    extra_workloads: 10_000,
    state_rounds: 3,
};

const SMOKE: Sizes = Sizes {
    stream_bytes: 1 << 20,
    pings: 20,
    conns: 10,
    idle: [5, 10],
    workloads: [100, 200],
    policies: [10, 20],
    decisions: 100,
    crypto_bytes: 1 << 20,
    tokens: 2,
    http_secs: 0.2,
    extra_workloads: 100,
    state_rounds: 1,
};

/// `--weft PATH`: the weft binary the daemons of the process cases run (`None`: the copy cargo
/// built beside this bench, under the bench profile, which inherits the release profile and
/// gets the same code layout from build.rs). For comparing two builds of weft by hand.
fn weft_arg(args: &[String]) -> Result<Option<PathBuf>, String> {
    let Some(i) = args.iter().position(|a| a == "--weft") else {
        return Ok(None);
    };
    match args.get(i + 1).map(PathBuf::from) {
        Some(path) if path.is_file() => Ok(Some(path)),
        Some(path) => Err(format!(
            "--weft {}: not a file (the path of a weft binary)",
            path.display()
        )),
        None => Err("--weft PATH: the path of a weft binary".to_string()),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(addr) = args
        .iter()
        .position(|a| a == "--app")
        .and_then(|i| args.get(i + 1))
    {
        // The app server of the mesh cases, run inside a pod namespace: the bench's own
        // protocol on ADDR, HTTP/1.1 answering 1 KiB bodies on the next port.
        let addr: SocketAddr = addr.parse().expect("--app ADDR");
        let http = SocketAddr::new(addr.ip(), addr.port() + 1);
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        // One thread that drives its own sockets, as the loopback app (a multi-thread runtime's
        // `block_on` accepted on the main thread, woken by a worker: one more hop per accept).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let body = bytes::Bytes::from(vec![b'x'; HTTP_BODY]);
            let http = TcpListener::bind(http).await.expect("app bind (HTTP)");
            tokio::spawn(serve_http(http, body));
            serve_app(TcpListener::bind(addr).await.expect("app bind")).await
        });
        return;
    }
    if let Some(case) = args
        .iter()
        .position(|a| a == "--loop")
        .and_then(|i| args.get(i + 1))
    {
        // For profiling (`perf record -p PID`): one loopback case through weft, over and
        // over, printing its figure each round.
        app_runtime().block_on(run_loop(case));
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let sz = if full { FULL } else { SMOKE };
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let want = |what: &str| only.as_deref().is_none_or(|o| o == what);
    let peer = match args.iter().position(|a| a == "--peer") {
        None => None,
        Some(i) => {
            let Some(path) = args.get(i + 1) else {
                eprintln!("--peer PATH: the path of a ztunnel binary");
                std::process::exit(2);
            };
            if !want("mesh") {
                eprintln!("--peer measures ztunnel on the mesh: not with --only {only:?}");
                std::process::exit(2);
            }
            match peer::Ztunnel::new(PathBuf::from(path)) {
                Ok(zt) => Some(zt),
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(2);
                }
            }
        }
    };
    let weft_bin = match weft_arg(&args) {
        Ok(path) => path.unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_weft"))),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if !full {
        // The smoke run (`cargo test`) checks the `--weft` boundary: what is not a file is
        // refused, a file is taken as it is.
        let exe = std::env::current_exe().unwrap().display().to_string();
        for bad in [
            &["--weft"][..],
            &["--weft", "/nonexistent/weft"],
            &["--weft", "/"],
        ] {
            let bad: Vec<String> = bad.iter().map(|a| a.to_string()).collect();
            assert!(weft_arg(&bad).is_err(), "--weft accepted {bad:?}");
        }
        let good = vec!["--weft".to_string(), exe.clone()];
        assert_eq!(weft_arg(&good).unwrap(), Some(PathBuf::from(exe)));
    }
    // 10,000 tunnelled connections are 20,000 sockets in this process alone; as root, lift
    // the hard limit too (the daemons inherit it).
    if let Err(e) = rlimit::setrlimit(rlimit::Resource::NOFILE, 200_000, 200_000) {
        eprintln!("cannot lift the open-file limit ({e}); large connection counts may fail");
        let _ = rlimit::increase_nofile_limit(u64::MAX);
    }
    if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        eprintln!("open-file limit: {soft}");
    }

    println!(
        "weft benchmarks ({}), {}",
        if full {
            "full"
        } else {
            "smoke run: one tiny iteration each, numbers meaningless"
        },
        machine()
    );
    if let Some(zt) = &peer {
        println!(
            "peer: {} ({}), {}",
            peer::NAME,
            zt.bin.display(),
            zt.version
        );
    }
    let mut report = Report::new(peer.as_ref().map(|_| peer::NAME));
    println!("{}", report.header());
    let rt = app_runtime();
    if want("loopback") {
        rt.block_on(run_loopback(sz, &mut report));
    }
    if want("mesh") {
        rt.block_on(run_mesh(&weft_bin, peer.as_ref(), sz, &mut report));
    }
    if want("micro") {
        run_state(sz, &mut report);
        run_policy(sz, &mut report);
        run_crypto(sz, &mut report);
        run_jwt(sz, &mut report);
    }
    if want("kube") {
        run_kube(sz, &weft_bin, &mut report);
    }
    if let Some(path) = json {
        let mut doc = BTreeMap::new();
        doc.insert("machine", serde_json::Value::String(machine()));
        doc.insert("full", serde_json::Value::Bool(full));
        doc.insert("rows", serde_json::to_value(&report.rows).unwrap());
        if let Some(zt) = &peer {
            doc.insert(
                "peer",
                serde_json::json!({
                    "name": peer::NAME,
                    "path": zt.bin.display().to_string(),
                    "version": zt.version,
                }),
            );
        }
        // `target/` is not there when CARGO_TARGET_DIR puts the build elsewhere.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        println!("written {}", path.display());
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!(
        "{} cores, {cpu}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}
