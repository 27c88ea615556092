//! A node of the graph: a driver instance plus the options every node has
//! (read-only, discard, detect-zeroes, cache), its users with their
//! permissions, and the count of requests in flight (the drain point).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use qsd_rt::IoBuf;
use tokio::sync::Notify;

use crate::debug::DebugEvent;
use crate::driver::{BlockDriver, BlockStatus, WriteFlags, ZeroFlags};
use crate::perm::{check_conflict, PermUser, UserDesc, UserEntry};
use crate::{Error, ErrorKind, Perm, Result};

/// A shared handle on a node.
pub type NodeRef = Arc<Node>;

/// `detect-zeroes`: turn writes of zero buffers into write-zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Never.
    #[default]
    Off,
    /// Yes, without unmapping.
    On,
    /// Yes, and unmap when `discard=unmap`.
    Unmap,
}

/// The options every node has, after inheritance from its parent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommonOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Open read-only when writing is not possible (qemu's auto-read-only).
    pub auto_read_only: bool,
    /// Do not take or check image locks for others.
    pub force_share: bool,
    /// Pass discard requests down (`discard=unmap`) or drop them.
    pub discard_unmap: bool,
    /// Zero detection on writes.
    pub detect_zeroes: DetectZeroes,
    /// Bypass the host page cache (O_DIRECT).
    pub cache_direct: bool,
    /// Ignore flush requests.
    pub cache_no_flush: bool,
}

/// Requests in flight, and a way to wait until there are none.
#[derive(Debug, Default)]
struct Inflight {
    count: AtomicUsize,
    idle: Notify,
}

struct InflightGuard<'a>(&'a Inflight);

impl Inflight {
    fn enter(&self) -> InflightGuard<'_> {
        self.count.fetch_add(1, Ordering::AcqRel);
        InflightGuard(self)
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[derive(Debug, Default)]
struct Users {
    next_id: u64,
    list: Vec<UserEntry>,
}

/// A child of a node, for queries and for deleting implicit nodes.
#[derive(Debug, Clone)]
pub struct ChildLink {
    /// "file", "backing", "image", ...
    pub role: String,
    /// The child.
    pub node: NodeRef,
}

/// One node of the block graph.
pub struct Node {
    name: String,
    implicit: bool,
    opts: CommonOptions,
    driver: Box<dyn BlockDriver>,
    /// Children by role; a driver may add and remove some at runtime
    /// (quorum through x-blockdev-change).
    children: Mutex<Vec<ChildLink>>,
    /// The child holding the node's data, fixed at open (see `primary_child`).
    primary: Option<NodeRef>,
    users: Mutex<Users>,
    inflight: Inflight,
    /// End of the highest write that reached this node (query-blockstats).
    wr_highest: AtomicU64,
    /// Serialises read-modify-write cycles of unaligned writes.
    rmw: tokio::sync::Mutex<()>,
    /// Writes since the last flush (qemu's `write_gen`/`flushed_gen`).
    gens: WriteGens,
}

/// qemu's write generation: every write-type request that completes
/// (successfully or not) starts a new generation, and a successful flush
/// records the generation it covered. Equal means nothing is waiting to be
/// made durable. Both start at 0 as in qemu: a node just opened has
/// nothing of ours to make durable.
#[derive(Debug, Default)]
struct WriteGens {
    written: AtomicU64,
    flushed: AtomicU64,
}

impl WriteGens {
    fn bump(&self) {
        self.written.fetch_add(1, Ordering::AcqRel);
    }

    /// The current generation, and whether a flush already covered it.
    fn current(&self) -> (u64, bool) {
        let gen = self.written.load(Ordering::Acquire);
        (gen, self.flushed.load(Ordering::Acquire) >= gen)
    }

