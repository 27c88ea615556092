//! Zero-copy request buffers: an `IoBuf` straight over guest memory, so
//! io_uring reads into and writes from the guest's pages.
//!
//! A request's data segments qualify when they cover one contiguous range
//! of host virtual memory (one segment, or adjacent ones whose mappings
//! touch). Translation goes through vm-memory's bounds-checked
//! `get_slices`: an address outside the memory table simply does not
//! qualify, and the copying path then answers IOERR.
//!
//! Safety argument for the external buffer (the crate's guest-memory glue):
//! - *Mapped for the whole I/O*: the buffer's owner holds an `Arc` of the
//!   memory map the chain was popped with. vhost-user-backend applies
//!   SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG by building a new map and
//!   swapping it in; regions are `Arc`s and are unmapped only when the last
//!   map holding them is dropped, so ours stay mapped. io_uring operations
//!   own their `IoBuf` until the completion arrives (also when the future
//!   that started them is dropped), so the owner outlives every kernel
//!   access.
//! - *Exclusive use*: the virtio contract gives the device the request's
//!   buffers from pop to used-ring update; nothing else in this process
//!   touches them meanwhile (the status byte is outside the range). The
//!   request waits for the owner to be dropped (`Pinned::released`) before
//!   it completes, so no I/O can touch the pages after the guest gets them
//!   back. A guest that changes its own buffers during the request only
//!   gets its own data garbled, as with any DMA.
//! - No dirty log: the memory is `GuestMemoryMmap<()>` (no bitmap), and the
//!   device offers no LOG_ALL, so writes need no dirty-page marking.
#![allow(unsafe_code)]

use std::ptr::NonNull;
use std::sync::Arc;

use qsd_rt::IoBuf;
use tokio::sync::oneshot;
use vm_memory::{Address, GuestMemoryBackend};

use crate::device::Mem;
use crate::request::Seg;

/// Smallest transfer worth mapping: below this, copying costs less than
/// the bookkeeping.
pub(crate) const MIN_ZERO_COPY: u64 = 512;

/// The owner of an external guest buffer: keeps the memory map alive, and
/// its drop (with the sender's) tells the request the buffer is released.
struct GuestPin {
    _mem: Arc<Mem>,
    _released: oneshot::Sender<()>,
}

