//! The NBD export: a server that listens on UNIX and TCP sockets, negotiates
//! with clients using the `qsd-nbd-proto` codec, and serves each export's
//! [`qsd_block::BlockBackend`] on the export's I/O thread.
//!
//! - [`NbdServer`]: listeners, the export table, connection limits, removal.
//! - [`NbdExport`]: one export and its connections; [`ExportGone`] tells the
//!   owner when a removed export has no connection left (the moment to emit
//!   `BLOCK_EXPORT_DELETED`).
//!
//! Each connection in transmission phase lives on one runtime: a reader task
//! decodes requests in batches and spawns one task per request; a writer task
//! sends all replies ready at once with vectored writes.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod error;
mod export;
mod ops;
mod out;
mod server;
mod session;

pub use error::{Error, Result};
pub use export::{ExportGone, ExportOptions, NbdExport, RemoveMode};
pub use server::{ListenAddr, NbdServer, ServerOptions};
