//! The `file` and `host_device` protocol drivers: an image file or a host
//! block device, with qemu-compatible image locking.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::FallocateFlags;
use nix::libc;
use qsd_block::{
    BlockDriver, BlockStatus, BoxFut, DriverFactory, Error, ErrorKind, ImageInfo, Limits, OpenCtx,
    Perm, Result, WriteFlags, ZeroFlags,
};
use qsd_rt::io::{self as rtio, Aio, SharedFd, Submit};
use qsd_rt::IoBuf;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::inline::InlineWrites;
use crate::lock::{ofd_supported, ImageLock};
use crate::posix::{self, errno_of, os_error, Extent, FileKind};

/// `locking`: OnOffAuto.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Locking {
    Auto,
    On,
    Off,
}

/// `aio`: BlockdevAioOptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum AioOpt {
    Threads,
    Native,
    IoUring,
}

/// BlockdevOptionsFile (shared by `file` and `host_device`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileOpts {
    filename: String,
    pr_manager: Option<String>,
    locking: Option<Locking>,
    aio: Option<AioOpt>,
    /// Accepted for compatibility: the rt engine chooses its own batching.
    #[allow(dead_code)]
    aio_max_batch: Option<i64>,
    /// Only used by migration's inactivation, which qsd does not do.
    #[allow(dead_code)]
    drop_cache: Option<bool>,
    #[allow(dead_code)]
    x_check_cache_dropped: Option<bool>,
}

/// Factory for `file` (regular files) or `host_device` (devices).
#[derive(Debug)]
pub struct FileFactory {
    device: bool,
}

impl FileFactory {
    /// The `file` driver.
    pub fn file() -> Self {
        FileFactory { device: false }
    }

    /// The `host_device` driver.
    pub fn host_device() -> Self {
        FileFactory { device: true }
    }
}

impl DriverFactory for FileFactory {
    fn name(&self) -> &'static str {
        if self.device {
            "host_device"
        } else {
            "file"
        }
    }

    fn open<'a>(
        &'a self,
        ctx: &'a mut OpenCtx<'_>,
        opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>> {
        Box::pin(async move {
            let opts: FileOpts = ctx.parse(opts)?;
            let common = ctx.options();
            let params = OpenParams {
                driver: self.name(),
                device: self.device,
                read_only: common.read_only,
                auto_read_only: common.auto_read_only,
                direct: common.cache_direct,
            };
            let drv = PosixFile::open(&params, &opts)?;
            Ok(Box::new(drv) as Box<dyn BlockDriver>)
        })
    }
}

struct OpenParams {
    driver: &'static str,
    device: bool,
    read_only: bool,
    auto_read_only: bool,
    direct: bool,
}

/// An open image file or device.
#[derive(Debug)]
pub struct PosixFile {
    driver: &'static str,
    filename: String,
    /// For fcntl, lseek and fstat; the same open file description as `fd`.
    file: File,
    /// For I/O through the runtime.
    fd: SharedFd,
    aio: Aio,
    kind: FileKind,
    /// Opened read-only although the node is writable (auto-read-only).
    fell_back_read_only: bool,
    align: u32,
    direct: bool,
    len: AtomicU64,
    lock: ImageLock,
    /// fallocate may be used to write zeroes.
    has_write_zeroes: bool,
    /// Punched ranges read back as zeroes.
    discard_zeroes: bool,
    /// Which buffered writes skip the ring.
    inline: InlineWrites,
}

/// `O_DIRECT` requests go to the device, which works while we prepare the
/// next ones, so they are submitted as soon as they start; buffered ones
/// mostly complete inside the submitting syscall, so they are batched.
fn submit_for(direct: bool) -> Submit {
    if direct {
        Submit::Eager
    } else {
        Submit::Batched
    }
}

fn choose_aio(requested: Option<AioOpt>, direct: bool) -> Result<Aio> {
    let wanted = match requested {
        Some(AioOpt::Threads) => return Ok(Aio::Threads),
        Some(AioOpt::Native) if !direct => return Err(Error::invalid(
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        )),
        Some(AioOpt::Native) => {
            tracing::debug!("aio=native (linux-aio) is served by io_uring");
            Aio::IoUring
        }
        Some(AioOpt::IoUring) | None => Aio::IoUring,
    };
    let (aio, reason) = qsd_rt::resolve_aio(wanted);
    if let Some(reason) = reason {
        tracing::info!("io_uring is not available ({reason}): using threads for file I/O");
    }
    Ok(aio)
}

