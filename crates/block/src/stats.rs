//! I/O statistics of a BlockBackend, as `query-blockstats` reports them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::{json, Value};

/// One kind of operation being counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Reads.
    Read,
    /// Writes and write-zeroes.
    Write,
    /// Flushes.
    Flush,
    /// Discards.
    Unmap,
}

#[derive(Debug, Default)]
struct Counters {
    bytes: AtomicU64,
    ops: AtomicU64,
    time_ns: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
}

/// Lock-free counters, updated on every request.
#[derive(Debug)]
pub struct Stats {
    rd: Counters,
    wr: Counters,
    flush: Counters,
    unmap: Counters,
    wr_highest_offset: AtomicU64,
    created: Instant,
    last_done_ns: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            rd: Counters::default(),
            wr: Counters::default(),
            flush: Counters::default(),
            unmap: Counters::default(),
            wr_highest_offset: AtomicU64::new(0),
            created: Instant::now(),
            last_done_ns: AtomicU64::new(0),
        }
    }
}

impl Stats {
    fn counters(&self, kind: OpKind) -> &Counters {
        match kind {
            OpKind::Read => &self.rd,
            OpKind::Write => &self.wr,
            OpKind::Flush => &self.flush,
            OpKind::Unmap => &self.unmap,
        }
    }

    /// Count a finished request that started at `start`.
    pub fn done(&self, kind: OpKind, bytes: u64, start: Instant, ok: bool) {
        let c = self.counters(kind);
        let now = Instant::now();
        if ok {
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
            c.ops.fetch_add(1, Ordering::Relaxed);
        } else {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
        c.time_ns.fetch_add(
            now.duration_since(start).as_nanos() as u64,
            Ordering::Relaxed,
        );
        let since = now.duration_since(self.created).as_nanos() as u64;
        self.last_done_ns.fetch_max(since, Ordering::Relaxed);
    }

    /// Count a request refused before it was started (bad range).
    pub fn invalid(&self, kind: OpKind) {
        self.counters(kind).invalid.fetch_add(1, Ordering::Relaxed);
    }

    /// Note the end offset of a write.
    pub fn wrote_up_to(&self, end: u64) {
        self.wr_highest_offset.fetch_max(end, Ordering::Relaxed);
    }

    /// The `stats` member of a `query-blockstats` entry.
    pub fn to_json(&self) -> Value {
        self.to_json_with_highest(self.wr_highest_offset.load(Ordering::Relaxed))
    }

    /// Like [`Stats::to_json`], with `wr_highest_offset` given by the caller
    /// (a node reports its own).
    pub fn to_json_with_highest(&self, wr_highest_offset: u64) -> Value {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut v = json!({
            "unmap_operations": l(&self.unmap.ops),
            "unmap_merged": 0,
            "failed_zone_append_operations": 0,
            "flush_total_time_ns": l(&self.flush.time_ns),
            "wr_highest_offset": wr_highest_offset,
            "wr_total_time_ns": l(&self.wr.time_ns),
            "failed_wr_operations": l(&self.wr.failed),
            "failed_rd_operations": l(&self.rd.failed),
            "wr_merged": 0,
            "wr_bytes": l(&self.wr.bytes),
            "timed_stats": [],
            "failed_unmap_operations": l(&self.unmap.failed),
            "zone_append_merged": 0,
            "failed_flush_operations": l(&self.flush.failed),
            "account_invalid": true,
            "rd_total_time_ns": l(&self.rd.time_ns),
            "invalid_unmap_operations": l(&self.unmap.invalid),
            "flush_operations": l(&self.flush.ops),
            "wr_operations": l(&self.wr.ops),
            "unmap_bytes": l(&self.unmap.bytes),
            "rd_merged": 0,
            "rd_bytes": l(&self.rd.bytes),
            "unmap_total_time_ns": l(&self.unmap.time_ns),
            "invalid_flush_operations": l(&self.flush.invalid),
            "account_failed": true,
            "zone_append_total_time_ns": 0,
            "invalid_zone_append_operations": 0,
            "zone_append_bytes": 0,
            "rd_operations": l(&self.rd.ops),
            "invalid_wr_operations": l(&self.wr.invalid),
            "zone_append_operations": 0,
            "invalid_rd_operations": l(&self.rd.invalid),
        });
        let last = self.last_done_ns.load(Ordering::Relaxed);
        if last > 0 {
            let now = self.created.elapsed().as_nanos() as u64;
            v["idle_time_ns"] = json!(now.saturating_sub(last));
        }
        v
    }
}
