//! When a buffered write runs on the I/O thread itself instead of the ring.
//!
//! io_uring runs a buffered write at once only where the file system can
//! promise not to sleep (`RWF_NOWAIT`: XFS and btrfs can). Elsewhere, ext4
//! among them, it hands every buffered write to an io-wq worker thread:
//! two thread wake-ups and a context switch for what is mostly a copy into
//! the page cache, made after the data has left the CPU's cache. There,
//! whole-page writes are done with `pwrite` on the I/O thread. Whole pages,
//! because a partial page that is not cached would first be read from the
//! disk. How large depends on where the thread may run:
//! - On one CPU only (pinned, as an iothread often is), io-wq's workers
//!   share that CPU, so a hand-off buys nothing: writes up to 1 MiB run
//!   inline (a 1 MiB copy, about 200 µs, is of the order of what the
//!   exports already copy inline when they receive such a request).
//! - With other CPUs allowed, a worker there copies a large write into the
//!   page cache while the thread receives the next one: only writes up to
//!   128 KiB run inline. (FUSE 1M writes through the page cache, unpinned:
//!   3,700 MiB/s with 1 MiB inline, 5,660 MiB/s with 128 KiB.)
//!
//! A buffered write can still sleep: dirty-page throttling, a journal
//! commit, a page under writeback. One that took longer than [`SLOW`]
//! sends writes back to the ring for [`BACK_OFF`], so that the thread goes
//! on serving its other requests while the page cache drains.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use nix::libc;
use qsd_rt::io::{self as rtio, SharedFd, WriteWait};

/// Largest write done inline by a thread that may run on one CPU only.
const INLINE_MAX_ONE_CPU: usize = 1024 * 1024;
/// Largest write done inline by a thread that may run on several CPUs.
const INLINE_MAX_SHARED: usize = 128 * 1024;
/// How often a thread looks again at its CPU affinity (an iothread may be
/// pinned after it started, as libvirt does).
const AFFINITY_RECHECK: Duration = Duration::from_secs(1);
/// An inline write slower than this has slept.
const SLOW: Duration = Duration::from_millis(2);
/// How long writes go back to the ring after a slow one.
const BACK_OFF: Duration = Duration::from_secs(1);

/// Not asked yet whether the file system takes `RWF_NOWAIT` writes.
const UNKNOWN: u8 = 0;
/// Leave every write to the ring: O_DIRECT, `aio=threads`, or a file system
/// with non-blocking buffered writes (which io_uring does at once itself).
const RING: u8 = 1;
/// Whole-page writes up to [`INLINE_MAX`] run inline.
const INLINE: u8 = 2;

/// The inline-write policy of one open file.
#[derive(Debug)]
pub(crate) struct InlineWrites {
    mode: AtomicU8,
    page: usize,
    epoch: Instant,
    /// Nanoseconds after `epoch` until which writes stay on the ring.
    off_until: AtomicU64,
}

impl InlineWrites {
    /// A policy for a file opened for buffered I/O served by io_uring
    /// (`buffered_on_ring`); anything else always uses the ring.
    pub(crate) fn new(buffered_on_ring: bool) -> Self {
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| usize::try_from(p).ok())
            .unwrap_or(4096);
        InlineWrites {
            mode: AtomicU8::new(if buffered_on_ring { UNKNOWN } else { RING }),
            page,
            epoch: Instant::now(),
            off_until: AtomicU64::new(0),
        }
    }

    /// Nanoseconds from `epoch` to `t`.
    fn ns_at(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn fits(&self, offset: u64, len: usize, now: Instant) -> bool {
        len > 0
            && len <= inline_max(now)
            && len.is_multiple_of(self.page)
            && offset.is_multiple_of(self.page as u64)
    }

    /// Write `buf` at `offset` now if the policy allows; `None` means
    /// "submit it to the ring".
    pub(crate) fn try_write(
        &self,
        fd: &SharedFd,
        buf: &[u8],
        offset: u64,
    ) -> Option<io::Result<usize>> {
        let mode = self.mode.load(Ordering::Relaxed);
        if mode == RING {
            return None;
        }
        // One clock read serves the affinity check and the back-off.
        let now = Instant::now();
        if !self.fits(offset, buf.len(), now) {
            return None;
        }
        if mode == UNKNOWN {
            match rtio::write_now(fd, buf, offset, WriteWait::NoWait) {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    tracing::debug!(
                        "buffered writes cannot be non-blocking here: whole-page ones run inline"
                    );
                    self.mode.store(INLINE, Ordering::Relaxed);
                }
                // EAGAIN: the file system does take RWF_NOWAIT, and so
                // does io_uring. ENOSYS: no pwritev2 (seccomp).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOSYS)) => {
                    self.mode.store(RING, Ordering::Relaxed);
                    return None;
                }
                Ok(n) => {
                    self.mode.store(RING, Ordering::Relaxed);
                    return Some(Ok(n));
                }
                Err(e) => return Some(Err(e)),
            }
        }
        self.blocking_write(fd, buf, offset, now)
    }

    fn blocking_write(
        &self,
        fd: &SharedFd,
        buf: &[u8],
        offset: u64,
        now: Instant,
    ) -> Option<io::Result<usize>> {
        let start = self.ns_at(now);
        if start < self.off_until.load(Ordering::Relaxed) {
            return None;
        }
        let r = rtio::write_now(fd, buf, offset, WriteWait::Block);
        let end = self.ns_at(Instant::now());
        let took = end.saturating_sub(start);
        if took > SLOW.as_nanos() as u64 {
            tracing::debug!("an inline write took {took} ns: writes go to the ring for a while");
            let until = end.saturating_add(BACK_OFF.as_nanos() as u64);
            self.off_until.store(until, Ordering::Relaxed);
        }
        Some(r)
    }
}

