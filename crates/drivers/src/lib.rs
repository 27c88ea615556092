//! Block drivers of qsd: the `file` and `host_device` protocols (image
//! files and host block devices, with qemu-compatible image locks), the
//! `raw` format (optionally a window of its child), the `luks` format
//! (LUKS1 encryption), the `compress` filter (compressed writes to its
//! child), and the `null-co` / `null-aio` devices.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod compress;
pub mod file;
mod inline;
pub mod jsonname;
mod lock;
pub mod luks;
pub mod null;
mod posix;
pub mod raw;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use compress::{CompressDriver, CompressFactory};
pub use file::{FileFactory, PosixFile};
pub use luks::{unlock_luks_at, LuksDriver, LuksFactory};
pub use null::{NullDriver, NullFactory};
pub use raw::{RawDriver, RawFactory};

/// Register every driver of this crate with `graph`.
pub fn register_all(graph: &mut qsd_block::Graph) {
    graph.register(Arc::new(FileFactory::file()));
    graph.register(Arc::new(FileFactory::host_device()));
    graph.register(Arc::new(RawFactory));
    graph.register(Arc::new(LuksFactory));
    graph.register(Arc::new(NullFactory::co()));
    graph.register(Arc::new(NullFactory::aio()));
    graph.register(Arc::new(CompressFactory));
}
