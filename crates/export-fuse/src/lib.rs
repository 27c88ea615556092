//! The FUSE export: a block node served as a regular file mounted over an
//! existing regular file (`--export type=fuse`), as qemu-storage-daemon does,
//! but with many requests in flight.
//!
//! - [`FuseExport`]: mounts the file, runs the FUSE session, removes it.
//! - [`ExportGone`]: resolves once a removed export has no request left (the
//!   moment to emit `BLOCK_EXPORT_DELETED`).
//!
//! Threads: fuser mounts the file and negotiates `INIT`; then the export's
//! I/O thread (the one given, or one of its own, never the main loop) reads
//! `/dev/fuse` without blocking, decodes each request ([`proto`]) and
//! answers attribute requests at once. Every data request (read, write,
//! flush, fallocate, lseek, truncate) becomes a task there that owns its
//! buffer and replies when the I/O completes, so the kernel can keep many
//! requests in flight.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod error;
mod export;
mod fs;
mod ops;
pub mod proto;
mod serve;
mod state;

pub use error::{Error, Result};
pub use export::{permissions, AllowOther, ExportGone, FuseExport, FuseExportOptions};
