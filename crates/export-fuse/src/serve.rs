//! Serving an export's requests on its I/O thread, which reads `/dev/fuse`
//! itself, without blocking, and runs each request as a task there.
//!
//! Why not fuser's session loop: its reader threads block in `read(2)` and
//! hand every request to the runtime, which costs a thread wake-up (and on
//! a loaded CPU a context switch) per request. Reading on the runtime, a
//! request goes from the kernel to the block layer with no hand-off, and a
//! burst of requests is read, started and submitted to the ring in one
//! turn. fuser still mounts and negotiates `INIT`.
//!
//! Each read is split in two: the header and a write's arguments land in a
//! small array, the rest (a write's payload) in a pooled, aligned buffer,
//! which a large write then takes without a copy.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use qsd_block::{BlockBackend, NodeRef};
use qsd_rt::IoBuf;
use tokio::io::unix::AsyncFd;

use crate::ops::{self, OpResult};
use crate::proto::{self, DecodeError, Header, Op, SetAttr, WRITE_PAYLOAD_AT};
use crate::state::{Shared, MAX_IO};

/// How long the kernel may cache attributes (qemu's value).
const ATTR_TTL_SECS: u64 = 1;
/// Writes up to this size are copied out of the read buffer, which is then
/// reused; larger ones take it.
const COPY_WRITE_MAX: usize = 64 * 1024;

/// The `/dev/fuse` descriptor of one export, shared by its request tasks
/// for their replies.
type Dev = Arc<AsyncFd<OwnedFd>>;

/// Serve `fd` (a mounted, initialised FUSE connection) until the kernel
/// ends the connection. Must run on the export's runtime.
pub(crate) async fn serve(shared: Arc<Shared>, fd: OwnedFd) {
    match run(shared, fd).await {
        Ok(()) => tracing::debug!("FUSE export: connection ended"),
        Err(e) => tracing::warn!("FUSE export: serving stopped: {e}"),
    }
}

async fn run(shared: Arc<Shared>, fd: OwnedFd) -> std::io::Result<()> {
    let dev: Dev = Arc::new(qsd_rt::readable_async_fd(fd)?);
    let owner = nix::unistd::geteuid().as_raw();
    let mut spare: Option<IoBuf> = None;
    loop {
        let mut head = [0u8; WRITE_PAYLOAD_AT];
        let mut data = spare.take().unwrap_or_else(|| shared.pool.get(MAX_IO));
        data.resize(MAX_IO);
        let n = match read_request(&dev, &mut head, &mut data).await {
            Ok(n) => n,
            // Unmounted or aborted.
            Err(Errno::ENODEV) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let ctx = Ctx {
            shared: &shared,
            dev: &dev,
            owner,
        };
        match ctx.handle(&head, n, data) {
            Next::Continue(buf) => spare = buf,
            Next::RunFirst(buf) => {
                spare = buf;
                tokio::task::yield_now().await;
            }
            Next::Stop => return Ok(()),
        }
    }
}

/// Read one request; retries on EINTR, waits while there is none.
async fn read_request(dev: &Dev, head: &mut [u8], data: &mut IoBuf) -> Result<usize, Errno> {
    loop {
        let mut guard = dev
            .readable()
            .await
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        let r = guard.try_io(|fd| {
            let mut iov = [IoSliceMut::new(head), IoSliceMut::new(&mut data[..])];
            nix::sys::uio::readv(fd.get_ref(), &mut iov).map_err(std::io::Error::from)
        });
        match r {
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(e)) => match Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)) {
                // A request the kernel dropped while we read it.
                Errno::EINTR | Errno::ENOENT => continue,
                other => return Err(other),
            },
            // Nothing queued: readiness was cleared, wait again.
            Err(_would_block) => continue,
        }
    }
}

/// What the read loop does after a request.
enum Next {
    /// Read the next request, into this buffer if given.
    Continue(Option<IoBuf>),
    /// As `Continue`, once the task just spawned has run: a large write,
    /// which took the buffer, is then copied into the page cache or
    /// submitted while its payload is still in the CPU's cache.
    RunFirst(Option<IoBuf>),
    /// The connection was destroyed.
    Stop,
}

