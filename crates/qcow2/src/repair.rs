//! Refcount repair of an image left dirty (lazy refcounts): count every
//! reference the metadata makes, write those counts, then clear the bit.

use qsd_block::{Error, Result};
use qsd_rt::IoBuf;

use crate::core::{Meta, Qcow2};
use crate::entries::{get_refcount, get_u64, max_refcount, set_refcount, Mapping, OFFSET_MASK};
use crate::header::{field, incompat};

/// Largest image file (in clusters) whose refcounts are rebuilt in memory
/// (4 bytes per cluster).
const MAX_REPAIR_CLUSTERS: u64 = 1 << 28;

/// Counts per host cluster, for clusters inside the file.
struct Counts {
    v: Vec<u32>,
    cluster_bits: u32,
}

impl Counts {
    fn add(&mut self, off: u64, len: u64) {
        let Some(end) = off.checked_add(len).filter(|_| len > 0) else {
            return;
        };
        let first = off >> self.cluster_bits;
        let last = (end - 1) >> self.cluster_bits;
        for c in first..=last {
            if let Some(x) = self.v.get_mut(c as usize) {
                *x = x.saturating_add(1);
            }
        }
    }
}

impl Qcow2 {
    async fn read_bytes(&self, off: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(self
            .file
            .read(off, IoBuf::new(len as usize))
            .await?
            .to_vec())
    }

    /// Count an L1 table, its L2 tables and their clusters.
    async fn count_l1(&self, counts: &mut Counts, l1: &[u64]) -> Result<()> {
        let cs = self.cluster_size();
        for &e in l1 {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            counts.add(l2, cs);
            let table = self.read_bytes(l2, cs).await?;
            let step = if self.layout.extended { 2 } else { 1 };
            for i in (0..table.len() / 8).step_by(step) {
                let entry = get_u64(&table, i);
                match self.layout.decode(entry) {
                    Mapping::Compressed { host, len } => counts.add(host, len),
                    _ if self.data_file.is_some() => {}
                    _ => counts.add(
                        entry & OFFSET_MASK,
                        u64::from(entry & OFFSET_MASK != 0) * cs,
                    ),
                }
            }
        }
        Ok(())
    }

    async fn count_bitmaps(&self, m: &Meta, counts: &mut Counts) -> Result<()> {
        let Some(b) = m.header.bitmaps else {
            return Ok(());
        };
        if b.nb_bitmaps == 0 {
            return Ok(());
        }
        counts.add(b.directory_offset, b.directory_size);
        let dir = self
            .read_bytes(b.directory_offset, b.directory_size)
            .await?;
        let entries = crate::bitmaps::parse_bitmap_directory(&dir, b.nb_bitmaps)
            .map_err(|e| Error::invalid(format!("Invalid bitmap directory: {e}")))?;
        for bm in entries {
            let len = u64::from(bm.table_size) * 8;
            counts.add(bm.table_offset, len);
            let raw = self.read_bytes(bm.table_offset, len).await?;
            let table = crate::bitmaps::parse_bitmap_table(&raw, bm.table_size)
                .map_err(|e| Error::invalid(format!("Invalid bitmap table: {e}")))?;
            for e in table {
                if let Some(off) = crate::bitmaps::table_entry_offset(e) {
                    counts.add(off, self.cluster_size());
                }
            }
        }
        Ok(())
    }

    /// Every reference the image's metadata makes, per cluster.
    async fn count_references(&self, m: &Meta) -> Result<Counts> {
        let cs = self.cluster_size();
        let end = self.file.len().div_ceil(cs);
        if end > MAX_REPAIR_CLUSTERS {
            return Err(Error::unsupported(format!(
                "Image '{}' is too large to repair its refcounts here; run 'qemu-img check -r all'",
                self.node_name
            )));
        }
        let mut counts = Counts {
            v: vec![0; end as usize],
            cluster_bits: self.cluster_bits(),
        };
        let h = &m.header;
        counts.add(0, cs);
        counts.add(h.l1_table_offset, u64::from(h.l1_size) * 8);
        let l1 = self.state().l1.clone();
        self.count_l1(&mut counts, &l1).await?;
        counts.add(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        );
        for &e in &m.reftable {
            counts.add(e & OFFSET_MASK, u64::from(e & OFFSET_MASK != 0) * cs);
        }
        counts.add(h.snapshots_offset, m.snapshot_table_len);
        for &(off, n) in &m.snapshot_l1s {
            counts.add(off, n * 8);
            let raw = self.read_bytes(off, n * 8).await?;
            let table: Vec<u64> = (0..raw.len() / 8).map(|i| get_u64(&raw, i)).collect();
            self.count_l1(&mut counts, &table).await?;
        }
        self.count_bitmaps(m, &mut counts).await?;
        Ok(counts)
    }

