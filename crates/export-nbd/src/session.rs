//! One connection in transmission phase, on its export's I/O thread.
//!
//! The reader decodes every complete request in its (large) buffer after each
//! read, checks it, and spawns a task per request on the current runtime.
//! Requests in flight are bounded by a weighted semaphore (small requests
//! weigh 1, big ones more) and the reply queue by a byte limit; when either is
//! full the reader stops reading, which pushes back on the client.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use qsd_nbd_proto::{
    CommandFlags, CommandType, Decoded, NbdErrno, Negotiated, Request, MAX_PAYLOAD,
};
use qsd_rt::IoBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::export::{ClientGuard, NbdExport};
use crate::ops::{self, Ctx, Failure};
use crate::out::{BufPool, OutQueue};

/// Capacity of the request semaphore: at most this many small requests, or
/// about 64 MiB of big ones, per connection.
const MAX_UNITS: u32 = 128;
/// One unit of weight per this many bytes of payload (plus one per request).
const UNIT_BYTES: u32 = 512 * 1024;
/// Read buffer size: many requests are decoded per read.
const READ_BUF: usize = 256 * 1024;
/// Write payloads up to this size are gathered in the read buffer.
const SMALL_PAYLOAD: usize = 64 * 1024;
/// The reader waits while more reply bytes than this are queued.
const MAX_QUEUED: usize = 64 * 1024 * 1024;
/// How long a closing connection may take to flush its last replies.
const FLUSH_GRACE: Duration = Duration::from_secs(30);

/// Why the reader stopped.
#[derive(Debug)]
enum End {
    /// The client closed the connection between requests.
    Eof,
    /// The client sent `NBD_CMD_DISC`.
    Disc,
    /// The export is being removed in hard mode (or the server is stopping).
    Disconnect,
    /// The client broke the protocol or the socket failed.
    Error(String),
}

/// Everything a session needs, prepared by the server after the handshake.
pub(crate) struct Session<R, W> {
    pub(crate) rd: R,
    pub(crate) wr: W,
    pub(crate) leftover: BytesMut,
    pub(crate) negotiated: Negotiated,
    pub(crate) export: Arc<NbdExport>,
    pub(crate) guard: ClientGuard,
    pub(crate) peer: String,
}

struct Reader<R> {
    rd: R,
    buf: BytesMut,
    ctx: Arc<Ctx>,
    sem: Arc<Semaphore>,
    disconnect: watch::Receiver<bool>,
}

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// Serve the connection until it ends. Must run on the export's runtime.
    pub(crate) async fn run(self) {
        let Session {
            rd,
            mut wr,
            mut leftover,
            negotiated,
            export,
            guard,
            peer,
        } = self;
        let meta = negotiated.meta.contexts(&[]);
        let pool = BufPool::default();
        let ctx = Arc::new(Ctx {
            backend: export.backend().clone(),
            export,
            structured: negotiated.structured,
            meta,
            out: OutQueue::with_pool(pool.clone()),
            pool,
        });
        let wctx = Arc::clone(&ctx);
        let mut writer = tokio::spawn(async move { wctx.out.run_writer(&mut wr).await });
        leftover.reserve(READ_BUF);
        let mut disconnect = guard.disconnect_signal();
        let mut reader = Reader {
            rd,
            buf: leftover,
            ctx: Arc::clone(&ctx),
            sem: Arc::new(Semaphore::new(MAX_UNITS as usize)),
            disconnect: disconnect.clone(),
        };
        let end = reader.run().await;
        match &end {
            End::Error(msg) => tracing::warn!("NBD client {peer}: disconnecting: {msg}"),
            other => tracing::debug!("NBD client {peer}: {other:?}"),
        }
        // Every admitted request completes before the connection goes away.
        let _ = reader.sem.acquire_many(MAX_UNITS).await;
        ctx.out.close();
        let grace = if matches!(end, End::Disconnect) {
            Duration::ZERO
        } else {
            FLUSH_GRACE
        };
        tokio::select! {
            _ = &mut writer => {}
            _ = tokio::time::sleep(grace) => writer.abort(),
            _ = disconnect.wait_for(|d| *d) => writer.abort(),
        }
        drop(guard);
    }
}

fn weight(req: &Request) -> u32 {
    match req.command {
        CommandType::Read | CommandType::Write => (1 + req.length / UNIT_BYTES).min(MAX_UNITS),
        _ => 1,
    }
}

impl<R: AsyncRead + Unpin> Reader<R> {
    async fn run(&mut self) -> End {
        loop {
            loop {
                let req = match Request::decode(&self.buf) {
                    Ok(Decoded::Done(req, n)) => {
                        self.buf.advance(n);
                        req
                    }
                    Ok(Decoded::Incomplete(_)) => break,
                    Err(e) => return End::Error(e.to_string()),
                };
                if let Some(end) = self.admit(req).await {
                    return end;
                }
            }
            match self.fill().await {
                Ok(true) => {}
                Ok(false) if self.buf.is_empty() => return End::Eof,
                Ok(false) => {
                    return End::Error("connection closed in the middle of a request".into())
                }
                Err(end) => return end,
            }
        }
    }

