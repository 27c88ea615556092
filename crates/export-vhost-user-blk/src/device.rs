//! One front-end connection's device: the `VhostUserBackend` the rust-vmm
//! daemon drives. Vring worker threads pop descriptor chains; each request
//! then runs as a task on the export's runtime and completes the vring itself.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{self, ConfigInputs};
use crate::inflight::{InflightQueue, InflightRegion};
use crate::request::{execute, walk_chain, Chain, ChainError};
use crate::Shared;

pub(crate) type Mem = GuestMemoryMmap<()>;
pub(crate) type Gm = GuestMemoryAtomic<Mem>;
pub(crate) type Vring = VringRwLock<Gm>;

/// How long GET_VRING_BASE or a disconnect waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Requests of one queue that were popped but not yet completed.
#[derive(Debug, Default)]
pub(crate) struct Inflight {
    state: Mutex<InflightCount>,
    idle: Condvar,
}

#[derive(Debug, Default)]
struct InflightCount {
    running: usize,
    /// Threads in `wait_idle`: without them, `end` need not notify (a
    /// notify costs a futex call even when nobody waits).
    waiters: usize,
}

impl Inflight {
    fn begin(&self) {
        self.lock().running += 1;
    }

    fn end(&self) {
        let mut st = self.lock();
        st.running = st.running.saturating_sub(1);
        if st.running == 0 && st.waiters > 0 {
            self.idle.notify_all();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InflightCount> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait until nothing is in flight; false on timeout.
    pub(crate) fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        st.waiters += 1;
        while st.running > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .idle
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        st.waiters -= 1;
        st.running == 0
    }
}

type Popped = (Arc<Mem>, Vec<DescriptorChain<Arc<Mem>>>);

/// Pop the chains the driver has made available, with a memory map that
/// covers them: the map is taken after reading the avail index, and only
/// the chains published by then are popped. (A front-end adds a memory
/// region, which the backend crate applies to `gm` in place before acking,
/// before it publishes requests that use it.) With inflight tracking, each
/// chain is marked in flight before its request can start.
fn pop_available(vring: &Vring, gm: &Gm, track: &Mutex<Track>) -> io::Result<Popped> {
    let mut st = vring.get_mut();
    let mem = gm.memory().into_inner();
    // A kick read on the runtime (see `kick`) may race with GET_VRING_BASE
    // or SET_VRING_ENABLE: a stopped or disabled ring is not touched.
    if !st.get_queue().ready() || !st.is_enabled() {
        return Ok((mem, Vec::new()));
    }
    let q = st.get_queue_mut();
    let avail = q
        .avail_idx(&*gm.memory(), Ordering::Acquire)
        .map_err(queue_err)?;
    let n = (avail - std::num::Wrapping(q.next_avail())).0;
    let chains: Vec<_> = (0..n)
        .map_while(|_| q.pop_descriptor_chain(Arc::clone(&mem)))
        .collect();
    let mut t = track.lock().unwrap_or_else(PoisonError::into_inner);
    let Track { region, counter } = &mut *t;
    if let Some(r) = region {
        for c in &chains {
            r.mark(c.head_index(), *counter);
            *counter = counter.wrapping_add(1);
        }
    }
    Ok((mem, chains))
}

/// Inflight tracking state of one queue (see `inflight`).
#[derive(Debug, Default)]
pub(crate) struct Track {
    /// The queue's part of the front-end's inflight region, once set.
    region: Option<InflightQueue>,
    /// Age of the next chain popped.
    counter: u64,
}

/// Per-queue state, shared with the tasks on the queue's runtime.
pub(crate) struct QueueCtx {
    shared: Arc<Shared>,
    rt: tokio::runtime::Handle,
    inflight: Inflight,
    event_idx: AtomicBool,
    /// A pass over the avail ring is queued on the runtime.
    poll_scheduled: AtomicBool,
    /// A used-ring notification is queued on the runtime.
    signal_pending: AtomicBool,
    /// Inflight tracking; lock order: the vring, then this.
    track: Mutex<Track>,
    /// The ring (re)started with an inflight region: check it for chains to
    /// resubmit before popping new ones.
    recover_pending: AtomicBool,
    /// The ring, once the backend crate has handed it to `handle_event`.
    vring: Mutex<Option<Vring>>,
    /// Guest memory, shared with the device (set by `update_memory`).
    mem: Arc<Mutex<Option<Gm>>>,
    /// The task reading this ring's kick eventfd (see `kick`).
    kick_task: Mutex<Option<tokio::task::AbortHandle>>,
}

fn queue_err(e: virtio_queue::Error) -> io::Error {
    io::Error::other(format!("virtqueue: {e}"))
}

impl QueueCtx {
    /// A kick read by the queue's kick task: pop the ring here, on the
    /// runtime, or pass the kick to the backend crate through `proxy` while
    /// we have no ring or memory yet or the ring is not running.
    pub(crate) fn on_kick(self: &Arc<Self>, proxy: &std::fs::File) {
        let vring = self
            .vring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let gm = self
            .mem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (Some(vring), Some(gm)) = (vring, gm) else {
            crate::kick::poke(proxy);
            return;
        };
        // Counted before the ring's state is looked at, so that a
        // GET_VRING_BASE that stops the ring meanwhile waits for this pass.
        self.inflight.begin();
        let running = {
            let st = vring.get_ref();
            st.get_queue().ready() && st.is_enabled()
        };
        if running {
            if let Err(e) = self.process(&vring, &gm) {
                tracing::warn!(export = %self.shared.id, "vhost-user-blk: queue error: {e}");
            }
        } else {
            crate::kick::poke(proxy);
        }
        self.inflight.end();
    }

