//! The `BlockDriver` implementation and queries.

use std::sync::atomic::Ordering;

use qsd_block::{
    BlockDriver, BlockStatus, BoxFut, ImageInfo, Limits, Perm, Result, WriteFlags, ZeroFlags,
};
use qsd_rt::IoBuf;
use serde_json::{json, Map, Value};

use crate::core::Qcow2;
use crate::header::{autoclear, compat, incompat, Header};

impl BlockDriver for Qcow2 {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }

    fn len(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn limits(&self) -> Limits {
        Limits {
            // Encryption works on whole 512-byte sectors.
            request_alignment: if self.crypto.is_some() { 512 } else { 1 },
            max_transfer: 0,
            opt_transfer: 0,
        }
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            self.check_range(offset, buf.len() as u64)?;
            self.read_guest(offset, buf).await
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        Box::pin(self.write_guest(offset, buf, flags))
    }

    fn can_compress(&self) -> bool {
        true
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFut<'_, ()> {
        Box::pin(self.zero_guest(offset, len, flags))
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFut<'_, ()> {
        Box::pin(self.discard_guest(offset, len))
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Ok(());
            }
            self.flush_all().await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFut<'_, BlockStatus> {
        Box::pin(self.status(offset, len))
    }

    fn truncate(&self, size: u64) -> BoxFut<'_, ()> {
        Box::pin(self.resize(size))
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        // As qemu's format drivers: metadata needs consistent reads (and
        // writes when writable) whatever the parents do, and nobody else may
        // write or resize the image file under us.
        let (perm, shared) = crate::open::storage_perms(perm, shared, self.read_only);
        self.file_user.update(perm, shared)?;
        if let Some(u) = &self.data_user {
            u.update(perm, shared)?;
        }
        Ok(())
    }

    fn image_info(&self) -> ImageInfo {
        let file = self.file.driver().image_info();
        let h = self.header_snapshot();
        ImageInfo {
            filename: file.filename,
            actual_size: file.actual_size,
            cluster_size: Some(self.cluster_size()),
            dirty_flag: Some(h.incompatible & incompat::DIRTY != 0),
            format_specific: Some(self.format_specific(&h)),
            backing_filename: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            encrypted: self.crypto.is_some(),
            snapshots: self.info.snapshots.clone(),
        }
    }

    fn close(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if self.read_only || self.corrupt.load(Ordering::Acquire) {
                return Ok(());
            }
            let mut m = self.meta.lock().await;
            if m.dirty_set {
                // Clean close: everything on disk, then the bit goes.
                self.writeback(&mut m, true).await?;
                return self.set_dirty_bit(&mut m, false).await;
            }
            self.writeback(&mut m, true).await
        })
    }
}

impl Qcow2 {
    /// The header as opened, with the feature bits as they are now.
    fn header_snapshot(&self) -> Header {
        let mut h = self.header_copy.clone();
        h.incompatible = self.known_incompat.load(Ordering::Acquire);
        h
    }

    /// qemu's `ImageInfoSpecificQCow2`, members in qemu's order.
    fn format_specific(&self, h: &Header) -> Value {
        let mut d = Map::new();
        let v3 = h.version >= 3;
        d.insert("compat".into(), if v3 { "1.1" } else { "0.10" }.into());
        d.insert("compression-type".into(), self.compression.name().into());
        if v3 {
            d.insert(
                "lazy-refcounts".into(),
                (h.compatible & compat::LAZY_REFCOUNTS != 0).into(),
            );
            if let Some(b) = &self.info.bitmaps {
                d.insert("bitmaps".into(), b.clone());
            }
        }
        d.insert("refcount-bits".into(), (1u64 << self.refcount_order).into());
        if let Some(c) = &self.crypto {
            d.insert("encrypt".into(), c.info.clone());
        }
        if v3 {
            if let Some(f) = &self.info.data_file_name {
                d.insert("data-file".into(), f.clone().into());
                d.insert(
                    "data-file-raw".into(),
                    (h.autoclear & autoclear::DATA_FILE_RAW != 0).into(),
                );
            }
            let corrupt =
                h.incompatible & incompat::CORRUPT != 0 || self.corrupt.load(Ordering::Acquire);
            d.insert("corrupt".into(), corrupt.into());
            d.insert("extended-l2".into(), self.layout.extended.into());
        }
        json!({"type": "qcow2", "data": d})
    }
}
