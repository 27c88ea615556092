//! The FUSE wire protocol after `INIT`, for the one-file file system of an
//! export: requests decoded from the bytes the kernel hands to a read of
//! `/dev/fuse`, replies encoded for a write to it. Pure: no I/O, so it is
//! unit-tested and fuzzed on its own (public for the fuzz target only).
//!
//! Layouts are those of `fuse_kernel.h` at protocol 7.40 (the minor the
//! session negotiates at `INIT`), little-endian as on every host we run on.
//! No request extensions are negotiated, so arguments follow the header
//! directly.

/// `struct fuse_in_header`.
pub const IN_HEADER_LEN: usize = 40;
/// `struct fuse_out_header`.
pub const OUT_HEADER_LEN: usize = 16;
/// `struct fuse_write_in`: a write's arguments, after which its payload
/// starts. A read of `/dev/fuse` is split here so the payload lands in an
/// aligned buffer.
pub const WRITE_IN_LEN: usize = 40;
/// Header plus write arguments: the bytes before a write's payload.
pub const WRITE_PAYLOAD_AT: usize = IN_HEADER_LEN + WRITE_IN_LEN;

/// Opcodes (`enum fuse_opcode`) this module names.
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const LSEEK: u32 = 46;
}

/// `FATTR_*`: which members of a setattr request are set.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const CTIME: u32 = 1 << 10;
}

/// `FOPEN_DIRECT_IO`: bypass the page cache.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
/// `FOPEN_PARALLEL_DIRECT_WRITES`: direct writes need not be serialised.
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

/// What the request header says about who asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes of the whole request, header included.
    pub len: u32,
    /// `fuse_opcode`.
    pub opcode: u32,
    /// The id the reply must carry.
    pub unique: u64,
    /// The inode asked about.
    pub nodeid: u64,
    /// Caller's user.
    pub uid: u32,
}

/// The members of a setattr request that are set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// Access, modification or change time is set (never kept).
    pub times: bool,
}

/// A decoded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A name in a directory (there are none).
    Lookup,
    /// The kernel drops inode references: no reply.
    Forget,
    GetAttr,
    SetAttr(SetAttr),
    Open,
    Release,
    /// Read `size` bytes at `offset`.
    Read {
        offset: u64,
        size: u32,
    },
    /// Write `size` bytes at `offset`; the payload follows the arguments.
    Write {
        offset: u64,
        size: u32,
    },
    Statfs,
    Fsync,
    Flush,
    /// Cancel a request: answered ENOSYS so the kernel stops sending them.
    Interrupt,
    /// The connection ends.
    Destroy,
    Fallocate {
        offset: u64,
        length: u64,
        mode: i32,
    },
    Lseek {
        offset: u64,
        whence: i32,
    },
    /// Anything else: answered ENOSYS.
    Other,
}

/// Why a request could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than a header.
    Short,
    /// The header's length disagrees with the bytes read.
    Length,
    /// The opcode's arguments are cut off (the reply is EINVAL).
    Args(Header),
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Decode one request of `total` bytes, of which `head` holds the first
/// ones: all of them, or for a write at least [`WRITE_PAYLOAD_AT`] (the
/// payload is elsewhere).
pub fn decode(head: &[u8], total: usize) -> Result<(Header, Op), DecodeError> {
    if head.len() < IN_HEADER_LEN || total < IN_HEADER_LEN {
        return Err(DecodeError::Short);
    }
    let len = u32_at(head, 0).ok_or(DecodeError::Short)?;
    if len as usize != total {
        return Err(DecodeError::Length);
    }
    let h = Header {
        len,
        opcode: u32_at(head, 4).ok_or(DecodeError::Short)?,
        unique: u64_at(head, 8).ok_or(DecodeError::Short)?,
        nodeid: u64_at(head, 16).ok_or(DecodeError::Short)?,
        uid: u32_at(head, 24).ok_or(DecodeError::Short)?,
    };
    // Extensions (total_extlen, in 8-byte units) sit at the end: not ours.
    let ext = usize::from(u16_at(head, 36).ok_or(DecodeError::Short)?) * 8;
    let args = &head[IN_HEADER_LEN..];
    let op = decode_op(&h, args, total - IN_HEADER_LEN, ext).ok_or(DecodeError::Args(h))?;
    Ok((h, op))
}

