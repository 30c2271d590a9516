//! weft: a node-level service-mesh tunnel.
//!
//! The crate is one library with a thin binary (`main.rs`) on top. Data flows one way:
//! config sources → [`state`] (an immutable snapshot swapped atomically) → the listeners,
//! which read the snapshot once per connection. `ARCHITECTURE.md` at the
//! repository's top is the map: the data flow, what each module owns and may use, and the
//! invariants the hard parts rely on.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// No unwrap/expect outside tests: an invariant that cannot fail says so with a comment and
// a pattern match or an error, never a panic on the data path.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod authz;
pub mod backoff;
pub mod ca_server;
pub mod check;
pub mod config;
pub mod ctl;
pub mod daemon;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod inpod;
pub mod istiod;
pub mod kubeapi;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod proto;
pub mod proxy;
pub mod redirect;
pub mod source;
pub mod state;
mod sync;
pub mod tls;
pub mod waypoint;
mod yaml;
