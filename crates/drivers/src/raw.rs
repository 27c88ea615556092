//! The `raw` format driver: the child's bytes, optionally a window of them
//! (`offset`, `size`).

use std::sync::atomic::{AtomicU64, Ordering};

use nix::libc;
use qsd_block::perm::UserDesc;
use qsd_block::{
    BlockDriver, BlockStatus, BoxFut, DebugEvent, DriverFactory, Error, ImageInfo, Limits, NodeRef,
    OpenCtx, Perm, PermUser, Result, WriteFlags, ZeroFlags,
};
use qsd_rt::IoBuf;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::jsonname::json_filename;

/// BlockdevOptionsRaw (without `file`, which is taken out as a child first).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawOpts {
    offset: Option<u64>,
    size: Option<u64>,
}

/// Factory for `raw`.
#[derive(Debug, Default)]
pub struct RawFactory;

impl DriverFactory for RawFactory {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn open<'a>(
        &'a self,
        ctx: &'a mut OpenCtx<'_>,
        mut opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>> {
        Box::pin(async move {
            let child = ctx.required_child(&mut opts, "file").await?;
            let opts: RawOpts = ctx.parse(opts)?;
            Ok(Box::new(RawDriver::new(child, &opts, ctx.node_name())?) as Box<dyn BlockDriver>)
        })
    }
}

/// A raw node over its `file` child.
#[derive(Debug)]
pub struct RawDriver {
    child: NodeRef,
    user: PermUser,
    offset: u64,
    /// Set when `size` was given: the window is fixed.
    fixed_size: bool,
    size: AtomicU64,
}

impl RawDriver {
    fn new(child: NodeRef, opts: &RawOpts, node_name: &str) -> Result<Self> {
        let real = child.len();
        let offset = opts.offset.unwrap_or(0);
        if offset > real {
            return Err(Error::invalid(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({real})"
            )));
        }
        if let Some(size) = opts.size {
            if real - offset < size {
                // The double space is qemu's.
                return Err(Error::invalid(format!(
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal \
                     to the  actual size of the containing file ({real})"
                )));
            }
            if size % 512 != 0 {
                return Err(Error::invalid("Specified size is not multiple of 512"));
            }
        }
        let size = opts.size.unwrap_or(real - offset);
        // Until a parent takes something, raw takes nothing on its child.
        let desc = UserDesc {
            who: format!("node '{node_name}'"),
            role: "file".into(),
        };
        // Like qemu's format nodes over their data child, raw never lets
        // others resize the file under it.
        let user = child.add_user(desc, Perm::NONE, Perm::ALL & !Perm::RESIZE)?;
        Ok(RawDriver {
            child,
            user,
            offset,
            fixed_size: opts.size.is_some(),
            size: AtomicU64::new(size),
        })
    }

    fn is_window(&self) -> bool {
        self.offset != 0 || self.fixed_size
    }

    /// Translate a request; refused (as qemu) if it leaves the window.
    fn adjust(&self, offset: u64, len: u64, is_write: bool) -> Result<u64> {
        let size = self.len();
        if self.fixed_size && (offset > size || len > size - offset) {
            let errno = if is_write { libc::ENOSPC } else { libc::EINVAL };
            return Err(Error::invalid(format!(
                "request at offset {offset}, length {len} is outside the raw window of {size} bytes"
            ))
            .with_errno(errno));
        }
        offset
            .checked_add(self.offset)
            .ok_or_else(|| Error::invalid("request offset overflows"))
    }
}

impl BlockDriver for RawDriver {
    fn driver_name(&self) -> &'static str {
        "raw"
    }

    fn len(&self) -> u64 {
        // Follow the child if it changed size behind our back, as qemu.
        let real = self.child.len().saturating_sub(self.offset);
        let size = self.size.load(Ordering::Acquire);
        if self.fixed_size {
            size.min(real)
        } else {
            real
        }
    }

    fn limits(&self) -> Limits {
        // The child pads its own requests; only transfer sizes carry over.
        let child = self.child.driver().limits();
        Limits {
            request_alignment: 1,
            ..child
        }
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            let at = self.adjust(offset, buf.len() as u64, false)?;
            self.child.debug_event(DebugEvent::ReadAio);
            self.child.read(at, buf).await
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            let at = self.adjust(offset, buf.len() as u64, true)?;
            self.child.debug_event(DebugEvent::WriteAio);
            self.child.write(at, buf, flags).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let at = self.adjust(offset, len, true)?;
            self.child.write_zeroes(at, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let at = self.adjust(offset, len, true)?;
            self.child.discard(at, len).await
        })
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(self.child.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFut<'_, BlockStatus> {
        Box::pin(async move {
            let at = self.adjust(offset, len, false)?;
            self.child.block_status(at, len).await
        })
    }

    fn truncate(&self, size: u64) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if self.fixed_size {
                return Err(Error::unsupported("Cannot resize fixed-size raw disks"));
            }
            let end = size
                .checked_add(self.offset)
                .filter(|&e| i64::try_from(e).is_ok())
                .ok_or_else(|| Error::invalid("Disk size too large for the chosen offset"))?;
            self.child.truncate(end).await?;
            self.size.store(size, Ordering::Release);
            Ok(())
        })
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        // Permissions pass through, but resizing the file is never shared
        // (qemu's default for a data child); a window refuses resizes itself.
        self.user.update(perm, shared & !Perm::RESIZE)
    }

    fn image_info(&self) -> ImageInfo {
        let child = self.child.driver().image_info();
        let filename = if self.is_window() || child.filename.starts_with("json:") {
            self.window_filename(&child.filename)
        } else {
            child.filename.clone()
        };
        ImageInfo {
            filename,
            actual_size: child.actual_size,
            ..ImageInfo::default()
        }
    }
}

impl RawDriver {
    /// qemu's `json:{...}` name for a raw node that has options of its own
    /// (or whose child has a `json:` name).
    fn window_filename(&self, child_name: &str) -> String {
        let child_opts = match child_name.strip_prefix("json:") {
            Some(json) => serde_json::from_str(json).unwrap_or(Value::Null),
            None => {
                let mut m = Map::new();
                m.insert("driver".into(), self.child.driver().driver_name().into());
                m.insert("filename".into(), child_name.into());
                Value::Object(m)
            }
        };
        let mut m = Map::new();
        m.insert("driver".into(), "raw".into());
        if self.offset != 0 {
            m.insert("offset".into(), self.offset.into());
        }
        if self.fixed_size {
            m.insert("size".into(), self.size.load(Ordering::Acquire).into());
        }
        m.insert("file".into(), child_opts);
        json_filename(&m)
    }
}
