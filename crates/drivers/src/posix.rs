//! Small POSIX helpers for the file drivers: opening, probing the O_DIRECT
//! alignment, sizes, and the allocation map through SEEK_DATA/SEEK_HOLE.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::libc;
use nix::sys::stat::{major, minor};
use nix::sys::statfs::{fstatfs, NFS_SUPER_MAGIC};
use nix::unistd::{lseek, Whence};
use qsd_block::{Error, ErrorKind};
use qsd_rt::IoBuf;

/// Largest alignment probed, as qemu (`MAX_BLOCKSIZE`, a page).
pub(crate) const MAX_ALIGN: u32 = 4096;

/// An I/O error in qemu's words: "what: strerror".
pub(crate) fn os_error(what: impl std::fmt::Display, errno: i32) -> Error {
    let desc = Errno::from_raw(errno).desc();
    Error::new(ErrorKind::Io, format!("{what}: {desc}")).with_errno(errno)
}

/// The errno of an `io::Error` (EIO when it has none).
pub(crate) fn errno_of(err: &std::io::Error) -> i32 {
    err.raw_os_error().unwrap_or(libc::EIO)
}

/// Open `path` for reading, or reading and writing, optionally with O_DIRECT.
pub(crate) fn open_image(path: &str, writable: bool, direct: bool) -> Result<File, i32> {
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(flags)
        .open(Path::new(path))
        .map_err(|e| errno_of(&e))
}

/// What kind of file an image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    Regular,
    BlockDevice,
    CharDevice,
    Other,
}

pub(crate) fn file_kind(file: &File) -> Result<(FileKind, u64), i32> {
    let md = file.metadata().map_err(|e| errno_of(&e))?;
    let ft = md.file_type();
    let kind = if ft.is_file() {
        FileKind::Regular
    } else if ft.is_block_device() {
        FileKind::BlockDevice
    } else if ft.is_char_device() {
        FileKind::CharDevice
    } else {
        FileKind::Other
    };
    Ok((kind, std::os::unix::fs::MetadataExt::rdev(&md)))
}

/// Current length: st_size for regular files, the end offset for devices.
pub(crate) fn file_len(file: &File, kind: FileKind) -> Result<u64, i32> {
    match kind {
        FileKind::Regular => file.metadata().map(|m| m.len()).map_err(|e| errno_of(&e)),
        _ => lseek(file, 0, Whence::SeekEnd)
            .map(|n| n.max(0) as u64)
            .map_err(|e| e as i32),
    }
}

/// Bytes the image takes on the host (st_blocks * 512).
pub(crate) fn allocated_size(file: &File) -> Option<u64> {
    file.metadata()
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
}

/// The logical block size of a block device, from sysfs.
fn logical_block_size(rdev: u64) -> Option<u32> {
    let path = format!(
        "/sys/dev/block/{}:{}/queue/logical_block_size",
        major(rdev),
        minor(rdev)
    );
    let text = std::fs::read_to_string(path).ok()?;
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| n.is_power_of_two())
}

/// True when a read of `len` bytes at 0 is accepted (only EINVAL means
/// misaligned; other errors are not about alignment).
fn io_aligned(file: &File, buf: &mut IoBuf, len: usize) -> bool {
    buf.resize(len);
    !matches!(nix::sys::uio::pread(file, buf, 0), Err(Errno::EINVAL))
}

/// The request alignment O_DIRECT needs, as qemu's raw_probe_alignment:
/// the device's logical block size where known, else the smallest read size
/// that works (a 1-byte success means probing could not tell: use a page).
pub(crate) fn probe_alignment(file: &File, kind: FileKind, rdev: u64) -> u32 {
    if fstatfs(file).is_ok_and(|s| s.filesystem_type() == NFS_SUPER_MAGIC) {
        return 1;
    }
    if kind == FileKind::BlockDevice {
        if let Some(n) = logical_block_size(rdev) {
            return n;
        }
    }
    let mut buf = IoBuf::new(MAX_ALIGN as usize);
    for align in [1u32, 512, 1024, 2048, 4096] {
        if io_aligned(file, &mut buf, align as usize) {
            return if align == 1 { MAX_ALIGN } else { align };
        }
    }
    MAX_ALIGN
}

/// Where data and holes lie around `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extent {
    /// Data from `start` up to the given offset (the next hole).
    Data(u64),
    /// A hole from `start` up to the given offset (the next data).
    Hole(u64),
    /// No data after `start`: a hole up to the end of the file.
    TrailingHole,
    /// No information: treat as data.
    Unknown,
}

fn seek(file: &File, start: u64, whence: Whence) -> Result<u64, Errno> {
    let pos = i64::try_from(start).map_err(|_| Errno::EINVAL)?;
    let got = lseek(file, pos, whence)?;
    // The kernel never moves backwards; if it does, trust nothing.
    u64::try_from(got)
        .ok()
        .filter(|&g| g >= start)
        .ok_or(Errno::EIO)
}

/// qemu's find_allocation: SEEK_DATA first, then SEEK_HOLE.
pub(crate) fn find_allocation(file: &File, start: u64) -> Extent {
    match seek(file, start, Whence::SeekData) {
        Err(Errno::ENXIO) => Extent::TrailingHole,
        Err(_) => Extent::Unknown,
        Ok(data) if data > start => Extent::Hole(data),
        Ok(_) => match seek(file, start, Whence::SeekHole) {
            Ok(hole) if hole > start => Extent::Data(hole),
            _ => Extent::Unknown,
        },
    }
}
