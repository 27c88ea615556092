//! The `fuser::Filesystem` of an export: one inode, the mount point itself.
//!
//! Runs on the FUSE reader threads. Attribute requests are answered here;
//! data requests are spawned as tasks on the export's runtime, each owning
//! its buffer and its reply, so they run concurrently.

use std::ffi::OsStr;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use qsd_block::{BlockBackend, NodeRef};

use crate::ops::{self, OpResult};
use crate::state::{Shared, MAX_IO};

/// How long the kernel may cache attributes (qemu's value).
const ATTR_TTL: Duration = Duration::from_secs(1);
/// Requests the kernel may keep queued to us in the background (async
/// direct I/O counts here): enough for deep queues from several jobs.
const MAX_BACKGROUND: u16 = 256;

fn errno(n: i32) -> Errno {
    Errno::from_i32(n)
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
pub(crate) fn file_attr(shared: &Shared, blk: &BlockBackend) -> FileAttr {
    let size = blk.len();
    let blocks = allocated_bytes(blk.node()).unwrap_or(size).div_ceil(512);
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let now = UNIX_EPOCH + Duration::from_secs(secs);
    let a = shared.attrs();
    FileAttr {
        ino: INodeNo::ROOT,
        size,
        blocks,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind: FileType::RegularFile,
        perm: (a.mode & 0o7777) as u16,
        nlink: 1,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: blk.request_alignment(),
        flags: 0,
    }
}

/// The export's filesystem, owned by the FUSE session.
#[derive(Debug)]
pub(crate) struct ExportFs {
    pub(crate) shared: Arc<Shared>,
}

impl ExportFs {
    fn spawn_flush(&self, reply: ReplyEmpty) {
        let Some(req) = self.shared.begin() else {
            return reply.error(Errno::ENOTCONN);
        };
        self.shared.runner.spawn(async move {
            let blk = req.blk();
            finish(ops::flush(blk).await, reply);
        });
    }

    fn reply_attr(&self, reply: ReplyAttr) {
        match self.shared.backend() {
            Some(blk) => reply.attr(&ATTR_TTL, &file_attr(&self.shared, &blk)),
            None => reply.error(Errno::ENOTCONN),
        }
    }
}

fn finish(r: OpResult<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(n) => reply.error(errno(n)),
    }
}

/// What `setattr` may change: checked before anything is changed.
fn check_setattr(shared: &Shared, mode: Option<u32>, others: bool) -> Result<(), Errno> {
    // Only size, mode and (with allow_other) owner can be set.
    if others {
        return Err(errno(libc::ENOTSUP));
    }
    if let Some(m) = mode {
        let allow_other = shared
            .allow_other
            .load(std::sync::atomic::Ordering::Relaxed);
        // Without allow_other nobody but the owner can get in anyway.
        if !allow_other && m & 0o077 != 0 {
            return Err(Errno::EPERM);
        }
        if !shared.writable && m & 0o222 != 0 {
            return Err(Errno::EROFS);
        }
    }
    Ok(())
}

fn apply_attrs(shared: &Shared, mode: Option<u32>, uid: Option<u32>, gid: Option<u32>) {
    shared.set_attrs(|a| {
        if let Some(m) = mode {
            a.mode = m & 0o7777;
        }
        if let Some(u) = uid {
            a.uid = u;
        }
        if let Some(g) = gid {
            a.gid = g;
        }
    });
}

impl Filesystem for ExportFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let max = MAX_IO as u32;
        if let Err(cap) = config.set_max_write(max) {
            let _ = config.set_max_write(cap.min(max));
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        // Without ASYNC_DIO the kernel turns libaio/io_uring O_DIRECT I/O
        // into one synchronous request at a time.
        let wanted = InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
        let _ = config.add_capabilities(wanted & config.capabilities());
        Ok(())
    }

    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        // The mount point is the only file; it has no entries.
        reply.error(Errno::ENOENT);
    }

    fn getattr(&self, _req: &Request, _ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.reply_attr(reply);
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        chgtime: Option<SystemTime>,
        bkuptime: Option<SystemTime>,
        flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let allow_other = self
            .shared
            .allow_other
            .load(std::sync::atomic::Ordering::Relaxed);
        let others = atime.is_some()
            || mtime.is_some()
            || ctime.is_some()
            || crtime.is_some()
            || chgtime.is_some()
            || bkuptime.is_some()
            || flags.is_some()
            || (!allow_other && (uid.is_some() || gid.is_some()));
        if let Err(e) = check_setattr(&self.shared, mode, others) {
            return reply.error(e);
        }
        let Some(size) = size else {
            apply_attrs(&self.shared, mode, uid, gid);
            return self.reply_attr(reply);
        };
        if !self.shared.writable {
            return reply.error(Errno::EACCES);
        }
        let Some(req) = self.shared.begin() else {
            return reply.error(Errno::ENOTCONN);
        };
        let shared = Arc::clone(&self.shared);
        self.shared.runner.spawn(async move {
            let blk = req.blk();
            match ops::truncate(&shared, blk, size).await {
                Ok(()) => {
                    apply_attrs(&shared, mode, uid, gid);
                    reply.attr(&ATTR_TTL, &file_attr(&shared, blk));
                }
                Err(n) => reply.error(errno(n)),
            }
        });
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Like qemu (since 10.1): no page cache, and direct writes may run
        // in parallel.
        let flags = FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        reply.opened(FileHandle(0), flags);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(req) = self.shared.begin() else {
            return reply.error(Errno::ENOTCONN);
        };
        let shared = Arc::clone(&self.shared);
        self.shared.runner.spawn(async move {
            let blk = req.blk();
            match ops::read(&shared, blk, offset, size).await {
                Ok(buf) => {
                    reply.data(&buf);
                    shared.pool.put(buf);
                }
                Err(n) => reply.error(errno(n)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if !self.shared.writable {
            return reply.error(Errno::EACCES);
        }
        let Some(req) = self.shared.begin() else {
            return reply.error(Errno::ENOTCONN);
        };
        // The request buffer is reused for the next request: copy out.
        let mut buf = self.shared.pool.get(data.len());
        buf.copy_from_slice(data);
        let shared = Arc::clone(&self.shared);
        self.shared.runner.spawn(async move {
            let blk = req.blk();
            match ops::write(&shared, blk, offset, buf).await {
                Ok(n) => reply.written(n),
                Err(n) => reply.error(errno(n)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.spawn_flush(reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn_flush(reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // One file that fills the whole "file system".
        let blocks = self.shared.backend().map_or(0, |b| b.len().div_ceil(512));
        reply.statfs(blocks, 0, 0, 1, 0, 512, 255, 512);
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _n: &OsStr, _s: u32, reply: ReplyXattr) {
        // ENOSYS makes the kernel stop asking (security.capability on writes).
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if !self.shared.writable {
            return reply.error(Errno::EACCES);
        }
        let Some(req) = self.shared.begin() else {
            return reply.error(Errno::ENOTCONN);
        };
        let shared = Arc::clone(&self.shared);
        self.shared.runner.spawn(async move {
            let blk = req.blk();
            finish(
                ops::fallocate(&shared, blk, mode, offset, length).await,
                reply,
            );
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(req) = self.shared.begin() else {
            return reply.error(Errno::ENOTCONN);
        };
        self.shared.runner.spawn(async move {
            let blk = req.blk();
            match ops::seek(blk, offset, whence).await {
                Ok(pos) => reply.offset(pos),
                Err(n) => reply.error(errno(n)),
            }
        });
    }
}
