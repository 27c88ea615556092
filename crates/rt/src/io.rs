//! File operations on owned buffers.
//!
//! Each function takes the buffer by value and gives it back with the result,
//! so the memory stays alive until the kernel is done with it even if the
//! caller's future is dropped. `Aio::IoUring` submits to the calling thread's
//! ring; `Aio::Threads` (and any thread without a ring) uses tokio's blocking
//! pool.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use crate::op::{Op, Payload};
use crate::ring::{self, Ring};
use crate::IoBuf;

/// Which engine runs file I/O (`aio=` in qemu's options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aio {
    /// The calling thread's io_uring ring.
    IoUring,
    /// A pool of blocking threads.
    Threads,
}

/// When the ring gives a file's operations to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Submit {
    /// With the other operations started in the same pass of the thread's
    /// tasks, by one `io_uring_enter`: fewest syscalls. Right where the
    /// kernel does the work inline (page-cache hits), so nothing is gained
    /// by starting early.
    #[default]
    Batched,
    /// At once, while the device has few of this thread's operations
    /// (see `ring::EAGER_DEPTH`): for `O_DIRECT`, where the device works
    /// in parallel with us. Handing it a whole burst in one go makes the
    /// requests travel as a convoy: they complete together, and the device
    /// sits idle while the front-end turns them round.
    Eager,
}

/// A file descriptor shared by a node and its in-flight operations, so it is
/// closed only when the last operation using it has completed.
#[derive(Debug, Clone)]
pub struct SharedFd {
    fd: Arc<OwnedFd>,
    submit: Submit,
}

impl SharedFd {
    /// Wrap an open file descriptor; its operations are [`Submit::Batched`].
    pub fn new(fd: OwnedFd) -> Self {
        Self::with_submit(fd, Submit::Batched)
    }

    /// Wrap an open file descriptor whose ring operations follow `submit`.
    pub fn with_submit(fd: OwnedFd, submit: Submit) -> Self {
        SharedFd {
            fd: Arc::new(fd),
            submit,
        }
    }

    /// The raw descriptor, valid while `self` lives.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// When its operations reach the kernel.
    pub fn submit(&self) -> Submit {
        self.submit
    }
}

fn check(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn blocking_pread(fd: &SharedFd, buf: &mut IoBuf, offset: u64) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() writable bytes; fd is open while `fd` lives.
    let ret = unsafe {
        libc::pread64(
            fd.raw(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off64_t,
        )
    };
    check(ret)
}

fn blocking_pwrite(fd: &SharedFd, buf: &[u8], offset: u64) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() readable bytes; fd is open while `fd` lives.
    let ret = unsafe {
        libc::pwrite64(
            fd.raw(),
            buf.as_ptr().cast(),
            buf.len(),
            offset as libc::off64_t,
        )
    };
    check(ret)
}

fn blocking_fsync(fd: &SharedFd, datasync: bool) -> io::Result<()> {
    // SAFETY: plain syscalls on an open descriptor.
    let ret = unsafe {
        if datasync {
            libc::fdatasync(fd.raw())
        } else {
            libc::fsync(fd.raw())
        }
    };
    check(ret as isize).map(|_| ())
}

fn blocking_fallocate(fd: &SharedFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    let ret = unsafe {
        libc::fallocate64(
            fd.raw(),
            mode,
            offset as libc::off64_t,
            len as libc::off64_t,
        )
    };
    check(ret as isize).map(|_| ())
}

async fn on_pool<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("I/O worker failed: {e}")))
}

/// This thread's ring, if `aio` asks for io_uring and the thread has one.
fn ring_for(aio: Aio) -> Option<Arc<Ring>> {
    match aio {
        Aio::IoUring => ring::current(),
        Aio::Threads => None,
    }
}

