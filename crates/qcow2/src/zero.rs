//! write-zeroes, discard and resize.

use qsd_block::{Error, Result, WriteFlags, ZeroFlags};
use qsd_rt::IoBuf;

use crate::core::Qcow2;
use crate::entries::{Mapping, COPIED, ZERO};
use crate::header::{field, MAX_L1_BYTES};

/// Zero bits of all 32 subclusters.
const ALL_ZERO_BM: u64 = 0xffff_ffff << 32;

impl Qcow2 {
    /// (entry, bitmap) of a cluster made to read as zeroes (or, with
    /// `unallocate`, to show the backing file). `keep` leaves an owned host
    /// cluster allocated.
    fn zeroed(&self, entry: u64, keep: bool, unallocate: bool) -> (u64, u64) {
        let own = if keep { self.own_host(entry) } else { None };
        match (self.layout.extended, own) {
            (false, Some(h)) => (h | COPIED | ZERO, 0),
            (true, Some(h)) => (h | COPIED, ALL_ZERO_BM),
            (false, None) if unallocate => (0, 0),
            (false, None) => (ZERO, 0),
            (true, None) if unallocate => (0, 0),
            (true, None) => (0, ALL_ZERO_BM),
        }
    }

    /// Whole clusters of `offset..offset+len` (rounded inward; the image's
    /// last partial cluster counts as whole).
    fn whole_clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.cluster_size();
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        let first = offset.div_ceil(cs);
        let end = if offset + len == size {
            size.div_ceil(cs)
        } else {
            (offset + len) / cs
        };
        (first, end.max(first))
    }

    /// Write zeroes: whole clusters through the zero flag, partial ones by
    /// writing zero buffers.
    pub(crate) async fn zero_guest(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_not_corrupt()?;
        self.check_range(offset, len)?;
        if self.data_file_raw() {
            // The raw data file must read as the image does (qemu zeroes
            // it first too).
            self.data_node().write_zeroes(offset, len, flags).await?;
        }
        if !self.layout.zero_flag && !self.layout.extended {
            return self.zero_v2(offset, len).await;
        }
        let cb = self.cluster_bits();
        let (first, end) = self.whole_clusters(offset, len);
        if first >= end {
            return self.zero_partial(offset, len).await;
        }
        let head_end = first << cb;
        let tail_start = (end << cb).min(offset + len);
        if head_end > offset {
            self.zero_partial(offset, head_end - offset).await?;
        }
        self.map_clusters(
            first,
            end,
            !flags.may_unmap,
            false,
            self.pass_discard_request,
        )
        .await?;
        if offset + len > tail_start {
            self.zero_partial(tail_start, offset + len - tail_start)
                .await?;
        }
        if flags.fua {
            self.flush_all().await?;
        }
        Ok(())
    }

    /// v2 images have no zero flag: nothing to do only where nothing is
    /// allocated and no backing file shows through.
    async fn zero_v2(&self, offset: u64, len: u64) -> Result<()> {
        if self.backing.is_none() {
            let mut pos = offset;
            while pos < offset + len {
                let ext = self.extent(pos, offset + len - pos).await?;
                if ext.mapping != Mapping::Unallocated {
                    break;
                }
                pos += ext.len;
            }
            if pos >= offset + len {
                return Ok(());
            }
        }
        Err(Error::unsupported(
            "write-zeroes needs a compat=1.1 (v3) qcow2 image",
        ))
    }

    /// Zero part of one cluster: with extended L2 entries the whole
    /// subclusters in it get their zero bits (as qemu), the rest is
    /// written as zero buffers.
    async fn zero_partial(&self, offset: u64, len: u64) -> Result<()> {
        if !self.layout.extended {
            return self.write_zero_buf(offset, len).await;
        }
        let cs = self.cluster_size();
        let mut at = offset;
        while at < offset + len {
            let stop = (offset + len).min((at / cs + 1) * cs);
            self.zero_in_cluster(at, stop - at).await?;
            at = stop;
        }
        Ok(())
    }

    async fn zero_in_cluster(&self, offset: u64, len: u64) -> Result<()> {
        let sb = self.layout.subcluster_bits();
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        let end = offset + len;
        let s0 = offset.div_ceil(1 << sb);
        // The image's last partial subcluster counts as whole.
        let s1 = if end == size {
            end.div_ceil(1 << sb)
        } else {
            end >> sb
        };
        if s0 >= s1 {
            return self.write_zero_buf(offset, len).await;
        }
        let (zs, ze) = ((s0 << sb).max(offset), (s1 << sb).min(end));
        if zs > offset {
            self.write_zero_buf(offset, zs - offset).await?;
        }
        if !self.zero_subclusters(s0, s1).await? {
            self.write_zero_buf(zs, ze - zs).await?;
        }
        if end > ze {
            self.write_zero_buf(ze, end - ze).await?;
        }
        Ok(())
    }

    /// Set the zero bits (and clear the allocation bits) of subclusters
    /// `s0..s1` of one cluster; false when the cluster is compressed.
    async fn zero_subclusters(&self, s0: u64, s1: u64) -> Result<bool> {
        let per = 5;
        let c = s0 >> per;
        let (i0, i1) = (s0 - (c << per), s1 - (c << per));
        let mask = ((1u64 << i1) - 1) & !((1u64 << i0) - 1);
        let _claim = self.claim(c, c + 1).await;
        let mut m = self.meta.lock().await;
        let (entry, bm) = self.entry_async(c).await?;
        if entry & crate::entries::COMPRESSED != 0 {
            return Ok(false);
        }
        let nbm = (bm | (mask << 32)) & !mask;
        if nbm != bm {
            self.set_l2(&mut m, c, entry, nbm, false).await?;
            self.maybe_writeback(&mut m).await?;
        }
        Ok(true)
    }

    async fn write_zero_buf(&self, offset: u64, len: u64) -> Result<()> {
        let ext = self.extent(offset, len).await?;
        let reads_zero = match ext.mapping {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => self.backing.is_none(),
            _ => false,
        };
        if reads_zero && ext.len == len {
            return Ok(());
        }
        let buf = IoBuf::new(len as usize);
        self.write_guest(offset, buf, WriteFlags::default()).await?;
        Ok(())
    }

    /// Remap guest clusters `first..end` to zero (or unallocated) entries.
    async fn map_clusters(
        &self,
        first: u64,
        end: u64,
        keep: bool,
        unallocate: bool,
        pass_discard: bool,
    ) -> Result<()> {
        const CHUNK: u64 = 4096;
        let keep = keep && (self.layout.zero_flag || self.layout.extended);
        let mut at = first;
        while at < end {
            let stop = end.min(at + CHUNK);
            let _claim = self.claim(at, stop).await;
            let mut m = self.meta.lock().await;
            for c in at..stop {
                let (entry, bm) = self.entry_async(c).await?;
                let (ne, nbm) = self.zeroed(entry, keep, unallocate);
                if (ne, nbm) == (entry, bm) {
                    continue;
                }
                self.set_l2(&mut m, c, ne, nbm, pass_discard).await?;
                self.maybe_writeback(&mut m).await?;
            }
            at = stop;
        }
        Ok(())
    }

    /// Discard whole clusters: unallocated when no backing file could show
    /// through, zero clusters otherwise (v3), untouched on v2 with a backing.
    pub(crate) async fn discard_guest(&self, offset: u64, len: u64) -> Result<()> {
        self.check_not_corrupt()?;
        self.check_range(offset, len)?;
        let (first, end) = self.whole_clusters(offset, len);
        if first >= end {
            return Ok(());
        }
        let has_backing = self.backing.is_some();
        if has_backing && !self.layout.zero_flag && !self.layout.extended {
            return Ok(());
        }
        let keep = self.discard_no_unref;
        self.map_clusters(first, end, keep, !has_backing, self.pass_discard_request)
            .await
    }

    /// Resize: growing extends the L1 table as needed; shrinking is refused
    /// while anything is allocated past the new end.
    pub(crate) async fn resize(&self, new_size: u64) -> Result<()> {
        self.check_not_corrupt()?;
        let old = self.size.load(std::sync::atomic::Ordering::Acquire);
        if !new_size.is_multiple_of(512) {
            return Err(Error::invalid("The new size must be a multiple of 512"));
        }
        if new_size < old {
            self.shrink_data(new_size, old).await?;
        }
        let mut m = self.meta.lock().await;
        let span = self.cluster_size() * self.layout.l2_entries();
        let need = new_size.div_ceil(span);
        if need * 8 > MAX_L1_BYTES {
            return Err(Error::invalid("Active L1 table too large"));
        }
        if need > u64::from(m.header.l1_size) {
            self.grow_l1(&mut m, need).await?;
        }
        self.writeback(&mut m, true).await?;
        self.write_meta(field::SIZE, &new_size.to_be_bytes())
            .await?;
        self.file.flush().await?;
        m.header.size = new_size;
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Drop the data past `new_size` (as qemu, shrinking discards it):
    /// the partial last cluster's tail reads as zeroes, whole clusters past
    /// the end are freed. Images with internal snapshots are not shrunk.
    async fn shrink_data(&self, new_size: u64, old: u64) -> Result<()> {
        if self.meta.lock().await.header.nb_snapshots > 0 {
            return Err(Error::unsupported(
                "Can't shrink an image which has snapshots",
            ));
        }
        let cs = self.cluster_size();
        let first_whole = new_size.div_ceil(cs);
        let tail_end = (first_whole * cs).min(old);
        if tail_end > new_size {
            if self.layout.zero_flag || self.layout.extended {
                self.zero_guest(new_size, tail_end - new_size, ZeroFlags::default())
                    .await?;
            } else {
                self.write_zero_buf(new_size, tail_end - new_size).await?;
            }
        }
        let end = old.div_ceil(cs);
        if first_whole < end {
            self.map_clusters(first_whole, end, false, true, self.pass_discard_request)
                .await?;
        }
        Ok(())
    }

    /// Move the L1 table to a new place with room for `need` entries.
    async fn grow_l1(&self, m: &mut crate::core::Meta, need: u64) -> Result<()> {
        let cs = self.cluster_size();
        // Everything the old table points to must be on disk first.
        self.writeback(m, true).await?;
        let clusters = (need * 8).div_ceil(cs);
        let new_off = self.alloc_clusters(m, clusters).await?;
        self.check_overlap(m, new_off, clusters * cs, 0)?;
        let mut table = self.state().l1.clone();
        table.resize((clusters * cs / 8) as usize, 0);
        self.writeback(m, true).await?;
        self.write_table(new_off, &table).await?;
        self.file.flush().await?;
        let mut hdr = Vec::with_capacity(12);
        hdr.extend_from_slice(&(need as u32).to_be_bytes());
        hdr.extend_from_slice(&new_off.to_be_bytes());
        self.write_meta(field::L1_SIZE, &hdr).await?;
        self.file.flush().await?;
        let old_off = m.header.l1_table_offset;
        let old_bytes = u64::from(m.header.l1_size) * 8;
        m.header.l1_table_offset = new_off;
        m.header.l1_size = need as u32;
        table.truncate(need as usize);
        self.state().l1 = table;
        if old_bytes > 0 {
            let first = old_off >> self.cluster_bits();
            for c in first..first + old_bytes.div_ceil(cs) {
                self.add_refcount(m, c, -1).await?;
            }
        }
        Ok(())
    }
}
