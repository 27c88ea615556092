//! Execution of transmission requests against the backend, and the replies.
//!
//! Each admitted request runs as its own task on the connection's I/O thread;
//! errors from the block layer become NBD errno values here, at the edge.

use std::sync::Arc;

use qsd_block::{BlockBackend, BlockStatus, WriteFlags, ZeroFlags};
use qsd_nbd_proto::transmission as tx;
use qsd_nbd_proto::{
    CommandFlags, CommandType, Extent, MetaContext, NbdErrno, Request, STATE_HOLE, STATE_ZERO,
};
use qsd_rt::IoBuf;
use tokio::sync::OwnedSemaphorePermit;

use crate::export::NbdExport;
use crate::out::{BufPool, OutQueue};

/// Reads at least this long consult block status to send holes as
/// `OFFSET_HOLE` chunks; shorter reads just read (saves a status query per I/O).
pub(crate) const SPARSE_READ_MIN: u32 = 64 * 1024;
/// Most extents in one block status chunk (qemu's 1 MiB of extents).
const MAX_EXTENTS: usize = 1024 * 1024 / 8;

/// State shared by a connection's reader, request tasks and writer.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) export: Arc<NbdExport>,
    pub(crate) backend: BlockBackend,
    pub(crate) structured: bool,
    /// Selected metadata contexts, in reply order.
    pub(crate) meta: Vec<(u32, MetaContext)>,
    pub(crate) out: OutQueue,
    pub(crate) pool: BufPool,
}

/// A failed request: wire errno and message.
pub(crate) struct Failure {
    pub(crate) errno: NbdErrno,
    pub(crate) msg: String,
}

impl Failure {
    pub(crate) fn new(errno: NbdErrno, msg: impl Into<String>) -> Self {
        Failure {
            errno,
            msg: msg.into(),
        }
    }

    fn block(what: &str, e: &qsd_block::Error) -> Self {
        Failure {
            errno: NbdErrno::from_host(e.errno()),
            msg: format!("{what}: {e}"),
        }
    }
}

impl Ctx {
    /// Success without payload: a simple reply (allowed in structured mode).
    pub(crate) fn reply_ok(&self, cookie: u64) {
        self.out
            .push(|v| tx::encode_simple_reply(v, cookie, NbdErrno(0)));
    }

    /// An error: an ERROR chunk in structured mode, else a simple reply.
    pub(crate) fn reply_err(&self, cookie: u64, f: &Failure) {
        tracing::debug!(cookie, errno = f.errno.0, "NBD request failed: {}", f.msg);
        if self.structured {
            self.out
                .push(|v| tx::encode_error_chunk(v, cookie, f.errno, &f.msg));
        } else {
            self.out
                .push(|v| tx::encode_simple_reply(v, cookie, f.errno));
        }
    }

    fn finish(&self, cookie: u64, r: Result<(), Failure>) {
        match r {
            Ok(()) => self.reply_ok(cookie),
            Err(f) => self.reply_err(cookie, &f),
        }
    }
}

/// Run one admitted request and queue its reply. The permit bounds the
/// connection's requests in flight and is released when this returns.
pub(crate) async fn handle(
    ctx: Arc<Ctx>,
    req: Request,
    data: Option<IoBuf>,
    _permit: OwnedSemaphorePermit,
) {
    let c = req.cookie;
    match req.command {
        CommandType::Read => read(&ctx, &req).await,
        CommandType::Write => {
            let r = match data {
                Some(buf) => write(&ctx, &req, buf).await,
                None => Err(Failure::new(NbdErrno::EINVAL, "write without payload")),
            };
            ctx.finish(c, r);
        }
        CommandType::WriteZeroes => ctx.finish(c, write_zeroes(&ctx, &req).await),
        CommandType::Trim => ctx.finish(c, trim(&ctx, &req).await),
        CommandType::Flush => ctx.finish(c, flush(&ctx.backend).await),
        // Advisory only; the range was checked on admission.
        CommandType::Cache => ctx.reply_ok(c),
        CommandType::BlockStatus => block_status(&ctx, &req).await,
        other => {
            let msg = format!("invalid request type ({}) received", other.raw());
            ctx.reply_err(c, &Failure::new(NbdErrno::EINVAL, msg));
        }
    }
}

