//! The qcow2 image format driver: on-disk structures, metadata caches,
//! cluster allocation with crash-safe ordering, backing chains.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

/// Register the qcow2 driver with `graph`.
pub fn register(_graph: &mut qsd_block::Graph) {
    // TODO(#3): the qcow2 factory.
}
