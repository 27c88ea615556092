//! The qcow2 image format driver: on-disk structures, metadata caches,
//! cluster allocation with crash-safe ordering, backing chains.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod be;
// The codec modules carry writers and checks for later stages (header and
// bitmap rewrites); until those land, parts of them are unused here.
#[allow(dead_code)]
mod bitmaps;
mod cache;
mod codec;
#[allow(dead_code)]
mod compress;
mod core;
mod crypto;
mod cwrite;
mod driver;
mod entries;
mod header;
mod meta;
mod open;
mod options;
mod overlap;
mod read;
mod repair;
#[allow(dead_code)]
mod snapshot;
mod tables;
mod write;
mod zero;

use std::sync::Arc;

use qsd_block::{
    BlockDriver, BlockStatus, BoxFut, DriverFactory, ImageInfo, Limits, NodeRef, OpenCtx, Perm,
    Result, WriteFlags, ZeroFlags,
};
use qsd_rt::IoBuf;
use serde_json::{Map, Value};

pub use crate::core::Qcow2;
pub use crate::open::Qcow2Factory;

/// Register the qcow2 driver with `graph`.
pub fn register(graph: &mut qsd_block::Graph) {
    graph.register(Arc::new(Qcow2Factory));
}

/// The qcow2 driver of `node`, if it is a qcow2 node (for operations the
/// generic interface lacks, such as [`Qcow2::write_compressed`]).
pub fn qcow2_of(node: &NodeRef) -> Option<Arc<Qcow2>> {
    let any: &dyn std::any::Any = node.driver();
    any.downcast_ref::<Qcow2Node>().map(|n| n.0.clone())
}

impl DriverFactory for Qcow2Factory {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn open<'a>(
        &'a self,
        ctx: &'a mut OpenCtx<'_>,
        opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>> {
        Box::pin(async move {
            let q = Arc::new(open::open(ctx, opts).await?);
            if q.clean_interval > 0 {
                let every = std::time::Duration::from_secs(q.clean_interval);
                tokio::spawn(clean_caches(Arc::downgrade(&q), every));
            }
            Ok(Box::new(Qcow2Node(q)) as Box<dyn BlockDriver>)
        })
    }
}

/// `cache-clean-interval`: every `every`, drop the clean L2 tables and
/// refcount blocks nobody used since the previous pass. Ends with the node.
async fn clean_caches(q: std::sync::Weak<Qcow2>, every: std::time::Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(q) = q.upgrade() else { return };
        q.state().l2.drop_idle();
        q.meta.lock().await.rc.drop_idle();
    }
}

/// The boxed driver of a node: a handle on the shared [`Qcow2`].
#[derive(Debug)]
struct Qcow2Node(Arc<Qcow2>);

impl BlockDriver for Qcow2Node {
    fn driver_name(&self) -> &'static str {
        self.0.driver_name()
    }
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn limits(&self) -> Limits {
        self.0.limits()
    }
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf> {
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        self.0.write(offset, buf, flags)
    }
    fn can_compress(&self) -> bool {
        self.0.can_compress()
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFut<'_, ()> {
        self.0.write_zeroes(offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> BoxFut<'_, ()> {
        self.0.discard(offset, len)
    }
    fn flush(&self) -> BoxFut<'_, ()> {
        self.0.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> BoxFut<'_, BlockStatus> {
        self.0.block_status(offset, len)
    }
    fn truncate(&self, size: u64) -> BoxFut<'_, ()> {
        self.0.truncate(size)
    }
    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        self.0.set_perm(perm, shared)
    }
    fn image_info(&self) -> ImageInfo {
        self.0.image_info()
    }
    fn close(&self) -> BoxFut<'_, ()> {
        self.0.close()
    }
}