async fn flush(backend: &BlockBackend) -> Result<(), Failure> {
    backend
        .flush()
        .await
        .map_err(|e| Failure::block("flush failed", &e))
}

async fn write(ctx: &Ctx, req: &Request, buf: IoBuf) -> Result<(), Failure> {
    let flags = WriteFlags {
        fua: req.flags.contains(CommandFlags::FUA),
        ..WriteFlags::default()
    };
    match ctx.backend.write(req.offset, buf, flags).await {
        Ok(buf) => {
            ctx.pool.put(buf);
            Ok(())
        }
        Err(e) => Err(Failure::block("writing to file failed", &e)),
    }
}

async fn write_zeroes(ctx: &Ctx, req: &Request) -> Result<(), Failure> {
    let flags = ZeroFlags {
        may_unmap: !req.flags.contains(CommandFlags::NO_HOLE),
        no_fallback: req.flags.contains(CommandFlags::FAST_ZERO),
        fua: req.flags.contains(CommandFlags::FUA),
    };
    let len = u64::from(req.length);
    ctx.backend
        .write_zeroes(req.offset, len, flags)
        .await
        .map_err(|e| Failure::block("writing zeroes failed", &e))
}

async fn trim(ctx: &Ctx, req: &Request) -> Result<(), Failure> {
    let len = u64::from(req.length);
    ctx.backend
        .discard(req.offset, len)
        .await
        .map_err(|e| Failure::block("discard failed", &e))?;
    if req.flags.contains(CommandFlags::FUA) {
        flush(&ctx.backend).await?;
    }
    Ok(())
}

async fn read(ctx: &Ctx, req: &Request) {
    let c = req.cookie;
    // qemu flushes before a read with FUA; the spec allows ignoring it.
    if req.flags.contains(CommandFlags::FUA) {
        if let Err(f) = flush(&ctx.backend).await {
            return ctx.reply_err(c, &f);
        }
    }
    if req.length == 0 {
        if ctx.structured {
            ctx.out.push(|v| tx::encode_none(v, c));
        } else {
            ctx.reply_ok(c);
        }
        return;
    }
    if ctx.structured && !req.flags.contains(CommandFlags::DF) && req.length >= SPARSE_READ_MIN {
        return sparse_read(ctx, req).await;
    }
    let buf = ctx.pool.get(req.length as usize);
    match ctx.backend.read(req.offset, buf).await {
        Ok(buf) => send_data(ctx, c, req.offset, buf, true),
        Err(e) => ctx.reply_err(c, &Failure::block("reading from file failed", &e)),
    }
}

fn send_data(ctx: &Ctx, cookie: u64, offset: u64, buf: IoBuf, done: bool) {
    let len = buf.len() as u32;
    let back = if ctx.structured {
        ctx.out.push_data(
            |v| tx::encode_offset_data_header(v, cookie, offset, len, done),
            buf,
        )
    } else {
        ctx.out
            .push_data(|v| tx::encode_simple_reply(v, cookie, NbdErrno(0)), buf)
    };
    if let Some(b) = back {
        ctx.pool.put(b);
    }
}

/// Status of part of a read: `(offset, len, reads as zeroes)`.
type Piece = (u64, u64, bool);

async fn map_zeroes(
    backend: &BlockBackend,
    offset: u64,
    len: u64,
) -> qsd_block::Result<Vec<Piece>> {
    let end = offset + len;
    let mut pieces: Vec<Piece> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let st = backend.block_status(pos, end - pos).await?;
        let n = st.len.clamp(1, end - pos);
        match pieces.last_mut() {
            Some(last) if last.2 == st.zero => last.1 += n,
            _ => pieces.push((pos, n, st.zero)),
        }
        pos += n;
    }
    Ok(pieces)
}

