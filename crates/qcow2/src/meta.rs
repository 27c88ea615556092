//! Refcounts, the cluster allocator and the ordered metadata writeback.
//!
//! Crash safety follows qemu's model: a refcount increase is on disk before
//! any L2 entry or L1 entry that uses the cluster; an L2 table is on disk
//! before the L1 entry that points to it; a cluster's refcount drops only
//! after the L2 change that stopped using it is on disk (frees wait in
//! `Meta::pending_free` until a writeback made the L2 change durable).

use qsd_block::{DebugEvent, Error, Result, WriteFlags};
use qsd_rt::IoBuf;

use crate::core::{Meta, PendingFree, Qcow2};
use crate::entries::{get_refcount, max_refcount, set_refcount, set_u64, OFFSET_MASK};
use crate::header::{field, MAX_REFTABLE_BYTES};

impl Qcow2 {
    fn rc_entries_bits(&self) -> u32 {
        self.cluster_bits() + 3 - self.refcount_order
    }

    /// Offset of the refcount block covering cluster `c` (0 = none).
    fn rc_block_of(&self, m: &Meta, c: u64) -> u64 {
        let bi = (c >> self.rc_entries_bits()) as usize;
        m.reftable.get(bi).map_or(0, |e| e & OFFSET_MASK)
    }

    /// Make sure the refcount block at `off` is cached.
    async fn load_rc(&self, m: &mut Meta, off: u64) -> Result<()> {
        if m.rc.contains(off) {
            return Ok(());
        }
        let cs = self.cluster_size();
        if off & (cs - 1) != 0 || off + cs > self.file.len().next_multiple_of(cs) {
            return Err(self.fatal(
                format!("Refcount block offset {off:#x} unaligned or outside the image"),
                off,
                cs,
            ));
        }
        if m.rc.over_capacity() {
            // Refcount blocks may go to disk at any time: decrements are
            // only applied once the L2 changes behind them are durable.
            self.write_rc_blocks(m).await?;
            m.rc.trim();
        }
        self.file.debug_event(DebugEvent::RefblockLoad);
        let buf = self.file.read(off, IoBuf::new(cs as usize)).await?;
        m.rc.insert(off, buf.to_vec(), false);
        Ok(())
    }

    /// The refcount of cluster `c` (0 where no refcount block covers it).
    pub(crate) async fn refcount_of(&self, m: &mut Meta, c: u64) -> Result<u64> {
        let off = self.rc_block_of(m, c);
        if off == 0 {
            return Ok(0);
        }
        self.load_rc(m, off).await?;
        let i = (c & ((1 << self.rc_entries_bits()) - 1)) as usize;
        Ok(m.rc
            .get(off)
            .map_or(0, |b| get_refcount(b, self.refcount_order, i)))
    }

    /// Add `delta` to the refcount of cluster `c`. The block must exist
    /// (the allocator creates blocks before it hands out clusters).
    pub(crate) async fn add_refcount(&self, m: &mut Meta, c: u64, delta: i64) -> Result<u64> {
        let off = self.rc_block_of(m, c);
        if off == 0 {
            return Err(self.fatal(
                format!("Refcount of cluster {c:#x} changed but it has no refcount block"),
                c << self.cluster_bits(),
                self.cluster_size(),
            ));
        }
        self.load_rc(m, off).await?;
        let i = (c & ((1 << self.rc_entries_bits()) - 1)) as usize;
        let order = self.refcount_order;
        let Some(block) = m.rc.get_mut(off) else {
            return Err(Error::invalid("refcount block vanished from the cache"));
        };
        let old = get_refcount(block, order, i);
        let new = old
            .checked_add_signed(delta)
            .filter(|&v| v <= max_refcount(order));
        let Some(new) = new else {
            let msg = format!("Refcount of cluster {c:#x} would leave its range ({old}{delta:+})");
            return Err(self.fatal(msg, c << self.cluster_bits(), self.cluster_size()));
        };
        set_refcount(block, order, i, new);
        if new == 0 {
            m.cursor = m.cursor.min(c);
            // A free cluster may be handed out whole: no more packing there.
            if m.free_byte >> self.cluster_bits() == c {
                m.free_byte = 0;
            }
        }
        Ok(new)
    }

    /// First fit: `n` free clusters from `start` within the area existing
    /// refcount blocks cover; None when the search reaches a missing block.
    async fn find_run(&self, m: &mut Meta, start: u64, n: u64) -> Result<Option<u64>> {
        let bits = self.rc_entries_bits();
        let mask = (1u64 << bits) - 1;
        let order = self.refcount_order;
        let (mut c, mut run_start, mut run) = (start, start, 0);
        loop {
            let off = self.rc_block_of(m, c);
            if off == 0 {
                return Ok(None);
            }
            self.load_rc(m, off).await?;
            let Some(block) = m.rc.get(off) else {
                return Err(Error::invalid("refcount block vanished from the cache"));
            };
            let block_end = (c | mask) + 1;
            while c < block_end {
                if get_refcount(block, order, (c & mask) as usize) == 0 {
                    if run == 0 {
                        run_start = c;
                    }
                    run += 1;
                    if run == n {
                        return Ok(Some(run_start));
                    }
                } else {
                    run = 0;
                }
                c += 1;
            }
        }
    }

