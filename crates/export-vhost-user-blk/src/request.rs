//! virtio-blk requests: turning a descriptor chain into a typed request
//! (without trusting the guest), and running it against the `BlockBackend`.
//!
//! IN and OUT data whose segments form one contiguous range of mapped
//! guest memory goes to the block layer as an `IoBuf` over that memory
//! (zero-copy, see `zerocopy`); other data is copied between guest memory
//! and a pooled `IoBuf` with vm-memory's bounds-checked accessors.

use std::sync::Arc;

use qsd_block::{BlockBackend, WriteFlags, ZeroFlags};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::config::{MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, SECTOR};
use crate::device::Mem;
use crate::pool::BufPool;
use crate::zerocopy::Pinned;

/// Bytes of `struct virtio_blk_outhdr`.
const HDR_LEN: usize = 16;
/// Bytes of `struct virtio_blk_discard_write_zeroes`.
const DWZ_LEN: usize = 16;
/// Largest data transfer accepted in one request; larger chains get IOERR
/// rather than a huge allocation.
pub(crate) const MAX_DATA: u64 = 32 << 20;

/// One guest buffer: address and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A parsed chain: readable segments (header + data out), then writable
/// segments (data in + status byte).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Chain {
    pub readable: Vec<Seg>,
    pub writable: Vec<Seg>,
}

/// Why a chain cannot carry a request at all.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ChainError {
    /// A readable descriptor after a writable one (spec violation).
    Order,
    /// No writable byte for the status.
    NoStatus,
    /// Too much data.
    TooLarge,
    /// A descriptor index, indirect table or loop the ring cannot hold.
    Malformed,
}

impl Chain {
    /// Split descriptors into readable and writable lists, checking order.
    pub(crate) fn from_descriptors(
        descs: impl Iterator<Item = Descriptor>,
    ) -> Result<Chain, ChainError> {
        let mut c = Chain::default();
        let mut total = 0u64;
        for d in descs {
            total += u64::from(d.len());
            if total > MAX_DATA + (HDR_LEN as u64) + 1 {
                return Err(ChainError::TooLarge);
            }
            let seg = Seg {
                addr: d.addr(),
                len: d.len(),
            };
            if d.is_write_only() {
                c.writable.push(seg);
            } else if c.writable.is_empty() {
                c.readable.push(seg);
            } else {
                return Err(ChainError::Order);
            }
        }
        if c.writable.iter().all(|s| s.len == 0) {
            return Err(ChainError::NoStatus);
        }
        Ok(c)
    }

    /// The guest address of the status byte: the last writable byte.
    pub(crate) fn status_addr(&self) -> Option<GuestAddress> {
        let last = self.writable.iter().rev().find(|s| s.len > 0)?;
        last.addr.checked_add(u64::from(last.len) - 1)
    }

    /// Writable segments minus the status byte.
    fn data_in(&self) -> Vec<Seg> {
        let mut segs: Vec<Seg> = self.writable.clone();
        while let Some(last) = segs.last_mut() {
            if last.len == 0 {
                segs.pop();
                continue;
            }
            last.len -= 1;
            if last.len == 0 {
                segs.pop();
            }
            break;
        }
        segs
    }
}