fn open_error(path: &str, errno: i32) -> Error {
    os_error(format!("Could not open '{path}'"), errno)
}

impl PosixFile {
    fn open(p: &OpenParams, opts: &FileOpts) -> Result<Self> {
        if let Some(id) = &opts.pr_manager {
            return Err(Error::invalid(format!(
                "No persistent reservation manager with id '{id}'"
            )));
        }
        let aio = choose_aio(opts.aio, p.direct)?;
        let path = opts.filename.as_str();
        let (file, fell_back) = open_with_fallback(path, p)?;
        let (kind, rdev) =
            posix::file_kind(&file).map_err(|e| os_error("Could not stat file", e))?;
        check_kind(p, path, kind)?;
        let len = posix::file_len(&file, kind)
            .map_err(|e| os_error(format!("Could not get the size of '{path}'"), e))?;
        let align = if p.direct {
            posix::probe_alignment(&file, kind, rdev)
        } else {
            1
        };
        let use_lock = match opts.locking.unwrap_or(Locking::Auto) {
            Locking::Off => false,
            Locking::On => true,
            Locking::Auto => ofd_supported(&file),
        };
        let io_file = file
            .try_clone()
            .map_err(|e| open_error(path, errno_of(&e)))?;
        let regular = kind == FileKind::Regular;
        // Without O_DIRECT, device zeroing and discard may leave stale page
        // cache behind (qemu's rule), so only trust them with cache.direct.
        let device_ok = regular || p.direct;
        Ok(PosixFile {
            driver: p.driver,
            filename: path.to_string(),
            file,
            fd: SharedFd::with_submit(io_file.into(), submit_for(p.direct)),
            aio,
            kind,
            fell_back_read_only: fell_back,
            align,
            direct: p.direct,
            len: AtomicU64::new(len),
            lock: ImageLock::new(path, use_lock),
            has_write_zeroes: device_ok,
            discard_zeroes: device_ok,
            inline: InlineWrites::new(!p.direct && aio == Aio::IoUring),
        })
    }

    fn what(&self, op: &str) -> String {
        format!("{op} on '{}'", self.filename)
    }

    /// O_DIRECT wants the buffer's address aligned as well as the offset
    /// and length (the block layer aligns those). Owned buffers always are;
    /// an external one (guest memory) may not be, and goes through an
    /// aligned bounce buffer. The request alignment is used for memory too:
    /// never less than the kernel's DMA alignment, at worst a needless copy.
    fn needs_bounce(&self, buf: &IoBuf) -> bool {
        self.direct && !buf.is_aligned(self.align as usize)
    }

    async fn read_inner(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let want = buf.len();
        let (r, b) = rtio::read_at(self.aio, &self.fd, buf, offset).await;
        buf = b;
        let mut done = match r {
            Ok(n) if n >= want => return Ok(buf),
            Ok(n) => n,
            Err(e) => return Err(os_error(self.what("read"), errno_of(&e))),
        };
        // Short read: continue into a scratch buffer until EOF.
        while done < want && done > 0 {
            let tail = IoBuf::new(want - done);
            let (r, tail) = rtio::read_at(self.aio, &self.fd, tail, offset + done as u64).await;
            match r {
                Ok(0) => break,
                Ok(n) => {
                    buf[done..done + n].copy_from_slice(&tail[..n]);
                    done += n;
                }
                // O_DIRECT refuses the unaligned offset after a short read
                // at the end of the file: that is EOF too (as qemu).
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(os_error(self.what("read"), errno_of(&e))),
            }
        }
        // Past EOF reads as zeroes.
        buf[done..].fill(0);
        Ok(buf)
    }

