//! The `null-co` and `null-aio` drivers: a device of a given size that
//! drops writes and, with `read-zeroes`, reads as zeroes.

use std::time::Duration;

use qsd_block::{
    BlockDriver, BlockStatus, BoxFut, DriverFactory, Error, ImageInfo, OpenCtx, Result, WriteFlags,
    ZeroFlags,
};
use qsd_rt::IoBuf;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::jsonname::json_filename;

/// Default size: 1 GiB.
const DEFAULT_SIZE: u64 = 1 << 30;

/// BlockdevOptionsNull.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct NullOpts {
    size: Option<i64>,
    latency_ns: Option<i64>,
    read_zeroes: Option<bool>,
}

/// Factory for `null-co` or `null-aio` (they differ only inside qemu).
#[derive(Debug)]
pub struct NullFactory {
    name: &'static str,
}

impl NullFactory {
    /// The `null-co` driver.
    pub fn co() -> Self {
        NullFactory { name: "null-co" }
    }

    /// The `null-aio` driver.
    pub fn aio() -> Self {
        NullFactory { name: "null-aio" }
    }
}

impl DriverFactory for NullFactory {
    fn name(&self) -> &'static str {
        self.name
    }

    fn open<'a>(
        &'a self,
        ctx: &'a mut OpenCtx<'_>,
        opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>> {
        Box::pin(async move {
            let opts: NullOpts = ctx.parse(opts)?;
            Ok(Box::new(NullDriver::new(self.name, &opts)?) as Box<dyn BlockDriver>)
        })
    }
}

/// A null device.
#[derive(Debug)]
pub struct NullDriver {
    name: &'static str,
    size: u64,
    latency: Option<Duration>,
    read_zeroes: bool,
    filename: String,
}

impl NullDriver {
    fn new(name: &'static str, opts: &NullOpts) -> Result<Self> {
        let size = match opts.size {
            None => DEFAULT_SIZE,
            Some(n) => u64::try_from(n).map_err(|_| {
                Error::invalid(format!("Value '{n}' is out of range for parameter 'size'"))
            })?,
        };
        let latency = match opts.latency_ns {
            None | Some(0) => None,
            Some(n) => Some(Duration::from_nanos(
                u64::try_from(n).map_err(|_| Error::invalid("latency-ns is invalid"))?,
            )),
        };
        Ok(NullDriver {
            name,
            // qemu counts lengths in 512-byte sectors, rounding up.
            size: size.next_multiple_of(512),
            latency,
            read_zeroes: opts.read_zeroes.unwrap_or(false),
            filename: null_filename(name, opts),
        })
    }

    async fn delay(&self) {
        if let Some(d) = self.latency {
            tokio::time::sleep(d).await;
        }
    }
}

/// "null-co://", or qemu's `json:` name when size or read-zeroes were given.
fn null_filename(name: &str, opts: &NullOpts) -> String {
    if opts.size.is_none() && opts.read_zeroes.is_none() {
        return format!("{name}://");
    }
    let mut m = Map::new();
    m.insert("driver".into(), name.into());
    if let Some(s) = opts.size {
        m.insert("size".into(), s.into());
    }
    if let Some(z) = opts.read_zeroes {
        m.insert("read-zeroes".into(), z.into());
    }
    json_filename(&m)
}

impl BlockDriver for NullDriver {
    fn driver_name(&self) -> &'static str {
        self.name
    }

    fn len(&self) -> u64 {
        self.size
    }

    fn read(&self, _offset: u64, mut buf: IoBuf) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            self.delay().await;
            // Without read-zeroes qemu leaves the buffer alone, and so do we.
            // Our buffers are always initialised memory, but a pooled one may
            // hold data from an earlier request of the same connection; use
            // read-zeroes=on when reads must be zeroes.
            if self.read_zeroes {
                buf.zero();
            }
            Ok(buf)
        })
    }

    fn write(&self, _offset: u64, buf: IoBuf, _flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            self.delay().await;
            Ok(buf)
        })
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn block_status(&self, _offset: u64, len: u64) -> BoxFut<'_, BlockStatus> {
        Box::pin(async move {
            Ok(if self.read_zeroes {
                BlockStatus::hole(len)
            } else {
                // Neither data nor zero: qemu reports it unallocated.
                BlockStatus {
                    len,
                    data: false,
                    zero: false,
                    allocated: false,
                    depth: 0,
                }
            })
        })
    }

    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            filename: self.filename.clone(),
            actual_size: Some(0),
            ..ImageInfo::default()
        }
    }
}
