//! In-flight io_uring operations: the table that owns their memory, and the
//! future that waits for each.
//!
//! An operation's buffer and file descriptor live in its table entry from the
//! moment its SQE is built until its CQE is reaped. If the future is dropped
//! first, the entry is marked orphaned and freed when the CQE arrives; the
//! buffer is never freed while the kernel may still write into it.
//! `user_data` is the slot index in the low 32 bits and the slot's generation
//! in the high 32 bits, so a stale completion can never hit a reused slot.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use io_uring::squeue;

use crate::ring::{Deferred, Ring};
use crate::{IoBuf, SharedFd, Submit};

/// Memory an operation hands to the kernel.
#[derive(Debug, Default)]
pub(crate) struct Payload {
    pub(crate) buf: Option<IoBuf>,
    /// Held, never read: the descriptor stays open until the CQE arrives.
    #[expect(dead_code, reason = "kept alive for the kernel")]
    pub(crate) fd: Option<SharedFd>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting in the ring's local backlog; the kernel has not seen it.
    Queued,
    /// In the SQ or in the kernel.
    InKernel,
    /// The CQE arrived with this result.
    Done(i32),
    /// The ring shut down while the kernel still owned the memory: the future
    /// resolves with an error and the payload is leaked.
    Abandoned,
}

#[derive(Debug)]
struct Entry {
    stage: Stage,
    waker: Option<Waker>,
    orphaned: bool,
    payload: Payload,
}

#[derive(Debug, Default)]
struct Slot {
    gen: u32,
    entry: Option<Entry>,
}

/// The ring's operation table (a slab with generations).
#[derive(Debug, Default)]
pub(crate) struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

fn split(key: u64) -> (usize, u32) {
    ((key & 0xffff_ffff) as usize, (key >> 32) as u32)
}

impl Table {
    fn insert(&mut self, payload: Payload) -> u64 {
        let idx = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.slots.push(Slot::default());
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[idx];
        slot.entry = Some(Entry {
            stage: Stage::Queued,
            waker: None,
            orphaned: false,
            payload,
        });
        (u64::from(slot.gen) << 32) | idx as u64
    }

    fn get_mut(&mut self, key: u64) -> Option<&mut Entry> {
        let (idx, gen) = split(key);
        let slot = self.slots.get_mut(idx)?;
        if slot.gen != gen {
            return None;
        }
        slot.entry.as_mut()
    }

    fn remove(&mut self, key: u64) -> Option<Entry> {
        let (idx, gen) = split(key);
        let slot = self.slots.get_mut(idx)?;
        if slot.gen != gen {
            return None;
        }
        let entry = slot.entry.take()?;
        slot.gen = slot.gen.wrapping_add(1);
        self.free.push(idx as u32);
        Some(entry)
    }

    /// Number of live entries.
    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// A backlog SQE is about to be pushed: true if its operation still
    /// wants to run (it is then in the kernel's hands).
    pub(crate) fn take_queued(&mut self, key: u64, _out: &mut Deferred) -> bool {
        match self.get_mut(key) {
            Some(e) if e.stage == Stage::Queued => {
                e.stage = Stage::InKernel;
                true
            }
            _ => false,
        }
    }

    /// Undo `take_queued` when the push failed after all.
    pub(crate) fn requeue(&mut self, key: u64) {
        if let Some(e) = self.get_mut(key) {
            e.stage = Stage::Queued;
        }
    }

    /// Record a CQE. Returns true if it ended an operation the kernel owned.
    pub(crate) fn complete(&mut self, key: u64, res: i32, out: &mut Deferred) -> bool {
        let Some(e) = self.get_mut(key) else {
            tracing::warn!(
                user_data = key,
                "io_uring completion for an unknown operation"
            );
            return false;
        };
        match e.stage {
            Stage::InKernel if !e.orphaned => {
                e.stage = Stage::Done(res);
                out.wakers.extend(e.waker.take());
                true
            }
            Stage::InKernel | Stage::Abandoned => {
                if let Some(e) = self.remove(key) {
                    out.garbage.push(e.payload);
                }
                true
            }
            Stage::Queued | Stage::Done(_) => {
                tracing::warn!(
                    user_data = key,
                    "io_uring completion for an operation not in flight"
                );
                false
            }
        }
    }

    /// The ring is closing: an operation still in the backlog fails.
    pub(crate) fn cancel_queued(&mut self, key: u64, out: &mut Deferred) {
        if let Some(e) = self.get_mut(key) {
            if e.stage == Stage::Queued {
                e.stage = Stage::Done(-libc::ECANCELED);
                out.wakers.extend(e.waker.take());
            }
        }
    }

    /// The ring gave up waiting: operations the kernel owns resolve with an
    /// error, and their memory stays allocated.
    pub(crate) fn abandon_in_kernel(&mut self, out: &mut Deferred) {
        for slot in &mut self.slots {
            if let Some(e) = slot.entry.as_mut() {
                if e.stage == Stage::InKernel {
                    e.stage = Stage::Abandoned;
                    out.wakers.extend(e.waker.take());
                }
            }
        }
    }

