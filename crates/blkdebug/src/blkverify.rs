//! The `blkverify` driver: every read and write goes to both the `test`
//! child and the `raw` reference child; reads are compared.
//!
//! Difference from qemu: on a mismatch (of data or of the results) qemu
//! prints a message and exits the whole process. Here the request fails
//! with EIO, the same message is logged at error level, and the daemon and
//! its other exports keep running.

use qsd_block::perm::UserDesc;
use qsd_block::{
    BlockDriver, BoxFut, DebugEvent, DriverFactory, Error, ErrorKind, ImageInfo, NodeRef, OpenCtx,
    Perm, PermUser, Result, WriteFlags,
};
use qsd_rt::IoBuf;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::blkdebug::child_json;

/// `BlockdevOptionsBlkverify` without its children.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlkverifyOpts {}

/// Factory for `blkverify`.
#[derive(Debug, Default)]
pub struct BlkverifyFactory;

impl DriverFactory for BlkverifyFactory {
    fn name(&self) -> &'static str {
        "blkverify"
    }

    fn open<'a>(
        &'a self,
        ctx: &'a mut OpenCtx<'_>,
        mut opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>> {
        Box::pin(async move {
            for key in ["test", "raw"] {
                if !opts.contains_key(key) {
                    return Err(Error::invalid(format!("Parameter '{key}' is missing")));
                }
            }
            // qemu opens the reference first.
            let raw = ctx.required_child(&mut opts, "raw").await?;
            let test = ctx.required_child(&mut opts, "test").await?;
            let _: BlkverifyOpts = ctx.parse(opts)?;
            let driver = BlkverifyDriver::new(test, raw, ctx.node_name())?;
            Ok(Box::new(driver) as Box<dyn BlockDriver>)
        })
    }
}

/// A blkverify node.
#[derive(Debug)]
pub struct BlkverifyDriver {
    test: NodeRef,
    raw: NodeRef,
    test_user: PermUser,
    raw_user: PermUser,
}

impl BlkverifyDriver {
    fn new(test: NodeRef, raw: NodeRef, node_name: &str) -> Result<Self> {
        let desc = |role: &str| UserDesc {
            who: format!("node '{node_name}'"),
            role: role.into(),
        };
        let raw_user = raw.add_user(desc("raw"), Perm::NONE, Perm::ALL)?;
        let test_user = test.add_user(desc("test"), Perm::NONE, Perm::ALL)?;
        Ok(BlkverifyDriver {
            test,
            raw,
            test_user,
            raw_user,
        })
    }
}

/// qemu's report of a mismatch, as an EIO error (logged too).
fn mismatch(is_write: bool, offset: u64, bytes: u64, what: &str) -> Error {
    let msg = format!(
        "blkverify: {} offset={offset} bytes={bytes} {what}",
        if is_write { "write" } else { "read" }
    );
    tracing::error!("{msg}");
    Error::new(ErrorKind::Io, msg)
}

/// The result as qemu compares it: 0 or the negative errno.
fn ret_code<T>(r: &Result<T>) -> i32 {
    r.as_ref().map_or_else(|e| -e.errno(), |_| 0)
}

/// Check that both children gave the same result; the test child's wins.
fn same_result<T>(
    is_write: bool,
    offset: u64,
    bytes: u64,
    test: Result<T>,
    raw: &Result<T>,
) -> Result<T> {
    let (t, r) = (ret_code(&test), ret_code(raw));
    if t != r {
        return Err(mismatch(
            is_write,
            offset,
            bytes,
            &format!("return value mismatch {t} != {r}"),
        ));
    }
    test
}

impl BlockDriver for BlkverifyDriver {
    fn driver_name(&self) -> &'static str {
        "blkverify"
    }

    fn len(&self) -> u64 {
        self.test.len()
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            let len = buf.len();
            let (test, raw) = tokio::join!(
                self.test.read(offset, buf),
                self.raw.read(offset, IoBuf::new(len))
            );
            let test = same_result(false, offset, len as u64, test, &raw)?;
            if let Ok(raw) = &raw {
                if let Some(at) = test.iter().zip(raw.iter()).position(|(a, b)| a != b) {
                    return Err(mismatch(
                        false,
                        offset,
                        len as u64,
                        &format!("contents mismatch at offset {}", offset + at as u64),
                    ));
                }
            }
            Ok(test)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            let len = buf.len() as u64;
            let copy = IoBuf::from_slice(&buf);
            let (test, raw) = tokio::join!(
                self.test.write(offset, buf, flags),
                self.raw.write(offset, copy, flags)
            );
            same_result(true, offset, len, test, &raw)
        })
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        // As qemu: only the test child matters for durability.
        Box::pin(self.test.flush())
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        self.raw_user.update(perm, shared)?;
        self.test_user.update(perm, shared)
    }

    fn image_info(&self) -> ImageInfo {
        let raw = self.raw.driver().image_info().filename;
        let test = self.test.driver().image_info().filename;
        let filename = if raw.starts_with("json:") || test.starts_with("json:") {
            let mut m = Map::new();
            m.insert("driver".into(), "blkverify".into());
            m.insert("raw".into(), child_json(&self.raw));
            m.insert("test".into(), child_json(&self.test));
            qsd_drivers::jsonname::json_filename(&m)
        } else {
            format!("blkverify:{raw}:{test}")
        };
        ImageInfo {
            filename,
            ..ImageInfo::default()
        }
    }

    fn debug_event(&self, ev: DebugEvent) -> bool {
        // qemu's primary child of blkverify is the reference.
        self.raw.debug_event(ev);
        true
    }
}
