//! A writeback cache of one-cluster metadata tables (L2 tables, refcount
//! blocks), keyed by host offset. Tables are kept as their on-disk bytes.
//!
//! The cache itself does no I/O: callers read tables in, and write dirty
//! ones out (in the order crash safety asks for) before evicting them.

use std::collections::HashMap;

#[derive(Debug)]
struct Slot {
    data: Vec<u8>,
    dirty: bool,
    used: u64,
}

/// Tables by host offset.
#[derive(Debug)]
pub struct TableCache {
    slots: HashMap<u64, Slot>,
    capacity: usize,
    tick: u64,
    /// `tick` at the previous [`TableCache::drop_idle`].
    idle_mark: u64,
    /// Bumped whenever a table leaves the cache: a table read from disk
    /// while this changed may be stale and is not inserted.
    pub generation: u64,
}

impl TableCache {
    /// A cache holding up to `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            slots: HashMap::new(),
            capacity: capacity.max(2),
            tick: 0,
            idle_mark: 0,
            generation: 0,
        }
    }

    /// The table at `offset`, if cached.
    pub fn get(&mut self, offset: u64) -> Option<&[u8]> {
        self.tick += 1;
        let tick = self.tick;
        self.slots.get_mut(&offset).map(|s| {
            s.used = tick;
            s.data.as_slice()
        })
    }

    /// True when cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.slots.contains_key(&offset)
    }

    /// The table at `offset` for modification; it becomes dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut Vec<u8>> {
        self.tick += 1;
        let tick = self.tick;
        self.slots.get_mut(&offset).map(|s| {
            s.used = tick;
            s.dirty = true;
            &mut s.data
        })
    }

    /// Insert a table (clean or dirty), evicting clean tables when full.
    /// Dirty tables are never evicted here; the cache may exceed its
    /// capacity until [`TableCache::over_capacity`] is handled by a writeback.
    pub fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool) {
        self.tick += 1;
        if !self.slots.contains_key(&offset) && self.slots.len() >= self.capacity {
            self.evict_clean();
        }
        self.slots.insert(
            offset,
            Slot {
                data,
                dirty,
                used: self.tick,
            },
        );
    }

    fn evict_clean(&mut self) {
        let victim = self
            .slots
            .iter()
            .filter(|(_, s)| !s.dirty)
            .min_by_key(|(_, s)| s.used)
            .map(|(k, _)| *k);
        if let Some(k) = victim {
            self.slots.remove(&k);
            self.generation += 1;
        }
    }

    /// True when dirty tables keep the cache over its capacity.
    pub fn over_capacity(&self) -> bool {
        self.slots.len() > self.capacity
    }

    /// Trim to capacity (after a writeback made tables clean).
    pub fn trim(&mut self) {
        while self.slots.len() > self.capacity && self.slots.values().any(|s| !s.dirty) {
            self.evict_clean();
        }
    }

    /// True when some table is dirty.
    pub fn has_dirty(&self) -> bool {
        self.slots.values().any(|s| s.dirty)
    }

    /// Copies of the dirty tables, sorted by offset.
    pub fn dirty(&self) -> Vec<(u64, Vec<u8>)> {
        let mut v: Vec<(u64, Vec<u8>)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, s)| (*k, s.data.clone()))
            .collect();
        v.sort_unstable_by_key(|(k, _)| *k);
        v
    }

    /// Mark a table clean once written, unless it changed since `written`.
    pub fn mark_clean(&mut self, offset: u64, written: &[u8]) {
        if let Some(s) = self.slots.get_mut(&offset) {
            if s.data == written {
                s.dirty = false;
            }
        }
    }

    /// Drop the clean tables nobody used since the previous call (qemu's
    /// `cache-clean-interval`: an idle image gives its cache memory back).
    pub fn drop_idle(&mut self) {
        let mark = self.idle_mark;
        let before = self.slots.len();
        self.slots.retain(|_, s| s.dirty || s.used > mark);
        if self.slots.len() != before {
            self.generation += 1;
        }
        self.idle_mark = self.tick;
    }

    /// Forget a table (its cluster was freed).
    pub fn remove(&mut self, offset: u64) {
        if self.slots.remove(&offset).is_some() {
            self.generation += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cache_evicts_least_recent_clean_table() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![1], false);
        c.insert(2, vec![2], false);
        assert!(c.get(1).is_some());
        c.insert(3, vec![3], false);
        assert!(c.contains(1) && !c.contains(2) && c.contains(3));
        assert_eq!(c.generation, 1);
    }

    #[test]
    fn test_cache_drop_idle_keeps_used_and_dirty_tables() {
        let mut c = TableCache::new(8);
        c.insert(0, vec![0], false);
        c.insert(1, vec![1], false);
        c.insert(2, vec![2], true);
        c.drop_idle();
        // Everything was used since the (initial) mark.
        assert!(c.contains(0) && c.contains(1) && c.contains(2));
        assert!(c.get(1).is_some());
        c.drop_idle();
        assert!(!c.contains(0), "idle clean table dropped");
        assert!(c.contains(1), "used table kept");
        assert!(c.contains(2), "dirty table kept");
    }

    #[test]
    fn test_cache_keeps_dirty_tables_until_written() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![1], true);
        c.insert(2, vec![2], true);
        c.insert(3, vec![3], true);
        assert!(c.over_capacity());
        let d = c.dirty();
        assert_eq!(d.len(), 3);
        for (k, v) in &d {
            c.mark_clean(*k, v);
        }
        c.trim();
        assert!(!c.over_capacity());
        c.get_mut(3).unwrap()[0] = 9;
        c.mark_clean(3, &[3]);
        assert_eq!(c.dirty().len(), usize::from(c.contains(3)));
    }
}