    /// Allocate `n` contiguous clusters (refcount 1 each); returns the host
    /// offset of the first.
    pub(crate) async fn alloc_clusters(&self, m: &mut Meta, n: u64) -> Result<u64> {
        self.file.debug_event(DebugEvent::ClusterAlloc);
        let (start, counted) = match self.find_run(m, m.cursor, n).await? {
            Some(s) => (s, false),
            None => (self.alloc_past_end(m, n).await?, true),
        };
        if !counted && (n == 1 || start == m.cursor) {
            m.cursor = start + n;
        }
        m.high = m.high.max(start + n);
        for c in start..start + n {
            self.add_refcount(m, c, 1).await?;
        }
        let off = start << self.cluster_bits();
        if off
            .checked_add(n << self.cluster_bits())
            .is_none_or(|e| e > (1 << 56))
        {
            return Err(Error::invalid("image file too large"));
        }
        Ok(off)
    }

    /// Place `n` clusters past everything in use, followed by the refcount
    /// blocks that cover them (and themselves) where those are missing.
    /// Returns the first cluster index (its refcounts are left to the caller).
    async fn alloc_past_end(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let bits = self.rc_entries_bits();
        loop {
            let e = self.file.len().div_ceil(cs).max(m.high);
            let missing = |table: &[u64], k: u64| -> Vec<u64> {
                ((e >> bits)..=((e + n + k - 1) >> bits))
                    .filter(|&b| table.get(b as usize).is_none_or(|&x| x & OFFSET_MASK == 0))
                    .collect()
            };
            let mut k = 0;
            loop {
                let need = missing(&m.reftable, k).len() as u64;
                if need == k {
                    break;
                }
                k = need;
            }
            let last_block = (e + n + k - 1) >> bits;
            if last_block as usize >= m.reftable.len() {
                self.grow_reftable(m, last_block).await?;
                continue;
            }
            for (i, b) in missing(&m.reftable, k).into_iter().enumerate() {
                self.file.debug_event(DebugEvent::RefblockAlloc);
                let off = (e + n + i as u64) << self.cluster_bits();
                self.check_overlap(m, off, cs, 0)?;
                m.rc.insert(off, vec![0u8; cs as usize], true);
                m.reftable[b as usize] = off;
                m.reftable_dirty = true;
            }
            for c in e + n..e + n + k {
                self.add_refcount(m, c, 1).await?;
            }
            m.high = m.high.max(e + n + k);
            return Ok(e);
        }
    }

    /// Host clusters for `n` guest clusters from `guest_cluster`: identity
    /// in an external data file, freshly allocated otherwise.
    pub(crate) async fn alloc_data(&self, m: &mut Meta, guest_cluster: u64, n: u64) -> Result<u64> {
        if self.data_file.is_some() {
            return Ok(guest_cluster << self.cluster_bits());
        }
        self.alloc_clusters(m, n).await
    }

