//! Test drivers: `blkdebug` (error injection at debug events, request
//! limits) and `blkverify` (reads compared against a raw reference).
//!
//! Debug events are fired by the drivers above a blkdebug node (`raw`
//! fires `read_aio`/`write_aio`, qcow2 its metadata events, every node
//! `flush_to_os`/`flush_to_disk` on flush); blkdebug itself fires none.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::sync::Arc;

pub mod blkdebug;
pub mod blkverify;
pub mod config;
pub mod rules;

#[cfg(test)]
mod tests;

pub use blkdebug::{BlkdebugDriver, BlkdebugFactory};
pub use blkverify::{BlkverifyDriver, BlkverifyFactory};
pub use config::{parse_config, ConfigError, ConfigRules};
pub use rules::{InjectSpec, Injection, IoType, RuleEngine, SetStateSpec};

/// Register the `blkdebug` and `blkverify` drivers with `graph`.
pub fn register(graph: &mut qsd_block::Graph) {
    graph.register(Arc::new(BlkdebugFactory));
    graph.register(Arc::new(BlkverifyFactory));
}
