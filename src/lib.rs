//! weft: a node-level service-mesh tunnel.
//!
//! The crate is one library with a thin binary (`main.rs`) on top. Data flows one way:
//! config sources → [`state`] (an immutable snapshot swapped atomically) → the listeners,
//! which read the snapshot once per connection. See `DESIGN.md` for the module map.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod authz;
pub mod backoff;
pub mod check;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod identity;
pub mod istiod;
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
