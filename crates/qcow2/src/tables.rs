//! Query views of the snapshot table and the bitmap directory (parsed by
//! `snapshot.rs` and `bitmaps.rs`).

use qsd_block::{Error, Result};
use serde_json::Value;

/// qemu's `SnapshotInfo` list, or None when there are no snapshots.
pub fn snapshots_json(table: &[u8], nb: u32) -> Result<Option<Value>> {
    if nb == 0 {
        return Ok(None);
    }
    let snaps = crate::snapshot::parse_snapshot_table(table, nb)
        .map_err(|e| Error::invalid(format!("Invalid snapshot table: {e}")))?;
    Ok(Some(Value::Array(
        snaps
            .iter()
            .map(crate::snapshot::Snapshot::to_qapi_json)
            .collect(),
    )))
}

/// qemu's `Qcow2BitmapInfo` list, or None when there are no bitmaps.
pub fn bitmaps_json(dir: &[u8], nb: u32) -> Result<Option<Value>> {
    if nb == 0 {
        return Ok(None);
    }
    let entries = crate::bitmaps::parse_bitmap_directory(dir, nb)
        .map_err(|e| Error::invalid(format!("Invalid bitmap directory: {e}")))?;
    Ok(Some(Value::Array(
        entries
            .iter()
            .map(crate::bitmaps::BitmapEntry::to_qapi_json)
            .collect(),
    )))
}