/// When a request's task first runs.
#[derive(Clone, Copy)]
enum Start {
    /// Before the next request is read from /dev/fuse: a read then reaches
    /// the disk at once, while we read the requests queued behind it
    /// (without this, fio's 32 reads went to the disk as one convoy, and
    /// the disk stood empty while they were turned round: 4k QD32
    /// `O_DIRECT` reads rose from about 48,000 to 60,000 IOPS). Only for
    /// reads: started this way, 4k `O_DIRECT` writes at QD32 lost a sixth
    /// of their rate, and page-cache I/O gains nothing either way.
    Now,
    /// When the scheduler gets to the task, after the read loop yields.
    Queued,
}

/// Send a reply: the out header and its body (possibly empty).
fn send(dev: &AsyncFd<OwnedFd>, header: &[u8], body: &[u8]) {
    let iov = [IoSlice::new(header), IoSlice::new(body)];
    match nix::sys::uio::writev(dev.get_ref().as_fd(), &iov) {
        Ok(_) => {}
        // The request was interrupted or the connection is going away.
        Err(Errno::ENOENT | Errno::ENODEV) => {}
        Err(e) => tracing::debug!("FUSE export: reply failed: {e}"),
    }
}

fn reply_ok(dev: &AsyncFd<OwnedFd>, unique: u64, body: &[u8]) {
    send(dev, &proto::out_header(unique, 0, body.len()), body);
}

fn reply_err(dev: &AsyncFd<OwnedFd>, unique: u64, errno: i32) {
    send(dev, &proto::out_header(unique, errno, 0), &[]);
}

fn reply_result(dev: &AsyncFd<OwnedFd>, unique: u64, r: OpResult<()>) {
    match r {
        Ok(()) => reply_ok(dev, unique, &[]),
        Err(n) => reply_err(dev, unique, n),
    }
}

/// Bytes the image takes on the host: the bottom of the `file` chain.
fn allocated_bytes(node: &NodeRef) -> Option<u64> {
    let mut n = Arc::clone(node);
    while let Some(c) = n.children().iter().find(|c| c.role == "file") {
        let next = Arc::clone(&c.node);
        n = next;
    }
    n.driver().image_info().actual_size.filter(|&s| s > 0)
}

/// The attributes of the exported file, as qemu builds them.
fn file_attr(shared: &Shared, blk: &BlockBackend) -> proto::Attr {
    let size = blk.len();
    let a = shared.attrs();
    proto::Attr {
        ino: 1,
        size,
        blocks: allocated_bytes(blk.node()).unwrap_or(size).div_ceil(512),
        time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        mode: libc::S_IFREG | (a.mode & 0o7777),
        uid: a.uid,
        gid: a.gid,
        blksize: blk.request_alignment(),
    }
}

fn reply_attr(shared: &Shared, dev: &AsyncFd<OwnedFd>, unique: u64, blk: &BlockBackend) {
    reply_ok(
        dev,
        unique,
        &proto::attr_out(&file_attr(shared, blk), ATTR_TTL_SECS),
    );
}

/// The owner's requests only, without `allow_other` (fuser's rule: the
/// kernel may send these few on behalf of nobody in particular).
fn refused_for(op: &Op, allow_other: bool, uid: u32, owner: u32) -> bool {
    let anyone = matches!(
        op,
        Op::Read { .. } | Op::Write { .. } | Op::Fsync | Op::Release | Op::Forget | Op::Destroy
    );
    !allow_other && uid != owner && !anyone
}

/// What `setattr` may change: checked before anything is changed.
fn check_setattr(shared: &Shared, s: &SetAttr) -> Result<(), i32> {
    let allow_other = shared.allow_other.load(Ordering::Relaxed);
    // Only size, mode and (with allow_other) owner can be set.
    if s.times || (!allow_other && (s.uid.is_some() || s.gid.is_some())) {
        return Err(libc::ENOTSUP);
    }
    if let Some(m) = s.mode {
        // Without allow_other nobody but the owner can get in anyway.
        if !allow_other && m & 0o077 != 0 {
            return Err(libc::EPERM);
        }
        if !shared.writable && m & 0o222 != 0 {
            return Err(libc::EROFS);
        }
    }
    Ok(())
}