thread_local! {
    /// This thread's inline limit and when it was worked out.
    static LIMIT: Cell<Option<(usize, Instant)>> = const { Cell::new(None) };
}

/// The largest write this thread does inline, from its CPU affinity
/// (looked at again after [`AFFINITY_RECHECK`]); `now` is the time.
fn inline_max(now: Instant) -> usize {
    LIMIT.with(|limit| match limit.get() {
        Some((max, at)) if now.saturating_duration_since(at) < AFFINITY_RECHECK => max,
        _ => {
            let max = inline_max_for(allowed_cpus());
            limit.set(Some((max, now)));
            max
        }
    })
}

fn inline_max_for(allowed_cpus: Option<usize>) -> usize {
    match allowed_cpus {
        Some(1) => INLINE_MAX_ONE_CPU,
        // Several CPUs, or unknown: leave large copies to io-wq.
        _ => INLINE_MAX_SHARED,
    }
}

/// How many CPUs this thread may run on.
fn allowed_cpus() -> Option<usize> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    Some(
        (0..nix::sched::CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .count(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn scratch() -> (tempfile::NamedTempFile, SharedFd) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let fd = SharedFd::new(f.reopen().unwrap().into());
        (f, fd)
    }

    #[test]
    fn test_inline_writes_only_whole_small_pages() {
        let w = InlineWrites::new(true);
        let p = w.page;
        let now = Instant::now();
        let max = inline_max(now);
        assert!(w.fits(0, p, now));
        assert!(w.fits(p as u64 * 3, max, now));
        assert!(!w.fits(0, max + p, now));
        assert!(!w.fits(512, p, now));
        assert!(!w.fits(0, p + 512, now));
        assert!(!w.fits(0, 0, now));
    }

    #[test]
    fn test_large_writes_stay_inline_only_on_a_pinned_thread() {
        assert_eq!(inline_max_for(Some(1)), INLINE_MAX_ONE_CPU);
        assert_eq!(inline_max_for(Some(2)), INLINE_MAX_SHARED);
        assert_eq!(inline_max_for(None), INLINE_MAX_SHARED);
    }

    #[test]
    fn test_a_thread_pinned_to_one_cpu_sees_one_cpu() {
        let me = nix::unistd::Pid::from_raw(0);
        let all = nix::sched::sched_getaffinity(me).unwrap();
        let first = (0..nix::sched::CpuSet::count())
            .find(|&c| all.is_set(c).unwrap())
            .unwrap();
        std::thread::spawn(move || {
            let mut one = nix::sched::CpuSet::new();
            one.set(first).unwrap();
            nix::sched::sched_setaffinity(me, &one).unwrap();
            assert_eq!(allowed_cpus(), Some(1));
            assert_eq!(inline_max(Instant::now()), INLINE_MAX_ONE_CPU);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn test_ring_mode_never_writes_inline() {
        let (_f, fd) = scratch();
        let w = InlineWrites::new(false);
        assert!(w.try_write(&fd, &vec![1u8; w.page], 0).is_none());
    }

    #[test]
    fn test_inline_write_lands_in_the_file_or_goes_to_the_ring() {
        let (f, fd) = scratch();
        let w = InlineWrites::new(true);
        let data = vec![0x5au8; w.page * 2];
        match w.try_write(&fd, &data, w.page as u64) {
            Some(r) => {
                assert_eq!(r.unwrap(), data.len());
                let mut back = vec![0u8; data.len()];
                f.as_file().read_exact_at(&mut back, w.page as u64).unwrap();
                assert_eq!(back, data);
            }
            // A file system with non-blocking buffered writes: the probe
            // said so, and from now on the ring does them.
            None => assert_eq!(w.mode.load(Ordering::Relaxed), RING),
        }
        assert_ne!(w.mode.load(Ordering::Relaxed), UNKNOWN);
    }

    #[test]
    fn test_slow_write_backs_off_to_the_ring() {
        let (_f, fd) = scratch();
        let w = InlineWrites::new(true);
        w.mode.store(INLINE, Ordering::Relaxed);
        w.off_until.store(u64::MAX, Ordering::Relaxed);
        assert!(w.try_write(&fd, &vec![1u8; w.page], 0).is_none());
        w.off_until.store(0, Ordering::Relaxed);
        assert!(w.try_write(&fd, &vec![1u8; w.page], 0).is_some());
    }
}
