//! A command-line face of the testbed, for poking at a mesh by hand and for testing the
//! Ctrl-C cleanup:
//!
//! - `weft-testbed hold [NODES] [PODS_PER_NODE] [SECONDS]`: builds a mesh, prints its
//!   namespaces, the pid of a process it runs in node 1 (`sleeper <pid>`), a line
//!   `ready <prefix>`, and holds it for SECONDS (default 600) or until
//!   SIGINT/SIGTERM/SIGHUP, then removes it.
//! - `weft-testbed cleanup-stale`: deletes namespaces left by killed runs.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use weft_testbed::{cleanup_stale, install_signal_cleanup, Testbed};

fn main() -> ExitCode {
    // First: a signal that comes while the mesh is built must already tear it down.
    if let Err(e) = install_signal_cleanup() {
        eprintln!("weft-testbed: {e}");
        return ExitCode::FAILURE;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("hold") => hold(&args[1..]),
        Some("cleanup-stale") => cleanup_stale().map(|names| {
            for name in names {
                println!("deleted {name}");
            }
        }),
        _ => {
            eprintln!(
                "usage: weft-testbed hold [NODES] [PODS_PER_NODE] [SECONDS] | weft-testbed cleanup-stale"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-testbed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn number(args: &[String], index: usize, default: u64) -> io::Result<u64> {
    match args.get(index) {
        None => Ok(default),
        Some(arg) => arg.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not a number: {arg:?}"),
            )
        }),
    }
}

fn hold(args: &[String]) -> io::Result<()> {
    let nodes = number(args, 0, 2)?;
    let pods = number(args, 1, 1)?;
    let seconds = number(args, 2, 600)?;
    let mut bed = Testbed::new(usize::try_from(nodes).unwrap_or(usize::MAX))?;
    for node in 1..=bed.nodes().len() {
        for n in 0..pods {
            bed.add_pod(node, &format!("n{node}-pod{n}"))?;
        }
    }
    // Something long-running in a node, to show that processes are stopped too.
    let sleeper = bed.spawn("sleeper", bed.node(1).ns.command("sleep", ["3600"]))?;
    let mut out = io::stdout().lock();
    writeln!(out, "sleeper {}", sleeper.pid())?;
    for node in bed.nodes() {
        writeln!(
            out,
            "{} {} {} pods {}",
            node.name,
            node.ns.name(),
            node.underlay_ip,
            node.pod_cidr
        )?;
    }
    for pod in bed.pods() {
        writeln!(
            out,
            "pod {} {} {} via {}",
            pod.name,
            pod.ns.name(),
            pod.ip,
            pod.host_veth
        )?;
    }
    writeln!(out, "ready {}", bed.prefix())?;
    out.flush()?;
    drop(out);
    std::thread::sleep(Duration::from_secs(seconds));
    Ok(())
}