fn total(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

const F_NEXT: u16 = 1;
const F_INDIRECT: u16 = 4;

/// The descriptors of the chain starting at `head` in the descriptor table
/// at `table` (of `size` entries), following NEXT links and an indirect
/// table, read through guest memory. Used to resubmit a chain a previous
/// back-end popped (virtio-queue only builds chains while popping).
pub(crate) fn walk_chain<M: GuestMemory>(
    mem: &M,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Result<Vec<Descriptor>, ChainError> {
    let (mut tbl, mut len, mut idx) = (table, size, head);
    let mut indirect = false;
    let mut out = Vec::new();
    loop {
        // A chain visits each entry of its table at most once.
        if idx >= len || out.len() >= usize::from(len) {
            return Err(ChainError::Malformed);
        }
        let at = tbl
            .checked_add(16 * u64::from(idx))
            .ok_or(ChainError::Malformed)?;
        let d: Descriptor = mem.read_obj(at).map_err(|_| ChainError::Malformed)?;
        if d.flags() & F_INDIRECT != 0 {
            let n = d.len() / 16;
            if indirect || !d.len().is_multiple_of(16) || n == 0 || n > u32::from(u16::MAX) {
                return Err(ChainError::Malformed);
            }
            (tbl, len, idx, indirect) = (d.addr(), n as u16, 0, true);
            out.clear();
            continue;
        }
        out.push(d);
        if d.flags() & F_NEXT == 0 {
            return Ok(out);
        }
        idx = d.next();
    }
}

/// Copy `out.len()` bytes from the segments, skipping the first `skip` bytes.
fn gather<M: GuestMemory>(mem: &M, segs: &[Seg], mut skip: u64, out: &mut [u8]) -> bool {
    let mut pos = 0usize;
    for s in segs {
        if pos == out.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(out.len() - pos);
        let Some(addr) = s.addr.checked_add(skip) else {
            return false;
        };
        if mem.read_slice(&mut out[pos..pos + n], addr).is_err() {
            return false;
        }
        pos += n;
        skip = 0;
    }
    pos == out.len()
}

/// Copy `data` into the segments from their start.
fn scatter<M: GuestMemory>(mem: &M, segs: &[Seg], data: &[u8]) -> bool {
    let mut pos = 0usize;
    for s in segs {
        if pos == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - pos);
        if mem.write_slice(&data[pos..pos + n], s.addr).is_err() {
            return false;
        }
        pos += n;
    }
    pos == data.len()
}

/// Per-export facts a request needs.
#[derive(Debug)]
pub(crate) struct ReqCtx {
    pub backend: BlockBackend,
    pub writable: bool,
    pub blk_size: u32,
    pub serial: Vec<u8>,
    pub pool: BufPool,
}

/// Run one request; returns (status, bytes written into guest buffers
/// excluding the status byte).
pub(crate) async fn execute(
    ctx: &ReqCtx,
    mem: &Arc<Mem>,
    chain: &Chain,
    writeback: bool,
) -> (u8, u32) {
    let mut hdr = [0u8; HDR_LEN];
    if !gather(&**mem, &chain.readable, 0, &mut hdr) {
        return (VIRTIO_BLK_S_IOERR as u8, 0);
    }
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let out_len = total(&chain.readable) - HDR_LEN as u64;
    let ok = VIRTIO_BLK_S_OK as u8;
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    match kind {
        VIRTIO_BLK_T_IN => read(ctx, mem, chain, sector).await,
        VIRTIO_BLK_T_OUT => {
            let st = write(ctx, mem, chain, sector, out_len, writeback).await;
            (st, 0)
        }
        VIRTIO_BLK_T_FLUSH => match ctx.backend.flush().await {
            Ok(()) => (ok, 0),
            Err(e) => {
                tracing::debug!("vhost-user-blk flush failed: {e}");
                (ioerr, 0)
            }
        },
        VIRTIO_BLK_T_GET_ID => get_id(ctx, &**mem, chain),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            (discard_zeroes(ctx, &**mem, chain, kind, out_len).await, 0)
        }
        _ => (VIRTIO_BLK_S_UNSUPP as u8, 0),
    }
}

/// Byte range of a data request, or `None` when misaligned or out of range.
fn byte_range(ctx: &ReqCtx, sector: u64, len: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR)?;
    let bs = u64::from(ctx.blk_size);
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) || len > MAX_DATA {
        return None;
    }
    let end = offset.checked_add(len)?;
    (end <= ctx.backend.len()).then_some(offset)
}

async fn read(ctx: &ReqCtx, mem: &Arc<Mem>, chain: &Chain, sector: u64) -> (u8, u32) {
    let segs = chain.data_in();
    let len = total(&segs);
    let ioerr = (VIRTIO_BLK_S_IOERR as u8, 0);
    let Some(offset) = byte_range(ctx, sector, len) else {
        return ioerr;
    };
    let ok = match Pinned::new(mem, &segs, 0, len) {
        Some(pinned) => read_direct(ctx, mem, &segs, offset, pinned).await,
        None => read_copy(ctx, &**mem, &segs, offset, len).await,
    };
    if !ok {
        return ioerr;
    }
    (VIRTIO_BLK_S_OK as u8, len as u32)
}

/// Read straight into guest memory.
async fn read_direct(ctx: &ReqCtx, mem: &Mem, segs: &[Seg], offset: u64, pinned: Pinned) -> bool {
    let (buf, released) = pinned.into_parts();
    let guest = buf.as_ptr() as usize;
    let got = ctx.backend.read(offset, buf).await;
    // A driver may answer with another buffer (quorum reads several
    // children): copy that one in, but only once no operation can still
    // write into the guest's buffer.
    let other = match got {
        Ok(b) if b.as_ptr() as usize == guest => None,
        Ok(b) => Some(b),
        Err(e) => {
            tracing::debug!("vhost-user-blk read failed: {e}");
            released.wait().await;
            return false;
        }
    };
    released.wait().await;
    other.is_none_or(|b| scatter(mem, segs, &b))
}