fn result_of(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

fn check_offset(offset: u64) -> io::Result<()> {
    // io_uring reads `-1` as "the file position"; pread refuses it. Refuse both.
    if offset > i64::MAX as u64 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

/// Run `sqe` on `ring`, keeping `buf` and `fd` alive until it completes.
/// Gives them back (`Err`) if the ring no longer takes operations.
///
/// # Safety
/// `sqe` may refer only to `buf`'s memory and `fd`.
async unsafe fn on_ring(
    ring: Arc<Ring>,
    sqe: squeue::Entry,
    buf: Option<IoBuf>,
    fd: &SharedFd,
) -> Result<(i32, Option<IoBuf>), Option<IoBuf>> {
    let payload = Payload {
        buf,
        fd: Some(fd.clone()),
    };
    let submit = fd.submit();
    // SAFETY: upheld by the caller; the payload keeps buf and fd alive.
    match unsafe { Op::start(ring, sqe, payload, submit) } {
        Ok(op) => Ok(op.await),
        Err(p) => Err(p.buf),
    }
}

/// Read `buf.len()` bytes at `offset` (one syscall; may return fewer).
pub async fn read_at(
    aio: Aio,
    fd: &SharedFd,
    mut buf: IoBuf,
    offset: u64,
) -> (io::Result<usize>, IoBuf) {
    if let Err(e) = check_offset(offset) {
        return (Err(e), buf);
    }
    if let Some(ring) = ring_for(aio) {
        let len = buf.len().min(u32::MAX as usize) as u32;
        let sqe = opcode::Read::new(types::Fd(fd.raw()), buf.as_mut_ptr(), len)
            .offset(offset)
            .build();
        // SAFETY: the SQE points into `buf`, which the operation owns.
        match unsafe { on_ring(ring, sqe, Some(buf), fd) }.await {
            Ok((res, b)) => return (result_of(res), b.unwrap_or_else(|| IoBuf::new(0))),
            Err(b) => buf = b.unwrap_or_else(|| IoBuf::new(0)),
        }
    }
    let fd = fd.clone();
    match on_pool(move || {
        let r = blocking_pread(&fd, &mut buf, offset);
        (r, buf)
    })
    .await
    {
        Ok(pair) => pair,
        Err(e) => (Err(e), IoBuf::new(0)),
    }
}

/// Write `buf` at `offset` (one syscall; may write fewer bytes).
pub async fn write_at(
    aio: Aio,
    fd: &SharedFd,
    mut buf: IoBuf,
    offset: u64,
) -> (io::Result<usize>, IoBuf) {
    if let Err(e) = check_offset(offset) {
        return (Err(e), buf);
    }
    if let Some(ring) = ring_for(aio) {
        let len = buf.len().min(u32::MAX as usize) as u32;
        let sqe = opcode::Write::new(types::Fd(fd.raw()), buf.as_ptr(), len)
            .offset(offset)
            .build();
        // SAFETY: the SQE points into `buf`, which the operation owns.
        match unsafe { on_ring(ring, sqe, Some(buf), fd) }.await {
            Ok((res, b)) => return (result_of(res), b.unwrap_or_else(|| IoBuf::new(0))),
            Err(b) => buf = b.unwrap_or_else(|| IoBuf::new(0)),
        }
    }
    let fd = fd.clone();
    match on_pool(move || {
        let r = blocking_pwrite(&fd, &buf, offset);
        (r, buf)
    })
    .await
    {
        Ok(pair) => pair,
        Err(e) => (Err(e), IoBuf::new(0)),
    }
}

/// fsync or fdatasync.
pub async fn fsync(aio: Aio, fd: &SharedFd, datasync: bool) -> io::Result<()> {
    if let Some(ring) = ring_for(aio) {
        let flags = if datasync {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let sqe = opcode::Fsync::new(types::Fd(fd.raw())).flags(flags).build();
        // SAFETY: the SQE refers only to `fd`, which the operation holds.
        if let Ok((res, _)) = unsafe { on_ring(ring, sqe, None, fd) }.await {
            return result_of(res).map(|_| ());
        }
    }
    let fd = fd.clone();
    on_pool(move || blocking_fsync(&fd, datasync)).await?
}

/// fallocate(2) with the given mode flags.
pub async fn fallocate(
    aio: Aio,
    fd: &SharedFd,
    mode: i32,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    if let Some(ring) = ring_for(aio) {
        let sqe = opcode::Fallocate::new(types::Fd(fd.raw()), len)
            .offset(offset)
            .mode(mode)
            .build();
        // SAFETY: the SQE refers only to `fd`, which the operation holds.
        if let Ok((res, _)) = unsafe { on_ring(ring, sqe, None, fd) }.await {
            return result_of(res).map(|_| ());
        }
    }
    let fd = fd.clone();
    on_pool(move || blocking_fallocate(&fd, mode, offset, len)).await?
}

/// How [`write_now`] may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteWait {
    /// An ordinary `pwrite`: may sleep (page locks, dirty throttling).
    Block,
    /// `RWF_NOWAIT`: fails with `EAGAIN` rather than sleep, or with
    /// `EOPNOTSUPP` where the file system cannot promise that.
    NoWait,
}

/// Write `buf` at `offset` on the calling thread, now (one syscall; may
/// write fewer bytes). For buffered writes, which are a copy into the page
/// cache, this is cheaper than any hand-off; the caller decides when that
/// is safe.
pub fn write_now(fd: &SharedFd, buf: &[u8], offset: u64, wait: WriteWait) -> io::Result<usize> {
    check_offset(offset)?;
    if wait == WriteWait::Block {
        return blocking_pwrite(fd, buf, offset);
    }
    let iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the iovec covers `buf`, readable for its length while this
    // call runs; fd is open while `fd` lives.
    let ret =
        unsafe { libc::pwritev2(fd.raw(), &iov, 1, offset as libc::off64_t, libc::RWF_NOWAIT) };
    check(ret)
}