    fn stop_kicks(&self) {
        if let Some(t) = self
            .kick_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            t.abort();
        }
    }

    /// Pop every available chain and start its request. Runs on the
    /// queue's runtime, so requests start and complete without crossing
    /// threads.
    pub(crate) fn process(self: &Arc<Self>, vring: &Vring, gm: &Gm) -> io::Result<()> {
        if self.recover_pending.swap(false, Ordering::AcqRel) {
            self.recover(vring, gm)?;
        }
        loop {
            let event_idx = self.event_idx.load(Ordering::Acquire);
            if event_idx {
                vring.disable_notification().map_err(queue_err)?;
            }
            let (mem, chains) = pop_available(vring, gm, &self.track)?;
            for c in chains {
                let head = c.head_index();
                self.submit(vring, Arc::clone(&mem), head, Chain::from_descriptors(c));
            }
            if !event_idx || !vring.enable_notification().map_err(queue_err)? {
                return Ok(());
            }
        }
    }

    /// The ring started with an inflight region: position the ring after
    /// the chains a previous back-end left in flight and resubmit those,
    /// oldest first, before anything new is popped.
    fn recover(self: &Arc<Self>, vring: &Vring, gm: &Gm) -> io::Result<()> {
        let mem = gm.memory().into_inner();
        let (table, size, resubmit) = {
            let mut st = vring.get_mut();
            let mut t = self.track.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(region) = t.region.clone() else {
                return Ok(());
            };
            let q = st.get_queue_mut();
            let used = q.used_idx(&*mem, Ordering::Acquire).map_err(queue_err)?.0;
            let rec = region.recover(used);
            tracing::debug!(export = %self.shared.id, used, ?rec, "vhost-user-blk: ring starts with an inflight region");
            t.counter = rec.next_counter;
            if let Some(avail) = rec.last_avail {
                q.set_next_avail(avail);
                q.set_next_used(used);
            }
            (GuestAddress(q.desc_table()), q.size(), rec.resubmit)
        };
        // Chains the previous back-end completed after the front-end lost
        // it may never have been signalled: tell the driver to look.
        if let Err(e) = vring.signal_used_queue() {
            tracing::debug!("vhost-user-blk: signal failed: {e}");
        }
        if !resubmit.is_empty() {
            tracing::info!(export = %self.shared.id, "vhost-user-blk: resubmitting {} requests left in flight", resubmit.len());
        }
        for head in resubmit {
            let parsed = if head < size {
                walk_chain(&*mem, table, size, head)
                    .and_then(|d| Chain::from_descriptors(d.into_iter()))
            } else {
                Err(ChainError::Malformed)
            };
            self.submit(vring, Arc::clone(&mem), head, parsed);
        }
        Ok(())
    }

