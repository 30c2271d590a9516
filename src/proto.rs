//! The control-plane schemas of `proto/`, compiled by `build.rs`: Envoy's delta ADS, Istio's
//! workload and authorization APIs, Istio's certificate service and istio-cni's ZDS, as prost
//! messages and tonic clients (and servers, which the tests use as istiod stand-ins).
//!
//! Modules mirror the protobuf packages, so the generated cross-references resolve. Nothing
//! here has logic; `source::xds`, `identity::istio` and `inpod` use these types.
#![allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]

/// Envoy's API.
pub mod envoy {
    /// `envoy.config.*`.
    pub mod config {
        /// `envoy.config.core`.
        pub mod core {
            /// `envoy.config.core.v3`: `Node`.
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.config.core.v3.rs"));
            }
        }
    }
    /// `envoy.service.*`.
    pub mod service {
        /// `envoy.service.discovery`.
        pub mod discovery {
            /// `envoy.service.discovery.v3`: delta ADS.
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
            }
        }
    }
}

/// `google.rpc`: `Status`.
pub mod google {
    /// `google.rpc`.
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

/// Istio's APIs.
pub mod istio {
    /// `istio.workload`: `Address`, `Workload`, `Service`.
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
        /// `istio.workload.zds`: istio-cni's node agent to the node proxy (`inpod`).
        pub mod zds {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
        }
    }
    /// `istio.security`: `Authorization`.
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
    /// `istio.v1`.
    pub mod v1 {
        /// `istio.v1.auth`: the certificate service.
        pub mod auth {
            include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        }
    }
}