    /// Read more bytes into the buffer. `Ok(false)` at end of stream.
    async fn fill(&mut self) -> Result<bool, End> {
        if self.buf.capacity() - self.buf.len() < READ_BUF / 4 {
            self.buf.reserve(READ_BUF);
        }
        tokio::select! {
            r = self.rd.read_buf(&mut self.buf) => match r {
                Ok(n) => Ok(n > 0),
                Err(e) => Err(End::Error(format!("read failed: {e}"))),
            },
            _ = self.disconnect.wait_for(|d| *d) => Err(End::Disconnect),
        }
    }

    async fn read_payload(&mut self, len: usize) -> Result<IoBuf, End> {
        let mut data = self.ctx.pool.get(len);
        if len <= SMALL_PAYLOAD {
            while self.buf.len() < len {
                if !self.fill().await? {
                    return Err(End::Error(
                        "connection closed inside a write payload".into(),
                    ));
                }
            }
            data.copy_from_slice(&self.buf[..len]);
            self.buf.advance(len);
            return Ok(data);
        }
        let have = self.buf.len().min(len);
        data[..have].copy_from_slice(&self.buf[..have]);
        self.buf.advance(have);
        tokio::select! {
            r = self.rd.read_exact(&mut data[have..]) => match r {
                Ok(_) => Ok(data),
                Err(e) => Err(End::Error(format!("reading write payload failed: {e}"))),
            },
            _ = self.disconnect.wait_for(|d| *d) => Err(End::Disconnect),
        }
    }

    async fn acquire(&mut self, units: u32) -> Result<OwnedSemaphorePermit, End> {
        if let Ok(p) = Arc::clone(&self.sem).try_acquire_many_owned(units) {
            return Ok(p);
        }
        tokio::select! {
            p = Arc::clone(&self.sem).acquire_many_owned(units) => {
                p.map_err(|_| End::Error("request limiter closed".into()))
            }
            _ = self.disconnect.wait_for(|d| *d) => Err(End::Disconnect),
        }
    }

    /// Check, read the payload of, and start one request. `Some` ends the
    /// connection.
    async fn admit(&mut self, req: Request) -> Option<End> {
        if req.command == CommandType::Disc {
            return Some(End::Disc);
        }
        if self.ctx.out.is_broken() {
            return Some(End::Error("reply stream broken".into()));
        }
        self.ctx.out.wait_below(MAX_QUEUED).await;
        let permit = match self.acquire(weight(&req)).await {
            Ok(p) => p,
            Err(end) => return Some(end),
        };
        let mut data = None;
        if req.command == CommandType::Write {
            if req.length > MAX_PAYLOAD {
                // The payload cannot be skipped cheaply: answer, then hang up.
                let msg = format!(
                    "len ({}) is larger than max len ({MAX_PAYLOAD})",
                    req.length
                );
                self.ctx
                    .reply_err(req.cookie, &Failure::new(NbdErrno::EINVAL, msg.clone()));
                return Some(End::Error(msg));
            }
            match self.read_payload(req.length as usize).await {
                Ok(d) => data = Some(d),
                Err(end) => return Some(end),
            }
        }
        if let Err(f) = check(&self.ctx, &req) {
            self.ctx.reply_err(req.cookie, &f);
            if let Some(d) = data {
                self.ctx.pool.put(d);
            }
            return None;
        }
        tokio::spawn(ops::handle(Arc::clone(&self.ctx), req, data, permit));
        None
    }
}

/// The checks qemu makes before running a request, in qemu's order. Every
/// failure is EINVAL on the wire, as qemu-storage-daemon 10.0 answers, except
/// writes to a read-only export, which get the spec's EPERM.
fn check(ctx: &Ctx, req: &Request) -> Result<(), Failure> {
    let cmd = req.command;
    let sized = matches!(cmd, CommandType::Read | CommandType::Cache);
    if sized && req.length > MAX_PAYLOAD {
        let msg = format!(
            "len ({}) is larger than max len ({MAX_PAYLOAD})",
            req.length
        );
        return Err(Failure::new(NbdErrno::EINVAL, msg));
    }
    let writes = matches!(
        cmd,
        CommandType::Write | CommandType::Trim | CommandType::WriteZeroes
    );
    if writes && !ctx.export.is_writable() {
        return Err(Failure::new(NbdErrno::EPERM, "export is read-only"));
    }
    let size = ctx.export.size();
    if req.end().is_none_or(|end| end > size) {
        let msg = format!(
            "operation past EOF; From: {}, Len: {}, Size: {size}",
            req.offset, req.length
        );
        return Err(Failure::new(NbdErrno::EINVAL, msg));
    }
    let mut valid = CommandFlags::FUA;
    match cmd {
        CommandType::Read if ctx.structured => valid |= CommandFlags::DF,
        CommandType::WriteZeroes => valid |= CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO,
        CommandType::BlockStatus => valid |= CommandFlags::REQ_ONE,
        _ => {}
    }
    if req.flags.bits() & !valid.bits() != 0 {
        let msg = format!(
            "unsupported flags for command {} (got {:#x})",
            cmd.raw(),
            req.flags.bits()
        );
        return Err(Failure::new(NbdErrno::EINVAL, msg));
    }
    Ok(())
}