    /// Make sure the refcount block covering cluster `c` exists; new
    /// blocks go past the end of everything in use.
    async fn ensure_block(&self, m: &mut Meta, c: u64) -> Result<()> {
        let bits = self.cluster_bits() + 3 - self.refcount_order;
        let cs = self.cluster_size();
        let mut created = Vec::new();
        let mut target = c;
        loop {
            let bi = (target >> bits) as usize;
            if m.reftable.get(bi).is_some_and(|e| e & OFFSET_MASK != 0) {
                break;
            }
            if bi >= m.reftable.len() {
                self.grow_reftable(m, bi as u64).await?;
                continue;
            }
            let e = self.file.len().div_ceil(cs).max(m.high);
            let off = e << self.cluster_bits();
            m.rc.insert(off, vec![0u8; cs as usize], true);
            m.reftable[bi] = off;
            m.reftable_dirty = true;
            m.high = e + 1;
            created.push(e);
            target = e;
        }
        for e in created.into_iter().rev() {
            self.add_refcount(m, e, 1).await?;
        }
        Ok(())
    }

    /// Set the refcount of cluster `c` to `v`.
    async fn set_refcount_to(&self, m: &mut Meta, c: u64, v: u64) -> Result<()> {
        let bits = self.cluster_bits() + 3 - self.refcount_order;
        let order = self.refcount_order;
        let v = v.min(max_refcount(order));
        let bi = (c >> bits) as usize;
        let off = m.reftable.get(bi).map_or(0, |e| e & OFFSET_MASK);
        if off == 0 {
            if v == 0 {
                return Ok(());
            }
            self.ensure_block(m, c).await?;
        }
        let cur = self.add_refcount(m, c, 0).await?;
        if cur != v {
            let off = m.reftable[bi] & OFFSET_MASK;
            if let Some(block) = m.rc.get_mut(off) {
                set_refcount(block, order, (c & ((1 << bits) - 1)) as usize, v);
            }
        }
        Ok(())
    }

    /// Rebuild refcounts from the metadata and clear the dirty bit.
    pub(crate) async fn repair_dirty(&self) -> Result<()> {
        let mut m = self.meta.lock().await;
        let counts = self.count_references(&m).await?;
        let mut fixed = 0u64;
        for (c, &want) in counts.v.iter().enumerate() {
            let c = c as u64;
            let bits = self.cluster_bits() + 3 - self.refcount_order;
            let off = m
                .reftable
                .get((c >> bits) as usize)
                .map_or(0, |e| e & OFFSET_MASK);
            let have = match off {
                0 => 0,
                off => {
                    self.add_refcount(&mut m, c, 0).await?;
                    m.rc.get(off).map_or(0, |b| {
                        get_refcount(b, self.refcount_order, (c & ((1 << bits) - 1)) as usize)
                    })
                }
            };
            if have != u64::from(want) {
                self.set_refcount_to(&mut m, c, u64::from(want)).await?;
                fixed += 1;
            }
        }
        tracing::info!(node = %self.node_name, fixed, "qcow2: repaired refcounts of a dirty image");
        self.writeback(&mut m, true).await?;
        m.header.incompatible &= !incompat::DIRTY;
        let bits = m.header.incompatible;
        self.write_meta(field::INCOMPAT, &bits.to_be_bytes())
            .await?;
        self.file.flush().await?;
        self.known_incompat
            .store(bits, std::sync::atomic::Ordering::Release);
        m.cursor = 0;
        Ok(())
    }
}
