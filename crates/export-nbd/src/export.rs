//! One NBD export: a block backend served under a name, the I/O thread its
//! connections run on, and the bookkeeping that tells the owner when the
//! export is fully gone after removal.

use std::sync::{Arc, Mutex, MutexGuard};

use qsd_block::BlockBackend;
use qsd_nbd_proto::handshake::BlockSizes;
use qsd_nbd_proto::{ExportInfo, TransmissionFlags, MAX_PAYLOAD, MAX_STRING_LEN};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::error::{Error, Result};

/// What `block-export-add type=nbd` (or `nbd-server-add`) configures.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Name clients ask for.
    pub name: String,
    /// Free-form description sent with `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Allow writes.
    pub writable: bool,
    /// The backend requests go to.
    pub backend: BlockBackend,
    /// Runtime of the I/O thread the export's connections run on.
    pub io: Handle,
    /// Offer the `qemu:allocation-depth` metadata context.
    pub allocation_depth: bool,
}

/// How to remove an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RemoveMode {
    /// Refuse if clients are connected (qemu's `safe`).
    #[default]
    Safe,
    /// Disconnect clients: requests already received are completed (their
    /// replies sent if the client still listens), then the socket is closed.
    Hard,
}

#[derive(Debug, Default)]
struct State {
    clients: usize,
    removed: bool,
}

/// An export, shared by the server and its connections.
#[derive(Debug)]
pub struct NbdExport {
    name: String,
    description: Option<String>,
    backend: BlockBackend,
    io: Handle,
    size: u64,
    flags: TransmissionFlags,
    block_sizes: BlockSizes,
    allocation_depth: bool,
    state: Mutex<State>,
    /// Set to true to make every connection of this export disconnect.
    disconnect: watch::Sender<bool>,
    /// Set to true once removed and the last connection has finished.
    gone: watch::Sender<bool>,
}

impl NbdExport {
    /// Validate options and compute what clients are told.
    ///
    /// `multi_conn`: advertise `NBD_FLAG_CAN_MULTI_CONN`. qemu does so unless
    /// the server allows a single connection; it is safe here because a flush
    /// goes to the node shared by all connections, so its effect is global.
    pub(crate) fn new(opts: ExportOptions, multi_conn: bool) -> Result<Arc<Self>> {
        if opts.name.len() > MAX_STRING_LEN {
            return Err(Error::NameTooLong(opts.name));
        }
        if let Some(d) = &opts.description {
            if d.len() > MAX_STRING_LEN {
                return Err(Error::DescriptionTooLong(d.clone()));
            }
        }
        let mut flags = TransmissionFlags::HAS_FLAGS
            | TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::SEND_CACHE;
        if multi_conn {
            flags |= TransmissionFlags::CAN_MULTI_CONN;
        }
        if opts.writable {
            flags |= TransmissionFlags::SEND_TRIM
                | TransmissionFlags::SEND_WRITE_ZEROES
                | TransmissionFlags::SEND_FAST_ZERO;
        } else {
            flags |= TransmissionFlags::READ_ONLY;
        }
        let minimum = opts.backend.request_alignment().clamp(1, 64 * 1024);
        let block_sizes = BlockSizes {
            minimum,
            preferred: minimum.max(4096),
            maximum: MAX_PAYLOAD,
        };
        // Like qemu, only whole 512-byte sectors are exported.
        let size = opts.backend.len() & !511;
        Ok(Arc::new(NbdExport {
            name: opts.name,
            description: opts.description,
            backend: opts.backend,
            io: opts.io,
            size,
            flags,
            block_sizes,
            allocation_depth: opts.allocation_depth,
            state: Mutex::new(State::default()),
            disconnect: watch::Sender::new(false),
            gone: watch::Sender::new(false),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The name clients use.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The description, if any.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The backend.
    pub fn backend(&self) -> &BlockBackend {
        &self.backend
    }

    /// The size clients see.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags (before SEND_DF, which depends on the client).
    pub fn flags(&self) -> TransmissionFlags {
        self.flags
    }

    /// True if clients may write.
    pub fn is_writable(&self) -> bool {
        !self.flags.contains(TransmissionFlags::READ_ONLY)
    }

    /// Connections currently in transmission phase on this export.
    pub fn client_count(&self) -> usize {
        self.lock().clients
    }

    /// True once removal has started (`shutting-down` in query-block-exports).
    pub fn is_removed(&self) -> bool {
        self.lock().removed
    }

    /// A handle that resolves once the export is removed and its last
    /// connection has finished (time to emit `BLOCK_EXPORT_DELETED`).
    pub fn gone(&self) -> ExportGone {
        ExportGone(self.gone.subscribe())
    }

    pub(crate) fn io(&self) -> &Handle {
        &self.io
    }

    pub(crate) fn info(&self) -> ExportInfo {
        ExportInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.size,
            flags: self.flags,
            block_sizes: self.block_sizes,
            allocation_depth: self.allocation_depth,
            bitmaps: Vec::new(),
        }
    }

    /// Register a connection entering transmission; `None` if the export is
    /// being removed.
    pub(crate) fn attach(self: &Arc<Self>) -> Option<ClientGuard> {
        let mut st = self.lock();
        if st.removed {
            return None;
        }
        st.clients += 1;
        Some(ClientGuard {
            export: Arc::clone(self),
            disconnect: self.disconnect.subscribe(),
        })
    }

    /// Start removal. Fails in safe mode while clients are connected.
    pub(crate) fn remove(&self, mode: RemoveMode) -> Result<ExportGone> {
        let gone = self.gone();
        let mut st = self.lock();
        if mode == RemoveMode::Safe && st.clients > 0 {
            return Err(Error::ExportInUse(self.name.clone()));
        }
        st.removed = true;
        if st.clients == 0 {
            self.gone.send_replace(true);
        }
        drop(st);
        if mode == RemoveMode::Hard {
            self.disconnect.send_replace(true);
        }
        Ok(gone)
    }

    fn detach(&self) {
        let mut st = self.lock();
        st.clients -= 1;
        if st.removed && st.clients == 0 {
            self.gone.send_replace(true);
        }
    }
}

/// A connection's registration with its export; dropping it deregisters.
#[derive(Debug)]
pub(crate) struct ClientGuard {
    export: Arc<NbdExport>,
    disconnect: watch::Receiver<bool>,
}

impl ClientGuard {
    /// Receiver that turns true when the export wants its clients gone.
    pub(crate) fn disconnect_signal(&self) -> watch::Receiver<bool> {
        self.disconnect.clone()
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.export.detach();
    }
}

/// Resolves once a removed export has no connection left.
#[derive(Debug, Clone)]
pub struct ExportGone(watch::Receiver<bool>);

impl ExportGone {
    /// True if already gone.
    pub fn is_gone(&self) -> bool {
        *self.0.borrow()
    }

    /// Wait until gone.
    pub async fn wait(mut self) {
        // An error means the export itself was dropped: gone as well.
        let _ = self.0.wait_for(|g| *g).await;
    }
}
