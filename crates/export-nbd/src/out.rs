//! The reply path of a connection: request tasks append encoded replies to an
//! [`OutQueue`]; one writer task drains everything queued so far with
//! vectored writes. Replies finished in the same scheduler tick leave in one
//! syscall, which is what keeps the CPU cost per I/O low at high queue depth.
//!
//! Small replies (headers, reads up to [`COPY_MAX`]) are copied into shared
//! byte buffers; bigger read data is queued as its own [`IoBuf`] segment.
//! [`BufPool`] recycles the aligned buffers of small requests.

use std::io::IoSlice;
use std::sync::{Mutex, MutexGuard};

use qsd_rt::IoBuf;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// Read data up to this size is copied into the reply byte stream.
pub(crate) const COPY_MAX: usize = 16 * 1024;
/// A byte segment stops growing past this size.
const SEG_MAX: usize = 256 * 1024;
/// Most iovecs handed to one writev.
const IOV_BATCH: usize = 64;

enum Seg {
    Bytes(Vec<u8>),
    Buf(IoBuf),
}

impl Seg {
    fn as_slice(&self) -> &[u8] {
        match self {
            Seg::Bytes(v) => v,
            Seg::Buf(b) => b,
        }
    }
}

#[derive(Default)]
struct State {
    segs: Vec<Seg>,
    spare: Vec<Vec<u8>>,
    /// Bytes queued and not yet taken by the writer.
    queued: usize,
    closed: bool,
    broken: bool,
}

/// Replies waiting for the writer.
#[derive(Default)]
pub(crate) struct OutQueue {
    state: Mutex<State>,
    /// Where written data buffers go back to, for the next request.
    pool: BufPool,
    /// Wakes the writer.
    wake: Notify,
    /// Wakes a reader waiting for the queue to drain.
    drained: Notify,
}

impl std::fmt::Debug for OutQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutQueue").finish_non_exhaustive()
    }
}

impl OutQueue {
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Append bytes written by `encode`.
    pub(crate) fn push(&self, encode: impl FnOnce(&mut Vec<u8>)) {
        let mut st = self.lock();
        if st.broken {
            return;
        }
        let was_empty = st.segs.is_empty();
        Self::bytes_seg(&mut st, encode);
        drop(st);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Append a header written by `encode` followed by `data`. Small data is
    /// copied and the buffer handed back for reuse.
    pub(crate) fn push_data(
        &self,
        encode: impl FnOnce(&mut Vec<u8>),
        data: IoBuf,
    ) -> Option<IoBuf> {
        let mut st = self.lock();
        if st.broken {
            return Some(data);
        }
        let was_empty = st.segs.is_empty();
        let back = if data.len() <= COPY_MAX {
            Self::bytes_seg(&mut st, |v| {
                encode(v);
                v.extend_from_slice(&data);
            });
            Some(data)
        } else {
            Self::bytes_seg(&mut st, encode);
            st.queued += data.len();
            st.segs.push(Seg::Buf(data));
            None
        };
        drop(st);
        if was_empty {
            self.wake.notify_one();
        }
        back
    }

    fn bytes_seg(st: &mut State, encode: impl FnOnce(&mut Vec<u8>)) {
        if let Some(Seg::Bytes(v)) = st.segs.last_mut() {
            if v.len() < SEG_MAX {
                let before = v.len();
                encode(v);
                st.queued += v.len() - before;
                return;
            }
        }
        let mut v = st
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(64 * 1024));
        encode(&mut v);
        st.queued += v.len();
        st.segs.push(Seg::Bytes(v));
    }

    /// No more replies will be queued; the writer exits once it is drained.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Wait while more than `limit` bytes are queued (and the writer works).
    pub(crate) async fn wait_below(&self, limit: usize) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                if st.queued <= limit || st.broken || st.closed {
                    return;
                }
            }
            notified.await;
        }
    }

    /// True once a write to the socket failed.
    pub(crate) fn is_broken(&self) -> bool {
        self.lock().broken
    }

    fn take(&self) -> Option<Vec<Seg>> {
        let mut st = self.lock();
        if st.segs.is_empty() {
            return None;
        }
        st.queued = 0;
        Some(std::mem::take(&mut st.segs))
    }

    /// A queue whose written data buffers return to `pool`.
    pub(crate) fn with_pool(pool: BufPool) -> Self {
        OutQueue {
            pool,
            ..OutQueue::default()
        }
    }

    fn recycle(&self, batch: Vec<Seg>) {
        let mut st = self.lock();
        for seg in batch {
            match seg {
                Seg::Bytes(mut v) => {
                    if st.spare.len() < 4 && v.capacity() <= 4 * SEG_MAX {
                        v.clear();
                        st.spare.push(v);
                    }
                }
                Seg::Buf(b) => self.pool.put(b),
            }
        }
    }

    /// Drain the queue into `w` until closed and empty, or until a write fails.
    pub(crate) async fn run_writer<W: AsyncWrite + Unpin>(&self, w: &mut W) {
        loop {
            let Some(batch) = self.take() else {
                if self.lock().closed {
                    break;
                }
                self.wake.notified().await;
                continue;
            };
            if let Err(e) = write_all_segs(w, &batch).await {
                tracing::debug!("NBD client write failed: {e}");
                let mut st = self.lock();
                st.broken = true;
                st.segs.clear();
                break;
            }
            self.recycle(batch);
            self.drained.notify_waiters();
        }
        self.drained.notify_waiters();
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    }
}

