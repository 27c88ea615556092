//! The `blkdebug` driver: a filter over its `image` child that injects
//! errors when debug events fire (see [`crate::rules`]) and imposes request
//! limits (`align`, `max-transfer`, write-zeroes and discard granularity).
//!
//! The block layer's [`Limits`] has no members for write-zeroes and discard
//! limits, so this driver splits those requests itself the way qemu's
//! generic layer would: unaligned heads and tails of a write-zeroes become
//! written zero buffers (or ENOTSUP with `no_fallback`), those of a discard
//! are dropped, and aligned bodies go down in pieces of at most the maximum.
//! Reads and writes above `max-transfer` are split here too.

use std::io;
use std::sync::{Mutex, MutexGuard};

use qsd_block::error::libc_errno;
use qsd_block::perm::UserDesc;
use qsd_block::{
    BlockDriver, BlockStatus, BoxFut, DebugEvent, DriverFactory, Error, ErrorKind, ImageInfo,
    Limits, NodeRef, OpenCtx, Perm, PermUser, Result, WriteFlags, ZeroFlags,
};
use qsd_rt::IoBuf;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::parse_config;
use crate::rules::{InjectSpec, IoType, RuleEngine, SetStateSpec};

/// `BlkdebugInjectErrorOptions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct InjectErrorOpts {
    event: DebugEvent,
    state: Option<i64>,
    iotype: Option<IoType>,
    errno: Option<i64>,
    sector: Option<i64>,
    once: Option<bool>,
    immediately: Option<bool>,
}

/// `BlkdebugSetStateOptions` (`new_state` is spelled with an underscore).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStateOpts {
    event: DebugEvent,
    state: Option<i64>,
    new_state: i64,
}

/// `BlockPermission`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum PermName {
    ConsistentRead,
    Write,
    WriteUnchanged,
    Resize,
}

impl PermName {
    fn perm(self) -> Perm {
        match self {
            PermName::ConsistentRead => Perm::CONSISTENT_READ,
            PermName::Write => Perm::WRITE,
            PermName::WriteUnchanged => Perm::WRITE_UNCHANGED,
            PermName::Resize => Perm::RESIZE,
        }
    }
}

/// `BlockdevOptionsBlkdebug` without `image` (opened as the child).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlkdebugOpts {
    config: Option<String>,
    align: Option<u64>,
    max_transfer: Option<u64>,
    opt_write_zero: Option<u64>,
    max_write_zero: Option<u64>,
    opt_discard: Option<u64>,
    max_discard: Option<u64>,
    inject_error: Option<Vec<InjectErrorOpts>>,
    set_state: Option<Vec<SetStateOpts>>,
    take_child_perms: Option<Vec<PermName>>,
    unshare_child_perms: Option<Vec<PermName>>,
}

impl From<&InjectErrorOpts> for InjectSpec {
    fn from(o: &InjectErrorOpts) -> Self {
        InjectSpec {
            event: o.event,
            state: o.state,
            iotype: o.iotype,
            errno: o.errno,
            sector: o.sector,
            once: o.once,
            immediately: o.immediately,
        }
    }
}

impl From<&SetStateOpts> for SetStateSpec {
    fn from(o: &SetStateOpts) -> Self {
        SetStateSpec {
            event: o.event,
            state: o.state,
            new_state: o.new_state,
        }
    }
}

/// The request limits blkdebug imposes (0 = none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct BlkLimits {
    align: u64,
    max_transfer: u64,
    opt_write_zero: u64,
    max_write_zero: u64,
    opt_discard: u64,
    max_discard: u64,
}

/// Largest limit qemu accepts (it keeps them in C ints).
const INT_MAX: u64 = i32::MAX as u64;

