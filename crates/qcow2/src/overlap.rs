//! Overlap checks: refuse a write that would land on metadata.

use qsd_block::Result;

use crate::core::{Meta, Qcow2};
use crate::entries::OFFSET_MASK;
use crate::options::overlap as ol;

impl Qcow2 {
    /// Check that `off..off+len` overlaps none of the structures in the
    /// node's overlap mask (minus `ignore`). A hit marks the image corrupt.
    pub(crate) fn check_overlap(&self, m: &Meta, off: u64, len: u64, ignore: u32) -> Result<()> {
        let mask = self.overlap & !ignore;
        if mask == 0 || len == 0 {
            return Ok(());
        }
        let cs = self.cluster_size();
        let hits = |start: u64, size: u64| {
            size > 0 && off < start.saturating_add(size) && start < off.saturating_add(len)
        };
        let h = &m.header;
        let mut hit: Option<&str> = None;
        if mask & ol::MAIN_HEADER != 0 && hits(0, cs) {
            hit = Some("qcow2_header");
        } else if mask & ol::ACTIVE_L1 != 0 && hits(h.l1_table_offset, u64::from(h.l1_size) * 8) {
            hit = Some("active L1 table");
        } else if mask & ol::REFCOUNT_TABLE != 0
            && hits(
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
            )
        {
            hit = Some("refcount table");
        } else if mask & ol::SNAPSHOT_TABLE != 0 && hits(h.snapshots_offset, m.snapshot_table_len) {
            hit = Some("snapshot table");
        } else if mask & ol::INACTIVE_L1 != 0 && m.snapshot_l1s.iter().any(|&(o, n)| hits(o, n * 8))
        {
            hit = Some("inactive L1 table");
        } else if mask & ol::BITMAP_DIRECTORY != 0
            && h.bitmaps
                .is_some_and(|b| hits(b.directory_offset, b.directory_size))
        {
            hit = Some("bitmap directory");
        } else if mask & ol::REFCOUNT_BLOCK != 0
            && m.reftable
                .iter()
                .any(|&e| e & OFFSET_MASK != 0 && hits(e & OFFSET_MASK, cs))
        {
            hit = Some("refcount block");
        } else if mask & ol::INACTIVE_L2 != 0 && m.inactive_l2.iter().any(|&o| hits(o, cs)) {
            hit = Some("inactive L2 table");
        } else if mask & ol::ACTIVE_L2 != 0
            && self
                .state()
                .l1
                .iter()
                .any(|&e| e & OFFSET_MASK != 0 && hits(e & OFFSET_MASK, cs))
        {
            hit = Some("active L2 table");
        }
        match hit {
            None => Ok(()),
            Some(what) => Err(self.fatal_at(
                format!("Preventing invalid write on metadata (overlaps with {what})"),
                off,
                len,
            )),
        }
    }
}
