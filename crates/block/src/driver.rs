//! The data-plane trait every block driver implements, and its small types.

use std::future::Future;
use std::pin::Pin;

use qsd_rt::IoBuf;

use crate::{Perm, Result};

/// A boxed, sendable future: nodes are chained as trait objects.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Flags of a write request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is on stable storage when the write completes.
    pub fua: bool,
    /// Store the data compressed (qemu's `BDRV_REQ_WRITE_COMPRESSED`, set by
    /// the `compress` filter). Formats that can compress take only whole
    /// clusters (or the image's last, partial cluster) and refuse to
    /// overwrite allocated clusters; drivers that cannot compress fail with
    /// `ErrorKind::Unsupported` (ENOTSUP).
    pub compress: bool,
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (punched) rather than written.
    pub may_unmap: bool,
    /// Fail with ENOTSUP rather than write zero buffers (NBD FAST_ZERO).
    pub no_fallback: bool,
    /// Force unit access.
    pub fua: bool,
}

/// Allocation status of the first `len` bytes of a queried range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Bytes from the queried offset that share this status (at least 1).
    pub len: u64,
    /// The range holds data (not a hole) in this node or below.
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// The range is allocated in this node (not passed to a backing file).
    pub allocated: bool,
    /// For allocation depth: 1 = this layer, 2 = its backing file, ...; 0 = unallocated.
    pub depth: u32,
}

impl BlockStatus {
    /// Status of an ordinary data range.
    pub fn data(len: u64) -> Self {
        BlockStatus {
            len,
            data: true,
            zero: false,
            allocated: true,
            depth: 1,
        }
    }

    /// Status of a hole that reads as zeroes.
    pub fn hole(len: u64) -> Self {
        BlockStatus {
            len,
            data: false,
            zero: true,
            allocated: true,
            depth: 1,
        }
    }
}

/// I/O limits of a driver. Offsets and lengths of requests reaching the
/// driver are multiples of `request_alignment`; the node pads others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Alignment of offsets and lengths, a power of two (1 = byte granular).
    pub request_alignment: u32,
    /// Largest single transfer in bytes (0 = no limit).
    pub max_transfer: u64,
    /// Preferred transfer size (0 = none).
    pub opt_transfer: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_alignment: 1,
            max_transfer: 0,
            opt_transfer: 0,
        }
    }
}

/// What `query-named-block-nodes` reports about the image of a node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageInfo {
    /// The file name (or a pseudo-name such as "null-co://").
    pub filename: String,
    /// Bytes the image takes on the host, where known.
    pub actual_size: Option<u64>,
    /// Cluster size, for formats that have one.
    pub cluster_size: Option<u64>,
    /// The dirty flag, for formats that have one.
    pub dirty_flag: Option<bool>,
    /// `format-specific` member (`{"type": ..., "data": {...}}`), if any.
    pub format_specific: Option<serde_json::Value>,
    /// The backing file name recorded in the image, if any.
    pub backing_filename: Option<String>,
    /// The backing file format recorded in the image, if any.
    pub backing_format: Option<String>,
    /// The image is encrypted (queries show only this, never key material).
    pub encrypted: bool,
    /// Internal snapshots as qemu's `SnapshotInfo` objects, if the format has them.
    pub snapshots: Option<serde_json::Value>,
}