impl BlkLimits {
    /// qemu's checks, in its order; `child_align` is the child's alignment.
    fn validate(o: &BlkdebugOpts, child_align: u64) -> Result<Self> {
        let bad =
            |name: &str, v: u64| Error::invalid(format!("Cannot meet constraints with {name} {v}"));
        let align = o.align.unwrap_or(0);
        if align != 0 && (align >= INT_MAX || !align.is_power_of_two()) {
            return Err(bad("align", align));
        }
        let base = align.max(child_align).max(1);
        let check = |name: &str, v: Option<u64>, unit: u64| -> Result<u64> {
            let v = v.unwrap_or(0);
            if v != 0 && (v >= INT_MAX || !v.is_multiple_of(unit.max(1))) {
                return Err(bad(name, v));
            }
            Ok(v)
        };
        let max_transfer = check("max-transfer", o.max_transfer, base)?;
        let opt_write_zero = check("opt-write-zero", o.opt_write_zero, base)?;
        let max_write_zero = check("max-write-zero", o.max_write_zero, opt_write_zero.max(base))?;
        let opt_discard = check("opt-discard", o.opt_discard, base)?;
        let max_discard = check("max-discard", o.max_discard, opt_discard.max(base))?;
        Ok(BlkLimits {
            align,
            max_transfer,
            opt_write_zero,
            max_write_zero,
            opt_discard,
            max_discard,
        })
    }
}

/// Split `[offset, offset + len)` as qemu's generic layer splits
/// write-zeroes and discard for a driver with granularity `align`: a head
/// up to the first boundary, aligned bodies of at most `max` bytes (0 = no
/// limit), and the unaligned tail. Pieces shorter than `align` are the
/// unaligned ones.
pub(crate) fn split_pieces(offset: u64, len: u64, align: u64, max: u64) -> Vec<(u64, u64)> {
    let align = align.max(1);
    let max = if max == 0 {
        u64::MAX / align * align
    } else {
        (max / align * align).max(align)
    };
    let mut head = offset % align;
    let tail = offset.saturating_add(len) % align;
    let (mut pos, mut left) = (offset, len);
    let mut out = Vec::new();
    while left > 0 {
        let mut num = left;
        if head != 0 {
            num = num.min(align - head);
            head = (head + num) % align;
        } else if tail != 0 && num > align {
            num -= tail;
        }
        num = num.min(max);
        out.push((pos, num));
        pos += num;
        left -= num;
    }
    out
}

/// Factory for `blkdebug`.
#[derive(Debug, Default)]
pub struct BlkdebugFactory;

impl DriverFactory for BlkdebugFactory {
    fn name(&self) -> &'static str {
        "blkdebug"
    }

    fn open<'a>(
        &'a self,
        ctx: &'a mut OpenCtx<'_>,
        mut opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>> {
        Box::pin(async move {
            // As qemu's visitor: `image` is the first member checked.
            let mut image = Map::new();
            match opts.remove("image") {
                Some(v) => image.insert("image".into(), v),
                None => return Err(Error::invalid("Parameter 'image' is missing")),
            };
            let parsed: BlkdebugOpts = ctx.parse(opts)?;
            let engine = build_rules(&parsed)?;
            let child = ctx.required_child(&mut image, "image").await?;
            let driver = BlkdebugDriver::new(child, &parsed, engine, ctx.node_name())?;
            Ok(Box::new(driver) as Box<dyn BlockDriver>)
        })
    }
}

/// The rules of the config file (first) and of the options.
fn build_rules(o: &BlkdebugOpts) -> Result<RuleEngine> {
    let mut inject: Vec<InjectSpec> = Vec::new();
    let mut set_state: Vec<SetStateSpec> = Vec::new();
    if let Some(path) = &o.config {
        let text = std::fs::read(path).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("Could not read blkdebug config file: {}", strerror(&e)),
            )
            .with_errno(e.raw_os_error().unwrap_or(libc_errno::EIO))
        })?;
        let text = String::from_utf8_lossy(&text);
        let rules = parse_config(&text).map_err(|e| Error::invalid(e.to_string()))?;
        inject.extend(rules.inject);
        set_state.extend(rules.set_state);
    }
    inject.extend(o.inject_error.iter().flatten().map(InjectSpec::from));
    set_state.extend(o.set_state.iter().flatten().map(SetStateSpec::from));
    Ok(RuleEngine::new(&inject, &set_state))
}

