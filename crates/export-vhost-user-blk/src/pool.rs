//! A small pool of `IoBuf`s per export. Large fresh allocations are mmap'd
//! and page-faulted on every request (about 0.5 ms per MiB); reusing
//! buffers keeps big sequential I/O at memory speed.

use std::sync::{Mutex, PoisonError};

use qsd_rt::IoBuf;

/// Smallest pooled capacity.
const MIN_CAP: usize = 4096;
/// Size classes: 4 KiB .. 32 MiB, powers of two.
const CLASSES: usize = 14;
/// Pooled bytes kept per class at most.
const CLASS_BYTES: usize = 32 << 20;
/// Buffers kept per class at most.
const CLASS_COUNT: usize = 64;

/// Free buffers by power-of-two capacity class.
#[derive(Debug)]
pub(crate) struct BufPool {
    classes: Vec<Mutex<Vec<IoBuf>>>,
}

impl Default for BufPool {
    fn default() -> Self {
        BufPool {
            classes: (0..CLASSES).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }
}

fn class_of(cap: usize) -> Option<usize> {
    let c = cap.max(MIN_CAP).next_power_of_two();
    let idx = (c / MIN_CAP).trailing_zeros() as usize;
    (idx < CLASSES).then_some(idx)
}

impl BufPool {
    /// A buffer of `len` bytes; its contents are unspecified (callers
    /// overwrite every byte before the buffer is seen by anyone).
    pub(crate) fn get(&self, len: usize) -> IoBuf {
        let Some(idx) = class_of(len) else {
            return IoBuf::new(len);
        };
        let reused = self.classes[idx]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut buf = reused.unwrap_or_else(|| IoBuf::new_huge(MIN_CAP << idx));
        buf.resize(len);
        buf
    }

    /// Give a buffer back (dropped if its class is full, it is odd-sized,
    /// or it is not ours: a zero-copy buffer over guest memory).
    pub(crate) fn put(&self, buf: IoBuf) {
        if buf.is_external() {
            return;
        }
        let cap = buf.capacity();
        let Some(idx) = class_of(cap).filter(|&i| MIN_CAP << i == cap) else {
            return;
        };
        let mut free = self.classes[idx]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if free.len() < CLASS_COUNT && (free.len() + 1) * cap <= CLASS_BYTES.max(cap) {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pool_reuses_buffer_of_same_class() {
        let p = BufPool::default();
        let b = p.get(5000);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        let ptr = b.as_ptr();
        p.put(b);
        let c = p.get(8000);
        assert_eq!(c.as_ptr(), ptr);
        assert_eq!(c.len(), 8000);
    }

    #[test]
    fn test_pool_external_buffer_is_never_pooled() {
        let p = BufPool::default();
        p.put(IoBuf::external_from_box(
            vec![0u8; 4096].into_boxed_slice(),
            0,
        ));
        assert!(p.classes.iter().all(|c| c.lock().unwrap().is_empty()));
        assert!(!p.get(4096).is_external());
    }

    #[test]
    fn test_pool_oversize_is_not_pooled() {
        let p = BufPool::default();
        let b = p.get(64 << 20);
        assert_eq!(b.len(), 64 << 20);
        p.put(b);
        assert!(p.classes.iter().all(|c| c.lock().unwrap().is_empty()));
    }
}