    fn flushed(&self, gen: u64) {
        self.flushed.fetch_max(gen, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver.driver_name())
            .field("opts", &self.opts)
            .finish()
    }
}

impl Node {
    /// Wrap an opened driver. `implicit` nodes were created inline as a
    /// child of another node and are deleted with it.
    pub fn new(
        name: String,
        implicit: bool,
        opts: CommonOptions,
        driver: Box<dyn BlockDriver>,
        children: Vec<ChildLink>,
    ) -> NodeRef {
        let primary = children
            .iter()
            .find(|c| c.role == "file" || c.role == "image")
            .map(|c| c.node.clone());
        Arc::new(Node {
            name,
            implicit,
            opts,
            driver,
            children: Mutex::new(children),
            primary,
            users: Mutex::new(Users::default()),
            inflight: Inflight::default(),
            wr_highest: AtomicU64::new(0),
            rmw: tokio::sync::Mutex::new(()),
            gens: WriteGens::default(),
        })
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when created inline as another node's child.
    pub fn is_implicit(&self) -> bool {
        self.implicit
    }

    /// The common options.
    pub fn options(&self) -> &CommonOptions {
        &self.opts
    }

    /// True when the node refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.opts.read_only
    }

    /// The driver (for queries).
    pub fn driver(&self) -> &dyn BlockDriver {
        self.driver.as_ref()
    }

    /// The children (a snapshot: drivers may change the list at runtime).
    pub fn children(&self) -> Vec<ChildLink> {
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn has_no_children(&self) -> bool {
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }

    /// Record a child the driver attached at runtime.
    pub fn add_child(&self, link: ChildLink) {
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(link);
    }

    /// Forget the child in `role` after the driver detached it.
    pub fn remove_child(&self, role: &str) {
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|c| c.role != role);
    }

    /// The child that holds this node's data (qemu's primary child): the
    /// first child in role `file` or `image`.
    pub fn primary_child(&self) -> Option<&NodeRef> {
        self.primary.as_ref()
    }

    /// Fire debug event `ev` at this node: its driver handles it (blkdebug)
    /// or it passes down to the primary child. Drivers call this on the
    /// child they are about to touch, just before the I/O the event names.
    pub fn debug_event(&self, ev: DebugEvent) {
        if !self.driver.debug_event(ev) {
            if let Some(child) = self.primary_child() {
                child.debug_event(ev);
            }
        }
    }

    /// Current size in bytes.
    pub fn len(&self) -> u64 {
        self.driver.len()
    }

    /// True when the node has zero length.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// End offset of the highest successful write (qemu's `wr_highest_offset`).
    pub fn wr_highest_offset(&self) -> u64 {
        self.wr_highest.load(Ordering::Relaxed)
    }

    fn wrote(&self, offset: u64, len: u64) {
        self.wr_highest.fetch_max(offset + len, Ordering::Relaxed);
    }

    /// Requests currently in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.count.load(Ordering::Acquire)
    }

    // ---- users and permissions ----

    fn users(&self) -> MutexGuard<'_, Users> {
        match self.users.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Descriptions of the current users ("export 'e0'" ...), for errors.
    pub fn user_names(&self) -> Vec<String> {
        self.users()
            .list
            .iter()
            .map(|u| u.desc.who.clone())
            .collect()
    }

    /// Users attached as backends (role "root"), not as parent nodes.
    pub fn root_user_names(&self) -> Vec<String> {
        self.users()
            .list
            .iter()
            .filter(|u| u.desc.role == "root")
            .map(|u| u.desc.who.clone())
            .collect()
    }

    /// Register a user taking `perm` and sharing `shared`.
    pub fn add_user(
        self: &Arc<Self>,
        desc: UserDesc,
        perm: Perm,
        shared: Perm,
    ) -> Result<PermUser> {
        let mut users = self.users();
        self.check_writable(perm)?;
        check_conflict(&self.name, &desc, perm, shared, &users.list)?;
        let id = users.next_id;
        users.next_id += 1;
        users.list.push(UserEntry {
            id,
            desc,
            perm,
            shared,
        });
        if let Err(e) = self.apply_perms(&users) {
            users.list.retain(|u| u.id != id);
            return Err(e);
        }
        Ok(PermUser::new(self, id))
    }

