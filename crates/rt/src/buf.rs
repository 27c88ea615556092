//! `IoBuf`: a byte buffer that can be handed to the kernel or a device.
//!
//! Two kinds of storage:
//! - **owned** (`new`, `from_slice`, `new_huge`): a heap allocation
//!   aligned to [`IO_ALIGN`] (for `new_huge` from 1 MiB up, part of a
//!   huge-page region instead: see `huge`), every byte initialised (zeroed)
//!   when made, so changing the length within the capacity never exposes
//!   uninitialised memory;
//! - **external** (`from_external`): memory someone else mapped (a guest's
//!   RAM), kept valid by an `owner` handle the buffer holds until it is
//!   dropped. Its address is whatever the caller gave; code that needs
//!   alignment (O_DIRECT) checks [`IoBuf::is_aligned`] and bounces.
//!
//! An io_uring operation owns the `IoBuf` it was given until its completion
//! arrives, so an external buffer's owner (and with it the mapping) outlives
//! every kernel access, even when the future that started it is dropped.

use std::alloc::{self, Layout};
use std::any::Any;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every owned `IoBuf`: enough for O_DIRECT on any logical
/// block size up to 4 KiB and for a device page.
pub const IO_ALIGN: usize = 4096;

/// Who frees the bytes.
enum Storage {
    /// Allocated by `IoBuf::new` with `IoBuf::layout(cap)`.
    Owned,
    /// Part of a huge-page region, unmapped when its last buffer drops
    /// (large buffers; see `huge`).
    Huge(
        #[expect(dead_code, reason = "held, never read: keeps the region mapped")]
        Arc<crate::huge::Region>,
    ),
    /// Not ours: valid while this handle lives (see `from_external`).
    External(
        #[expect(dead_code, reason = "held, never read: keeps the memory mapped")]
        Arc<dyn Any + Send + Sync>,
    ),
}

/// An aligned, initialised byte buffer that can be handed to the kernel.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    storage: Storage,
}