/// A structured read that sends holes as `OFFSET_HOLE` chunks. All chunks
/// are prepared before any is queued, so an error yields a single ERROR chunk.
async fn sparse_read(ctx: &Ctx, req: &Request) {
    let c = req.cookie;
    let pieces = match map_zeroes(&ctx.backend, req.offset, u64::from(req.length)).await {
        Ok(p) => p,
        Err(e) => return ctx.reply_err(c, &Failure::block("unable to check for holes", &e)),
    };
    let mut data = Vec::with_capacity(pieces.len());
    for &(off, len, zero) in &pieces {
        if zero {
            data.push(None);
            continue;
        }
        match ctx.backend.read(off, ctx.pool.get(len as usize)).await {
            Ok(buf) => data.push(Some(buf)),
            Err(e) => return ctx.reply_err(c, &Failure::block("reading from file failed", &e)),
        }
    }
    let last = pieces.len() - 1;
    for (i, (&(off, len, _), buf)) in pieces.iter().zip(data).enumerate() {
        let done = i == last;
        match buf {
            Some(buf) => send_data(ctx, c, off, buf, done),
            None => ctx
                .out
                .push(|v| tx::encode_offset_hole(v, c, off, len as u32, done)),
        }
    }
}

fn allocation_flags(st: &BlockStatus) -> u32 {
    (if st.data { 0 } else { STATE_HOLE }) | (if st.zero { STATE_ZERO } else { 0 })
}

/// Add an extent, merging with the previous one when the flags match.
/// Returns false (and adds nothing) when the list is full.
fn add_extent(list: &mut Vec<Extent>, len: u32, flags: u32, max: usize) -> bool {
    if let Some(last) = list.last_mut() {
        if last.flags == flags {
            if let Some(sum) = last.length.checked_add(len) {
                last.length = sum;
                return true;
            }
        }
    }
    if list.len() >= max {
        return false;
    }
    list.push(Extent { length: len, flags });
    true
}

async fn extents(
    backend: &BlockBackend,
    ctx: &MetaContext,
    offset: u64,
    len: u32,
    max: usize,
) -> qsd_block::Result<Vec<Extent>> {
    let end = offset + u64::from(len);
    let mut list = Vec::new();
    let mut pos = offset;
    while pos < end {
        let st = backend.block_status(pos, end - pos).await?;
        let n = st.len.clamp(1, end - pos);
        let flags = match ctx {
            MetaContext::BaseAllocation => allocation_flags(&st),
            MetaContext::AllocationDepth => st.depth,
            // Bitmaps are never offered yet, so never selected.
            MetaContext::DirtyBitmap(_) => 0,
        };
        // n <= len, which is a u32.
        if !add_extent(&mut list, n as u32, flags, max) {
            break;
        }
        pos += n;
    }
    Ok(list)
}

async fn block_status(ctx: &Ctx, req: &Request) {
    let c = req.cookie;
    if req.length == 0 {
        return ctx.reply_err(c, &Failure::new(NbdErrno::EINVAL, "need non-zero length"));
    }
    if ctx.meta.is_empty() {
        let f = Failure::new(NbdErrno::EINVAL, "CMD_BLOCK_STATUS not negotiated");
        return ctx.reply_err(c, &f);
    }
    let max = if req.flags.contains(CommandFlags::REQ_ONE) {
        1
    } else {
        MAX_EXTENTS
    };
    let last = ctx.meta.len() - 1;
    for (i, (id, meta)) in ctx.meta.iter().enumerate() {
        match extents(&ctx.backend, meta, req.offset, req.length, max).await {
            Ok(list) => {
                ctx.out
                    .push(|v| tx::encode_block_status(v, c, *id, &list, i == last));
            }
            Err(e) => return ctx.reply_err(c, &Failure::block("can't get block status", &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_add_extent_merges_same_flags_and_respects_max() {
        let mut l = Vec::new();
        assert!(add_extent(&mut l, 10, 1, 1));
        assert!(add_extent(&mut l, 5, 1, 1));
        assert!(!add_extent(&mut l, 5, 0, 1));
        assert_eq!(
            l,
            vec![Extent {
                length: 15,
                flags: 1
            }]
        );
    }

    #[test]
    fn test_add_extent_splits_on_u32_overflow() {
        let mut l = Vec::new();
        assert!(add_extent(&mut l, u32::MAX, 0, 4));
        assert!(add_extent(&mut l, 1, 0, 4));
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn test_allocation_flags_from_status() {
        assert_eq!(
            allocation_flags(&BlockStatus::hole(1)),
            STATE_HOLE | STATE_ZERO
        );
        assert_eq!(allocation_flags(&BlockStatus::data(1)), 0);
    }
}