fn apply_attrs(shared: &Shared, s: &SetAttr) {
    shared.set_attrs(|a| {
        if let Some(m) = s.mode {
            a.mode = m & 0o7777;
        }
        if let Some(u) = s.uid {
            a.uid = u;
        }
        if let Some(g) = s.gid {
            a.gid = g;
        }
    });
}

/// One request's view of the export.
struct Ctx<'a> {
    shared: &'a Arc<Shared>,
    dev: &'a Dev,
    owner: u32,
}

impl Ctx<'_> {
    /// Decode and start the request of `n` bytes read into `head` and
    /// `data`.
    fn handle(&self, head: &[u8], n: usize, data: IoBuf) -> Next {
        let joined;
        let is_write = head[4..8] == proto::opcode::WRITE.to_le_bytes();
        // Only a write's arguments fit in `head` for sure; other requests
        // that spilled over are joined up.
        let whole = if n <= head.len() || is_write {
            &head[..n.min(head.len())]
        } else {
            joined = [head, &data[..n - head.len()]].concat();
            &joined[..]
        };
        let (h, op) = match proto::decode(whole, n) {
            Ok(r) => r,
            Err(DecodeError::Args(h)) => {
                reply_err(self.dev, h.unique, libc::EINVAL);
                return Next::Continue(Some(data));
            }
            Err(e) => {
                tracing::warn!("FUSE export: undecodable request ({e:?}, {n} bytes)");
                return Next::Continue(Some(data));
            }
        };
        let allow_other = self.shared.allow_other.load(Ordering::Relaxed);
        if refused_for(&op, allow_other, h.uid, self.owner) {
            reply_err(self.dev, h.unique, libc::EACCES);
            return Next::Continue(Some(data));
        }
        match op {
            Op::Write { offset, size } => return self.write(&h, offset, size as usize, data),
            Op::Destroy => {
                reply_ok(self.dev, h.unique, &[]);
                return Next::Stop;
            }
            Op::Read { offset, size } => self.read(&h, offset, size),
            other => self.control(&h, other),
        }
        Next::Continue(Some(data))
    }

    /// Requests answered at once or by a task that needs no buffer.
    fn control(&self, h: &Header, op: Op) {
        let (dev, unique) = (self.dev, h.unique);
        match op {
            // The mount point is the only file; it has no entries.
            Op::Lookup => reply_err(dev, unique, libc::ENOENT),
            Op::Forget => {}
            Op::GetAttr => match self.shared.backend() {
                Some(blk) => reply_attr(self.shared, dev, unique, &blk),
                None => reply_err(dev, unique, libc::ENOTCONN),
            },
            Op::SetAttr(s) => self.setattr(h, s),
            // Like qemu (since 10.1): no page cache, and direct writes may
            // run in parallel.
            Op::Open => {
                let flags = proto::FOPEN_DIRECT_IO | proto::FOPEN_PARALLEL_DIRECT_WRITES;
                reply_ok(dev, unique, &proto::open_out(flags));
            }
            Op::Release => reply_ok(dev, unique, &[]),
            Op::Statfs => {
                // One file that fills the whole "file system".
                let blocks = self.shared.backend().map_or(0, |b| b.len().div_ceil(512));
                reply_ok(dev, unique, &proto::statfs_out(blocks));
            }
            Op::Fsync | Op::Flush => {
                self.spawn(unique, |_, blk, dev| async move {
                    reply_result(&dev, unique, ops::flush(&blk).await);
                });
            }
            Op::Fallocate {
                offset,
                length,
                mode,
            } => {
                if !self.shared.writable {
                    return reply_err(dev, unique, libc::EACCES);
                }
                self.spawn(unique, move |shared, blk, dev| async move {
                    let r = ops::fallocate(&shared, &blk, mode, offset, length).await;
                    reply_result(&dev, unique, r);
                });
            }
            Op::Lseek { offset, whence } => {
                self.spawn(unique, move |_, blk, dev| async move {
                    match ops::seek(&blk, offset as i64, whence).await {
                        Ok(pos) => reply_ok(&dev, unique, &proto::lseek_out(pos as u64)),
                        Err(n) => reply_err(&dev, unique, n),
                    }
                });
            }
            // ENOSYS to an interrupt makes the kernel stop sending them; the
            // request itself completes as usual. ENOSYS to xattr requests
            // makes it stop asking (security.capability on writes).
            Op::Interrupt | Op::Other => reply_err(dev, unique, libc::ENOSYS),
            Op::Read { .. } | Op::Write { .. } | Op::Destroy => {}
        }
    }

    /// Run `f` as a task holding the backend, or answer ENOTCONN once the
    /// export is removed.
    fn spawn<F, Fut>(&self, unique: u64, f: F)
    where
        F: FnOnce(Arc<Shared>, BlockBackend, Dev) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.spawn_as(unique, Start::Queued, f);
    }

    fn spawn_as<F, Fut>(&self, unique: u64, start: Start, f: F)
    where
        F: FnOnce(Arc<Shared>, BlockBackend, Dev) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Some(req) = self.shared.begin() else {
            return reply_err(self.dev, unique, libc::ENOTCONN);
        };
        let fut = f(
            Arc::clone(self.shared),
            req.blk().clone(),
            Arc::clone(self.dev),
        );
        let task = async move {
            fut.await;
            drop(req);
        };
        match start {
            Start::Now => qsd_rt::spawn_started(task),
            Start::Queued => drop(tokio::spawn(task)),
        }
    }

    fn setattr(&self, h: &Header, s: SetAttr) {
        let unique = h.unique;
        if let Err(e) = check_setattr(self.shared, &s) {
            return reply_err(self.dev, unique, e);
        }
        let Some(size) = s.size else {
            apply_attrs(self.shared, &s);
            return match self.shared.backend() {
                Some(blk) => reply_attr(self.shared, self.dev, unique, &blk),
                None => reply_err(self.dev, unique, libc::ENOTCONN),
            };
        };
        if !self.shared.writable {
            return reply_err(self.dev, unique, libc::EACCES);
        }
        self.spawn(unique, move |shared, blk, dev| async move {
            match ops::truncate(&shared, &blk, size).await {
                Ok(()) => {
                    apply_attrs(&shared, &s);
                    reply_attr(&shared, &dev, unique, &blk);
                }
                Err(n) => reply_err(&dev, unique, n),
            }
        });
    }

    fn read(&self, h: &Header, offset: u64, size: u32) {
        let unique = h.unique;
        self.spawn_as(unique, Start::Now, move |shared, blk, dev| async move {
            match ops::read(&shared, &blk, offset, size).await {
                Ok(buf) => {
                    reply_ok(&dev, unique, &buf);
                    shared.pool.put(buf);
                }
                Err(n) => reply_err(&dev, unique, n),
            }
        });
    }

    /// A write whose `size`-byte payload is at the start of `data`.
    fn write(&self, h: &Header, offset: u64, size: usize, mut data: IoBuf) -> Next {
        let unique = h.unique;
        if !self.shared.writable {
            reply_err(self.dev, unique, libc::EACCES);
            return Next::Continue(Some(data));
        }
        let (payload, keep) = if size <= COPY_WRITE_MAX {
            let mut small = self.shared.pool.get(size);
            small.copy_from_slice(&data[..size]);
            (small, Some(data))
        } else {
            data.resize(size);
            (data, None)
        };
        self.spawn(unique, move |shared, blk, dev| async move {
            match ops::write(&shared, &blk, offset, payload).await {
                Ok(n) => reply_ok(&dev, unique, &proto::write_out(n)),
                Err(n) => reply_err(&dev, unique, n),
            }
        });
        match keep {
            Some(buf) => Next::Continue(Some(buf)),
            None => Next::RunFirst(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_without_allow_other_only_io_passes_for_strangers() {
        let read = Op::Read { offset: 0, size: 1 };
        assert!(!refused_for(&read, false, 5, 0));
        assert!(refused_for(&Op::GetAttr, false, 5, 0));
        assert!(!refused_for(&Op::GetAttr, false, 0, 0));
        assert!(!refused_for(&Op::GetAttr, true, 5, 0));
    }
}
