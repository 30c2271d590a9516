//! Workload identity.
