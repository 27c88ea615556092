//! The `throttle` filter driver: every read (and write, write-zeroes,
//! discard) waits for its turn in the node's throttle group, then goes to
//! the `file` child unchanged. Flushes and block status are not throttled,
//! as in qemu.

use std::sync::Arc;

use qsd_block::perm::UserDesc;
use qsd_block::{
    BlockDriver, BoxFut, DriverFactory, Error, ErrorKind, ImageInfo, Limits, NodeRef, OpenCtx,
    Perm, PermUser, Result, WriteFlags, ZeroFlags,
};
use qsd_drivers::jsonname::{json_filename, node_options};
use qsd_rt::IoBuf;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::group::{GroupMember, ThrottleGroup};
use crate::state::Direction;

/// qemu's `BlockdevOptionsThrottle` without `file` (taken out first).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThrottleOpts {
    #[serde(rename = "throttle-group")]
    throttle_group: String,
}

/// Factory for `throttle`.
#[derive(Debug, Default)]
pub struct ThrottleFactory;

impl DriverFactory for ThrottleFactory {
    fn name(&self) -> &'static str {
        "throttle"
    }

    fn open<'a>(
        &'a self,
        ctx: &'a mut OpenCtx<'_>,
        mut opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>> {
        Box::pin(async move {
            let child = ctx.required_child(&mut opts, "file").await?;
            let o: ThrottleOpts = ctx.parse(opts)?;
            let group = ctx
                .object::<ThrottleGroup>(&o.throttle_group)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("Throttle group '{}' does not exist", o.throttle_group),
                    )
                })?;
            let d = ThrottleDriver::new(child, ctx.node_name(), o.throttle_group, &group)?;
            Ok(Box::new(d) as Box<dyn BlockDriver>)
        })
    }
}

/// A `throttle` node over its `file` child.
#[derive(Debug)]
pub struct ThrottleDriver {
    child: NodeRef,
    user: PermUser,
    group_name: String,
    member: GroupMember,
}

impl ThrottleDriver {
    fn new(
        child: NodeRef,
        node_name: &str,
        group_name: String,
        group: &Arc<ThrottleGroup>,
    ) -> Result<Self> {
        let desc = UserDesc {
            who: format!("node '{node_name}'"),
            role: "file".into(),
        };
        // A filter takes nothing until its parents do.
        let user = child.add_user(desc, Perm::NONE, Perm::ALL)?;
        Ok(ThrottleDriver {
            child,
            user,
            group_name,
            member: group.join(),
        })
    }

    /// The id of the node's throttle group.
    pub fn group_name(&self) -> &str {
        &self.group_name
    }

    /// The node's throttle group.
    pub fn group(&self) -> &Arc<ThrottleGroup> {
        self.member.group()
    }
}

impl BlockDriver for ThrottleDriver {
    fn driver_name(&self) -> &'static str {
        "throttle"
    }

    fn drain_begin(&self) {
        self.member.begin_drain();
    }

    fn drain_end(&self) {
        self.member.end_drain();
    }

    qsd_block::forward_to_child!(child: len, flush, block_status, truncate);

    fn limits(&self) -> Limits {
        self.child.driver().limits()
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            self.member
                .throttle(Direction::Read, buf.len() as u64)
                .await;
            self.child.read(offset, buf).await
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            self.member
                .throttle(Direction::Write, buf.len() as u64)
                .await;
            self.child.write(offset, buf, flags).await
        })
    }

    fn can_compress(&self) -> bool {
        self.child.driver().can_compress()
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.member.throttle(Direction::Write, len).await;
            self.child.write_zeroes(offset, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.member.throttle(Direction::Write, len).await;
            self.child.discard(offset, len).await
        })
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        self.user.update(perm, shared)
    }

    fn image_info(&self) -> ImageInfo {
        let child = self.child.driver().image_info();
        let mut m = Map::new();
        m.insert("throttle-group".into(), self.group_name.clone().into());
        m.insert("driver".into(), "throttle".into());
        m.insert("file".into(), node_options(&self.child));
        ImageInfo {
            filename: json_filename(&m),
            actual_size: child.actual_size,
            ..ImageInfo::default()
        }
    }
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
