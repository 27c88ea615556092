//! vhost-user-blk export: serves a `BlockBackend` to a VM (QEMU,
//! cloud-hypervisor, libblkio, ...) over a vhost-user unix socket, on the
//! rust-vmm crates. One front-end is served at a time; after it disconnects
//! the export accepts the next one (reconnect). Requests run as tasks on the
//! export's runtimes (its I/O threads, queue `i` on runtime `i mod n`).
//! Beyond qemu-storage-daemon: inflight I/O tracking (INFLIGHT_SHMFD), so a
//! restarted daemon resubmits what a killed one left in flight, and a
//! config-change message to the front-end after a resize; a message relay
//! in front of the rust-vmm handler provides both. See
//! docs/vhost-user-blk.md.
// Unsafe code is limited to the vhost-user descriptor glue (relay.rs) and
// the zero-copy guest buffers (zerocopy.rs).
#![deny(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod config;
mod device;
#[doc(hidden)]
pub mod fuzzing;
mod inflight;
mod kick;
mod pool;
mod relay;
mod request;
mod server;
mod zerocopy;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use qsd_block::BlockBackend;
use vhost::vhost_user::Listener;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventFlag, EventNotifier};

use crate::request::ReqCtx;
use crate::server::ConnSlot;

/// The serial GET_ID returns when none is configured (as qemu-storage-daemon).
pub const DEFAULT_SERIAL: &str = "vhost_user_blk";

/// Errors of starting an export.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad option value (message in qemu's words where it has one).
    #[error("{0}")]
    InvalidOption(String),
    /// The socket could not be created or used.
    #[error("{0}")]
    Socket(String),
    /// An OS resource (thread, eventfd) could not be created.
    #[error("{0}")]
    Os(#[from] std::io::Error),
}

/// `Result` of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Where the export listens.
#[derive(Debug)]
pub enum VhostAddr {
    /// Bind a unix socket at this path (replacing a stale one).
    Path(PathBuf),
    /// An already bound and listening unix socket (`addr.type=fd`).
    Fd(OwnedFd),
}

/// Options of a vhost-user-blk export.
#[derive(Debug)]
pub struct VhostBlkOptions {
    /// The export id (thread names, log messages).
    pub id: String,
    pub addr: VhostAddr,
    pub writable: bool,
    /// `logical-block-size`: power of two, 512..=32768 (qemu's rule).
    pub logical_block_size: u32,
    /// `num-queues`: 1..=256 (qemu's default is 1).
    pub num_queues: u16,
    /// GET_ID answer; `None` gives [`DEFAULT_SERIAL`].
    pub serial: Option<String>,
    /// `writethrough`: the write cache starts disabled (CONFIG_WCE byte 0).
    pub writethrough: bool,
}

impl VhostBlkOptions {
    /// Options with qemu's defaults for everything but id and address.
    pub fn new(id: impl Into<String>, addr: VhostAddr) -> Self {
        VhostBlkOptions {
            id: id.into(),
            addr,
            writable: false,
            logical_block_size: 512,
            num_queues: 1,
            serial: None,
            writethrough: false,
        }
    }

    fn validate(&self, backend: &BlockBackend) -> Result<()> {
        let lbs = self.logical_block_size;
        if !lbs.is_power_of_two() || !(512..=32768).contains(&lbs) {
            return Err(Error::InvalidOption(format!(
                "Property 'vhost-user-blk.logical-block-size' doesn't take value '{lbs}' \
                 (must be a power of 2 between 512 and 32768)"
            )));
        }
        if self.num_queues == 0 || self.num_queues > 256 {
            return Err(Error::InvalidOption(
                "num-queues must be greater than 0 and at most 256".into(),
            ));
        }
        if self.writable && !backend.is_writable() {
            return Err(Error::InvalidOption(
                "the block backend of a writable export must be writable".into(),
            ));
        }
        Ok(())
    }
}

/// State shared by the export handle, its connections and request tasks.
pub(crate) struct Shared {
    pub id: String,
    pub ctx: ReqCtx,
    pub num_queues: u16,
    /// Runtimes running requests: queue `i` uses `rts[i % rts.len()]`.
    pub rts: Vec<tokio::runtime::Handle>,
    /// The CONFIG_WCE byte: the guest may switch the write cache off.
    pub writeback: AtomicBool,
}

