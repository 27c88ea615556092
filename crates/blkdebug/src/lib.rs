//! Test drivers: `blkdebug` (error injection at debug events, request
//! limits) and `blkverify` (reads compared against a raw reference).
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

/// Register the `blkdebug` and `blkverify` drivers with `graph`.
pub fn register(_graph: &mut qsd_block::Graph) {}