/// The C library's text for an error.
pub(crate) fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// A blkdebug node.
#[derive(Debug)]
pub struct BlkdebugDriver {
    child: NodeRef,
    user: PermUser,
    rules: Mutex<RuleEngine>,
    limits: BlkLimits,
    take: Perm,
    unshare: Perm,
    filename: String,
}

impl BlkdebugDriver {
    fn new(child: NodeRef, o: &BlkdebugOpts, rules: RuleEngine, node_name: &str) -> Result<Self> {
        let child_align = u64::from(child.driver().limits().request_alignment);
        let limits = BlkLimits::validate(o, child_align)?;
        let perms = |list: &Option<Vec<PermName>>| {
            list.iter()
                .flatten()
                .fold(Perm::NONE, |acc, p| acc | p.perm())
        };
        let take = perms(&o.take_child_perms);
        let unshare = perms(&o.unshare_child_perms);
        let desc = UserDesc {
            who: format!("node '{node_name}'"),
            role: "image".into(),
        };
        let user = child.add_user(desc, take, Perm::ALL & !unshare)?;
        let filename = filename(&child, o);
        Ok(BlkdebugDriver {
            child,
            user,
            rules: Mutex::new(rules),
            limits,
            take,
            unshare,
            filename,
        })
    }

    fn engine(&self) -> MutexGuard<'_, RuleEngine> {
        match self.rules.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The state of the rules (for tests and debugging).
    pub fn state(&self) -> i64 {
        self.engine().state()
    }

    /// Fail the request if an armed rule says so.
    async fn check(&self, offset: u64, bytes: u64, iotype: IoType) -> Result<()> {
        let Some(inj) = self.engine().check(offset, bytes, iotype) else {
            return Ok(());
        };
        if !inj.immediately {
            // qemu completes the failed request from a later iteration of
            // the event loop; let other tasks run first.
            tokio::task::yield_now().await;
        }
        let text = strerror(&io::Error::from_raw_os_error(inj.errno));
        let at = match iotype {
            IoType::Flush => String::new(),
            _ => format!(" at offset {offset}"),
        };
        Err(Error::new(
            ErrorKind::Io,
            format!(
                "blkdebug: injected error on {}{at}: {text}",
                iotype.as_str()
            ),
        )
        .with_errno(inj.errno))
    }

    /// Largest piece of a read or write (0 = no limit).
    fn max_transfer(&self) -> usize {
        usize::try_from(self.limits.max_transfer).unwrap_or(0)
    }

    async fn read_piece(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.check(offset, buf.len() as u64, IoType::Read).await?;
        self.child.read(offset, buf).await
    }

    async fn write_piece(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.check(offset, buf.len() as u64, IoType::Write).await?;
        self.child.write(offset, buf, flags).await
    }

    async fn read_split(&self, offset: u64, mut buf: IoBuf, max: usize) -> Result<IoBuf> {
        let mut done = 0;
        while done < buf.len() {
            let n = max.min(buf.len() - done);
            let piece = self.read_piece(offset + done as u64, IoBuf::new(n)).await?;
            buf[done..done + n].copy_from_slice(&piece);
            done += n;
        }
        Ok(buf)
    }

    async fn write_split(
        &self,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
        max: usize,
    ) -> Result<IoBuf> {
        let mut done = 0;
        while done < buf.len() {
            let n = max.min(buf.len() - done);
            let piece = IoBuf::from_slice(&buf[done..done + n]);
            self.write_piece(offset + done as u64, piece, flags).await?;
            done += n;
        }
        Ok(buf)
    }

    /// The write-zeroes fallback: zero buffers through the write path
    /// (so `iotype=write` rules see them, as in qemu).
    async fn write_zero_buffers(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        const BOUNCE: u64 = 1 << 20;
        let max = match self.limits.max_transfer {
            0 => BOUNCE,
            m => m.min(BOUNCE),
        };
        let flags = WriteFlags {
            fua,
            ..WriteFlags::default()
        };
        let mut done = 0;
        while done < len {
            let n = max.min(len - done);
            self.write_piece(offset + done, IoBuf::new(n as usize), flags)
                .await?;
            done += n;
        }
        Ok(())
    }

