//! The `throttle` filter driver and `throttle-group` objects: I/O limits
//! (operations and bytes per second, with bursts) shared by the nodes of a
//! group, scheduled as qemu does (leaky buckets, round robin between the
//! member nodes, one timer per group and direction).
//!
//! - [`config`]: `ThrottleLimits`, the object properties, validation.
//! - [`state`]: the leaky-bucket algorithm, pure (time passed in).
//! - [`group`]: [`ThrottleGroup`], the shared state and its scheduling.
//! - [`driver`]: the `throttle` block driver.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::sync::Arc;

pub mod config;
pub mod driver;
pub mod group;
pub mod state;

pub use config::{ThrottleConfig, ThrottleGroupProps, ThrottleLimits};
pub use driver::{ThrottleDriver, ThrottleFactory};
pub use group::{GroupMember, ThrottleGroup};
pub use state::{Direction, ThrottleState};

/// The QOM type name of group objects.
pub const QOM_TYPE: &str = "throttle-group";

/// Errors of group configuration (the block driver uses `qsd_block::Error`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Invalid limits, with qemu's message.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Register the `throttle` driver with `graph`.
pub fn register(graph: &mut qsd_block::Graph) {
    graph.register(Arc::new(ThrottleFactory));
}
