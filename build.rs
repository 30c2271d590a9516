//! Compiles the control-plane schemas in `proto/` (Envoy delta ADS, Istio's workload and
//! authorization APIs, Istio's certificate service, istio-cni's ZDS) into Rust with prost and tonic.
//!
//! `protoc` comes from the `protoc-bin-vendored` crate, with the well-known types it ships
//! (`google/protobuf/*.proto`), so building needs no system package.

use std::path::PathBuf;

#[path = "link/order.rs"]
mod order;

const PROTOS: &[&str] = &[
    "proto/envoy/service/discovery/v3/ads.proto",
    "proto/istio/workload/workload.proto",
    "proto/istio/security/authorization.proto",
    "proto/istio/v1/auth/ca.proto",
    "proto/istio/zds/zds.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known: PathBuf = protoc_bin_vendored::include_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    let protos: Vec<PathBuf> = PROTOS.iter().map(PathBuf::from).collect();
    tonic_prost_build::configure()
        .build_client(true)
        // The servers are the tests' in-process istiod stand-ins.
        .build_server(true)
        .build_transport(false)
        .compile_with_config(config, &protos, &[PathBuf::from("proto"), well_known])?;
    println!("cargo:rerun-if-changed=proto");
    release_link()
}

/// How the release `weft` is linked, for what a node proxy keeps resident (README, "Where the
/// resident code is"):
/// - its functions in the order `link/weft.order` lists them (written by `scripts/text-order`
///   from profiles of node proxies): what a node proxy runs sits together, so the kernel's
///   fault-around maps little code that never runs. The list becomes a linker script
///   (`link/order.rs`) whose patterns leave out the hashes in symbol names, so it keeps its
///   effect when the compiler, a dependency or the build profile changes them.
/// - its relative relocations packed (`-z pack-relative-relocs`, DT_RELR, glibc 2.36 and
///   later): the table the loader reads at every start, and which then stays resident, shrinks
///   from about 580 KiB to a few KiB.
///
/// Only where the link is rustc's default `rust-lld` (x86_64 Linux since Rust 1.90), whose
/// options these are; other toolchains link as before.
fn release_link() -> Result<(), Box<dyn std::error::Error>> {
    // The directory, which the repository holds (a missing path would rerun this every build).
    println!("cargo:rerun-if-changed=link");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let target = std::env::var("TARGET").unwrap_or_default();
    let rustc = rustc_version().unwrap_or_default();
    if !release || target != "x86_64-unknown-linux-gnu" || minor(&rustc) < Some(90) {
        return Ok(());
    }
    println!("cargo:rustc-link-arg-bin=weft=-Wl,-z,pack-relative-relocs");
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let order = root.join("link/weft.order");
    if !order.is_file() {
        return Ok(());
    }
    let script = PathBuf::from(std::env::var("OUT_DIR")?).join("weft-order.ld");
    std::fs::write(&script, order::script(&std::fs::read_to_string(&order)?)?)?;
    println!("cargo:rustc-link-arg-bin=weft=-Wl,-T,{}", script.display());
    Ok(())
}

/// `rustc --version` of the compiler building this, e.g. `rustc 1.95.0 (59807616e 2026-04-14)`.
fn rustc_version() -> Option<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()
}

/// The minor version in a `rustc --version` line (`rustc 1.95.0 (...)` → 95).
fn minor(version: &str) -> Option<u32> {
    version
        .split_whitespace()
        .nth(1)?
        .split('.')
        .nth(1)?
        .parse()
        .ok()
}