    async fn zero_piece(&self, offset: u64, len: u64, align: u64, flags: ZeroFlags) -> Result<()> {
        if len < align {
            // qemu's blkdebug refuses pieces below its granularity.
            if flags.no_fallback {
                return Err(Error::unsupported("write-zeroes below the alignment"));
            }
            return self.write_zero_buffers(offset, len, flags.fua).await;
        }
        self.check(offset, len, IoType::WriteZeroes).await?;
        match self.child.write_zeroes(offset, len, flags).await {
            Err(e) if e.kind() == ErrorKind::Unsupported && !flags.no_fallback => {
                self.write_zero_buffers(offset, len, flags.fua).await
            }
            other => other,
        }
    }

    fn req_align(&self) -> u64 {
        u64::from(self.limits().request_alignment.max(1))
    }
}

impl BlockDriver for BlkdebugDriver {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }

    qsd_block::forward_to_child!(child: len, truncate);

    fn limits(&self) -> Limits {
        let child = self.child.driver().limits();
        let align = u64::from(child.request_alignment).max(self.limits.align);
        Limits {
            request_alignment: u32::try_from(align).unwrap_or(child.request_alignment),
            max_transfer: match self.limits.max_transfer {
                0 => child.max_transfer,
                m => m,
            },
            opt_transfer: child.opt_transfer,
        }
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            match self.max_transfer() {
                max if max != 0 && buf.len() > max => self.read_split(offset, buf, max).await,
                _ => self.read_piece(offset, buf).await,
            }
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            match self.max_transfer() {
                max if max != 0 && buf.len() > max && !flags.compress => {
                    self.write_split(offset, buf, flags, max).await
                }
                _ => self.write_piece(offset, buf, flags).await,
            }
        })
    }

    fn can_compress(&self) -> bool {
        // qemu's filters pass compressed writes to a child that can take them.
        self.child.driver().can_compress()
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let align = self.req_align().max(self.limits.opt_write_zero);
            for (pos, n) in split_pieces(offset, len, align, self.limits.max_write_zero) {
                self.zero_piece(pos, n, align, flags).await?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let align = self.req_align().max(self.limits.opt_discard);
            for (pos, n) in split_pieces(offset, len, align, self.limits.max_discard) {
                // Pieces below the granularity are dropped, as in qemu.
                if n >= align {
                    self.check(pos, n, IoType::Discard).await?;
                    self.child.discard(pos, n).await?;
                }
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.check(0, 0, IoType::Flush).await?;
            self.child.flush().await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFut<'_, BlockStatus> {
        Box::pin(async move {
            self.check(offset, len, IoType::BlockStatus).await?;
            self.child.block_status(offset, len).await
        })
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        self.user.update(perm | self.take, shared & !self.unshare)
    }

    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            filename: self.filename.clone(),
            ..ImageInfo::default()
        }
    }

    fn debug_event(&self, ev: DebugEvent) -> bool {
        self.engine().fire(ev);
        true
    }
}

/// The child's options as qemu prints them inside a `json:` name.
pub(crate) fn child_json(child: &NodeRef) -> Value {
    let name = child.driver().image_info().filename;
    match name.strip_prefix("json:") {
        Some(json) => serde_json::from_str(json).unwrap_or(Value::Null),
        None => {
            let mut m = Map::new();
            m.insert("driver".into(), child.driver().driver_name().into());
            m.insert("filename".into(), name.into());
            Value::Object(m)
        }
    }
}

/// qemu's name for the node: `blkdebug:CONFIG:CHILD` when only a config
/// file is given, else `json:{...}` with the options flattened.
fn filename(child: &NodeRef, o: &BlkdebugOpts) -> String {
    let child_name = child.driver().image_info().filename;
    let flat = flat_options(o);
    if flat.keys().all(|k| k == "config") && !child_name.starts_with("json:") {
        return format!(
            "blkdebug:{}:{child_name}",
            o.config.as_deref().unwrap_or("")
        );
    }
    let mut m = Map::new();
    m.insert("driver".into(), "blkdebug".into());
    m.insert("image".into(), child_json(child));
    m.extend(flat);
    qsd_drivers::jsonname::json_filename(&m)
}

