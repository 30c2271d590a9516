//! The network-namespace test mesh of weft (TESTING.md, "The test mesh"): nodes and pods
//! as network namespaces, a routed underlay, processes and packet captures inside them.
//! Used by weft's mesh tests, its benchmarks in namespaces and the demo; it does not depend
//! on weft.
//!
//! Owns: every network namespace it creates (all named `wt<pid><tag>-...`), the veths,
//! addresses, routes and sysctls inside them, the processes started in them, and their
//! removal on drop, on panic, on Ctrl-C ([`install_signal_cleanup`]) and after a killed run
//! ([`cleanup_stale`]). Never touches the root network namespace: traffic stays on loopback
//! or between the namespaces a testbed created.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! use std::time::Duration;
//! use weft_testbed::Testbed;
//!
//! let Some(()) = weft_testbed::require() else { return Ok(()) };
//! let mut bed = Testbed::new(2)?;
//! let a = bed.add_pod(1, "a")?;
//! let b = bed.add_pod(2, "b")?;
//! let listener = b.ns.tcp_listen((b.ip, 8080).into())?;
//! let stream = a.ns.tcp_connect((b.ip, 8080).into(), Duration::from_secs(5))?;
//! let (_conn, peer) = listener.accept()?;
//! assert_eq!(peer.ip(), a.ip);
//! # drop(stream);
//! # Ok(())
//! # }
//! ```

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod capture;
mod exec;
mod http;
mod netns;
mod prereqs;
mod process;
mod registry;
mod testbed;

pub use crate::capture::{contains, Capture};
pub use crate::netns::{list as list_namespaces, Netns, NETNS_RUN_DIR};
pub use crate::prereqs::{require, Prereqs, REQUIRED_TOOLS};
pub use crate::process::{ChildGuard, DROP_GRACE};
pub use crate::registry::{cleanup_stale, install_signal_cleanup};
pub use crate::testbed::{
    Ipv4Cidr, Node, Pod, Testbed, MAX_NODES, MAX_PODS_PER_NODE, MAX_POD_NAME, POD_GATEWAY,
    UNDERLAY_IFACE,
};
