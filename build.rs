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
    Ok(())
}
