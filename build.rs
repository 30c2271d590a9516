//! Compiles the control-plane schemas in `proto/` (Envoy delta ADS, Istio's workload and
//! authorization APIs, Istio's certificate service, istio-cni's ZDS) into Rust with prost and tonic.
//!
//! `protoc` comes from the `protoc-bin-vendored` crate, with the well-known types it ships
//! (`google/protobuf/*.proto`), so building needs no system package.

use std::path::PathBuf;

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
    release_link();
    Ok(())
}

/// How the release `weft` is linked, for what a node proxy keeps resident (README, "Where the
/// resident code is"):
/// - its functions in the order `link/weft.order` lists them (written by `scripts/text-order`
///   from profiles of node proxies): what a node proxy runs sits together, so the kernel's
///   fault-around maps little code that never runs. A name the binary no longer has is skipped
///   without a linker warning, so a stale file costs memory, never the build; the build warns
///   instead when the file was written for another compiler or another `Cargo.lock` (symbol
///   names carry a hash of both), as `link/weft.order.stamp` records them.
/// - its relative relocations packed (`-z pack-relative-relocs`, DT_RELR, glibc 2.36 and
///   later): the table the loader reads at every start, and which then stays resident, shrinks
///   from about 580 KiB to a few KiB.
///
/// Only where the link is rustc's default `rust-lld` (x86_64 Linux since Rust 1.90), whose
/// options these are; other toolchains link as before.
fn release_link() {
    // The directory, which the repository holds (a missing path would rerun this every build),
    // and the lock file the stamp is checked against.
    println!("cargo:rerun-if-changed=link");
    println!("cargo:rerun-if-changed=Cargo.lock");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let target = std::env::var("TARGET").unwrap_or_default();
    let rustc = rustc_version().unwrap_or_default();
    if !release || target != "x86_64-unknown-linux-gnu" || minor(&rustc) < Some(90) {
        return;
    }
    println!("cargo:rustc-link-arg-bin=weft=-Wl,-z,pack-relative-relocs");
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let order = root.join("link/weft.order");
    if !order.is_file() {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bin=weft=-Wl,--symbol-ordering-file={},--no-warn-symbol-ordering",
        order.display()
    );
    // The stamp's own tools (`sha256sum`): a build dependency would change the symbol names
    // it checks.
    let Some(expected) = stamp(&rustc, &root.join("Cargo.lock")) else {
        println!("cargo:warning=sha256sum of Cargo.lock failed: link/weft.order not checked");
        return;
    };
    match std::fs::read_to_string(root.join("link/weft.order.stamp")) {
        Ok(found) if found.trim() == expected.trim() => {}
        Ok(found) => println!(
            "cargo:warning=link/weft.order was written for {}, this build is {}: the \
             functions it lists may have other names now (a symbol's name carries a hash of the \
             compiler and the dependencies), and then the node proxy keeps several MB more code \
             resident; run scripts/text-order",
            found.trim().replace('\n', ", "),
            expected.trim().replace('\n', ", ")
        ),
        Err(e) => println!(
            "cargo:warning=link/weft.order.stamp: {e}: whether link/weft.order still fits this \
             build is unknown; run scripts/text-order"
        ),
    }
}

/// What `link/weft.order.stamp` holds for a compiler and a lock file, the two lines
/// `scripts/text-order` writes: `rustc --version` and `sha256sum Cargo.lock`'s digest.
fn stamp(rustc: &str, lock: &std::path::Path) -> Option<String> {
    let out = std::process::Command::new("sha256sum")
        .arg(lock)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let digest = String::from_utf8(out.stdout).ok()?;
    let digest = digest.split_whitespace().next()?;
    Some(format!("{}\nCargo.lock {digest}\n", rustc.trim()))
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
