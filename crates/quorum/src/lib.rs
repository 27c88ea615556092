//! The `quorum` driver: writes go to every child, reads vote by content.
//!
//! As qemu's `block/quorum.c`: a read goes to all children at once and the
//! data a majority (`vote-threshold`) agrees on wins; children that lost the
//! vote or failed are reported with `QUORUM_REPORT_BAD`, a read no version
//! wins with `QUORUM_FAILURE` (and EIO). `read-pattern=fifo` reads the first
//! child and tries the next only on error. `rewrite-corrupted` writes the
//! winning data back to the losers, and `blkverify` mode (two children)
//! stops the process at the first difference, as qemu does.
//!
//! Children can be added and removed at runtime (`x-blockdev-change`) through
//! [`QuorumDriver::add_child`] and [`QuorumDriver::remove_child`].
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::sync::Arc;

mod driver;
mod events;
mod join;
mod options;
mod vote;

#[cfg(test)]
mod tests;

pub use driver::{QuorumDriver, QuorumFactory};
pub use options::ReadPattern;

/// Register the `quorum` driver with `graph`.
pub fn register(graph: &mut qsd_block::Graph) {
    graph.register(Arc::new(QuorumFactory));
}
