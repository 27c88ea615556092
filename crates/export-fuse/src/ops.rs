//! Data operations of a FUSE export, run as tasks on the export's runtime.
//!
//! Each returns a host errno on failure; errors of the block layer become
//! errno values here, at the edge. The size rules (short reads and writes at
//! the end, growing writes, fallocate modes, SEEK_DATA/SEEK_HOLE) follow
//! qemu-storage-daemon's FUSE export.

use qsd_block::{BlockBackend, WriteFlags, ZeroFlags};
use qsd_rt::IoBuf;

use crate::state::Shared;

/// Linux `fallocate` mode bits.
pub(crate) const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
pub(crate) const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
pub(crate) const FALLOC_FL_ZERO_RANGE: i32 = 0x10;
/// Zeroing requests are cut into pieces no longer than this.
const ZERO_CHUNK: u64 = 1 << 30;

/// Result of an operation: a value or a host errno.
pub(crate) type OpResult<T> = Result<T, i32>;

/// The errno a block-layer error is reported with.
pub(crate) fn errno_of(e: &qsd_block::Error) -> i32 {
    match e.errno() {
        n if n > 0 => n,
        _ => libc::EIO,
    }
}

fn blk_err(what: &str, e: qsd_block::Error) -> i32 {
    tracing::debug!("FUSE export: {what} failed: {e}");
    errno_of(&e)
}

/// Bytes a read of `size` at `offset` returns from a node of `len` bytes
/// (short at the end, as clients expect of a file).
pub(crate) fn read_len(len: u64, offset: u64, size: u32) -> u64 {
    len.saturating_sub(offset).min(u64::from(size))
}

/// What a write of `n` bytes at `offset` does to a node of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WritePlan {
    /// Write all of it.
    Full,
    /// Grow the node to this size first (growable exports).
    Grow(u64),
    /// Write only this many bytes: the rest is past the end.
    Short(u64),
    /// Nothing fits: ENOSPC, as a block device answers.
    NoSpace,
}

pub(crate) fn write_plan(len: u64, offset: u64, n: u64, growable: bool) -> WritePlan {
    let end = offset.saturating_add(n);
    if end <= len {
        WritePlan::Full
    } else if growable {
        WritePlan::Grow(end)
    } else if offset >= len {
        WritePlan::NoSpace
    } else {
        WritePlan::Short(len - offset)
    }
}

/// What an `fallocate(mode, offset, length)` does to a node of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Falloc {
    /// Nothing left to do.
    Nothing,
    /// Grow the node to this size (mode 0 at or past the end).
    Grow(u64),
    /// Deallocate; fail rather than write zeroes.
    Punch { offset: u64, len: u64 },
    /// Make the range read as zeroes, growing the node first if asked.
    Zero {
        grow: Option<u64>,
        offset: u64,
        len: u64,
    },
}

pub(crate) fn plan_fallocate(size: u64, mode: i32, offset: u64, length: u64) -> OpResult<Falloc> {
    let keep = mode & FALLOC_FL_KEEP_SIZE != 0;
    let length = if keep {
        length.min(size.saturating_sub(offset))
    } else {
        length
    };
    let end = offset.checked_add(length).ok_or(libc::EINVAL)?;
    if mode == 0 {
        // Space inside the file is always "allocated": only growing works.
        if offset < size {
            return Err(libc::EOPNOTSUPP);
        }
        return Ok(Falloc::Grow(end));
    }
    if mode & FALLOC_FL_PUNCH_HOLE != 0 {
        if !keep {
            return Err(libc::EINVAL);
        }
        return Ok(match length {
            0 => Falloc::Nothing,
            len => Falloc::Punch { offset, len },
        });
    }
    if mode & FALLOC_FL_ZERO_RANGE != 0 {
        let grow = (!keep && end > size).then_some(end);
        // A grown area reads as zeroes already.
        let len = end.min(size).saturating_sub(offset);
        if grow.is_none() && len == 0 {
            return Ok(Falloc::Nothing);
        }
        return Ok(Falloc::Zero { grow, offset, len });
    }
    Err(libc::EOPNOTSUPP)
}

/// Grow the node to at least `end` bytes (concurrent growers serialised).
async fn grow(shared: &Shared, blk: &BlockBackend, end: u64) -> OpResult<()> {
    let _resize = shared.resize.lock().await;
    if blk.len() >= end {
        return Ok(());
    }
    blk.truncate(end).await.map_err(|e| blk_err("growing", e))
}

/// Set the size exactly.
pub(crate) async fn truncate(shared: &Shared, blk: &BlockBackend, size: u64) -> OpResult<()> {
    let _resize = shared.resize.lock().await;
    if blk.len() == size {
        return Ok(());
    }
    blk.truncate(size).await.map_err(|e| blk_err("truncate", e))
}

/// Read up to `size` bytes at `offset`; the buffer holds what was read.
pub(crate) async fn read(
    shared: &Shared,
    blk: &BlockBackend,
    offset: u64,
    size: u32,
) -> OpResult<IoBuf> {
    let n = read_len(blk.len(), offset, size) as usize;
    if n == 0 {
        return Ok(IoBuf::new(0));
    }
    let buf = shared.pool.get(n);
    blk.read(offset, buf).await.map_err(|e| blk_err("read", e))
}