    fn submit(
        self: &Arc<Self>,
        vring: &Vring,
        mem: Arc<Mem>,
        head: u16,
        parsed: Result<Chain, ChainError>,
    ) {
        self.inflight.begin();
        let parsed = match parsed {
            Ok(c) => c,
            Err(e) => {
                // No usable status byte: return the buffer with nothing written.
                tracing::warn!(export = %self.shared.id, "bad virtio-blk descriptor chain: {e:?}");
                self.complete(vring, head, 0);
                self.inflight.end();
                return;
            }
        };
        let q = Arc::clone(self);
        let vring = vring.clone();
        self.rt.spawn(async move {
            let writeback = q.shared.writeback.load(Ordering::Relaxed);
            let (status, n) = execute(&q.shared.ctx, &mem, &parsed, writeback).await;
            let used = match parsed.status_addr() {
                Some(a) if mem.write_obj(status, a).is_ok() => n.saturating_add(1),
                _ => 0,
            };
            q.complete(&vring, head, used);
            q.inflight.end();
        });
    }

    /// Put `head` on the used ring, keeping the inflight region's order:
    /// remember the head, update the ring, then clear the mark.
    fn add_used(&self, vring: &Vring, head: u16, len: u32) -> Result<(), virtio_queue::Error> {
        let mut st = vring.get_mut();
        let t = self.track.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(r) = &t.region else {
            return st.add_used(head, len);
        };
        r.pre_put(head);
        st.add_used(head, len)?;
        r.post_put(head, st.get_queue().next_used());
        Ok(())
    }

    /// Put a chain on the used ring; the driver is notified once for all
    /// the requests that complete in the same batch.
    fn complete(self: &Arc<Self>, vring: &Vring, head: u16, len: u32) {
        if let Err(e) = self.add_used(vring, head, len) {
            tracing::warn!(export = %self.shared.id, "vhost-user-blk: cannot complete request: {e}");
            return;
        }
        if self.signal_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inflight.begin();
        let q = Arc::clone(self);
        let vring = vring.clone();
        // Spawned, so that it runs after the other request tasks the same
        // batch of io_uring completions woke, and signals once for them.
        self.rt.spawn(async move {
            // Cleared before signalling: a completion after this point
            // queues its own notification.
            q.signal_pending.store(false, Ordering::Release);
            if vring.needs_notification().unwrap_or(true) {
                if let Err(e) = vring.signal_used_queue() {
                    tracing::debug!("vhost-user-blk: signal failed: {e}");
                }
            }
            q.inflight.end();
        });
    }
}

/// The per-connection device state.
pub(crate) struct BlkDevice {
    shared: Arc<Shared>,
    mem: Arc<Mutex<Option<Gm>>>,
    queues: Vec<Arc<QueueCtx>>,
}

