//! Large I/O buffers in memory advised for transparent huge pages.
//!
//! A 1 MiB buffer made of scattered 4 KiB pages is 256 segments to the
//! block layer. A disk that takes fewer per request (virtio-blk: 254) gets
//! every such read or write as two requests, the second a few KiB long; on
//! a virtual disk, where each request costs a round trip to the host, that
//! halves the throughput of large sequential I/O with `O_DIRECT`. A buffer
//! inside one huge page is one physically contiguous segment: one request
//! per I/O (which the I/O scheduler can merge further), and later one entry
//! for an IOMMU to map.
//!
//! Buffers of exactly [`HALF`] are cut in pairs from one [`HUGE`] region;
//! larger ones get a region of their own, rounded up to [`HUGE`]. A region
//! is unmapped when its last buffer is dropped. Mapped memory is zero, and
//! no part of a region is handed out twice, so every buffer starts zeroed.
//! Where the kernel gives no huge page (THP off, memory fragmented) the
//! region is ordinary anonymous memory: nothing is lost but the gain.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Size and alignment of a huge page on x86_64 and arm64 (4 KiB base pages).
pub(crate) const HUGE: usize = 2 << 20;

/// Buffers from this size up are made here.
pub(crate) const HALF: usize = HUGE / 2;

/// An anonymous mapping, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Region is only an address range; who may touch which bytes is
// decided by the buffers cut from it, each of which owns its part alone.
unsafe impl Send for Region {}
// SAFETY: as above; Region itself never reads or writes the memory.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is a mapping made by `map_aligned`, and
        // every buffer cut from it held this Region, so none is left.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Hands out huge-page buffers; keeps the unused half of the last region
/// split for a [`HALF`] buffer.
#[derive(Debug, Default)]
pub(crate) struct Carver {
    spare: Mutex<Option<Arc<Region>>>,
}

/// The process-wide carver behind `IoBuf::new`.
pub(crate) static CARVER: Carver = Carver {
    spare: Mutex::new(None),
};

impl Carver {
    /// Memory for a buffer of `cap` bytes (`cap >= HALF`, a multiple of
    /// 4 KiB): its address and the region that keeps it mapped. `None` if
    /// the kernel refused the mapping (the caller uses the heap then).
    pub(crate) fn alloc(&self, cap: usize) -> Option<(NonNull<u8>, Arc<Region>)> {
        if cap != HALF {
            let region = Arc::new(map_aligned(cap.next_multiple_of(HUGE))?);
            return Some((region.ptr, region));
        }
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(region) = spare.take() {
            // SAFETY: the region is HUGE bytes long; its second half was
            // never handed out (only the first, when it was mapped).
            let ptr = unsafe { region.ptr.add(HALF) };
            return Some((ptr, region));
        }
        let region = Arc::new(map_aligned(HUGE)?);
        *spare = Some(Arc::clone(&region));
        Some((region.ptr, region))
    }
}

/// Map `len` bytes (a multiple of HUGE) of zeroed memory at a HUGE-aligned
/// address, and ask for huge pages there.
fn map_aligned(len: usize) -> Option<Region> {
    let over = len.checked_add(HUGE)?;
    // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let base = raw as usize;
    let start = base.next_multiple_of(HUGE);
    let (head, tail) = (start - base, HUGE - (start - base));
    // SAFETY: both ranges lie inside the mapping just made and outside the
    // part kept; unmapping them only trims it to the aligned window.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: advice on our own mapping; failure (THP disabled) is harmless.
    unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    Some(Region {
        ptr: NonNull::new(start as *mut u8)?,
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_half_buffers_are_cut_in_pairs_from_one_aligned_region() {
        let carver = Carver::default();
        let (a, ra) = carver.alloc(HALF).unwrap();
        let (b, rb) = carver.alloc(HALF).unwrap();
        assert!(Arc::ptr_eq(&ra, &rb));
        assert_eq!(a.as_ptr() as usize % HUGE, 0);
        assert_eq!(b.as_ptr() as usize, a.as_ptr() as usize + HALF);
        // A third starts a new region.
        let (_, rc) = carver.alloc(HALF).unwrap();
        assert!(!Arc::ptr_eq(&ra, &rc));
    }

    #[test]
    fn test_larger_buffers_get_their_own_rounded_region() {
        let (p, r) = Carver::default().alloc(HUGE + 4096).unwrap();
        assert_eq!(p.as_ptr() as usize % HUGE, 0);
        assert_eq!(r.len, 2 * HUGE);
    }

    #[test]
    fn test_region_memory_is_zeroed_and_writable() {
        let (p, _r) = Carver::default().alloc(HALF).unwrap();
        // SAFETY: the first HALF bytes of the region are this buffer's.
        let s = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), HALF) };
        assert!(s.iter().all(|&b| b == 0));
        s.fill(0xa5);
        assert!(s.iter().all(|&b| b == 0xa5));
    }
}