    /// The table is going away: buffers the kernel may still write into are
    /// leaked rather than freed.
    pub(crate) fn leak_in_kernel(&mut self) {
        let mut leaked = 0usize;
        for slot in &mut self.slots {
            if let Some(e) = slot.entry.as_mut() {
                if matches!(e.stage, Stage::InKernel | Stage::Abandoned) {
                    if let Some(buf) = e.payload.buf.take() {
                        std::mem::forget(buf);
                        leaked += 1;
                    }
                }
            }
        }
        if leaked > 0 {
            tracing::warn!(
                buffers = leaked,
                "leaked I/O buffers the kernel may still use"
            );
        }
    }
}

/// A submitted operation; resolves to the raw CQE result and the buffer.
#[derive(Debug)]
pub(crate) struct Op {
    ring: Arc<Ring>,
    key: u64,
    finished: bool,
}

impl Op {
    /// Queue `sqe` on `ring` (the calling thread's own ring), keeping `payload` alive until it completes.
    /// Gives the payload back if the ring is closed.
    ///
    /// # Safety
    /// Every pointer or descriptor in `sqe` must refer to memory owned by
    /// `payload` (whose heap allocations do not move when it moves) or be
    /// valid for as long as the operation runs.
    pub(crate) unsafe fn start(
        ring: Arc<Ring>,
        sqe: squeue::Entry,
        payload: Payload,
        submit: Submit,
    ) -> Result<Op, Payload> {
        let mut st = ring.lock();
        if st.closed {
            return Err(payload);
        }
        let key = st.table.insert(payload);
        if st.push(sqe.user_data(key)) {
            if let Some(e) = st.table.get_mut(key) {
                e.stage = Stage::InKernel;
            }
        }
        if submit == Submit::Eager && st.wants_eager_submit() {
            drop(st);
            ring.turn(false);
        } else {
            let reaper = Ring::request_flush(&mut st);
            drop(st);
            if let Some(w) = reaper {
                w.wake();
            }
        }
        Ok(Op {
            ring,
            key,
            finished: false,
        })
    }
}

impl Future for Op {
    type Output = (i32, Option<IoBuf>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.ring.lock();
        let key = self.key;
        let Some(e) = st.table.get_mut(key) else {
            drop(st);
            self.finished = true;
            return Poll::Ready((-libc::ECANCELED, None));
        };
        match e.stage {
            Stage::Done(res) => {
                let entry = st.table.remove(key);
                drop(st);
                self.finished = true;
                let buf = entry.and_then(|e| e.payload.buf);
                Poll::Ready((res, buf))
            }
            Stage::Abandoned => {
                // The kernel may still own the buffer: leave it in the table.
                e.orphaned = true;
                let old = e.waker.take();
                drop(st);
                drop(old);
                self.finished = true;
                Poll::Ready((-libc::ECANCELED, None))
            }
            Stage::Queued | Stage::InKernel => {
                let mut old = None;
                if !e.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    old = e.waker.replace(cx.waker().clone());
                }
                // Wakers are dropped outside the lock: dropping the last
                // reference to a task could drop futures that take it.
                drop(st);
                drop(old);
                Poll::Pending
            }
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut st = self.ring.lock();
        let Some(e) = st.table.get_mut(self.key) else {
            return;
        };
        match e.stage {
            Stage::Queued | Stage::Done(_) => {
                // The kernel never saw it, or is done with it: free now (after
                // unlocking). A queued SQE left in the backlog is skipped.
                let entry = st.table.remove(self.key);
                drop(st);
                drop(entry);
            }
            Stage::InKernel | Stage::Abandoned => {
                e.orphaned = true;
                let old = e.waker.take();
                drop(st);
                drop(old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_table_remove_bumps_generation_stale_key_misses() {
        let mut t = Table::default();
        let k1 = t.insert(Payload::default());
        assert!(t.remove(k1).is_some());
        let k2 = t.insert(Payload::default());
        assert_eq!(k1 & 0xffff_ffff, k2 & 0xffff_ffff);
        assert_ne!(k1, k2);
        assert!(t.get_mut(k1).is_none());
        let mut out = Deferred::default();
        assert!(!t.complete(k1, 0, &mut out));
        assert_eq!(t.live(), 1);
    }

    #[test]
    fn test_table_orphaned_completion_frees_entry() {
        let mut t = Table::default();
        let key = t.insert(Payload {
            buf: Some(IoBuf::new(8)),
            fd: None,
        });
        let e = t.get_mut(key).unwrap();
        e.stage = Stage::InKernel;
        e.orphaned = true;
        let mut out = Deferred::default();
        assert!(t.complete(key, 8, &mut out));
        assert_eq!(out.garbage.len(), 1);
        assert_eq!(t.live(), 0);
    }
}
