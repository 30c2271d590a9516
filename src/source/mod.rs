//! Config sources: each turns its input into a [`crate::model::Mesh`] and publishes it to the
//! [`crate::state::StateStore`]. A source never touches a socket of the data path.
//!
//! - [`file`]: a Kubernetes-style YAML file, watched.
//! - [`xds`]: Istio's control plane over delta ADS.

pub mod file;
pub mod xds;