fn decode_op(h: &Header, a: &[u8], args_len: usize, ext: usize) -> Option<Op> {
    use opcode::*;
    Some(match h.opcode {
        LOOKUP => Op::Lookup,
        FORGET | BATCH_FORGET => Op::Forget,
        GETATTR => Op::GetAttr,
        SETATTR => Op::SetAttr(setattr(a)?),
        OPEN => Op::Open,
        RELEASE => Op::Release,
        READ => Op::Read {
            offset: u64_at(a, 8)?,
            size: u32_at(a, 16)?,
        },
        WRITE => {
            let size = u32_at(a, 16)?;
            // The payload is exactly what follows the arguments.
            if args_len.checked_sub(WRITE_IN_LEN + ext)? != size as usize {
                return None;
            }
            Op::Write {
                offset: u64_at(a, 8)?,
                size,
            }
        }
        STATFS => Op::Statfs,
        FSYNC => Op::Fsync,
        FLUSH => Op::Flush,
        INTERRUPT => Op::Interrupt,
        DESTROY => Op::Destroy,
        FALLOCATE => Op::Fallocate {
            offset: u64_at(a, 8)?,
            length: u64_at(a, 16)?,
            mode: u32_at(a, 24)? as i32,
        },
        LSEEK => Op::Lseek {
            offset: u64_at(a, 8)?,
            whence: u32_at(a, 16)? as i32,
        },
        _ => Op::Other,
    })
}

/// `struct fuse_setattr_in` (88 bytes): valid, padding, fh, size,
/// lock_owner, atime, mtime, ctime, three nsec fields, mode, unused, uid,
/// gid, unused.
fn setattr(a: &[u8]) -> Option<SetAttr> {
    let valid = u32_at(a, 0)?;
    let is = |bit: u32| valid & bit != 0;
    let pick32 = |bit: u32, at: usize| -> Option<Option<u32>> {
        Some(if is(bit) { Some(u32_at(a, at)?) } else { None })
    };
    let times = fattr::ATIME | fattr::MTIME | fattr::ATIME_NOW | fattr::MTIME_NOW | fattr::CTIME;
    Some(SetAttr {
        mode: pick32(fattr::MODE, 68)?,
        uid: pick32(fattr::UID, 76)?,
        gid: pick32(fattr::GID, 80)?,
        size: if is(fattr::SIZE) {
            Some(u64_at(a, 16)?)
        } else {
            None
        },
        times: valid & times != 0,
    })
}

/// `struct fuse_out_header` for a reply with `body` bytes after it, or for
/// an error (`errno` > 0, no body).
pub fn out_header(unique: u64, errno: i32, body: usize) -> [u8; OUT_HEADER_LEN] {
    let mut b = [0u8; OUT_HEADER_LEN];
    let len = (OUT_HEADER_LEN + body) as u32;
    b[0..4].copy_from_slice(&len.to_le_bytes());
    b[4..8].copy_from_slice(&(-errno).to_le_bytes());
    b[8..16].copy_from_slice(&unique.to_le_bytes());
    b
}

/// The attributes of the exported file (`struct fuse_attr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    /// 512-byte blocks the image takes.
    pub blocks: u64,
    /// Access, modification and change time, whole seconds.
    pub time: u64,
    /// `st_mode`, file type included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

/// `struct fuse_attr_out`: the attributes, valid for `ttl_secs`.
pub fn attr_out(a: &Attr, ttl_secs: u64) -> [u8; 104] {
    let mut b = [0u8; 104];
    b[0..8].copy_from_slice(&ttl_secs.to_le_bytes());
    let at = &mut b[16..];
    let u64s = [a.ino, a.size, a.blocks, a.time, a.time, a.time];
    for (i, v) in u64s.iter().enumerate() {
        at[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    // atimensec, mtimensec, ctimensec stay 0; then mode, nlink, uid, gid,
    // rdev, blksize, flags.
    let u32s = [a.mode, 1, a.uid, a.gid, 0, a.blksize, 0];
    for (i, v) in u32s.iter().enumerate() {
        let o = 60 + i * 4;
        at[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// `struct fuse_open_out` with file handle 0.
pub fn open_out(open_flags: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[8..12].copy_from_slice(&open_flags.to_le_bytes());
    b
}

/// `struct fuse_write_out`.
pub fn write_out(written: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0..4].copy_from_slice(&written.to_le_bytes());
    b
}

/// `struct fuse_lseek_out`.
pub fn lseek_out(offset: u64) -> [u8; 8] {
    offset.to_le_bytes()
}

/// `struct fuse_statfs_out` of a file system of `blocks` 512-byte blocks
/// holding one file and no free space.
pub fn statfs_out(blocks: u64) -> [u8; 80] {
    let mut b = [0u8; 80];
    // blocks, bfree, bavail, files, ffree.
    for (i, v) in [blocks, 0, 0, 1, 0].iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    // bsize, namelen, frsize.
    for (i, v) in [512u32, 255, 512].iter().enumerate() {
        let o = 40 + i * 4;
        b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
    b
}

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