/// Read into a pooled buffer, then copy into guest memory.
async fn read_copy<M: GuestMemory>(
    ctx: &ReqCtx,
    mem: &M,
    segs: &[Seg],
    offset: u64,
    len: u64,
) -> bool {
    let buf = match ctx.backend.read(offset, ctx.pool.get(len as usize)).await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!("vhost-user-blk read failed: {e}");
            return false;
        }
    };
    let copied = scatter(mem, segs, &buf);
    ctx.pool.put(buf);
    copied
}

async fn write(
    ctx: &ReqCtx,
    mem: &Arc<Mem>,
    chain: &Chain,
    sector: u64,
    len: u64,
    writeback: bool,
) -> u8 {
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    if !ctx.writable {
        return ioerr;
    }
    let Some(offset) = byte_range(ctx, sector, len) else {
        return ioerr;
    };
    // With the write cache disabled by the guest (CONFIG_WCE), writes are FUA.
    let flags = WriteFlags {
        fua: !writeback,
        ..WriteFlags::default()
    };
    let skip = HDR_LEN as u64;
    let (r, released) = match Pinned::new(mem, &chain.readable, skip, len) {
        Some(pinned) => {
            let (buf, released) = pinned.into_parts();
            (ctx.backend.write(offset, buf, flags).await, Some(released))
        }
        None => {
            let mut buf = ctx.pool.get(len as usize);
            if !gather(&**mem, &chain.readable, skip, &mut buf) {
                ctx.pool.put(buf);
                return ioerr;
            }
            (ctx.backend.write(offset, buf, flags).await, None)
        }
    };
    let status = match r {
        Ok(buf) => {
            ctx.pool.put(buf);
            VIRTIO_BLK_S_OK as u8
        }
        Err(e) => {
            tracing::debug!("vhost-user-blk write failed: {e}");
            ioerr
        }
    };
    if let Some(released) = released {
        released.wait().await;
    }
    status
}

fn get_id<M: GuestMemory>(ctx: &ReqCtx, mem: &M, chain: &Chain) -> (u8, u32) {
    let segs = chain.data_in();
    // As qemu: the serial with its NUL, cut to the buffer and 20 bytes.
    let mut id = ctx.serial.clone();
    id.push(0);
    let n = id
        .len()
        .min(VIRTIO_BLK_ID_BYTES as usize)
        .min(total(&segs) as usize);
    if !scatter(mem, &segs, &id[..n]) {
        return (VIRTIO_BLK_S_IOERR as u8, 0);
    }
    (VIRTIO_BLK_S_OK as u8, n as u32)
}

