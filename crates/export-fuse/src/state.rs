//! State shared by an export's control handle, its serving loop and its
//! request tasks: the backend (taken away at removal), the in-memory
//! file attributes, the requests in flight and a pool of large buffers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use qsd_block::BlockBackend;
use qsd_rt::IoBuf;
use tokio::sync::watch;

/// Largest read or write the kernel is asked to send (it may cap it lower).
pub(crate) const MAX_IO: usize = 1 << 20;
/// Buffers at least this large are recycled through the pool.
const POOL_MIN: usize = 64 * 1024;
/// Most buffers kept in the pool.
const POOL_KEEP: usize = 64;

/// Mode bits and owner, kept in memory as qemu does (never on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attrs {
    /// Permission bits (07777).
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// Large I/O buffers, each with room for [`MAX_IO`] bytes, handed out
/// exclusively to one request at a time.
#[derive(Debug, Default)]
pub(crate) struct BufPool(Mutex<Vec<IoBuf>>);

impl BufPool {
    fn lock(&self) -> MutexGuard<'_, Vec<IoBuf>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A buffer of `len` bytes (contents unspecified).
    pub(crate) fn get(&self, len: usize) -> IoBuf {
        if !(POOL_MIN..=MAX_IO).contains(&len) {
            return IoBuf::new(len);
        }
        let mut buf = self.lock().pop().unwrap_or_else(|| IoBuf::new_huge(MAX_IO));
        buf.resize(len);
        buf
    }

    /// Give a buffer back.
    pub(crate) fn put(&self, buf: IoBuf) {
        if buf.capacity() < MAX_IO {
            return;
        }
        let mut pool = self.lock();
        if pool.len() < POOL_KEEP {
            pool.push(buf);
        }
    }
}

/// Everything the export's threads and tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    backend: RwLock<Option<BlockBackend>>,
    pub(crate) writable: bool,
    pub(crate) growable: bool,
    pub(crate) allow_other: AtomicBool,
    attrs: Mutex<Attrs>,
    /// Serialises size changes (growing writes, truncate, fallocate).
    pub(crate) resize: tokio::sync::Mutex<()>,
    pub(crate) pool: BufPool,
    inflight: AtomicUsize,
    removed: AtomicBool,
    gone: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn new(
        backend: BlockBackend,
        writable: bool,
        growable: bool,
        attrs: Attrs,
    ) -> Arc<Self> {
        Arc::new(Shared {
            backend: RwLock::new(Some(backend)),
            writable,
            growable,
            allow_other: AtomicBool::new(false),
            attrs: Mutex::new(attrs),
            resize: tokio::sync::Mutex::new(()),
            pool: BufPool::default(),
            inflight: AtomicUsize::new(0),
            removed: AtomicBool::new(false),
            gone: watch::Sender::new(false),
        })
    }

    /// The backend, unless the export was removed.
    pub(crate) fn backend(&self) -> Option<BlockBackend> {
        self.backend
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Start a request: counts it in flight and holds the backend, or
    /// `None` once the export is removed.
    pub(crate) fn begin(self: &Arc<Self>) -> Option<InFlight> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let count = Count(Arc::clone(self));
        Some(InFlight {
            blk: self.backend()?,
            _count: count,
        })
    }

    pub(crate) fn attrs(&self) -> Attrs {
        *self.attrs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_attrs(&self, f: impl FnOnce(&mut Attrs)) {
        f(&mut self.attrs.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// Mark removed and drop the export's own backend reference; requests
    /// in flight keep theirs until they finish. Returns false if already
    /// removed.
    pub(crate) fn remove(&self) -> bool {
        if self.removed.swap(true, Ordering::SeqCst) {
            return false;
        }
        let old = self
            .backend
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(old);
        self.check_gone();
        true
    }

    fn check_gone(&self) {
        if self.is_removed() && self.inflight.load(Ordering::SeqCst) == 0 {
            self.gone.send_replace(true);
        }
    }

    pub(crate) fn gone(&self) -> watch::Receiver<bool> {
        self.gone.subscribe()
    }
}

/// One request in flight with its handle on the backend. Fields drop in
/// order: the handle first, then the count, so the export is gone only once
/// no request holds the node.
#[derive(Debug)]
pub(crate) struct InFlight {
    blk: BlockBackend,
    _count: Count,
}

impl InFlight {
    /// The backend.
    pub(crate) fn blk(&self) -> &BlockBackend {
        &self.blk
    }
}

/// Counts one request in flight until dropped.
#[derive(Debug)]
struct Count(Arc<Shared>);

impl Drop for Count {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
        self.0.check_gone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qsd_block::mem::MemDriver;
    use qsd_block::{CommonOptions, Node, Perm};

    fn shared() -> Arc<Shared> {
        let node = Node::new(
            "n".into(),
            false,
            CommonOptions::default(),
            Box::new(MemDriver::new(1 << 20)),
            vec![],
        );
        let blk = BlockBackend::new(node, "e", Perm::ALL, Perm::ALL).unwrap();
        let attrs = Attrs {
            mode: 0o600,
            uid: 0,
            gid: 0,
        };
        Shared::new(blk, true, false, attrs)
    }

    #[test]
    fn test_remove_with_request_in_flight_is_gone_after_it_ends() {
        let s = shared();
        let gone = s.gone();
        let req = s.begin().unwrap();
        assert_eq!(req.blk().len(), 1 << 20);
        assert!(s.remove());
        assert!(!*gone.borrow());
        assert!(s.begin().is_none());
        drop(req);
        assert!(*gone.borrow());
        assert!(!s.remove());
    }

    #[test]
    fn test_pool_recycles_large_buffers_only() {
        let p = BufPool::default();
        let b = p.get(128 * 1024);
        assert_eq!((b.len(), b.capacity()), (128 * 1024, MAX_IO));
        p.put(b);
        p.put(IoBuf::new(4096));
        assert_eq!(p.lock().len(), 1);
        assert_eq!(p.get(MAX_IO).len(), MAX_IO);
        assert_eq!(p.lock().len(), 0);
    }
}
