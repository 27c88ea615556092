//! The `throttle` filter driver and `throttle-group` objects: I/O limits
//! (IOPS and bytes per second, with bursts) shared by the nodes of a group.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

/// Register the `throttle` driver with `graph`.
pub fn register(_graph: &mut qsd_block::Graph) {}