/// Write `buf` at `offset`; returns the bytes written.
pub(crate) async fn write(
    shared: &Shared,
    blk: &BlockBackend,
    offset: u64,
    mut buf: IoBuf,
) -> OpResult<u32> {
    let n = buf.len() as u64;
    match write_plan(blk.len(), offset, n, shared.growable) {
        WritePlan::Full => {}
        WritePlan::Grow(end) => grow(shared, blk, end).await?,
        WritePlan::Short(k) => buf.resize(k as usize),
        WritePlan::NoSpace => {
            shared.pool.put(buf);
            return Err(libc::ENOSPC);
        }
    }
    let written = buf.len() as u32;
    let buf = blk
        .write(offset, buf, WriteFlags::default())
        .await
        .map_err(|e| blk_err("write", e))?;
    shared.pool.put(buf);
    Ok(written)
}

/// Flush the node (fsync and close).
pub(crate) async fn flush(blk: &BlockBackend) -> OpResult<()> {
    blk.flush().await.map_err(|e| blk_err("flush", e))
}

async fn zero(blk: &BlockBackend, offset: u64, len: u64, flags: ZeroFlags) -> OpResult<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK);
        blk.write_zeroes(offset + done, n, flags)
            .await
            .map_err(|e| match errno_of(&e) {
                libc::ENOTSUP => libc::EOPNOTSUPP,
                n => {
                    tracing::debug!("FUSE export: zeroing failed: {e}");
                    n
                }
            })?;
        done += n;
    }
    Ok(())
}

/// `fallocate(2)`.
pub(crate) async fn fallocate(
    shared: &Shared,
    blk: &BlockBackend,
    mode: i32,
    offset: u64,
    length: u64,
) -> OpResult<()> {
    match plan_fallocate(blk.len(), mode, offset, length)? {
        Falloc::Nothing => Ok(()),
        Falloc::Grow(end) => grow(shared, blk, end).await,
        Falloc::Punch { offset, len } => {
            let flags = ZeroFlags {
                may_unmap: true,
                no_fallback: true,
                fua: false,
            };
            zero(blk, offset, len, flags).await
        }
        Falloc::Zero {
            grow: g,
            offset,
            len,
        } => {
            if let Some(end) = g {
                grow(shared, blk, end).await?;
            }
            zero(blk, offset, len, ZeroFlags::default()).await
        }
    }
}

/// `lseek(2)` with SEEK_DATA or SEEK_HOLE, from the node's block status.
pub(crate) async fn seek(blk: &BlockBackend, offset: i64, whence: i32) -> OpResult<i64> {
    let want_data = match whence {
        libc::SEEK_DATA => true,
        libc::SEEK_HOLE => false,
        _ => return Err(libc::EINVAL),
    };
    let mut pos = u64::try_from(offset).map_err(|_| libc::ENXIO)?;
    loop {
        let len = blk.len();
        if pos >= len {
            // The end counts as the start of a hole, never as data.
            if pos > len || want_data {
                return Err(libc::ENXIO);
            }
            return i64::try_from(pos).map_err(|_| libc::EOVERFLOW);
        }
        let st = blk
            .block_status(pos, len - pos)
            .await
            .map_err(|e| blk_err("block status", e))?;
        if st.data == want_data {
            return i64::try_from(pos).map_err(|_| libc::EOVERFLOW);
        }
        pos += st.len.max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_read_len_short_at_end_and_empty_past_it() {
        assert_eq!(read_len(100, 0, 4096), 100);
        assert_eq!(read_len(8192, 4096, 4096), 4096);
        assert_eq!(read_len(100, 100, 10), 0);
        assert_eq!(read_len(100, 200, 10), 0);
    }

    #[test]
    fn test_write_plan_covers_every_case() {
        assert_eq!(write_plan(100, 0, 100, false), WritePlan::Full);
        assert_eq!(write_plan(100, 90, 20, false), WritePlan::Short(10));
        assert_eq!(write_plan(100, 100, 20, false), WritePlan::NoSpace);
        assert_eq!(write_plan(100, 90, 20, true), WritePlan::Grow(110));
    }

    #[test]
    fn test_plan_fallocate_mode0_inside_file_is_unsupported() {
        assert_eq!(plan_fallocate(100, 0, 50, 10), Err(libc::EOPNOTSUPP));
        assert_eq!(plan_fallocate(100, 0, 100, 10), Ok(Falloc::Grow(110)));
        assert_eq!(plan_fallocate(100, 0, 120, 10), Ok(Falloc::Grow(130)));
    }

    #[test]
    fn test_plan_fallocate_punch_needs_keep_size_and_is_clamped() {
        let punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        assert_eq!(
            plan_fallocate(100, FALLOC_FL_PUNCH_HOLE, 0, 10),
            Err(libc::EINVAL)
        );
        assert_eq!(
            plan_fallocate(100, punch, 90, 50),
            Ok(Falloc::Punch {
                offset: 90,
                len: 10
            })
        );
        assert_eq!(plan_fallocate(100, punch, 100, 50), Ok(Falloc::Nothing));
    }

    #[test]
    fn test_plan_fallocate_zero_range_grows_without_keep_size() {
        assert_eq!(
            plan_fallocate(100, FALLOC_FL_ZERO_RANGE, 90, 20),
            Ok(Falloc::Zero {
                grow: Some(110),
                offset: 90,
                len: 10
            })
        );
        let keep = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
        assert_eq!(
            plan_fallocate(100, keep, 90, 20),
            Ok(Falloc::Zero {
                grow: None,
                offset: 90,
                len: 10
            })
        );
        assert_eq!(
            plan_fallocate(100, FALLOC_FL_KEEP_SIZE, 0, 10),
            Err(libc::EOPNOTSUPP)
        );
    }
}