    /// Grow the refcount table to cover block index `bi`: the new table and
    /// the blocks covering it go past the end of everything in use.
    pub(crate) async fn grow_reftable(&self, m: &mut Meta, bi: u64) -> Result<()> {
        self.file.debug_event(DebugEvent::ReftableGrow);
        let cs = self.cluster_size();
        let per_cluster = cs / 8;
        let want = (bi + 1).max(m.reftable.len() as u64 * 2);
        let entries = want.next_multiple_of(per_cluster);
        if entries * 8 > MAX_REFTABLE_BYTES {
            return Err(Error::invalid("Reference count table too large").with_errno(27));
        }
        let t = entries / per_cluster;
        let bits = self.rc_entries_bits();
        let end = self.file.len().div_ceil(cs).max(m.high);
        // Blocks for [end, end + t + r) that do not exist yet.
        let missing = |table: &[u64], r: u64| -> Vec<u64> {
            let first = end >> bits;
            let last = (end + t + r - 1) >> bits;
            (first..=last)
                .filter(|&b| table.get(b as usize).is_none_or(|&e| e & OFFSET_MASK == 0))
                .collect()
        };
        let mut r = 0;
        loop {
            let need = missing(&m.reftable, r).len() as u64;
            if need == r {
                break;
            }
            r = need;
        }
        let mut table = m.reftable.clone();
        table.resize(entries as usize, 0);
        for (k, b) in missing(&m.reftable, r).into_iter().enumerate() {
            let off = (end + t + k as u64) << self.cluster_bits();
            table[b as usize] = off;
            m.rc.insert(off, vec![0u8; cs as usize], true);
        }
        let old = (
            m.header.refcount_table_offset,
            m.header.refcount_table_clusters,
        );
        m.reftable = table;
        for c in end..end + t + r {
            self.add_refcount(m, c, 1).await?;
        }
        let new_off = end << self.cluster_bits();
        self.write_rc_blocks(m).await?;
        self.write_table(new_off, &m.reftable).await?;
        self.file.flush().await?;
        let mut hdr = Vec::with_capacity(12);
        hdr.extend_from_slice(&new_off.to_be_bytes());
        hdr.extend_from_slice(&(t as u32).to_be_bytes());
        self.write_meta(field::REFTABLE, &hdr).await?;
        self.file.flush().await?;
        m.header.refcount_table_offset = new_off;
        m.header.refcount_table_clusters = t as u32;
        m.reftable_dirty = false;
        m.cursor = m.cursor.max(end + t + r);
        m.high = m.high.max(end + t + r);
        let old_clusters = u64::from(old.1);
        for c in 0..old_clusters {
            self.add_refcount(m, (old.0 >> self.cluster_bits()) + c, -1)
                .await?;
        }
        Ok(())
    }

    /// Write a table of u64 entries at `off`.
    pub(crate) async fn write_table(&self, off: u64, table: &[u64]) -> Result<()> {
        let len = (table.len() * 8).next_multiple_of(512).max(512);
        let mut buf = IoBuf::new(len);
        for (i, e) in table.iter().enumerate() {
            set_u64(&mut buf, i, *e);
        }
        buf.resize(table.len() * 8);
        self.file.write(off, buf, WriteFlags::default()).await?;
        Ok(())
    }

    /// Write metadata bytes to the image file.
    pub(crate) async fn write_meta(&self, off: u64, data: &[u8]) -> Result<()> {
        self.file
            .write(off, IoBuf::from_slice(data), WriteFlags::default())
            .await?;
        Ok(())
    }

    async fn write_rc_blocks(&self, m: &mut Meta) -> Result<bool> {
        let dirty = m.rc.dirty();
        for (off, data) in &dirty {
            self.check_overlap(
                m,
                *off,
                data.len() as u64,
                crate::options::overlap::REFCOUNT_BLOCK,
            )?;
            self.file.debug_event(DebugEvent::RefblockUpdatePart);
            self.write_meta(*off, data).await?;
            m.rc.mark_clean(*off, data);
        }
        Ok(!dirty.is_empty())
    }

    /// Write dirty metadata in crash-safe order; with `sync`, end with a
    /// flush of the image (and data) file. Frees queued before the call
    /// take effect once their L2 changes are durable.
    pub(crate) async fn writeback(&self, m: &mut Meta, sync: bool) -> Result<()> {
        if self.corrupt.load(std::sync::atomic::Ordering::Acquire) {
            // Metadata of a corrupt image stays as it is; data still syncs.
            if sync {
                if let Some(d) = &self.data_file {
                    d.flush().await?;
                }
                self.file.flush().await?;
            }
            return Ok(());
        }
        let frees = std::mem::take(&mut m.pending_free);
        let r = self.writeback_inner(m, sync || !frees.is_empty()).await;
        if let Err(e) = r {
            m.pending_free.extend(frees);
            return Err(e);
        }
        if !frees.is_empty() {
            self.apply_frees(m, frees).await?;
        }
        m.rc.trim();
        Ok(())
    }

    async fn writeback_inner(&self, m: &mut Meta, sync: bool) -> Result<()> {
        let l2_dirty = self.state().l2.dirty();
        let any = !l2_dirty.is_empty() || m.l1_dirty || m.reftable_dirty || m.rc.has_dirty();
        if self.lazy && any && !m.dirty_set {
            self.set_dirty_bit(m, true).await?;
        }
        // With the dirty bit on disk, a crash leads to a refcount rebuild:
        // the flushes that order refcounts before L2 tables can go.
        let ordered = !m.dirty_set;
        let mut unsynced = self.write_rc_blocks(m).await?;
        if m.reftable_dirty {
            self.file.flush().await?;
            let off = m.header.refcount_table_offset;
            self.file.debug_event(DebugEvent::ReftableUpdate);
            self.write_table(off, &m.reftable).await?;
            m.reftable_dirty = false;
            unsynced = true;
        }
        if ordered && unsynced && (!l2_dirty.is_empty() || m.l1_dirty) {
            self.file.flush().await?;
            unsynced = false;
        }
        for (off, data) in &l2_dirty {
            let skip = crate::options::overlap::ACTIVE_L2;
            self.check_overlap(m, *off, data.len() as u64, skip)?;
            self.file.debug_event(DebugEvent::L2Update);
            self.write_meta(*off, data).await?;
            self.state().l2.mark_clean(*off, data);
            unsynced = true;
        }
        if m.l1_dirty {
            if unsynced && ordered {
                self.file.flush().await?;
            }
            let l1 = self.state().l1.clone();
            self.file.debug_event(DebugEvent::L1Update);
            self.write_table(m.header.l1_table_offset, &l1).await?;
            m.l1_dirty = false;
            unsynced = true;
        }
        self.state().l2.trim();
        if sync {
            if let Some(d) = &self.data_file {
                d.flush().await?;
            }
            self.file.flush().await?;
        } else {
            let _ = unsynced;
        }
        Ok(())
    }

