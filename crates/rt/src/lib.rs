//! Per-thread runtime for qsd: owned, aligned I/O buffers, file operations that
//! run on this thread's io_uring ring (or on a thread pool when io_uring is not
//! available), and I/O threads that each run a current-thread tokio runtime.
//!
//! This is one of the few crates where `unsafe` is allowed: the kernel writes into
//! buffers we own, so ownership must be tracked until each completion arrives.
//!
//! Threads: each runtime thread ([`run_main`], [`block_on_with_ring`],
//! [`IoThread`]) owns one ring. An operation is submitted to the ring of the
//! thread that starts it and completes there; its future may be polled or
//! dropped anywhere.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod buf;
mod eventfd;
mod huge;
pub mod io;
mod op;
mod probe;
pub mod process;
mod ring;
mod thread;

#[cfg(test)]
mod tests;

pub use buf::IoBuf;
pub use eventfd::{readable_async_fd, EventFdWatch};
pub use io::{Aio, SharedFd, Submit};
pub use probe::{io_uring_available, resolve_aio};
pub use thread::{
    block_on_with_ring, build_runtime, current_has_ring, run_main, spawn_started, IoThread,
};