/// The options as qemu's flattened QDict (`inject-error.0.event`, ...);
/// like qemu, only those that change the data path (not the permissions).
fn flat_options(o: &BlkdebugOpts) -> Map<String, Value> {
    let mut m = Map::new();
    let mut put = |k: String, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k, v);
        }
    };
    put("config".into(), o.config.clone().map(Value::from));
    for (k, v) in [
        ("align", o.align),
        ("max-transfer", o.max_transfer),
        ("opt-write-zero", o.opt_write_zero),
        ("max-write-zero", o.max_write_zero),
        ("opt-discard", o.opt_discard),
        ("max-discard", o.max_discard),
    ] {
        put(k.into(), v.map(Value::from));
    }
    for (i, r) in o.inject_error.iter().flatten().enumerate() {
        let p = format!("inject-error.{i}.");
        put(format!("{p}event"), Some(r.event.as_str().into()));
        put(format!("{p}state"), r.state.map(Value::from));
        put(format!("{p}iotype"), r.iotype.map(|t| t.as_str().into()));
        put(format!("{p}errno"), r.errno.map(Value::from));
        put(format!("{p}sector"), r.sector.map(Value::from));
        put(format!("{p}once"), r.once.map(Value::from));
        put(format!("{p}immediately"), r.immediately.map(Value::from));
    }
    for (i, r) in o.set_state.iter().flatten().enumerate() {
        let p = format!("set-state.{i}.");
        put(format!("{p}event"), Some(r.event.as_str().into()));
        put(format!("{p}state"), r.state.map(Value::from));
        put(format!("{p}new_state"), Some(r.new_state.into()));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_split_pieces_head_body_tail() {
        assert_eq!(
            split_pieces(1000, 200_000, 65536, 0),
            vec![(1000, 64536), (65536, 131_072), (196_608, 4392)]
        );
        assert_eq!(split_pieces(0, 4096, 1, 0), vec![(0, 4096)]);
        assert_eq!(split_pieces(100, 50, 4096, 0), vec![(100, 50)]);
    }

    #[test]
    fn test_split_pieces_caps_body_at_max() {
        assert_eq!(
            split_pieces(0, 10240, 1024, 4096),
            vec![(0, 4096), (4096, 4096), (8192, 2048)]
        );
        // a maximum below the alignment still makes progress
        assert_eq!(
            split_pieces(0, 2048, 1024, 100),
            vec![(0, 1024), (1024, 1024)]
        );
    }

    #[test]
    fn test_limits_validation_uses_qemu_wording() {
        let v = |o: BlkdebugOpts| BlkLimits::validate(&o, 1).map_err(|e| e.to_string());
        assert_eq!(
            v(BlkdebugOpts {
                align: Some(3),
                ..Default::default()
            }),
            Err("Cannot meet constraints with align 3".into())
        );
        assert_eq!(
            v(BlkdebugOpts {
                align: Some(4096),
                max_transfer: Some(1000),
                ..Default::default()
            }),
            Err("Cannot meet constraints with max-transfer 1000".into())
        );
        assert_eq!(
            v(BlkdebugOpts {
                opt_write_zero: Some(1024),
                max_write_zero: Some(1536),
                ..Default::default()
            }),
            Err("Cannot meet constraints with max-write-zero 1536".into())
        );
        assert_eq!(
            v(BlkdebugOpts {
                align: Some(1 << 31),
                ..Default::default()
            }),
            Err("Cannot meet constraints with align 2147483648".into())
        );
        assert!(v(BlkdebugOpts {
            opt_discard: Some(3),
            max_discard: Some(100),
            ..Default::default()
        })
        .is_err());
        assert!(v(BlkdebugOpts {
            opt_discard: Some(3),
            max_discard: Some(99),
            ..Default::default()
        })
        .is_ok());
    }

    #[test]
    fn test_strerror_drops_rust_suffix() {
        assert_eq!(
            strerror(&io::Error::from_raw_os_error(2)),
            "No such file or directory"
        );
    }
}