    /// Set or clear the dirty bit (lazy refcounts), durably; clear it only
    /// after a full writeback.
    pub(crate) async fn set_dirty_bit(&self, m: &mut Meta, on: bool) -> Result<()> {
        // The bits on disk, which may include a corrupt bit set meanwhile.
        let cur = self
            .known_incompat
            .load(std::sync::atomic::Ordering::Acquire);
        let bits = if on {
            cur | crate::header::incompat::DIRTY
        } else {
            cur & !crate::header::incompat::DIRTY
        };
        self.write_meta(field::INCOMPAT, &bits.to_be_bytes())
            .await?;
        self.file.flush().await?;
        m.header.incompatible = bits;
        m.dirty_set = on;
        self.known_incompat
            .store(bits, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Drop the refcounts of freed clusters once no request can still be
    /// using them, passing discards down where asked.
    async fn apply_frees(&self, m: &mut Meta, frees: Vec<PendingFree>) -> Result<()> {
        let _quiet = self.barrier.write().await;
        let cb = self.cluster_bits();
        for f in frees {
            let first = f.host >> cb;
            let last = (f.host + f.len - 1) >> cb;
            let mut zeroed = Vec::new();
            for c in first..=last {
                if self.add_refcount(m, c, -1).await? == 0 {
                    zeroed.push(c);
                    self.state().l2.remove(c << cb);
                }
            }
            if f.pass_discard && f.len >= self.cluster_size() {
                // Only clusters nobody uses any more: a packed compressed
                // cluster shares its host clusters with others.
                self.discard_clusters(&zeroed).await;
            }
        }
        Ok(())
    }

    /// Punch the host clusters `list` (ascending), in contiguous runs.
    /// Advisory: a failure to punch only leaves data in place.
    async fn discard_clusters(&self, list: &[u64]) {
        let cb = self.cluster_bits();
        let mut i = 0;
        while let Some(&start) = list.get(i) {
            let mut n = 1;
            while list.get(i + n as usize) == Some(&(start + n)) {
                n += 1;
            }
            i += n as usize;
            if let Err(e) = self.file.discard(start << cb, n << cb).await {
                tracing::debug!("discard of freed clusters failed: {e}");
            }
        }
    }

    /// `size` bytes (less than a cluster) for compressed data, packed after
    /// the previous compressed cluster as qemu does. Every host cluster the
    /// bytes touch gains one reference; returns the host offset.
    pub(crate) async fn alloc_bytes(&self, m: &mut Meta, size: u64) -> Result<u64> {
        self.file.debug_event(DebugEvent::ClusterAllocBytes);
        let cs = self.cluster_size();
        let cb = self.cluster_bits();
        let mut off = m.free_byte;
        if off != 0 {
            let rc = self.refcount_of(m, off >> cb).await?;
            if rc == 0 || rc >= max_refcount(self.refcount_order) {
                off = 0;
            }
        }
        let room = if off == 0 { 0 } else { cs - (off & (cs - 1)) };
        if off != 0 && room >= size {
            self.add_refcount(m, off >> cb, 1).await?;
        } else {
            let new = self.alloc_clusters(m, 1).await?;
            if off != 0 && new == off.next_multiple_of(cs) {
                // The data runs on from the old tail into the new cluster.
                self.add_refcount(m, off >> cb, 1).await?;
            } else {
                off = new;
            }
        }
        let end = off + size;
        m.free_byte = if end & (cs - 1) == 0 { 0 } else { end };
        Ok(off)
    }

    /// Queue the release of host range `host..host+len` (whole clusters of
    /// a data cluster, or the clusters a compressed cluster touches).
    pub(crate) fn queue_free(&self, m: &mut Meta, host: u64, len: u64, pass_discard: bool) {
        if self.data_file.is_some() || len == 0 {
            return;
        }
        m.pending_free.push(PendingFree {
            host,
            len,
            pass_discard,
        });
    }
}
