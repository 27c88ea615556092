//! `BlockBackend`: how exports (and later jobs) use a node. It holds a
//! permission on the node, checks request ranges, and counts statistics.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use qsd_rt::IoBuf;

use crate::driver::{BlockStatus, WriteFlags, ZeroFlags};
use crate::error::libc_errno;
use crate::perm::UserDesc;
use crate::stats::{OpKind, Stats};
use crate::{Error, ErrorKind, NodeRef, Perm, PermUser, Result};

struct Inner {
    node: NodeRef,
    perm: Perm,
    stats: Stats,
    _user: PermUser,
}

/// A user's handle on a node. Cheap to clone; clones share statistics.
#[derive(Clone)]
pub struct BlockBackend(Arc<Inner>);

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("node", &self.0.node.name())
            .field("perm", &self.0.perm)
            .finish()
    }
}

impl BlockBackend {
    /// Attach to `node` as `who` (qemu's words: "block device 'x'", "export 'e'"),
    /// taking `perm` and sharing `shared`.
    pub fn new(node: NodeRef, who: &str, perm: Perm, shared: Perm) -> Result<Self> {
        let desc = UserDesc {
            who: who.to_string(),
            role: "root".to_string(),
        };
        let user = node.add_user(desc, perm, shared)?;
        Ok(BlockBackend(Arc::new(Inner {
            node,
            perm,
            stats: Stats::default(),
            _user: user,
        })))
    }

    /// The node this backend is attached to.
    pub fn node(&self) -> &NodeRef {
        &self.0.node
    }

    /// The statistics.
    pub fn stats(&self) -> &Stats {
        &self.0.stats
    }

    /// True when this backend may write.
    pub fn is_writable(&self) -> bool {
        self.0.perm.contains(Perm::WRITE)
    }

    /// The node's size.
    pub fn len(&self) -> u64 {
        self.0.node.len()
    }

    /// True for a zero-length node.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The node's request alignment.
    pub fn request_alignment(&self) -> u32 {
        self.0.node.driver().limits().request_alignment.max(1)
    }

    fn check_range(&self, kind: OpKind, offset: u64, len: u64) -> Result<()> {
        let size = self.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            self.0.stats.invalid(kind);
            return Err(Error::invalid(format!(
                "request at offset {offset}, length {len} is beyond the end of node '{}' ({size} bytes)",
                self.0.node.name()
            )));
        }
        Ok(())
    }

    fn check_write(&self, kind: OpKind) -> Result<()> {
        if !self.is_writable() {
            self.0.stats.invalid(kind);
            return Err(Error::new(ErrorKind::ReadOnly, "the export is read-only")
                .with_errno(libc_errno::EPERM));
        }
        Ok(())
    }

    async fn counted<T>(
        &self,
        kind: OpKind,
        bytes: u64,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let start = Instant::now();
        let r = fut.await;
        self.0.stats.done(kind, bytes, start, r.is_ok());
        r
    }

    /// Read `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        self.check_range(OpKind::Read, offset, len)?;
        self.counted(OpKind::Read, len, self.0.node.read(offset, buf))
            .await
    }

    /// Write `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let len = buf.len() as u64;
        self.check_write(OpKind::Write)?;
        self.check_range(OpKind::Write, offset, len)?;
        let r = self
            .counted(OpKind::Write, len, self.0.node.write(offset, buf, flags))
            .await;
        if r.is_ok() {
            self.0.stats.wrote_up_to(offset + len);
        }
        r
    }

    /// Make a range read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_write(OpKind::Write)?;
        self.check_range(OpKind::Write, offset, len)?;
        let r = self
            .counted(
                OpKind::Write,
                len,
                self.0.node.write_zeroes(offset, len, flags),
            )
            .await;
        if r.is_ok() {
            self.0.stats.wrote_up_to(offset + len);
        }
        r
    }

    /// Discard a range.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(OpKind::Unmap)?;
        self.check_range(OpKind::Unmap, offset, len)?;
        self.counted(OpKind::Unmap, len, self.0.node.discard(offset, len))
            .await
    }

    /// Flush the node.
    pub async fn flush(&self) -> Result<()> {
        self.counted(OpKind::Flush, 0, self.0.node.flush()).await
    }

    /// Allocation status from `offset` for at most `len` bytes.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check_range(OpKind::Read, offset, len)?;
        self.0.node.block_status(offset, len).await
    }

    /// Resize the node (needs the resize permission).
    pub async fn truncate(&self, size: u64) -> Result<()> {
        if !self.0.perm.contains(Perm::RESIZE) {
            return Err(Error::new(
                ErrorKind::PermissionConflict,
                "resize permission not held",
            ));
        }
        self.0.node.truncate(size).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemDriver;
    use crate::node::{CommonOptions, Node};

    fn node(read_only: bool) -> NodeRef {
        let opts = CommonOptions {
            read_only,
            discard_unmap: true,
            ..CommonOptions::default()
        };
        Node::new(
            "n0".into(),
            false,
            opts,
            Box::new(MemDriver::new(1 << 20)),
            vec![],
        )
    }

    #[tokio::test]
    async fn test_backend_write_past_end_is_invalid_and_counted() {
        let blk = BlockBackend::new(node(false), "export 'e'", Perm::ALL, Perm::ALL).unwrap();
        let err = blk
            .write(1 << 20, IoBuf::new(512), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(err.errno(), libc_errno::EINVAL);
        assert_eq!(blk.stats().to_json()["invalid_wr_operations"], 1);
    }

    #[tokio::test]
    async fn test_backend_read_only_node_refuses_writer() {
        let err = BlockBackend::new(node(true), "export 'e'", Perm::WRITE, Perm::ALL).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ReadOnly);
    }

    #[tokio::test]
    async fn test_backend_stats_count_bytes() {
        let blk = BlockBackend::new(node(false), "export 'e'", Perm::ALL, Perm::ALL).unwrap();
        blk.write(4096, IoBuf::from_slice(&[7; 4096]), WriteFlags::default())
            .await
            .unwrap();
        let got = blk.read(4096, IoBuf::new(4096)).await.unwrap();
        assert!(got.iter().all(|&b| b == 7));
        let s = blk.stats().to_json();
        assert_eq!(
            (s["wr_bytes"].as_u64(), s["rd_bytes"].as_u64()),
            (Some(4096), Some(4096))
        );
        assert_eq!(s["wr_highest_offset"], 8192);
    }

    #[tokio::test]
    async fn test_backend_unaligned_write_read_roundtrip() {
        let blk = BlockBackend::new(node(false), "e", Perm::ALL, Perm::ALL).unwrap();
        blk.write(4000, IoBuf::from_slice(&[9; 200]), WriteFlags::default())
            .await
            .unwrap();
        let got = blk.read(3999, IoBuf::new(202)).await.unwrap();
        assert_eq!(got[0], 0);
        assert!(got[1..201].iter().all(|&b| b == 9));
        assert_eq!(got[201], 0);
    }
}
