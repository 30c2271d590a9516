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
    text_order();
    Ok(())
}

/// The release `weft` lays its functions out in the order `link/weft.order` lists them (written
/// by `scripts/text-order` from a profile of the demo mesh): what a node proxy runs sits together,
/// so the kernel's fault-around maps little code that never runs (README, "Where the resident
/// code is"). Only where the link is rustc's default `rust-lld` (x86_64 Linux since Rust 1.90,
/// whose `--symbol-ordering-file` this is); a name the binary no longer has is skipped without a
/// warning, so a stale file costs memory, never the build.
fn text_order() {
    // The directory, which the repository holds (a missing path would rerun this every build).
    println!("cargo:rerun-if-changed=link");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let target = std::env::var("TARGET").unwrap_or_default();
    let order = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
        .join("link/weft.order");
    if release && target == "x86_64-unknown-linux-gnu" && order.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=weft=-Wl,--symbol-ordering-file={},--no-warn-symbol-ordering",
            order.display()
        );
    }
}