    async fn write_inner(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let want = buf.len();
        let mut done = 0;
        while done < want {
            let (r, back) = if done == 0 {
                match self.inline.try_write(&self.fd, &buf, offset) {
                    Some(r) => (r, buf),
                    None => rtio::write_at(self.aio, &self.fd, buf, offset).await,
                }
            } else {
                let rest = IoBuf::from_slice(&buf[done..]);
                let (r, _) = rtio::write_at(self.aio, &self.fd, rest, offset + done as u64).await;
                (r, buf)
            };
            buf = back;
            match r {
                Ok(0) => return Err(os_error(self.what("write"), libc::ENOSPC)),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(os_error(self.what("write"), errno_of(&e))),
            }
        }
        let end = offset + want as u64;
        if self.kind == FileKind::Regular {
            self.len.fetch_max(end, Ordering::AcqRel);
        }
        Ok(buf)
    }

    async fn datasync(&self) -> Result<()> {
        rtio::fsync(self.aio, &self.fd, true)
            .await
            .map_err(|e| os_error(self.what("flush"), errno_of(&e)))
    }

    async fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> std::io::Result<()> {
        rtio::fallocate(self.aio, &self.fd, mode.bits(), offset, len).await
    }

    async fn zeroes_inner(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if !self.has_write_zeroes {
            return Err(Error::unsupported(
                "write-zeroes needs cache.direct=on on devices",
            ));
        }
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if flags.may_unmap && self.discard_zeroes {
            match self.fallocate(punch, offset, len).await {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(os_error(self.what("write-zeroes"), errno_of(&e))),
            }
        }
        if flags.no_fallback && self.kind != FileKind::Regular {
            // The kernel may write zero pages on devices: not "fast".
            return Err(Error::unsupported(
                "write-zeroes without fallback is not fast here",
            ));
        }
        match self
            .fallocate(FallocateFlags::FALLOC_FL_ZERO_RANGE, offset, len)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => {
                Err(Error::unsupported("fallocate cannot zero this range"))
            }
            Err(e) => Err(os_error(self.what("write-zeroes"), errno_of(&e))),
        }
    }

    fn status_at(&self, offset: u64, len: u64) -> BlockStatus {
        if self.kind != FileKind::Regular {
            return BlockStatus::data(len);
        }
        let align = u64::from(self.align);
        match posix::find_allocation(&self.file, offset) {
            Extent::TrailingHole => BlockStatus::hole(len),
            Extent::Unknown => BlockStatus::data(len),
            Extent::Hole(data) => BlockStatus::hole(len.min(data - offset)),
            Extent::Data(hole) => {
                // A data extent ending at an unaligned EOF still covers the
                // whole last block.
                let n = len.min(hole - offset).next_multiple_of(align);
                BlockStatus::data(n.min(len))
            }
        }
    }

    async fn truncate_inner(&self, size: u64) -> Result<()> {
        if self.kind != FileKind::Regular {
            let cur = self.len.load(Ordering::Acquire);
            if size > cur {
                return Err(Error::invalid("Cannot grow device files"));
            }
            return Ok(());
        }
        let len = i64::try_from(size).map_err(|_| Error::invalid("size too large"))?;
        nix::unistd::ftruncate(&self.file, len)
            .map_err(|e| os_error("Could not resize file", e as i32))?;
        self.len.store(size, Ordering::Release);
        Ok(())
    }
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY | libc::ENODEV | libc::EINVAL)
    )
}

fn check_kind(p: &OpenParams, path: &str, kind: FileKind) -> Result<()> {
    let ok = match kind {
        FileKind::Regular => !p.device,
        FileKind::BlockDevice | FileKind::CharDevice => p.device,
        FileKind::Other => false,
    };
    if ok {
        return Ok(());
    }
    Err(Error::invalid(if p.device {
        format!(
            "'{}' driver requires '{path}' to be either a character or block device",
            p.driver
        )
    } else {
        format!(
            "'{}' driver requires '{path}' to be a regular file",
            p.driver
        )
    }))
}

/// Open read-write unless read-only; with auto-read-only, fall back to
/// read-only when writing is not allowed. Returns whether it fell back.
fn open_with_fallback(path: &str, p: &OpenParams) -> Result<(File, bool)> {
    match posix::open_image(path, !p.read_only, p.direct) {
        Ok(f) => Ok((f, false)),
        Err(errno)
            if !p.read_only
                && p.auto_read_only
                && matches!(errno, libc::EACCES | libc::EROFS | libc::EPERM) =>
        {
            let f = posix::open_image(path, false, p.direct).map_err(|e| open_error(path, e))?;
            tracing::info!("'{path}' is not writable: opened read-only (auto-read-only)");
            Ok((f, true))
        }
        // qemu reports a read-only file system as "Permission denied".
        Err(libc::EROFS) => Err(open_error(path, libc::EACCES)),
        Err(errno) => Err(open_error(path, errno)),
    }
}