// SAFETY: an owned IoBuf owns its allocation exclusively, like Vec<u8>; an
// external one has exclusive use of its range by `from_external`'s contract,
// and its owner handle is Send + Sync.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only allow reads of initialised bytes.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes, for buffers that are kept and
    /// reused (pools): from 1 MiB up it lies in memory advised for huge
    /// pages, so a disk sees it as one physically contiguous segment rather
    /// than 256 (see `huge`). Each such buffer is a fresh mapping, so
    /// buffers made and dropped per request should use [`IoBuf::new`].
    pub fn new_huge(len: usize) -> Self {
        let cap = len.max(1).next_multiple_of(IO_ALIGN);
        if cap >= crate::huge::HALF {
            if let Some((ptr, region)) = crate::huge::CARVER.alloc(cap) {
                return IoBuf {
                    ptr,
                    len,
                    cap,
                    storage: Storage::Huge(region),
                };
            }
        }
        IoBuf::new(len)
    }

    /// A zero-filled buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let cap = len.max(1).next_multiple_of(IO_ALIGN);
        let layout = Self::layout(cap);
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf {
            ptr,
            len,
            cap,
            storage: Storage::Owned,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = IoBuf::new(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// A buffer over `len` bytes at `ptr` that it does not own. Dropping it
    /// drops `owner` and frees nothing. Its capacity is `len`: growing it
    /// moves the contents to an owned copy (see [`IoBuf::resize`]).
    ///
    /// # Safety
    /// - `ptr..ptr + len` is mapped, initialised, and valid for reads and
    ///   writes for as long as `owner` (this clone of it) lives;
    /// - while the buffer lives, nothing in this process reads or writes
    ///   that range except through it (no other `IoBuf`, slice or reference
    ///   over it), as for `slice::from_raw_parts_mut`;
    /// - `len <= isize::MAX`.
    ///
    /// Another process sharing the memory (a VM's guest) may still change
    /// the bytes underneath: the buffer then reads whatever is there, so
    /// code that must see stable contents (checksums, encryption) copies
    /// first, as it would for any shared memory.
    pub unsafe fn from_external(
        ptr: NonNull<u8>,
        len: usize,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Self {
        IoBuf {
            ptr,
            len,
            cap: len,
            storage: Storage::External(owner),
        }
    }

    /// An external buffer over `data[skip..]` that owns `data`: memory at
    /// any address alignment, without `unsafe` at the caller (for tests of
    /// code that must cope with unaligned external buffers).
    pub fn external_from_box(data: Box<[u8]>, skip: usize) -> Self {
        let len = data.len();
        let skip = skip.min(len);
        let owner = Arc::new(BoxOwner(NonNull::from(Box::leak(data)).cast::<u8>(), len));
        let ptr = owner.0;
        // SAFETY: the leaked box stays allocated until `owner` drops, and
        // only this buffer reaches it; skip <= len keeps the range inside.
        unsafe { IoBuf::from_external(ptr.add(skip), len - skip, owner) }
    }

    fn layout(cap: usize) -> Layout {
        match Layout::from_size_align(cap, IO_ALIGN) {
            Ok(l) => l,
            Err(_) => panic!("I/O buffer of {cap} bytes is too large"),
        }
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes available without moving the contents.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// True for memory made by `from_external`: it must not be pooled or
    /// kept, and its address has no particular alignment.
    pub fn is_external(&self) -> bool {
        matches!(self.storage, Storage::External(_))
    }

    /// True when both the address and the length are multiples of `align`
    /// (0 and 1 mean "no requirement"). Owned buffers are always aligned to
    /// [`IO_ALIGN`]; external ones may not be.
    pub fn is_aligned(&self, align: usize) -> bool {
        align <= 1
            || ((self.ptr.as_ptr() as usize).is_multiple_of(align)
                && self.len.is_multiple_of(align))
    }

    /// Change the length. Growing past the capacity moves the contents to a
    /// bigger owned allocation; for an external buffer that means the
    /// buffer no longer refers to the external memory (its owner is
    /// released). Bytes that come into view are whatever the buffer held
    /// before, or zeroes if they were never written.
    pub fn resize(&mut self, len: usize) {
        if len > self.cap {
            let mut bigger = IoBuf::new(len);
            bigger[..self.len].copy_from_slice(self);
            *self = bigger;
        }
        self.len = len;
    }

    /// Fill the whole buffer with zeroes.
    pub fn zero(&mut self) {
        self.fill(0);
    }

    /// Pointer for the kernel to read from.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Pointer for the kernel to write into.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Storage::Owned = self.storage {
            // SAFETY: an owned ptr was allocated in `new` with exactly this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
        }
        // An external buffer's owner handle is released with the field.
    }
}

/// A leaked boxed slice, freed when the last handle drops.
struct BoxOwner(NonNull<u8>, usize);

// SAFETY: BoxOwner is the sole owner of a plain heap allocation.
unsafe impl Send for BoxOwner {}
// SAFETY: BoxOwner never touches the bytes.
unsafe impl Sync for BoxOwner {}

impl Drop for BoxOwner {
    fn drop(&mut self) {
        let slice = std::ptr::slice_from_raw_parts_mut(self.0.as_ptr(), self.1);
        // SAFETY: made by Box::leak of a slice of this length.
        drop(unsafe { Box::from_raw(slice) });
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes, owned by
        // self or kept valid by its owner handle (`from_external`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .field("external", &self.is_external())
            .finish()
    }
}

impl Clone for IoBuf {
    /// Always an owned copy, also of an external buffer.
    fn clone(&self) -> Self {
        IoBuf::from_slice(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Waker};
    use std::time::{Duration, Instant};

    use crate::io::{read_at, write_at};
    use crate::{ring, Aio, SharedFd};

    /// Test memory for external buffers: a leaked boxed slice that the
    /// owner frees, counting how often that happens.
    struct Region {
        ptr: NonNull<u8>,
        len: usize,
        drops: Arc<AtomicUsize>,
    }

    // SAFETY: the region is plain heap memory only reached through `ptr`.
    unsafe impl Send for Region {}
    // SAFETY: as above; Region itself never touches the bytes.
    unsafe impl Sync for Region {}

    impl Drop for Region {
        fn drop(&mut self) {
            let slice = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
            // SAFETY: made by Box::into_raw in `external` with this length.
            drop(unsafe { Box::from_raw(slice) });
            self.drops.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// An external buffer over `data[skip..]`, and its owner's drop count.
    fn external(data: &[u8], skip: usize) -> (IoBuf, Arc<AtomicUsize>) {
        let raw = Box::into_raw(data.to_vec().into_boxed_slice());
        let ptr = NonNull::new(raw.cast::<u8>()).unwrap();
        let drops = Arc::new(AtomicUsize::new(0));
        let owner = Arc::new(Region {
            ptr,
            len: data.len(),
            drops: Arc::clone(&drops),
        });
        // SAFETY: the boxed slice lives until `owner` drops and is only
        // reached through this buffer.
        let buf = unsafe { IoBuf::from_external(ptr.add(skip), data.len() - skip, owner) };
        (buf, drops)
    }

    fn with_ring<F: Future>(f: F) -> F::Output {
        let rt = crate::build_runtime("buf-test").unwrap();
        let out = crate::block_on_with_ring(&rt, f);
        drop(rt);
        ring::shutdown_current();
        out
    }

    fn temp_fd(data: &[u8]) -> (tempfile::NamedTempFile, SharedFd) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), data).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(tmp.path())
            .unwrap();
        (tmp, SharedFd::new(f.into()))
    }

    #[test]
    fn test_iobuf_new_is_aligned_and_zeroed() {
        let b = IoBuf::new(10_000);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(b.len(), 10_000);
        assert_eq!(b.capacity(), 12_288);
        assert!(!b.is_external());
    }

    #[test]
    fn test_iobuf_resize_keeps_contents() {
        let mut b = IoBuf::from_slice(b"hello");
        b.resize(9000);
        assert_eq!(&b[..5], b"hello");
        assert!(b[5..].iter().all(|&x| x == 0));
        b.resize(2);
        assert_eq!(&b[..], b"he");
    }

    #[test]
    fn test_iobuf_external_drop_releases_owner_exactly_once() {
        let (mut b, drops) = external(b"0123456789", 2);
        assert!(b.is_external());
        assert_eq!(&b[..], b"23456789");
        assert_eq!(b.capacity(), 8);
        b[0] = b'x';
        assert_eq!(&b[..2], b"x3");
        let copy = b.clone();
        assert!(!copy.is_external());
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        drop(b);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        drop(copy);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn test_iobuf_external_resize_within_stays_beyond_moves_to_owned() {
        let (mut b, drops) = external(b"abcdefgh", 0);
        let ptr = b.as_ptr();
        b.resize(3);
        assert_eq!(&b[..], b"abc");
        b.resize(8);
        assert_eq!((b.as_ptr(), &b[..]), (ptr, &b"abcdefgh"[..]));
        b.resize(20);
        assert!(!b.is_external());
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "owner released on the move"
        );
        assert_eq!(&b[..8], b"abcdefgh");
        assert!(b[8..].iter().all(|&x| x == 0));
    }

    #[test]
    fn test_iobuf_is_aligned_checks_address_and_length() {
        let owned = IoBuf::new(4096);
        assert!(owned.is_aligned(4096) && owned.is_aligned(512) && owned.is_aligned(0));
        assert!(!IoBuf::new(100).is_aligned(512));
        let (b, _) = external(&[0u8; 1025], 1);
        let addr = b.as_ptr() as usize;
        assert!(b.is_aligned(1));
        assert_eq!(b.is_aligned(2), addr.is_multiple_of(2));
        assert_eq!(b.is_aligned(512), addr.is_multiple_of(512));
        let (odd_len, _) = external(&[0u8; 1000], 0);
        assert!(
            !odd_len.is_aligned(512),
            "length 1000 is not a multiple of 512"
        );
    }

    #[test]
    fn test_iobuf_external_uring_read_and_write_roundtrip() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        let (_tmp, fd) = temp_fd(&data);
        with_ring(async {
            let (buf, drops) = external(&[0u8; 4097], 1);
            let (r, buf) = read_at(Aio::IoUring, &fd, buf, 4096).await;
            assert_eq!(r.unwrap(), 4096);
            assert!(buf.is_external());
            assert_eq!(&buf[..], &data[4096..]);
            let (r, buf) = write_at(Aio::IoUring, &fd, buf, 0).await;
            assert_eq!(r.unwrap(), 4096);
            drop(buf);
            assert_eq!(drops.load(Ordering::SeqCst), 1);
            let (r, back) = read_at(Aio::IoUring, &fd, IoBuf::new(4096), 0).await;
            assert_eq!(r.unwrap(), 4096);
            assert_eq!(&back[..], &data[4096..]);
        });
    }

    #[test]
    fn test_iobuf_external_owner_outlives_dropped_inflight_read() {
        if !crate::io_uring_available() {
            eprintln!("io_uring unavailable; skipping");
            return;
        }
        let (rd, wr) = crate::tests::pipe();
        let rd = SharedFd::new(rd);
        with_ring(async {
            let (buf, drops) = external(&[0u8; 64], 0);
            {
                let mut fut = pin!(read_at(Aio::IoUring, &rd, buf, 0));
                let _ = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
                // Dropped while the kernel waits for pipe data.
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(drops.load(Ordering::SeqCst), 0, "kernel still owns it");
            // SAFETY: writes 3 bytes from a live array to an open pipe.
            let n = unsafe {
                use std::os::fd::AsRawFd;
                libc::write(wr.as_raw_fd(), b"abc".as_ptr().cast(), 3)
            };
            assert_eq!(n, 3);
            let deadline = Instant::now() + Duration::from_secs(10);
            while drops.load(Ordering::SeqCst) == 0 {
                assert!(Instant::now() < deadline, "owner never released");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(drops.load(Ordering::SeqCst), 1);
        });
    }
}