    fn check_writable(&self, perm: Perm) -> Result<()> {
        if self.opts.read_only && (perm.contains(Perm::WRITE) || perm.contains(Perm::RESIZE)) {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("Block node '{}' is read-only", self.name),
            ));
        }
        Ok(())
    }

    pub(crate) fn update_user(&self, id: u64, perm: Perm, shared: Perm) -> Result<()> {
        let mut users = self.users();
        self.check_writable(perm)?;
        let Some(pos) = users.list.iter().position(|u| u.id == id) else {
            return Ok(());
        };
        let others: Vec<UserEntry> = users.list.iter().filter(|u| u.id != id).cloned().collect();
        check_conflict(&self.name, &users.list[pos].desc, perm, shared, &others)?;
        let old = (users.list[pos].perm, users.list[pos].shared);
        users.list[pos].perm = perm;
        users.list[pos].shared = shared;
        if let Err(e) = self.apply_perms(&users) {
            users.list[pos].perm = old.0;
            users.list[pos].shared = old.1;
            return Err(e);
        }
        Ok(())
    }

    pub(crate) fn remove_user(&self, id: u64) {
        let mut users = self.users();
        users.list.retain(|u| u.id != id);
        if let Err(e) = self.apply_perms(&users) {
            tracing::warn!(node = %self.name, "dropping permissions failed: {e}");
        }
    }

    /// The union of what users take and the intersection of what they share.
    fn cumulative(users: &Users) -> (Perm, Perm) {
        users
            .list
            .iter()
            .fold((Perm::NONE, Perm::ALL), |(p, s), u| {
                (p | u.perm, s & u.shared)
            })
    }

    fn apply_perms(&self, users: &Users) -> Result<()> {
        let (perm, shared) = Self::cumulative(users);
        let shared = if self.opts.force_share {
            Perm::ALL
        } else {
            shared
        };
        self.driver.set_perm(perm, shared)
    }

    /// The cumulative (taken, shared) permissions, for queries and tests.
    pub fn cumulative_perms(&self) -> (Perm, Perm) {
        Self::cumulative(&self.users())
    }

    // ---- data plane ----

    /// Wait until no request is in flight on this node. Drivers in this
    /// node's subtree release requests they hold back while it waits.
    pub async fn drain(&self) {
        self.drain_begin();
        self.wait_idle().await;
        self.drain_end();
    }

    /// Tell this node's driver and its subtree that a drain begins (see
    /// [`BlockDriver::drain_begin`]); pair with [`Node::drain_end`].
    pub fn drain_begin(&self) {
        self.driver.drain_begin();
        for c in self.children() {
            c.node.drain_begin();
        }
    }

    /// End what [`Node::drain_begin`] began.
    pub fn drain_end(&self) {
        for c in self.children() {
            c.node.drain_end();
        }
        self.driver.drain_end();
    }

    async fn wait_idle(&self) {
        loop {
            let idle = self.inflight.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }

    fn align(&self) -> u64 {
        u64::from(self.driver.limits().request_alignment.max(1))
    }

    fn check_write_allowed(&self) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("Block node '{}' is read-only", self.name),
            )
            .with_errno(crate::error::libc_errno::EPERM));
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let _guard = self.inflight.enter();
        let align = self.align();
        if is_aligned(offset, buf.len() as u64, align) {
            return self.driver.read(offset, buf).await;
        }
        self.read_unaligned(offset, buf, align).await
    }

    async fn read_unaligned(&self, offset: u64, mut buf: IoBuf, align: u64) -> Result<IoBuf> {
        let (start, end) = widen(offset, buf.len() as u64, align);
        let bounce = IoBuf::new((end - start) as usize);
        let bounce = self.driver.read(start, bounce).await?;
        let head = (offset - start) as usize;
        let len = buf.len();
        buf.copy_from_slice(&bounce[head..head + len]);
        Ok(buf)
    }

    /// Write all of `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.check_write_allowed()?;
        let _guard = self.inflight.enter();
        let len = buf.len() as u64;
        let r = self.write_inner(offset, buf, flags).await;
        self.gens.bump();
        if r.is_ok() {
            self.wrote(offset, len);
        }
        r
    }

    async fn write_inner(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        if self.opts.detect_zeroes != DetectZeroes::Off && is_all_zero(&buf) {
            let may_unmap =
                self.opts.detect_zeroes == DetectZeroes::Unmap && self.opts.discard_unmap;
            let zflags = ZeroFlags {
                may_unmap,
                no_fallback: false,
                fua: flags.fua,
            };
            self.zeroes_inner(offset, buf.len() as u64, zflags).await?;
            return Ok(buf);
        }
        if flags.compress && !self.driver.can_compress() {
            // qemu's generic layer refuses before the driver sees it.
            return Err(Error::unsupported(format!(
                "Compression is not supported for this drive {}",
                self.name
            )));
        }
        let align = self.align();
        if is_aligned(offset, buf.len() as u64, align) {
            return self.write_aligned(offset, buf, flags).await;
        }
        self.write_unaligned(offset, buf, flags, align).await
    }

    /// The driver's write, between qemu's `pwritev` (not for compressed
    /// writes) and `pwritev_done` debug events, fired at this node.
    async fn write_aligned(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        if !flags.compress {
            self.debug_event(DebugEvent::Pwritev);
        }
        let r = self.driver.write(offset, buf, flags).await;
        self.debug_event(DebugEvent::PwritevDone);
        r
    }

    /// Read-modify-write of the blocks the request only partly covers.
    async fn write_unaligned(
        &self,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
        align: u64,
    ) -> Result<IoBuf> {
        let _rmw = self.rmw.lock().await;
        let (start, end) = widen(offset, buf.len() as u64, align);
        let padded = IoBuf::new((end - start) as usize);
        let covered = (offset, offset + buf.len() as u64);
        let mut padded = self.read_padding(padded, start, covered, align).await?;
        let head = (offset - start) as usize;
        padded[head..head + buf.len()].copy_from_slice(&buf);
        self.write_aligned(start, padded, flags).await?;
        Ok(buf)
    }

    /// Fill the head and tail blocks of `padded` (the aligned range from
    /// `start` around the bytes `covered`) from the driver: one read when
    /// those blocks are the whole range, else one block each, so a large
    /// unaligned write does not read its middle. Fires qemu's
    /// `pwritev_rmw_*` debug events in qemu's order.
    async fn read_padding(
        &self,
        mut padded: IoBuf,
        start: u64,
        covered: (u64, u64),
        align: u64,
    ) -> Result<IoBuf> {
        let total = padded.len() as u64;
        let end = start + total;
        let (head, tail) = (covered.0 != start, covered.1 != end);
        if total == align || (head && tail && total == 2 * align) {
            self.rmw_events(
                head,
                tail,
                DebugEvent::PwritevRmwHead,
                DebugEvent::PwritevRmwTail,
            );
            let padded = self.driver.read(start, padded).await?;
            self.rmw_events(
                head,
                tail,
                DebugEvent::PwritevRmwAfterHead,
                DebugEvent::PwritevRmwAfterTail,
            );
            return Ok(padded);
        }
        let block = align as usize;
        if head {
            self.debug_event(DebugEvent::PwritevRmwHead);
            let b = self.driver.read(start, IoBuf::new(block)).await?;
            padded[..block].copy_from_slice(&b);
            self.debug_event(DebugEvent::PwritevRmwAfterHead);
        }
        if tail {
            self.debug_event(DebugEvent::PwritevRmwTail);
            let b = self.driver.read(end - align, IoBuf::new(block)).await?;
            let at = padded.len() - block;
            padded[at..].copy_from_slice(&b);
            self.debug_event(DebugEvent::PwritevRmwAfterTail);
        }
        Ok(padded)
    }

    fn rmw_events(&self, head: bool, tail: bool, on_head: DebugEvent, on_tail: DebugEvent) {
        if head {
            self.debug_event(on_head);
        }
        if tail {
            self.debug_event(on_tail);
        }
    }

    /// Make a range read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_write_allowed()?;
        let _guard = self.inflight.enter();
        let r = self.zeroes_inner(offset, len, flags).await;
        self.gens.bump();
        if r.is_ok() {
            self.wrote(offset, len);
        }
        r
    }

    async fn zeroes_inner(&self, offset: u64, len: u64, mut flags: ZeroFlags) -> Result<()> {
        flags.may_unmap &= self.opts.discard_unmap;
        let by_writing = WriteFlags {
            fua: flags.fua,
            ..WriteFlags::default()
        };
        if !is_aligned(offset, len, self.align()) {
            if flags.no_fallback {
                return Err(Error::unsupported("unaligned write-zeroes cannot be fast"));
            }
            return self.zeroes_by_writing(offset, len, by_writing).await;
        }
        // qemu's events: `pwritev_zero`, the zeroing (by writing zero
        // buffers if the driver cannot), then `pwritev_done`.
        self.debug_event(DebugEvent::PwritevZero);
        let r = match self.driver.write_zeroes(offset, len, flags).await {
            Err(e) if e.kind() == ErrorKind::Unsupported && !flags.no_fallback => {
                self.zeroes_by_writing(offset, len, by_writing).await
            }
            other => other,
        };
        self.debug_event(DebugEvent::PwritevDone);
        r
    }

    /// The fallback for write-zeroes: write zero buffers, 1 MiB at a time.
    async fn zeroes_by_writing(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let align = self.align();
        let mut done = 0;
        let mut buf = IoBuf::new(CHUNK.min(len) as usize);
        while done < len {
            let n = CHUNK.min(len - done);
            buf.resize(n as usize);
            buf.zero();
            let pos = offset + done;
            buf = if is_aligned(pos, n, align) {
                self.driver.write(pos, buf, flags).await?
            } else {
                self.write_unaligned(pos, buf, flags, align).await?
            };
            done += n;
        }
        Ok(())
    }

    /// Discard a range (dropped unless `discard=unmap`).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write_allowed()?;
        if !self.opts.discard_unmap {
            return Ok(());
        }
        let _guard = self.inflight.enter();
        // Discard is advisory: shrink to the aligned part.
        let align = self.align();
        let start = offset.next_multiple_of(align);
        let end = (offset + len) / align * align;
        if end <= start {
            return Ok(());
        }
        let r = self.driver.discard(start, end - start).await;
        self.gens.bump();
        r
    }

    /// Flush completed writes to stable storage (no-op with cache.no-flush).
    pub async fn flush(&self) -> Result<()> {
        if self.opts.cache_no_flush {
            return Ok(());
        }
        let _guard = self.inflight.enter();
        let (gen, clean) = self.gens.current();
        // As qemu's bdrv_co_flush: the events go to the child being
        // flushed, FLUSH_TO_DISK only when something was written since.
        if let Some(child) = self.primary_child() {
            child.debug_event(DebugEvent::FlushToOs);
            if !clean {
                child.debug_event(DebugEvent::FlushToDisk);
            }
        }
        // A node without children holds the data itself: with nothing
        // written since its last flush there is nothing to make durable
        // (an fdatasync saved). Nodes above always pass the flush on (a
        // format may hold metadata of its own); their children decide.
        if clean && self.has_no_children() {
            return Ok(());
        }
        self.driver.flush().await?;
        self.gens.flushed(gen);
        Ok(())
    }

    /// Allocation status from `offset` for at most `len` bytes.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let _guard = self.inflight.enter();
        let mut st = self.driver.block_status(offset, len).await?;
        st.len = st.len.clamp(1, len.max(1));
        Ok(st)
    }

    /// Resize the node.
    pub async fn truncate(&self, size: u64) -> Result<()> {
        self.check_write_allowed()?;
        let _guard = self.inflight.enter();
        let r = self.driver.truncate(size).await;
        self.gens.bump();
        r
    }

    /// Drain, flush (unless read-only) and close the driver.
    pub async fn close(&self) -> Result<()> {
        self.drain().await;
        if !self.opts.read_only {
            self.flush().await?;
        }
        self.driver.close().await
    }
}

