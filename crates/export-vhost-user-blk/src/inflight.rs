//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) for split
//! virtqueues. The back-end allocates a shared-memory region
//! (GET_INFLIGHT_FD); the front-end keeps it and hands it to every later
//! back-end (SET_INFLIGHT_FD). The back-end marks each descriptor chain it
//! pops and clears the mark once the chain is on the used ring, so a
//! back-end started after a crash knows which requests never completed and
//! resubmits them, oldest first.
//!
//! Layout of one queue's part, as the vhost-user specification gives it
//! (all little-endian, the back-end's native order on the hosts we run on):
//!
//! | offset | field |
//! | --- | --- |
//! | 0 | `u64 features` |
//! | 8 | `u16 version` (0: fresh region) |
//! | 10 | `u16 desc_num` |
//! | 12 | `u16 last_batch_head` |
//! | 14 | `u16 used_idx` |
//! | 16 + 16 i | descriptor `i`: `u8 inflight`, 5 padding bytes, `u16 next`, `u64 counter` |
//!
//! Each queue's part is `16 * queue_size + 2` bytes rounded up to 64
//! (libvhost-user's size, so regions are interchangeable with it).

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

/// Version written into a region the back-end initialises.
const INFLIGHT_VERSION: u16 = 1;
const ALIGN: u64 = 64;
const HDR: u64 = 16;
const DESC: u64 = 16;
const OFF_VERSION: u64 = 8;
const OFF_DESC_NUM: u64 = 10;
const OFF_LAST_BATCH_HEAD: u64 = 12;
const OFF_USED_IDX: u64 = 14;
const OFF_COUNTER: u64 = 8;
/// Largest queue the region may describe (the device's largest queue).
pub(crate) const MAX_QUEUE_SIZE: u16 = crate::config::MAX_QUEUE_SIZE as u16;

/// Bytes of one queue's part of the region.
pub(crate) fn queue_region_len(queue_size: u16) -> u64 {
    (DESC * u64::from(queue_size) + 2).div_ceil(ALIGN) * ALIGN
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

fn check_geometry(num_queues: u16, queue_size: u16) -> io::Result<u64> {
    if num_queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(invalid("inflight region: bad queue count or size"));
    }
    Ok(queue_region_len(queue_size) * u64::from(num_queues))
}

/// A zero-filled anonymous shared-memory file for `num_queues` queues of
/// `queue_size` descriptors (GET_INFLIGHT_FD), and its length. It is an
/// unlinked tmpfs file (`O_TMPFILE` in /dev/shm), which the front-end maps
/// like a memfd.
pub(crate) fn create_region_file(num_queues: u16, queue_size: u16) -> io::Result<(File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let len = check_geometry(num_queues, queue_size)?;
    let open = |dir: &std::path::Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .open(dir)
    };
    let f = open(std::path::Path::new("/dev/shm")).or_else(|_| open(&std::env::temp_dir()))?;
    f.set_len(len)?;
    Ok((f, len))
}

/// A mapped inflight region (SET_INFLIGHT_FD).
#[derive(Debug)]
pub(crate) struct InflightRegion {
    mem: GuestRegionMmap<()>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// Map `size` bytes of `file` from `offset` for `num_queues` queues of
    /// `queue_size` descriptors.
    pub(crate) fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Arc<Self>> {
        let need = check_geometry(num_queues, queue_size)?;
        if size < need || size > need + ALIGN * 1024 {
            return Err(invalid("inflight region: size does not match its queues"));
        }
        // Pages of a shared file beyond its end fault with SIGBUS when
        // touched: refuse a region its file does not cover.
        let meta = file.metadata()?;
        if meta.is_file() && offset.checked_add(size).is_none_or(|end| end > meta.len()) {
            return Err(invalid("inflight region: beyond the end of its file"));
        }
        let len = usize::try_from(size).map_err(|_| invalid("inflight region too large"))?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), len)
            .map_err(|e| io::Error::other(format!("cannot map the inflight region: {e}")))?;
        let mem = GuestRegionMmap::new(map, GuestAddress(0))
            .ok_or_else(|| invalid("inflight region: bad mapping"))?;
        let r = Arc::new(InflightRegion {
            mem,
            num_queues,
            queue_size,
        });
        for q in 0..num_queues {
            if let Some(q) = r.queue(q) {
                q.store(OFF_DESC_NUM, queue_size);
            }
        }
        Ok(r)
    }

    /// The part of queue `index`, if the region covers it.
    pub(crate) fn queue(self: &Arc<Self>, index: u16) -> Option<InflightQueue> {
        (index < self.num_queues).then(|| InflightQueue {
            region: Arc::clone(self),
            base: queue_region_len(self.queue_size) * u64::from(index),
            desc_num: self.queue_size,
        })
    }
}