/// One block driver instance: the data plane of a node.
///
/// Requests reach a driver through [`crate::Node`], which has already checked
/// read-only state, applied `discard`/`detect-zeroes`/`cache.no-flush`, and
/// padded requests to `limits().request_alignment`.
///
/// `Any` is a supertrait so that a caller holding a node can reach the
/// driver-specific API (`(node.driver() as &dyn Any).downcast_ref::<T>()`).
pub trait BlockDriver: std::any::Any + Send + Sync + 'static {
    /// The driver's name as in `--blockdev driver=...`.
    fn driver_name(&self) -> &'static str;

    /// Current size in bytes.
    fn len(&self) -> u64;

    /// True for a zero-length device.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// I/O limits.
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// Fill `buf` (its whole length) from `offset`.
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf>;

    /// Write all of `buf` at `offset`.
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf>;

    /// True if the driver stores `WriteFlags::compress` writes compressed
    /// (qemu's `block_driver_can_compress`). The node fails compressed
    /// writes to other drivers with ENOTSUP before they reach `write`.
    fn can_compress(&self) -> bool {
        false
    }

    /// Make `len` bytes at `offset` read as zeroes. Drivers that cannot do it
    /// efficiently return `ErrorKind::Unsupported`; the node then writes zero
    /// buffers unless `no_fallback` is set.
    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> BoxFut<'_, ()> {
        Box::pin(async { Err(crate::Error::unsupported("write-zeroes is not supported")) })
    }

    /// Tell the driver a range is no longer needed (advisory).
    fn discard(&self, _offset: u64, _len: u64) -> BoxFut<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Make completed writes durable.
    fn flush(&self) -> BoxFut<'_, ()>;

    /// Allocation status from `offset`, for at most `len` bytes.
    fn block_status(&self, _offset: u64, len: u64) -> BoxFut<'_, BlockStatus> {
        Box::pin(async move { Ok(BlockStatus::data(len)) })
    }

    /// Change the size.
    fn truncate(&self, _size: u64) -> BoxFut<'_, ()> {
        Box::pin(async {
            Err(crate::Error::unsupported(
                "Image format driver does not support resize",
            ))
        })
    }

    /// The cumulative permissions of the node's users changed: take locks,
    /// pass the change to children. An error refuses the change.
    fn set_perm(&self, _perm: Perm, _shared: Perm) -> Result<()> {
        Ok(())
    }

    /// What queries report about the image.
    fn image_info(&self) -> ImageInfo;

    /// A debug event fired at this node (see [`crate::debug`]). Return true
    /// if the driver handled it (blkdebug); false passes it to the node's
    /// primary child.
    fn debug_event(&self, _ev: crate::DebugEvent) -> bool {
        false
    }

    /// A drain begins: requests the driver holds back (throttling) must go
    /// now rather than wait, until `drain_end`. Calls nest.
    fn drain_begin(&self) {}

    /// The drain that `drain_begin` announced is over.
    fn drain_end(&self) {}

    /// Called once before the node is dropped (after a drain).
    fn close(&self) -> BoxFut<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// Methods of [`BlockDriver`] that a filter passes unchanged to its child
/// node, written once for all filters. Inside a filter's
/// `impl BlockDriver`, `forward_to_child!(child: len, flush, truncate);`
/// defines each named method as the same call on `self.child` (a
/// [`crate::NodeRef`]). Known methods: `len`, `read`, `write_zeroes`,
/// `discard`, `flush`, `block_status`, `truncate`.
#[macro_export]
macro_rules! forward_to_child {
    ($child:ident: $($method:ident),+ $(,)?) => {
        $( $crate::forward_to_child!(@one $child $method); )+
    };
    (@one $c:ident len) => {
        fn len(&self) -> u64 {
            self.$c.len()
        }
    };
    (@one $c:ident read) => {
        fn read(&self, offset: u64, buf: $crate::IoBuf) -> $crate::BoxFut<'_, $crate::IoBuf> {
            Box::pin(self.$c.read(offset, buf))
        }
    };
    (@one $c:ident write_zeroes) => {
        fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            flags: $crate::ZeroFlags,
        ) -> $crate::BoxFut<'_, ()> {
            Box::pin(self.$c.write_zeroes(offset, len, flags))
        }
    };
    (@one $c:ident discard) => {
        fn discard(&self, offset: u64, len: u64) -> $crate::BoxFut<'_, ()> {
            Box::pin(self.$c.discard(offset, len))
        }
    };
    (@one $c:ident flush) => {
        fn flush(&self) -> $crate::BoxFut<'_, ()> {
            Box::pin(self.$c.flush())
        }
    };
    (@one $c:ident block_status) => {
        fn block_status(&self, offset: u64, len: u64) -> $crate::BoxFut<'_, $crate::BlockStatus> {
            Box::pin(self.$c.block_status(offset, len))
        }
    };
    (@one $c:ident truncate) => {
        fn truncate(&self, size: u64) -> $crate::BoxFut<'_, ()> {
            Box::pin(self.$c.truncate(size))
        }
    };
}