/// A running vhost-user-blk export.
pub struct VhostUserBlkExport {
    id: String,
    shared: Arc<Shared>,
    /// The size the front-end was last told about.
    announced_len: AtomicU64,
    stop: EventNotifier,
    slot: Arc<Mutex<ConnSlot>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VhostUserBlkExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlkExport")
            .field("id", &self.id)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl VhostUserBlkExport {
    /// Listen on `opts.addr` and serve front-ends one at a time; requests
    /// run on `rt` (a runtime with an io_uring ring: the main thread's or an
    /// I/O thread's). The socket is bound before this returns.
    pub fn start(
        opts: VhostBlkOptions,
        backend: BlockBackend,
        rt: tokio::runtime::Handle,
    ) -> Result<Self> {
        Self::start_on(opts, backend, vec![rt])
    }

    /// As [`start`](Self::start), with the queues spread over several
    /// runtimes (`iothread` given as a list): queue `i` runs on
    /// `rts[i % rts.len()]`.
    pub fn start_on(
        opts: VhostBlkOptions,
        backend: BlockBackend,
        rts: Vec<tokio::runtime::Handle>,
    ) -> Result<Self> {
        opts.validate(&backend)?;
        if rts.is_empty() {
            return Err(Error::InvalidOption("no runtime for the export".into()));
        }
        let listener = match opts.addr {
            VhostAddr::Path(ref p) => Listener::new(p, true).map_err(|e| {
                Error::Socket(format!("Failed to bind socket '{}': {e}", p.display()))
            })?,
            VhostAddr::Fd(fd) => Listener::from(UnixListener::from(fd)),
        };
        let shared = Arc::new(Shared {
            id: opts.id.clone(),
            ctx: ReqCtx {
                backend,
                writable: opts.writable,
                blk_size: opts.logical_block_size,
                serial: opts
                    .serial
                    .unwrap_or_else(|| DEFAULT_SERIAL.to_string())
                    .into_bytes(),
                pool: Default::default(),
            },
            num_queues: opts.num_queues,
            rts,
            writeback: AtomicBool::new(!opts.writethrough),
        });
        let (stop_rx, stop) = new_event_consumer_and_notifier(EventFlag::CLOEXEC)?;
        let slot = Arc::new(Mutex::new(ConnSlot::default()));
        let slot2 = Arc::clone(&slot);
        let shared2 = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("vhost-blk-{}", opts.id))
            .spawn(move || server::serve(shared2, listener, stop_rx, slot2))?;
        Ok(VhostUserBlkExport {
            id: opts.id,
            announced_len: AtomicU64::new(shared.ctx.backend.len()),
            shared,
            stop,
            slot,
            thread: Some(thread),
        })
    }

    /// The export id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// True while a front-end is connected.
    pub fn is_connected(&self) -> bool {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .connected()
    }

    /// After a resize: if the node's size differs from the one the
    /// front-end last heard of, send it VHOST_USER_BACKEND_CONFIG_CHANGE_MSG
    /// (when it gave a backend channel) so that it re-reads the config
    /// space, whose capacity is always the node's current size. Returns
    /// true when a message was sent.
    pub fn resize_notify(&self) -> bool {
        let len = self.shared.ctx.backend.len();
        if self.announced_len.swap(len, Ordering::AcqRel) == len {
            return false;
        }
        let sent = self
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .config_changed();
        tracing::debug!(export = %self.id, len, sent, "vhost-user-blk: size changed");
        sent
    }

    /// Disconnect the front-end, wait for its requests, close the socket
    /// (removing the socket file it created). Blocks; call it from a
    /// blocking context (`spawn_blocking`) when on a runtime that runs the
    /// export's requests.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// [`stop`](Self::stop) from async code: runs it on the blocking pool
    /// so the runtime keeps running the requests being drained.
    pub async fn stop_async(self) {
        let id = self.id.clone();
        if tokio::task::spawn_blocking(move || self.stop())
            .await
            .is_err()
        {
            tracing::error!(export = %id, "vhost-user-blk: stop panicked");
        }
    }

    fn shutdown(&mut self) {
        {
            let mut s = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
            s.request_stop();
        }
        let _ = self.stop.notify();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(export = %self.id, "vhost-user-blk server thread panicked");
            }
        }
    }
}

impl Drop for VhostUserBlkExport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The `--print-capabilities` answer of a vhost-user block back-end, per
/// qemu's vhost-user.json (`VHostUserBackendCapabilitiesBlock`).
pub fn capabilities_json() -> serde_json::Value {
    serde_json::json!({
        "type": "block",
        "features": ["read-only", "blk-file"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_capabilities_json_lists_block_features() {
        let v = capabilities_json();
        assert_eq!(v["type"], "block");
        assert_eq!(v["features"], serde_json::json!(["read-only", "blk-file"]));
    }
}