async fn discard_zeroes<M: GuestMemory>(
    ctx: &ReqCtx,
    mem: &M,
    chain: &Chain,
    kind: u32,
    out_len: u64,
) -> u8 {
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    let mut d = [0u8; DWZ_LEN];
    // One segment only, as advertised (max_discard_seg = max_write_zeroes_seg = 1).
    if !ctx.writable || out_len != DWZ_LEN as u64 || !gather(mem, &chain.readable, 16, &mut d) {
        return ioerr;
    }
    let sector = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    let sectors = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
    let flags = u32::from_le_bytes([d[12], d[13], d[14], d[15]]);
    let is_discard = kind == VIRTIO_BLK_T_DISCARD;
    let allowed = if is_discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    if flags & !allowed != 0 {
        return VIRTIO_BLK_S_UNSUPP as u8;
    }
    let max = if is_discard {
        MAX_DISCARD_SECTORS
    } else {
        MAX_WRITE_ZEROES_SECTORS
    };
    let len = u64::from(sectors) * SECTOR;
    let Some(offset) = byte_range(ctx, sector, len).filter(|_| sectors <= max) else {
        return ioerr;
    };
    let r = if is_discard {
        ctx.backend.discard(offset, len).await
    } else {
        let zf = ZeroFlags {
            may_unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            ..ZeroFlags::default()
        };
        ctx.backend.write_zeroes(offset, len, zf).await
    };
    match r {
        Ok(()) => VIRTIO_BLK_S_OK as u8,
        Err(e) => {
            tracing::debug!("vhost-user-blk discard/write-zeroes failed: {e}");
            ioerr
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::GuestMemoryMmap;

    const WRITE: u16 = 2;

    #[test]
    fn test_chain_readable_after_writable_is_rejected() {
        let d = vec![
            Descriptor::new(0x1000, 16, 0, 0),
            Descriptor::new(0x2000, 1, WRITE, 0),
            Descriptor::new(0x3000, 16, 0, 0),
        ];
        assert_eq!(
            Chain::from_descriptors(d.into_iter()),
            Err(ChainError::Order)
        );
    }

    #[test]
    fn test_chain_status_is_last_writable_byte() {
        let d = vec![
            Descriptor::new(0x1000, 16, 0, 0),
            Descriptor::new(0x2000, 513, WRITE, 0),
        ];
        let c = Chain::from_descriptors(d.into_iter()).unwrap();
        assert_eq!(c.status_addr(), Some(GuestAddress(0x2200)));
        assert_eq!(total(&c.data_in()), 512);
    }

    #[test]
    fn test_chain_without_writable_has_no_status() {
        let d = vec![Descriptor::new(0x1000, 16, 0, 0)];
        assert_eq!(
            Chain::from_descriptors(d.into_iter()),
            Err(ChainError::NoStatus)
        );
    }

    #[test]
    fn test_chain_oversize_is_rejected() {
        let d = (0..20).map(|i| Descriptor::new(0x1000 * i, u32::MAX / 8, WRITE, 0));
        assert_eq!(Chain::from_descriptors(d), Err(ChainError::TooLarge));
    }

    fn table(mem: &GuestMemoryMmap<()>, at: u64, descs: &[Descriptor]) {
        for (i, d) in descs.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(at + 16 * i as u64)).unwrap();
        }
    }

    #[test]
    fn test_walk_chain_follows_next_and_indirect() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        table(
            &mem,
            0,
            &[
                Descriptor::new(0x1000, 16, 1, 2),
                Descriptor::new(0x3000, 48, 4, 0),
                Descriptor::new(0x2000, 1, WRITE, 0),
            ],
        );
        table(
            &mem,
            0x3000,
            &[
                Descriptor::new(0x4000, 16, 1, 1),
                Descriptor::new(0x5000, 512, WRITE | 1, 2),
                Descriptor::new(0x6000, 1, WRITE, 0),
            ],
        );
        let c = walk_chain(&mem, GuestAddress(0), 4, 0).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].addr(), GuestAddress(0x2000));
        let c = walk_chain(&mem, GuestAddress(0), 4, 1).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[2].addr(), GuestAddress(0x6000));
    }

    #[test]
    fn test_walk_chain_loop_or_bad_index_is_malformed() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        table(
            &mem,
            0,
            &[
                Descriptor::new(0x100, 16, 1, 1),
                Descriptor::new(0x200, 16, 1, 0),
                Descriptor::new(0x300, 16, 1, 9),
            ],
        );
        assert_eq!(
            walk_chain(&mem, GuestAddress(0), 3, 0).err(),
            Some(ChainError::Malformed)
        );
        assert_eq!(
            walk_chain(&mem, GuestAddress(0), 3, 2).err(),
            Some(ChainError::Malformed)
        );
        assert_eq!(
            walk_chain(&mem, GuestAddress(0), 3, 3).err(),
            Some(ChainError::Malformed)
        );
        assert_eq!(
            walk_chain(&mem, GuestAddress(0xff8), 3, 0).err(),
            Some(ChainError::Malformed)
        );
    }

    #[test]
    fn test_gather_out_of_range_address_fails() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let segs = [Seg {
            addr: GuestAddress(0xff0),
            len: 0x100,
        }];
        let mut out = [0u8; 0x100];
        assert!(!gather(&mem, &segs, 0, &mut out));
    }

    #[test]
    fn test_gather_spans_segments_with_skip() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x10)).unwrap();
        mem.write_slice(&[5, 6], GuestAddress(0x20)).unwrap();
        let segs = [
            Seg {
                addr: GuestAddress(0x10),
                len: 4,
            },
            Seg {
                addr: GuestAddress(0x20),
                len: 2,
            },
        ];
        let mut out = [0u8; 4];
        assert!(gather(&mem, &segs, 2, &mut out));
        assert_eq!(out, [3, 4, 5, 6]);
    }
}
