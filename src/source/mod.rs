//! Config sources: each turns its input into a [`crate::model::Mesh`] and publishes it to the
//! [`crate::state::StateStore`]. A source never touches a socket of the data path.
//!
//! - [`file`]: a Kubernetes-style YAML file, watched. `file/mod.rs` reads, watches and
//!   reloads it; the text → model translation sits beside it, split by concern: `parse`
//!   (entry point, `file:line` errors), `kinds` (object kinds and the two reading passes),
//!   `locate` (the line of a field or object) and `translate` (objects → model).
//! - [`xds`]: Istio's control plane over delta ADS. `xds/mod.rs` is the protocol client;
//!   [`xds::translate`] turns resources into the model: `address` (workloads and services),
//!   `authorization` (L4 policies) and `assembly` (the accepted resources joined into the
//!   mesh).
//! - [`kube`]: the cluster's API server, watched with kube-rs: `kube/mod.rs` runs one watcher
//!   per kind, `kube::apply` turns their events into edits.
//! - `objects`: one Kubernetes object → model (Pods, Services), shared by `file` and `kube`.
//!
//! Every error a source reports is a typed error (`thiserror`) whose text is what the status
//! and logs show.

pub mod file;
pub mod kube;
pub(crate) mod objects;
pub mod xds;