/// The host range that `len` bytes of `segs`, after the first `skip`,
/// occupy, if it is one contiguous range of mapped memory.
pub(crate) fn contiguous(
    mem: &Mem,
    segs: &[Seg],
    mut skip: u64,
    len: u64,
) -> Option<(NonNull<u8>, usize)> {
    let total = usize::try_from(len).ok().filter(|&n| n > 0)?;
    let mut start: Option<NonNull<u8>> = None;
    let mut next = 0usize;
    let mut left = total;
    for s in segs {
        if left == 0 {
            break;
        }
        let seg_len = u64::from(s.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = usize::try_from(seg_len - skip).ok()?.min(left);
        let addr = s.addr.checked_add(skip)?;
        skip = 0;
        for slice in GuestMemoryBackend::get_slices(mem, addr, n) {
            let slice = slice.ok()?;
            let p = slice.ptr_guard_mut().as_ptr();
            match start {
                None => start = NonNull::new(p),
                Some(_) if p as usize != next => return None,
                Some(_) => {}
            }
            next = (p as usize).checked_add(slice.len())?;
        }
        left -= n;
    }
    if left != 0 {
        return None;
    }
    start.map(|p| (p, total))
}

/// A request's zero-copy buffer, and how to wait until it is released.
#[derive(Debug)]
pub(crate) struct Pinned {
    /// Over guest memory; handed to the block layer.
    buf: IoBuf,
    released: oneshot::Receiver<()>,
}

impl Pinned {
    /// An external buffer over the contiguous host range of the data, or
    /// `None` when the data is not one mapped range (copy instead).
    pub(crate) fn new(mem: &Arc<Mem>, segs: &[Seg], skip: u64, len: u64) -> Option<Pinned> {
        if len < MIN_ZERO_COPY {
            return None;
        }
        let (ptr, len) = contiguous(mem, segs, skip, len)?;
        let (tx, rx) = oneshot::channel();
        let owner = Arc::new(GuestPin {
            _mem: Arc::clone(mem),
            _released: tx,
        });
        // SAFETY: `ptr..ptr + len` lies in regions of `mem` (checked by
        // `contiguous`), which `owner` keeps mapped; the range belongs to
        // this request's descriptors, which nothing else in this process
        // touches until the request completes, and the request completes
        // only after `owner` is dropped (see the module docs).
        let buf = unsafe { IoBuf::from_external(ptr, len, owner) };
        Some(Pinned { buf, released: rx })
    }

    /// Split into the buffer and a release waiter.
    pub(crate) fn into_parts(self) -> (IoBuf, Released) {
        (self.buf, Released(self.released))
    }
}

/// Resolves once every handle on a zero-copy buffer is gone, including one
/// an abandoned io_uring operation holds until its completion.
#[derive(Debug)]
pub(crate) struct Released(oneshot::Receiver<()>);

impl Released {
    /// Wait for the release (nothing is ever sent: the sender's drop is
    /// the signal).
    pub(crate) async fn wait(self) {
        let _ = self.0.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn seg(addr: u64, len: u32) -> Seg {
        Seg {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn host(mem: &Mem, addr: u64) -> usize {
        GuestMemoryBackend::get_host_address(mem, GuestAddress(addr)).unwrap() as usize
    }

    #[test]
    fn test_contiguous_one_segment_maps_to_its_host_range() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let (p, n) = contiguous(&mem, &[seg(0x1000, 4096)], 0, 4096).unwrap();
        assert_eq!((p.as_ptr() as usize, n), (host(&mem, 0x1000), 4096));
    }

    #[test]
    fn test_contiguous_adjacent_segments_after_header_skip_qualify() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let segs = [seg(0x1000, 16), seg(0x2000, 512), seg(0x2200, 512)];
        let (p, n) = contiguous(&mem, &segs, 16, 1024).unwrap();
        assert_eq!((p.as_ptr() as usize, n), (host(&mem, 0x2000), 1024));
    }

    #[test]
    fn test_contiguous_gap_between_segments_does_not_qualify() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let segs = [seg(0x2000, 512), seg(0x3000, 512)];
        assert!(contiguous(&mem, &segs, 0, 1024).is_none());
        // Reversed order is not contiguous either.
        let segs = [seg(0x2200, 512), seg(0x2000, 512)];
        assert!(contiguous(&mem, &segs, 0, 1024).is_none());
    }

    #[test]
    fn test_contiguous_across_regions_or_out_of_range_does_not_qualify() {
        let mem =
            Mem::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)]).unwrap();
        let straddle = host(&mem, 0x1000) == host(&mem, 0xfff) + 1;
        assert_eq!(
            contiguous(&mem, &[seg(0xe00, 1024)], 0, 1024).is_some(),
            straddle
        );
        assert!(contiguous(&mem, &[seg(0x1e00, 1024)], 0, 1024).is_none());
        assert!(contiguous(&mem, &[seg(0xffff_0000_0000, 512)], 0, 512).is_none());
        assert!(contiguous(&mem, &[seg(u64::MAX - 10, 512)], 0, 512).is_none());
    }

    #[test]
    fn test_contiguous_short_segments_or_empty_do_not_qualify() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        assert!(contiguous(&mem, &[seg(0x1000, 512)], 0, 1024).is_none());
        assert!(contiguous(&mem, &[seg(0x1000, 512)], 0, 0).is_none());
        let (_, n) = contiguous(&mem, &[seg(0x1000, 1024)], 0, 512).unwrap();
        assert_eq!(n, 512);
    }

    #[test]
    fn test_pinned_buffer_is_guest_memory_and_released_after_last_drop() {
        let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        mem.write_slice(&[7u8; 4096], GuestAddress(0x4000)).unwrap();
        assert!(
            Pinned::new(&mem, &[seg(0x4000, 256)], 0, 256).is_none(),
            "too small"
        );
        let (mut buf, released) = Pinned::new(&mem, &[seg(0x4000, 4096)], 0, 4096)
            .unwrap()
            .into_parts();
        assert!(buf.is_external() && buf.iter().all(|&b| b == 7));
        buf[0] = 9;
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4000)).unwrap(), 9);
        assert_eq!(Arc::strong_count(&mem), 2, "the buffer holds the map");
        let mut rx = released.0;
        assert!(rx
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Empty));
        drop(buf);
        assert_eq!(Arc::strong_count(&mem), 1);
        assert_eq!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    }

    #[test]
    fn test_pinned_buffer_keeps_replaced_memory_mapped() {
        // A memory-table change swaps in a new map; the old one lives on in
        // the request's buffer until it is dropped.
        let gm = vm_memory::GuestMemoryAtomic::new(
            Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        let mem = vm_memory::GuestAddressSpace::memory(&gm).into_inner();
        let (mut buf, _released) = Pinned::new(&mem, &[seg(0x2000, 4096)], 0, 4096)
            .unwrap()
            .into_parts();
        let weak = Arc::downgrade(&mem);
        drop(mem);
        gm.lock()
            .unwrap()
            .replace(Mem::from_ranges(&[(GuestAddress(0x10000), 0x1000)]).unwrap());
        assert!(weak.upgrade().is_some(), "old map still held by the buffer");
        buf.fill(3);
        assert!(buf.iter().all(|&b| b == 3));
        drop(buf);
        assert!(weak.upgrade().is_none(), "unmapped after the last use");
    }
}