async fn write_all_segs<W: AsyncWrite + Unpin>(w: &mut W, segs: &[Seg]) -> std::io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < segs.len() {
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(IOV_BATCH.min(segs.len() - idx));
        iov.push(IoSlice::new(&segs[idx].as_slice()[off..]));
        for s in segs[idx + 1..].iter().take(IOV_BATCH - 1) {
            iov.push(IoSlice::new(s.as_slice()));
        }
        let mut n = w.write_vectored(&iov).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && idx < segs.len() {
            let left = segs[idx].as_slice().len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Size classes the pool keeps: 4 KiB to 4 MiB. Fresh large buffers are
/// expensive (the allocator maps and zeroes them), so sequential 1 MiB I/O
/// depends on reuse as much as small random I/O does.
const POOL_MIN_SHIFT: u32 = 12;
const POOL_MAX_SHIFT: u32 = 22;
/// Bytes kept per size class: up to 64 buffers, at most 8 MiB.
const POOL_BYTES_PER_CLASS: usize = 8 << 20;
const POOL_PER_CLASS: usize = 64;

fn class_limit(c: usize) -> usize {
    let size = 1usize << (c as u32 + POOL_MIN_SHIFT);
    (POOL_BYTES_PER_CLASS / size).clamp(2, POOL_PER_CLASS)
}

type PoolClasses = [Vec<IoBuf>; (POOL_MAX_SHIFT - POOL_MIN_SHIFT + 1) as usize];

/// Recycles aligned buffers of the common request sizes. Clones share the
/// same buffers (the request tasks and the writer of one connection).
#[derive(Debug, Default, Clone)]
pub(crate) struct BufPool {
    classes: std::sync::Arc<Mutex<PoolClasses>>,
}

fn class_of(cap: usize) -> Option<usize> {
    let shift = cap
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(POOL_MIN_SHIFT);
    (shift <= POOL_MAX_SHIFT).then(|| (shift - POOL_MIN_SHIFT) as usize)
}

impl BufPool {
    /// A buffer of exactly `len` bytes. Its contents are unspecified (stale
    /// data from earlier requests); callers overwrite all of it.
    pub(crate) fn get(&self, len: usize) -> IoBuf {
        if let Some(c) = class_of(len) {
            let popped = match self.classes.lock() {
                Ok(mut g) => g[c].pop(),
                Err(_) => None,
            };
            let mut buf =
                popped.unwrap_or_else(|| IoBuf::new_huge(1 << (c as u32 + POOL_MIN_SHIFT)));
            buf.resize(len);
            return buf;
        }
        IoBuf::new(len)
    }

    /// Give a buffer back.
    pub(crate) fn put(&self, buf: IoBuf) {
        let cap = buf.capacity();
        if !cap.is_power_of_two() {
            return;
        }
        if let Some(c) = class_of(cap) {
            if let Ok(mut g) = self.classes.lock() {
                if g[c].len() < class_limit(c) {
                    g[c].push(buf);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_out_queue_writes_in_order_and_exits_when_closed() {
        let q = std::sync::Arc::new(OutQueue::default());
        q.push(|v| v.extend_from_slice(b"ab"));
        let big = IoBuf::from_slice(&vec![7u8; COPY_MAX + 1]);
        assert!(q.push_data(|v| v.extend_from_slice(b"H"), big).is_none());
        let small = IoBuf::from_slice(b"xyz");
        assert!(q.push_data(|v| v.extend_from_slice(b"h"), small).is_some());
        q.close();
        let mut sink: Vec<u8> = Vec::new();
        q.run_writer(&mut sink).await;
        assert_eq!(&sink[..3], b"abH");
        assert_eq!(sink.len(), 3 + COPY_MAX + 1 + 4);
        assert_eq!(&sink[sink.len() - 4..], b"hxyz");
    }

    #[test]
    fn test_buf_pool_reuses_by_class() {
        let p = BufPool::default();
        let b = p.get(4096);
        assert_eq!(b.len(), 4096);
        let ptr = b.as_ptr();
        p.put(b);
        let c = p.get(3000);
        assert_eq!(c.as_ptr(), ptr);
        assert_eq!(c.len(), 3000);
        let huge = p.get(1 << 20);
        assert_eq!(huge.len(), 1 << 20);
    }
}