impl std::fmt::Debug for BlkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice")
            .field("export", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl BlkDevice {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let mem = Arc::new(Mutex::new(None));
        let queues = (0..usize::from(shared.num_queues))
            .map(|i| {
                Arc::new(QueueCtx {
                    shared: Arc::clone(&shared),
                    rt: shared.rts[i % shared.rts.len()].clone(),
                    inflight: Inflight::default(),
                    event_idx: AtomicBool::new(false),
                    poll_scheduled: AtomicBool::new(false),
                    signal_pending: AtomicBool::new(false),
                    track: Mutex::new(Track::default()),
                    recover_pending: AtomicBool::new(false),
                    vring: Mutex::new(None),
                    mem: Arc::clone(&mem),
                    kick_task: Mutex::new(None),
                })
            })
            .collect();
        BlkDevice {
            shared,
            mem,
            queues,
        }
    }

    /// SET_VRING_KICK with a descriptor: read `kick` on queue `index`'s
    /// runtime from now on, and forward what cannot be served there to a
    /// proxy eventfd, which is returned for the backend crate to watch
    /// instead (see `kick`). On error nothing watches `kick`, and the caller
    /// gives the backend crate the front-end's eventfd as before.
    pub(crate) fn serve_kicks(&self, index: usize, kick: OwnedFd) -> io::Result<OwnedFd> {
        let q = self
            .queues
            .get(index)
            .ok_or_else(|| io::Error::other(format!("no queue {index}")))?;
        q.stop_kicks();
        let (theirs, ours) = crate::kick::proxy()?;
        let watch = {
            // Registered with the reactor of the runtime that will read it.
            let _rt = q.rt.enter();
            qsd_rt::EventFdWatch::new(kick)?
        };
        let task = q.rt.spawn(crate::kick::serve(Arc::clone(q), watch, ours));
        *q.kick_task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
        Ok(theirs)
    }

    /// The connection ended: stop reading its kick eventfds.
    pub(crate) fn stop_kicks(&self) {
        for q in &self.queues {
            q.stop_kicks();
        }
    }

    /// Wait for every queue's requests; false if some did not finish in time.
    pub(crate) fn drain(&self) -> bool {
        self.queues
            .iter()
            .all(|q| q.inflight.wait_idle(DRAIN_TIMEOUT))
    }

    /// SET_INFLIGHT_FD: track the queues the region covers.
    pub(crate) fn set_inflight(&self, region: &Arc<InflightRegion>) {
        for (i, q) in self.queues.iter().enumerate() {
            let mut t = q.track.lock().unwrap_or_else(PoisonError::into_inner);
            t.region = u16::try_from(i).ok().and_then(|i| region.queue(i));
            t.counter = 0;
        }
    }

    /// SET_VRING_KICK for queue `index`: the ring (re)starts. True when it
    /// tracks inflight chains: the first pass then resubmits the ones a
    /// previous back-end left, and the caller kicks the ring so that pass
    /// happens even if the driver is only waiting for those.
    pub(crate) fn ring_starting(&self, index: usize) -> bool {
        let Some(q) = self.queues.get(index) else {
            return false;
        };
        let tracked = q
            .track
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .region
            .is_some();
        q.recover_pending.store(tracked, Ordering::Release);
        tracked
    }

    /// A kick: queue one pass over the ring on the queue's runtime.
    fn kick(&self, q: &Arc<QueueCtx>, vring: &Vring) {
        let Some(gm) = self
            .mem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return;
        };
        {
            let mut known = q.vring.lock().unwrap_or_else(PoisonError::into_inner);
            if known.is_none() {
                *known = Some(vring.clone());
            }
        }
        if q.poll_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        q.inflight.begin();
        let q2 = Arc::clone(q);
        let vring = vring.clone();
        q.rt.spawn(async move {
            q2.poll_scheduled.store(false, Ordering::Release);
            if let Err(e) = q2.process(&vring, &gm) {
                tracing::warn!(export = %q2.shared.id, "vhost-user-blk: queue error: {e}");
            }
            q2.inflight.end();
        });
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        config::MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        config::features(self.shared.ctx.writable)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // INFLIGHT_SHMFD and BACKEND_REQ are handled by the relay in front
        // of the backend crate (relay.rs), which never sees those messages.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, enabled: bool) {
        for q in &self.queues {
            q.event_idx.store(enabled, Ordering::Release);
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = config::config_space(&ConfigInputs {
            capacity_bytes: self.shared.ctx.backend.len(),
            blk_size: self.shared.ctx.blk_size,
            num_queues: self.shared.num_queues,
            writeback: self.shared.writeback.load(Ordering::Relaxed),
        });
        config::config_window(&space, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the write-cache byte is writable (VIRTIO_BLK_F_CONFIG_WCE).
        if offset as usize == config::WCE_OFFSET && buf.len() == 1 {
            self.shared.writeback.store(buf[0] != 0, Ordering::Relaxed);
            return Ok(());
        }
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn update_memory(&self, mem: Gm) -> io::Result<()> {
        *self.mem.lock().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue, so queues are popped in parallel.
        (0..self.shared.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE must report a ring with every popped request completed.
        match self.queues.get(queue_index as usize) {
            Some(q) if !q.inflight.wait_idle(DRAIN_TIMEOUT) => {
                Err(io::Error::other("requests still in flight after 30 s"))
            }
            _ => Ok(()),
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        // The backend crate numbers events per worker thread: event `i` of
        // thread `t` is the i-th queue of that thread's mask, and `vrings`
        // holds only that thread's rings.
        let local = usize::from(device_event);
        let global = self
            .queues_per_thread()
            .get(thread_id)
            .and_then(|&mask| nth_set_bit(mask, local));
        match (vrings.get(local), global.and_then(|g| self.queues.get(g))) {
            (Some(v), Some(q)) => {
                self.kick(q, v);
                Ok(())
            }
            _ => Err(io::Error::other(format!(
                "unknown device event {device_event}"
            ))),
        }
    }
}

/// Position of the `n`-th set bit of `mask` (0-based).
fn nth_set_bit(mask: u64, n: usize) -> Option<usize> {
    (0..64).filter(|b| mask >> b & 1 == 1).nth(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::ReqCtx;
    use qsd_block::{BlockBackend, Graph, Perm};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    fn null_backend(rt: &tokio::runtime::Runtime) -> (Graph, BlockBackend) {
        let mut g = Graph::new();
        qsd_drivers::register_all(&mut g);
        let opts = serde_json::json!({"driver": "null-co", "node-name": "n",
                                      "size": 1048576, "read-zeroes": true});
        let node = rt
            .block_on(g.open(opts.as_object().cloned().unwrap(), qsd_qapi::InputMode::Qmp))
            .unwrap();
        let blk = BlockBackend::new(node, "export 'e'", Perm::ALL, Perm::ALL).unwrap();
        (g, blk)
    }

    #[test]
    fn test_nth_set_bit_maps_thread_local_event_to_queue() {
        assert_eq!(nth_set_bit(0b1, 0), Some(0));
        assert_eq!(nth_set_bit(0b10, 0), Some(1));
        assert_eq!(nth_set_bit(0b1010, 1), Some(3));
        assert_eq!(nth_set_bit(0b1010, 2), None);
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn hdr(mem: &Mem, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// Used ring entries: id -> len.
    fn used(mem: &Mem, used_addr: GuestAddress) -> std::collections::HashMap<u32, u32> {
        let idx: u16 = mem.read_obj(used_addr.unchecked_add(2)).unwrap();
        (0..u64::from(idx))
            .map(|i| {
                let e = used_addr.unchecked_add(4 + 8 * i);
                let id: u32 = mem.read_obj(e).unwrap();
                let len: u32 = mem.read_obj(e.unchecked_add(4)).unwrap();
                (id, len)
            })
            .collect()
    }

    fn device(rt: &tokio::runtime::Runtime, backend: BlockBackend) -> BlkDevice {
        let shared = Arc::new(Shared {
            id: "e".into(),
            ctx: ReqCtx {
                backend,
                writable: true,
                blk_size: 512,
                serial: b"vhost_user_blk".to_vec(),
                pool: Default::default(),
            },
            num_queues: 1,
            rts: vec![rt.handle().clone()],
            writeback: AtomicBool::new(true),
        });
        BlkDevice::new(shared)
    }

    /// A runtime with one worker thread, as an export's I/O thread (with
    /// the reactor: kick watches register there).
    fn one_worker_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A vring over `mq`'s rings, ready to pop.
    fn vring(gm: &Gm, mq: &MockSplitQueue<'_, Mem>) -> Vring {
        let vring = Vring::new(gm.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring
            .set_queue_info(mq.desc_table_addr().0, mq.avail_addr().0, mq.used_addr().0)
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    fn file_backend(
        rt: &tokio::runtime::Runtime,
        path: &std::path::Path,
        direct: bool,
    ) -> (Graph, BlockBackend) {
        let mut g = Graph::new();
        qsd_drivers::register_all(&mut g);
        let opts = serde_json::json!({"driver": "file", "node-name": "f",
                                      "filename": path, "cache": {"direct": direct}});
        let node = rt
            .block_on(g.open(opts.as_object().cloned().unwrap(), qsd_qapi::InputMode::Qmp))
            .unwrap();
        let blk = BlockBackend::new(node, "export 'e'", Perm::ALL, Perm::ALL).unwrap();
        (g, blk)
    }

    /// Data of OUT then IN requests over a file: a contiguous buffer (zero
    /// copy), one split into two distant segments (copied), one at an odd
    /// address (zero copy; bounced by the file driver under O_DIRECT).
    fn file_roundtrip(direct: bool) {
        let rt = one_worker_runtime();
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("img");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(1 << 20))
            .unwrap();
        let (_g, backend) = file_backend(&rt, &path, direct);
        let dev = device(&rt, backend);
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let gm = GuestMemoryAtomic::new(mem.clone());
        let vring = vring(&gm, &mq);
        dev.update_memory(gm.clone()).unwrap();
        let pattern = |seed: u8, n: usize| -> Vec<u8> {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
                .collect()
        };
        let (a, b, c) = (pattern(3, 4096), pattern(5, 1024), pattern(7, 4096));
        mem.write_slice(&a, GuestAddress(0x2_0000)).unwrap();
        mem.write_slice(&b[..512], GuestAddress(0x3_0000)).unwrap();
        mem.write_slice(&b[512..], GuestAddress(0x3_1000)).unwrap();
        mem.write_slice(&c, GuestAddress(0x4_0001)).unwrap();
        for (i, (kind, sector)) in [(1, 0), (1, 16), (1, 32), (0, 0), (0, 16), (0, 32)]
            .into_iter()
            .enumerate()
        {
            hdr(&mem, 0x1_0000 + 0x100 * i as u64, kind, sector);
        }
        let (r, w) = (NEXT, WRITE | NEXT);
        let writes = [
            d(0x1_0000, 16, r, 1),
            d(0x2_0000, 4096, r, 2),
            d(0x8_0000, 1, WRITE, 0),
            d(0x1_0100, 16, r, 4),
            d(0x3_0000, 512, r, 5),
            d(0x3_1000, 512, r, 6),
            d(0x8_0010, 1, WRITE, 0),
            d(0x1_0200, 16, r, 8),
            d(0x4_0001, 4096, r, 9),
            d(0x8_0020, 1, WRITE, 0),
        ];
        mq.add_desc_chains(&writes, 0).unwrap();
        dev.queues[0].process(&vring, &gm).unwrap();
        assert!(dev.drain());
        let status = |a: u64| mem.read_obj::<u8>(GuestAddress(a)).unwrap();
        assert_eq!(
            [status(0x8_0000), status(0x8_0010), status(0x8_0020)],
            [0; 3]
        );
        let disk = std::fs::read(&path).unwrap();
        assert_eq!(&disk[..4096], &a[..]);
        assert_eq!(&disk[8192..9216], &b[..]);
        assert_eq!(&disk[16384..20480], &c[..]);
        let reads = [
            d(0x1_0300, 16, r, 1),
            d(0x5_0000, 4096, w, 2),
            d(0x8_0030, 1, WRITE, 0),
            d(0x1_0400, 16, r, 4),
            d(0x6_0000, 512, w, 5),
            d(0x6_1000, 512, w, 6),
            d(0x8_0040, 1, WRITE, 0),
            d(0x1_0500, 16, r, 8),
            d(0x7_0003, 4096, w, 9),
            d(0x8_0050, 1, WRITE, 0),
        ];
        mq.add_desc_chains(&reads, 0).unwrap();
        dev.queues[0].process(&vring, &gm).unwrap();
        assert!(dev.drain());
        assert_eq!(
            [status(0x8_0030), status(0x8_0040), status(0x8_0050)],
            [0; 3]
        );
        let read = |at: u64, n: usize| {
            let mut v = vec![0u8; n];
            mem.read_slice(&mut v, GuestAddress(at)).unwrap();
            v
        };
        assert_eq!(read(0x5_0000, 4096), a);
        assert_eq!([read(0x6_0000, 512), read(0x6_1000, 512)].concat(), b);
        assert_eq!(read(0x7_0003, 4096), c);
        let u = used(&mem, mq.used_addr());
        assert_eq!((u[&0], u[&3], u[&7]), (4097, 1025, 4097));
    }

    #[test]
    fn test_file_requests_zero_copy_and_copied_data_roundtrips() {
        file_roundtrip(false);
    }

    #[test]
    fn test_file_direct_requests_with_odd_guest_addresses_roundtrip() {
        file_roundtrip(true);
    }

    #[test]
    fn test_serve_kicks_refuses_what_it_cannot_watch() {
        let rt = one_worker_runtime();
        let (_g, backend) = null_backend(&rt);
        let dev = device(&rt, backend);
        let efd = || {
            OwnedFd::from(
                nix::sys::eventfd::EventFd::from_value_and_flags(
                    0,
                    nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
                )
                .unwrap(),
            )
        };
        // A queue that does not exist, and a descriptor epoll cannot watch:
        // the relay then forwards the front-end's own eventfd.
        assert!(dev.serve_kicks(5, efd()).is_err());
        let file = OwnedFd::from(tempfile::tempfile().unwrap());
        assert!(dev.serve_kicks(0, file).is_err());
        // An eventfd is watched, and a proxy comes back for the backend crate.
        assert!(dev.serve_kicks(0, efd()).is_ok());
        dev.stop_kicks();
    }

    #[test]
    fn test_process_queue_bad_chains_get_error_status_not_panic() {
        let rt = one_worker_runtime();
        let (_g, backend) = null_backend(&rt);
        let dev = device(&rt, backend);
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        // Requests' buffers live from 0x10000 on.
        hdr(&mem, 0x1_0000, 0, 0); // IN, sector 0
        hdr(&mem, 0x1_0100, 99, 0); // unknown type
        hdr(&mem, 0x1_0200, 8, 0); // GET_ID
        hdr(&mem, 0x1_0300, 0, 1 << 40); // IN beyond the end
        let chains = [
            // 0: valid read of 512 bytes
            d(0x1_0000, 16, NEXT, 1),
            d(0x2_0000, 512, WRITE | NEXT, 2),
            d(0x3_0000, 1, WRITE, 0),
            // 3: data buffer outside guest memory
            d(0x1_0000, 16, NEXT, 4),
            d(0xffff_0000_0000, 512, WRITE | NEXT, 5),
            d(0x3_0010, 1, WRITE, 0),
            // 6: no status byte at all
            d(0x1_0000, 16, 0, 0),
            // 7: unknown request type
            d(0x1_0100, 16, NEXT, 8),
            d(0x3_0020, 1, WRITE, 0),
            // 9: GET_ID
            d(0x1_0200, 16, NEXT, 10),
            d(0x4_0000, 20, WRITE | NEXT, 11),
            d(0x3_0030, 1, WRITE, 0),
            // 12: read beyond the end of the device
            d(0x1_0300, 16, NEXT, 13),
            d(0x2_0000, 512, WRITE | NEXT, 14),
            d(0x3_0040, 1, WRITE, 0),
        ];
        mq.add_desc_chains(&chains, 0).unwrap();
        let gm = GuestMemoryAtomic::new(mem.clone());
        let vring = vring(&gm, &mq);
        dev.update_memory(gm.clone()).unwrap();
        dev.queues[0].process(&vring, &gm).unwrap();
        assert!(dev.drain());
        let u = used(&mem, mq.used_addr());
        let status = |a: u64| mem.read_obj::<u8>(GuestAddress(a)).unwrap();
        assert_eq!(u[&0], 513);
        assert_eq!(status(0x3_0000), 0);
        assert_eq!(u[&3], 1);
        assert_eq!(status(0x3_0010), 1, "IOERR for an unmapped buffer");
        assert_eq!(u[&6], 0, "no status byte: nothing written");
        assert_eq!(status(0x3_0020), 2, "UNSUPP");
        assert_eq!(u[&9], 16);
        let mut id = [0u8; 15];
        mem.read_slice(&mut id, GuestAddress(0x4_0000)).unwrap();
        assert_eq!(&id, b"vhost_user_blk\0");
        assert_eq!(status(0x3_0040), 1, "IOERR beyond the end");
        assert_eq!(u.len(), 6);
    }
}