/// What a queue's region says when its ring starts.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovery {
    /// The ring position to pop from next (`used_idx` + chains in flight);
    /// `None` for a fresh region (keep SET_VRING_BASE's).
    pub last_avail: Option<u16>,
    /// Heads of the chains to resubmit, oldest first.
    pub resubmit: Vec<u16>,
    /// The counter for the next chain popped.
    pub next_counter: u64,
}

/// One queue's part of the inflight region.
#[derive(Debug, Clone)]
pub(crate) struct InflightQueue {
    region: Arc<InflightRegion>,
    base: u64,
    desc_num: u16,
}

impl InflightQueue {
    fn addr(&self, off: u64) -> MemoryRegionAddress {
        MemoryRegionAddress(self.base + off)
    }

    fn desc(&self, head: u16, off: u64) -> MemoryRegionAddress {
        self.addr(HDR + DESC * u64::from(head) + off)
    }

    // Offsets are in range by construction (`map` checked the size and
    // heads are checked against `desc_num`), so accesses cannot fail.
    fn store<T: vm_memory::AtomicAccess>(&self, off: u64, v: T) {
        let _ = self.region.mem.store(v, self.addr(off), Ordering::Release);
    }

    fn load<T: vm_memory::AtomicAccess + Default>(&self, off: u64) -> T {
        self.region
            .mem
            .load(self.addr(off), Ordering::Acquire)
            .unwrap_or_default()
    }

    /// Mark chain `head` in flight (when popped), `counter` giving its age.
    pub(crate) fn mark(&self, head: u16, counter: u64) {
        if head >= self.desc_num {
            return;
        }
        let _ = self
            .region
            .mem
            .store(counter, self.desc(head, OFF_COUNTER), Ordering::Relaxed);
        let _ = self
            .region
            .mem
            .store(1u8, self.desc(head, 0), Ordering::Release);
    }

    /// Before `head` goes on the used ring: remember it, so a crash between
    /// the used-ring update and [`post_put`](Self::post_put) is recognised.
    pub(crate) fn pre_put(&self, head: u16) {
        if head < self.desc_num {
            self.store(OFF_LAST_BATCH_HEAD, head);
        }
    }

