//! `IoBuf`: a heap buffer aligned for O_DIRECT and device DMA.
//!
//! Every byte of the allocation is initialised (zeroed) when it is made, so
//! changing the length within the capacity never exposes uninitialised memory.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every `IoBuf`: enough for O_DIRECT on any logical block size
/// up to 4 KiB and for a device page.
pub const IO_ALIGN: usize = 4096;

/// An owned, aligned, initialised byte buffer that can be handed to the kernel.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only allow reads of initialised bytes.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let cap = len.max(1).next_multiple_of(IO_ALIGN);
        let layout = Self::layout(cap);
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = IoBuf::new(data.len());
        buf.copy_from_slice(data);
        buf
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

    /// Bytes allocated.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Change the length. Growing past the capacity reallocates (keeping the
    /// contents); bytes that come into view are whatever the buffer held
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
        // SAFETY: ptr was allocated in `new` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes, owned by self.
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
            .finish()
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        IoBuf::from_slice(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_iobuf_new_is_aligned_and_zeroed() {
        let b = IoBuf::new(10_000);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(b.len(), 10_000);
        assert_eq!(b.capacity(), 12_288);
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
}
