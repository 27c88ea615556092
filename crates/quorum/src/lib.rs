//! The `quorum` driver: writes go to every child, reads vote by content.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

/// Register the `quorum` driver with `graph`.
pub fn register(_graph: &mut qsd_block::Graph) {}