fn is_aligned(offset: u64, len: u64, align: u64) -> bool {
    align <= 1 || (offset.is_multiple_of(align) && len.is_multiple_of(align))
}

fn widen(offset: u64, len: u64, align: u64) -> (u64, u64) {
    (
        offset / align * align,
        (offset + len).next_multiple_of(align),
    )
}

/// True when every byte is zero (word at a time).
pub fn is_all_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        let (h, rest) = buf.split_at(buf.len().min(buf.as_ptr().align_offset(8)));
        let n = rest.len() / 8 * 8;
        (h, &rest[..n], &rest[n..])
    };
    head.iter().all(|&b| b == 0)
        && words
            .chunks_exact(8)
            .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemDriver;

    /// MemDriver that counts the flushes reaching it.
    #[derive(Debug)]
    struct CountFlushes(MemDriver, Arc<AtomicUsize>);

    impl BlockDriver for CountFlushes {
        fn driver_name(&self) -> &'static str {
            "count-flushes"
        }
        fn len(&self) -> u64 {
            self.0.len()
        }
        fn read(&self, offset: u64, buf: IoBuf) -> crate::BoxFut<'_, IoBuf> {
            self.0.read(offset, buf)
        }
        fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> crate::BoxFut<'_, IoBuf> {
            self.0.write(offset, buf, flags)
        }
        fn discard(&self, offset: u64, len: u64) -> crate::BoxFut<'_, ()> {
            self.0.discard(offset, len)
        }
        fn flush(&self) -> crate::BoxFut<'_, ()> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.flush()
        }
        fn image_info(&self) -> crate::ImageInfo {
            self.0.image_info()
        }
    }

    #[tokio::test]
    async fn test_leaf_flush_skipped_when_nothing_was_written_since() {
        let flushes = Arc::new(AtomicUsize::new(0));
        let drv = CountFlushes(MemDriver::new(1 << 20), Arc::clone(&flushes));
        let opts = CommonOptions {
            discard_unmap: true,
            ..CommonOptions::default()
        };
        let n = Node::new("n0".into(), false, opts, Box::new(drv), vec![]);
        let count = || flushes.load(Ordering::SeqCst);
        n.flush().await.unwrap();
        assert_eq!(count(), 0, "nothing written since open");
        n.write(0, IoBuf::new(4096), WriteFlags::default())
            .await
            .unwrap();
        n.flush().await.unwrap();
        n.flush().await.unwrap();
        assert_eq!(count(), 1);
        n.write_zeroes(0, 4096, ZeroFlags::default()).await.unwrap();
        n.flush().await.unwrap();
        assert_eq!(count(), 2);
        n.discard(0, 4096).await.unwrap();
        n.flush().await.unwrap();
        assert_eq!(count(), 3);
        // A write that fails still counts (qemu's rule): flush again.
        assert!(n
            .write(2 << 20, IoBuf::new(4096), WriteFlags::default())
            .await
            .is_err());
        n.flush().await.unwrap();
        assert_eq!(count(), 4);
    }

    /// What reached a [`Recorder`]: debug events and reads, in order.
    #[derive(Debug, Clone, PartialEq)]
    enum Seen {
        Ev(DebugEvent),
        Read(u64, usize),
    }

    /// MemDriver with 512-byte alignment that handles (records) every
    /// debug event, as blkdebug would, and records its reads.
    #[derive(Debug)]
    struct Recorder(MemDriver, Arc<std::sync::Mutex<Vec<Seen>>>);

    impl Recorder {
        fn push(&self, s: Seen) {
            self.1.lock().unwrap().push(s);
        }
    }

    impl BlockDriver for Recorder {
        fn driver_name(&self) -> &'static str {
            "recorder"
        }
        fn len(&self) -> u64 {
            self.0.len()
        }
        fn limits(&self) -> crate::Limits {
            crate::Limits {
                request_alignment: 512,
                ..crate::Limits::default()
            }
        }
        fn read(&self, offset: u64, buf: IoBuf) -> crate::BoxFut<'_, IoBuf> {
            self.push(Seen::Read(offset, buf.len()));
            self.0.read(offset, buf)
        }
        fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> crate::BoxFut<'_, IoBuf> {
            self.0.write(offset, buf, flags)
        }
        fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> crate::BoxFut<'_, ()> {
            self.0.write_zeroes(offset, len, flags)
        }
        fn flush(&self) -> crate::BoxFut<'_, ()> {
            self.0.flush()
        }
        fn debug_event(&self, ev: DebugEvent) -> bool {
            self.push(Seen::Ev(ev));
            true
        }
        fn image_info(&self) -> crate::ImageInfo {
            self.0.image_info()
        }
    }

    fn recorder() -> (NodeRef, Arc<std::sync::Mutex<Vec<Seen>>>) {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let drv = Recorder(MemDriver::new(1 << 20), Arc::clone(&seen));
        let n = Node::new(
            "n0".into(),
            false,
            CommonOptions::default(),
            Box::new(drv),
            vec![],
        );
        (n, seen)
    }

    fn take(seen: &std::sync::Mutex<Vec<Seen>>) -> Vec<Seen> {
        std::mem::take(&mut *seen.lock().unwrap())
    }

    #[tokio::test]
    async fn test_write_fires_qemu_pwritev_events() {
        use DebugEvent::*;
        let (n, seen) = recorder();
        n.write(0, IoBuf::from_slice(&[1; 1024]), WriteFlags::default())
            .await
            .unwrap();
        assert_eq!(take(&seen), [Seen::Ev(Pwritev), Seen::Ev(PwritevDone)]);
        n.write_zeroes(1024, 512, ZeroFlags::default())
            .await
            .unwrap();
        assert_eq!(take(&seen), [Seen::Ev(PwritevZero), Seen::Ev(PwritevDone)]);
    }

    #[tokio::test]
    async fn test_unaligned_write_reads_one_merged_padding_block() {
        use DebugEvent::*;
        let (n, seen) = recorder();
        // Head and tail in the same block: one read, both events around it.
        n.write(100, IoBuf::from_slice(&[2; 10]), WriteFlags::default())
            .await
            .unwrap();
        let want = [
            Seen::Ev(PwritevRmwHead),
            Seen::Ev(PwritevRmwTail),
            Seen::Read(0, 512),
            Seen::Ev(PwritevRmwAfterHead),
            Seen::Ev(PwritevRmwAfterTail),
            Seen::Ev(Pwritev),
            Seen::Ev(PwritevDone),
        ];
        assert_eq!(take(&seen), want);
    }

    #[tokio::test]
    async fn test_large_unaligned_write_reads_only_head_and_tail_blocks() {
        use DebugEvent::*;
        let (n, seen) = recorder();
        n.write(4096, IoBuf::from_slice(&[7; 8192]), WriteFlags::default())
            .await
            .unwrap();
        take(&seen);
        // 100..(100 + 8000): blocks 0 and 15 are partial, 1..14 covered.
        let data: Vec<u8> = (0..8000u32).map(|i| (i % 251) as u8 + 1).collect();
        n.write(4196, IoBuf::from_slice(&data), WriteFlags::default())
            .await
            .unwrap();
        let want = [
            Seen::Ev(PwritevRmwHead),
            Seen::Read(4096, 512),
            Seen::Ev(PwritevRmwAfterHead),
            Seen::Ev(PwritevRmwTail),
            Seen::Read(4096 + 15 * 512, 512),
            Seen::Ev(PwritevRmwAfterTail),
            Seen::Ev(Pwritev),
            Seen::Ev(PwritevDone),
        ];
        assert_eq!(take(&seen), want);
        let got = n.read(4096, IoBuf::new(8192)).await.unwrap();
        assert!(got[..100].iter().all(|&b| b == 7), "head kept");
        assert_eq!(&got[100..8100], &data[..]);
        assert!(got[8100..].iter().all(|&b| b == 7), "tail kept");
    }

    #[test]
    fn test_widen_unaligned_range_covers_blocks() {
        assert_eq!(widen(513, 10, 512), (512, 1024));
        assert_eq!(widen(0, 4096, 512), (0, 4096));
        assert_eq!(widen(4095, 2, 4096), (0, 8192));
    }

    #[test]
    fn test_is_all_zero_detects_single_byte() {
        let mut v = vec![0u8; 4099];
        assert!(is_all_zero(&v));
        v[4098] = 1;
        assert!(!is_all_zero(&v));
        v[4098] = 0;
        v[1] = 1;
        assert!(!is_all_zero(&v[1..]));
    }
}