impl BlockDriver for PosixFile {
    fn driver_name(&self) -> &'static str {
        self.driver
    }

    fn len(&self) -> u64 {
        // qemu counts lengths in 512-byte sectors; reads of the partial
        // sector past EOF return zeroes.
        self.len.load(Ordering::Acquire).next_multiple_of(512)
    }

    fn limits(&self) -> Limits {
        Limits {
            request_alignment: self.align,
            ..Limits::default()
        }
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            if !self.needs_bounce(&buf) {
                return self.read_inner(offset, buf).await;
            }
            let mut buf = buf;
            let bounce = self.read_inner(offset, IoBuf::new(buf.len())).await?;
            buf.copy_from_slice(&bounce);
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            let buf = if self.needs_bounce(&buf) {
                self.write_inner(offset, IoBuf::from_slice(&buf)).await?;
                buf
            } else {
                self.write_inner(offset, buf).await?
            };
            if flags.fua {
                self.datasync().await?;
            }
            Ok(buf)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.zeroes_inner(offset, len, flags).await?;
            if flags.fua {
                self.datasync().await?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(punch, offset, len).await {
                // Discard is advisory: a file system that cannot punch is fine.
                Err(e) if !is_unsupported(&e) => Err(os_error(self.what("discard"), errno_of(&e))),
                _ => Ok(()),
            }
        })
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(self.datasync())
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFut<'_, BlockStatus> {
        Box::pin(async move { Ok(self.status_at(offset, len)) })
    }

    fn truncate(&self, size: u64) -> BoxFut<'_, ()> {
        Box::pin(self.truncate_inner(size))
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        if self.fell_back_read_only && (perm.contains(Perm::WRITE) || perm.contains(Perm::RESIZE)) {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!(
                    "Could not open '{}' for writing: Permission denied",
                    self.filename
                ),
            )
            .with_errno(libc::EACCES));
        }
        self.lock.set_perm(&self.file, perm, shared)
    }

    fn close(&self) -> BoxFut<'_, ()> {
        // Let other processes in now, even if a handle on the node lingers.
        Box::pin(async move { self.lock.set_perm(&self.file, Perm::NONE, Perm::ALL) })
    }

    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            filename: self.filename.clone(),
            actual_size: posix::allocated_size(&self.file),
            // qemu reports both for file-posix nodes (its get_info succeeds).
            dirty_flag: Some(false),
            format_specific: Some(serde_json::json!({"type": "file", "data": {}})),
            ..ImageInfo::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use qsd_block::{IoBuf, WriteFlags};
    use serde_json::json;

    use crate::tests::{add, backend, graph, image, path_str};

    /// An external buffer at an odd address holding `data`.
    fn odd_buffer(data: &[u8]) -> IoBuf {
        let mut v = vec![0u8; data.len() + 1];
        v[1..].copy_from_slice(data);
        let buf = IoBuf::external_from_box(v.into_boxed_slice(), 1);
        assert!(!buf.is_aligned(2));
        buf
    }

    #[test]
    fn test_file_direct_misaligned_buffer_address_is_bounced() {
        let (_dir, path) = image(1 << 20);
        let rt = qsd_rt::build_runtime("file-bounce-test").unwrap();
        qsd_rt::block_on_with_ring(&rt, async {
            let mut g = graph();
            let opts = json!({"driver": "file", "node-name": "f0",
                              "filename": path_str(&path), "cache": {"direct": true}});
            let blk = backend(&add(&mut g, opts).await.unwrap());
            let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
            let back = blk
                .write(4096, odd_buffer(&data), WriteFlags::default())
                .await
                .unwrap();
            assert!(back.is_external());
            let got = blk.read(4096, odd_buffer(&[0; 8192])).await.unwrap();
            assert!(got.is_external(), "data lands in the caller's memory");
            assert_eq!(&got[..], &data[..]);
            blk.flush().await.unwrap();
            assert_eq!(&std::fs::read(&path).unwrap()[4096..12288], &data[..]);
        });
    }
}