    /// After `head` is on the used ring and the ring's index is `used_idx`.
    pub(crate) fn post_put(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            let _ = self
                .region
                .mem
                .store(0u8, self.desc(head, 0), Ordering::Release);
        }
        self.store(OFF_USED_IDX, used_idx);
    }

    /// The ring starts with the used index `ring_used_idx` read from the
    /// guest's used ring: initialise a fresh region, or find the chains a
    /// previous back-end left in flight.
    pub(crate) fn recover(&self, ring_used_idx: u16) -> Recovery {
        if self.load::<u16>(OFF_VERSION) == 0 {
            self.store(OFF_VERSION, INFLIGHT_VERSION);
            self.store(OFF_USED_IDX, ring_used_idx);
            return Recovery::default();
        }
        if self.load::<u16>(OFF_USED_IDX) != ring_used_idx {
            // The back-end died after putting `last_batch_head` on the used
            // ring but before clearing its mark: it is complete.
            let last: u16 = self.load(OFF_LAST_BATCH_HEAD);
            if last < self.desc_num {
                let _ = self
                    .region
                    .mem
                    .store(0u8, self.desc(last, 0), Ordering::Release);
            }
            self.store(OFF_USED_IDX, ring_used_idx);
        }
        let mut inflight: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| {
                self.region
                    .mem
                    .load::<u8>(self.desc(h, 0), Ordering::Acquire)
                    .unwrap_or(0)
                    == 1
            })
            .map(|h| {
                let c = self
                    .region
                    .mem
                    .load::<u64>(self.desc(h, OFF_COUNTER), Ordering::Acquire)
                    .unwrap_or(0);
                (c, h)
            })
            .collect();
        inflight.sort_unstable();
        let next_counter = inflight.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        let inuse = inflight.len() as u16;
        Recovery {
            last_avail: Some(ring_used_idx.wrapping_add(inuse)),
            resubmit: inflight.into_iter().map(|(_, h)| h).collect(),
            next_counter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(num_queues: u16, queue_size: u16) -> (File, Arc<InflightRegion>) {
        let (f, len) = create_region_file(num_queues, queue_size).unwrap();
        let r =
            InflightRegion::map(f.try_clone().unwrap(), 0, len, num_queues, queue_size).unwrap();
        (f, r)
    }

    /// A second mapping of the same file: what the next back-end sees.
    fn remap(f: &File, num_queues: u16, queue_size: u16) -> Arc<InflightRegion> {
        let len = f.metadata().unwrap().len();
        InflightRegion::map(f.try_clone().unwrap(), 0, len, num_queues, queue_size).unwrap()
    }

    #[test]
    fn test_queue_region_len_matches_libvhost_user() {
        assert_eq!(queue_region_len(128), 2112);
        assert_eq!(queue_region_len(256), 4160);
        assert_eq!(queue_region_len(1), 64);
        assert!(queue_region_len(3) >= HDR + 3 * DESC);
    }

    #[test]
    fn test_create_region_file_bad_geometry_is_refused() {
        assert!(create_region_file(0, 128).is_err());
        assert!(create_region_file(1, 0).is_err());
        assert!(create_region_file(1, 2048).is_err());
    }

    #[test]
    fn test_map_region_too_small_is_refused() {
        let (f, len) = create_region_file(1, 128).unwrap();
        assert!(InflightRegion::map(f, 0, len, 2, 128).is_err());
    }

    #[test]
    fn test_map_region_beyond_end_of_file_is_refused() {
        // Found by the vhost_inflight fuzz target: mapping used to succeed
        // and the first store into the region died of SIGBUS.
        let (f, len) = create_region_file(1, 48).unwrap();
        f.set_len(4096).unwrap();
        assert!(InflightRegion::map(f.try_clone().unwrap(), 4096, len, 1, 48).is_err());
        assert!(InflightRegion::map(f.try_clone().unwrap(), 0, 4096 + 64, 1, 48).is_err());
        assert!(InflightRegion::map(f, u64::MAX - 64, len, 1, 48).is_err());
    }

    #[test]
    fn test_recover_fresh_region_initialises_and_keeps_base() {
        let (_f, r) = region(2, 16);
        let q = r.queue(1).unwrap();
        assert_eq!(q.recover(5), Recovery::default());
        assert_eq!(q.load::<u16>(OFF_VERSION), INFLIGHT_VERSION);
        assert_eq!(q.load::<u16>(OFF_DESC_NUM), 16);
        assert!(r.queue(2).is_none());
    }

    #[test]
    fn test_recover_after_crash_resubmits_oldest_first() {
        let (f, r) = region(1, 16);
        let q = r.queue(0).unwrap();
        q.recover(0);
        // Popped 7, 3, 9 (in that order); 3 completed.
        q.mark(7, 0);
        q.mark(3, 1);
        q.mark(9, 2);
        q.pre_put(3);
        q.post_put(3, 1);
        drop(r);
        let q2 = remap(&f, 1, 16).queue(0).unwrap();
        let rec = q2.recover(1);
        assert_eq!(rec.resubmit, vec![7, 9]);
        assert_eq!(rec.last_avail, Some(3));
        assert_eq!(rec.next_counter, 3);
    }

    #[test]
    fn test_recover_crash_between_used_ring_and_clear_drops_last_batch_head() {
        let (f, r) = region(1, 16);
        let q = r.queue(0).unwrap();
        q.recover(10);
        q.mark(4, 20);
        q.mark(5, 21);
        // 5 went on the used ring (index 10 -> 11), then the back-end died.
        q.pre_put(5);
        drop(r);
        let q2 = remap(&f, 1, 16).queue(0).unwrap();
        let rec = q2.recover(11);
        assert_eq!(rec.resubmit, vec![4]);
        assert_eq!(rec.last_avail, Some(12));
        assert_eq!(q2.load::<u16>(OFF_USED_IDX), 11);
    }

    #[test]
    fn test_recover_clean_region_has_nothing_to_resubmit() {
        let (_f, r) = region(1, 8);
        let q = r.queue(0).unwrap();
        q.recover(65535);
        q.mark(2, 0);
        q.pre_put(2);
        q.post_put(2, 0);
        let rec = q.recover(0);
        assert!(rec.resubmit.is_empty());
        assert_eq!(rec.last_avail, Some(0));
    }

    #[test]
    fn test_mark_head_beyond_desc_num_is_ignored() {
        let (_f, r) = region(1, 8);
        let q = r.queue(0).unwrap();
        q.recover(0);
        q.mark(8, 0);
        q.pre_put(100);
        assert!(q.recover(0).resubmit.is_empty());
        assert!(q.load::<u16>(OFF_LAST_BATCH_HEAD) < 8);
    }
}
