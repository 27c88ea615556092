//! The driver state and the mapping of guest offsets to host offsets.
//!
//! Lock order (outer first): guest-cluster claims (waited on with no lock
//! held) → `meta` (async; allocation and metadata I/O) → `state` (std, never
//! held across an await). The `barrier` read side is only taken by data I/O
//! with neither `meta` held nor waited for; its write side is taken under
//! `meta` to release freed clusters once no request can still touch them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use qsd_block::{Error, ErrorKind, EventSink, NodeRef, PermUser, Result};
use qsd_rt::IoBuf;
use serde_json::json;
use tokio::sync::Notify;

use crate::cache::TableCache;
use crate::entries::{get_u64, Layout, Mapping, COPIED, OFFSET_MASK};
use crate::header::Header;

/// State read on every request, behind a short std mutex.
#[derive(Debug)]
pub(crate) struct State {
    pub l1: Vec<u64>,
    pub l2: TableCache,
    /// Guest clusters whose mapping a request is changing.
    pub claims: HashMap<u64, Arc<Notify>>,
}

/// A cluster range whose refcount drops once the L2 change that stopped
/// referencing it is on disk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PendingFree {
    pub host: u64,
    pub len: u64,
    pub pass_discard: bool,
}

/// Metadata changed only under the async `meta` lock.
#[derive(Debug)]
pub(crate) struct Meta {
    pub header: Header,
    pub reftable: Vec<u64>,
    pub reftable_dirty: bool,
    pub rc: TableCache,
    /// First cluster index that may be free.
    pub cursor: u64,
    /// One past the highest cluster ever allocated or in the file.
    pub high: u64,
    pub l1_dirty: bool,
    pub pending_free: Vec<PendingFree>,
    /// (offset, entries) of snapshot L1 tables, for overlap checks.
    pub snapshot_l1s: Vec<(u64, u64)>,
    /// L2 tables of snapshots (read at open for `overlap-check=all`).
    pub inactive_l2: Vec<u64>,
    /// Bytes of the snapshot table.
    pub snapshot_table_len: u64,
    /// The dirty bit is set on disk (lazy refcounts in use).
    pub dirty_set: bool,
    /// Where the next compressed cluster may go: the first free byte of a
    /// partly used host cluster (0 = none, start a new cluster).
    pub free_byte: u64,
}

/// Static facts for queries.
#[derive(Debug, Clone, Default)]
pub(crate) struct Info {
    pub snapshots: Option<serde_json::Value>,
    pub bitmaps: Option<serde_json::Value>,
    pub data_file_name: Option<String>,
}

/// A qcow2 node.
pub struct Qcow2 {
    pub(crate) file: NodeRef,
    pub(crate) data_file: Option<NodeRef>,
    pub(crate) backing: Option<NodeRef>,
    pub(crate) file_user: PermUser,
    pub(crate) data_user: Option<PermUser>,
    pub(crate) _backing_user: Option<PermUser>,
    pub(crate) layout: Layout,
    pub(crate) compression: crate::codec::Kind,
    pub(crate) refcount_order: u32,
    pub(crate) size: AtomicU64,
    pub(crate) state: Mutex<State>,
    pub(crate) meta: tokio::sync::Mutex<Meta>,
    pub(crate) barrier: tokio::sync::RwLock<()>,
    pub(crate) corrupt: AtomicBool,
    /// The incompatible feature bits as on disk.
    pub(crate) known_incompat: AtomicU64,
    pub(crate) read_only: bool,
    /// Lazy refcounts: set the dirty bit instead of ordering flushes.
    pub(crate) lazy: bool,
    pub(crate) events: EventSink,
    pub(crate) node_name: String,
    pub(crate) overlap: u32,
    pub(crate) pass_discard_request: bool,
    pub(crate) pass_discard_other: bool,
    pub(crate) discard_no_unref: bool,
    pub(crate) info: Info,
    /// The header as opened (queries while `meta` is busy).
    pub(crate) header_copy: Header,
    /// qemu's metadata preallocation heuristic: 0 not decided yet, 1 no,
    /// 2 yes (see `Qcow2::status`).
    pub(crate) prealloc: std::sync::atomic::AtomicU8,
    /// The cipher of an encrypted image.
    pub(crate) crypto: Option<crate::crypto::Crypto>,
    /// `cache-clean-interval` in seconds (0 = never clean).
    pub(crate) clean_interval: u64,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("node", &self.node_name)
            .field("layout", &self.layout)
            .finish()
    }
}

/// One extent of a guest range with a uniform mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub mapping: Mapping,
    /// Bytes from the queried offset.
    pub len: u64,
}

/// Result of a lookup that needs no I/O, or the L2 table to load first.
pub(crate) enum Lookup {
    Found(Extent),
    Load(u64),
}

impl Qcow2 {
    pub(crate) fn cluster_bits(&self) -> u32 {
        self.layout.cluster_bits
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        1 << self.layout.cluster_bits
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The node guest data lives in.
    pub(crate) fn data_node(&self) -> &NodeRef {
        self.data_file.as_ref().unwrap_or(&self.file)
    }

    /// Guest bytes covered by one L2 table.
    fn l2_span_bits(&self) -> u32 {
        self.layout.cluster_bits + self.layout.l2_entries().trailing_zeros()
    }

    /// The (entry, bitmap) of guest cluster `c` from a cached table, or the
    /// table to load. An unallocated L1 entry gives (0, 0).
    pub(crate) fn entry_of(
        &self,
        st: &mut State,
        c: u64,
    ) -> Result<std::result::Result<(u64, u64), u64>> {
        let l2_bits = self.l2_span_bits() - self.layout.cluster_bits;
        let l1i = (c >> l2_bits) as usize;
        let Some(&l1e) = st.l1.get(l1i) else {
            return Ok(Ok((0, 0)));
        };
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(Ok((0, 0)));
        }
        let idx = (c & ((1 << l2_bits) - 1)) as usize;
        let Some(table) = st.l2.get(l2_off) else {
            return Ok(Err(l2_off));
        };
        Ok(Ok(if self.layout.extended {
            (get_u64(table, 2 * idx), get_u64(table, 2 * idx + 1))
        } else {
            (get_u64(table, idx), 0)
        }))
    }

    /// Mapping of the unit (subcluster or cluster) at `offset`, and the
    /// host offset of `offset` itself for data.
    fn unit_mapping(&self, entry: u64, bm: u64, offset: u64) -> Mapping {
        let cs = self.cluster_size();
        let within = offset & (cs - 1);
        let m = if self.layout.extended {
            let sc = (within >> self.layout.subcluster_bits()) as u32;
            self.layout.decode_sub(entry, bm, sc)
        } else {
            self.layout.decode(entry)
        };
        match m {
            Mapping::Normal { host, copied } => Mapping::Normal {
                host: host + within,
                copied,
            },
            other => other,
        }
    }

    /// The extent at `offset` (at most `len` bytes), from cached tables.
    pub(crate) fn lookup(&self, offset: u64, len: u64) -> Result<Lookup> {
        let unit_bits = self.layout.subcluster_bits();
        let span_bits = self.l2_span_bits();
        let mut st = self.state();
        let mut pos = offset;
        let end = offset + len;
        let mut first: Option<Mapping> = None;
        while pos < end {
            let c = pos >> self.layout.cluster_bits;
            let l1e = st.l1.get((pos >> span_bits) as usize).copied().unwrap_or(0);
            if l1e & OFFSET_MASK == 0 {
                // A whole unallocated L2 span in one step.
                match first {
                    None => first = Some(Mapping::Unallocated),
                    Some(Mapping::Unallocated) => {}
                    Some(_) => break,
                }
                pos = (((pos >> span_bits) + 1) << span_bits).min(end);
                continue;
            }
            let (entry, bm) = match self.entry_of(&mut st, c)? {
                Ok(e) => e,
                Err(l2) if first.is_none() => return Ok(Lookup::Load(l2)),
                Err(_) => break,
            };
            if entry & crate::entries::COMPRESSED == 0
                && entry & OFFSET_MASK & (self.cluster_size() - 1) != 0
            {
                let host = entry & OFFSET_MASK;
                let idx = c & (self.layout.l2_entries() - 1);
                // qemu's message; C's "%#x" prints 0 as "0".
                let idx = if idx == 0 {
                    "0".to_string()
                } else {
                    format!("{idx:#x}")
                };
                return Err(self.fatal(
                    format!(
                        "Cluster allocation offset {host:#x} unaligned (L2 offset: {:#x}, \
                         L2 index: {idx})",
                        l1e & OFFSET_MASK
                    ),
                    host,
                    self.cluster_size(),
                ));
            }
            let m = self.unit_mapping(entry, bm, pos);
            let next = ((pos >> unit_bits) + 1) << unit_bits;
            let step = next.min(end) - pos;
            match first {
                None => {
                    self.check_mapping(&m, c)?;
                    first = Some(m);
                }
                Some(f) if continues(&f, &m, pos - offset) => {}
                Some(_) => break,
            }
            pos += step;
        }
        let mapping = first.unwrap_or(Mapping::Unallocated);
        Ok(Lookup::Found(Extent {
            mapping,
            len: pos - offset,
        }))
    }

    /// Resolve the extent at `offset`, loading L2 tables as needed.
    pub(crate) async fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        loop {
            match self.lookup(offset, len)? {
                Lookup::Found(e) => return Ok(e),
                Lookup::Load(l2) => self.load_l2(l2).await?,
            }
        }
    }

    /// Read an L2 table into the cache (unless it arrived meanwhile).
    pub(crate) async fn load_l2(&self, l2_off: u64) -> Result<()> {
        let cs = self.cluster_size();
        if l2_off & (cs - 1) != 0 || l2_off + cs > self.file.len().next_multiple_of(cs) {
            return Err(self.fatal(
                format!("L2 table offset {l2_off:#x} unaligned or outside the image"),
                l2_off,
                cs,
            ));
        }
        let gen = self.state().l2.generation;
        self.file.debug_event(qsd_block::DebugEvent::L2Load);
        let buf = self.file.read(l2_off, IoBuf::new(cs as usize)).await?;
        let mut st = self.state();
        if st.l2.generation == gen && !st.l2.contains(l2_off) {
            st.l2.insert(l2_off, buf.to_vec(), false);
        }
        Ok(())
    }

    /// A data mapping must be aligned and inside the image file.
    fn check_mapping(&self, m: &Mapping, c: u64) -> Result<()> {
        let cs = self.cluster_size();
        match *m {
            Mapping::Normal { host, .. } if self.data_file.is_none() => {
                let base = host & !(cs - 1);
                if base + cs > self.file.len().next_multiple_of(cs) {
                    return Err(self.fatal(
                        format!(
                            "Cluster allocation offset {base:#x} beyond the end of the image \
                             (guest offset {:#x})",
                            c << self.layout.cluster_bits
                        ),
                        base,
                        cs,
                    ));
                }
            }
            Mapping::Compressed { host, len }
                if self.data_file.is_some() || host + len > self.file.len() + 512 =>
            {
                return Err(self.fatal(
                    format!(
                        "Compressed cluster at {host:#x} (guest offset {:#x}) is out of range",
                        c << self.layout.cluster_bits
                    ),
                    host,
                    len,
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// Mark the image corrupt (header bit, event, no more writes) and
    /// return the EIO error for the request. As qemu, the event names no
    /// offset and size here (only overlap checks give them, see
    /// [`Qcow2::fatal_at`]); `offset` and `size` go to the log.
    pub(crate) fn fatal(&self, msg: String, offset: u64, size: u64) -> Error {
        tracing::debug!(node = %self.node_name, offset, size, "qcow2 corruption");
        self.corruption(msg, None)
    }

    /// Like [`Qcow2::fatal`], with the offending range in the event.
    pub(crate) fn fatal_at(&self, msg: String, offset: u64, size: u64) -> Error {
        self.corruption(msg, Some((offset, size)))
    }

    fn corruption(&self, msg: String, range: Option<(u64, u64)>) -> Error {
        let mut ev = json!({"device": "", "node-name": self.node_name, "msg": msg});
        if let Some((offset, size)) = range {
            ev["offset"] = offset.into();
            ev["size"] = size.into();
        }
        if self.read_only {
            // qemu: corruption found in a read-only image is not fatal;
            // the image is not marked and every hit is reported.
            ev["fatal"] = false.into();
            tracing::warn!(node = %self.node_name, "qcow2: {msg}");
            self.events.emit("BLOCK_IMAGE_CORRUPTED", ev);
            return Error::new(
                ErrorKind::Corrupt,
                format!("Image '{}' is corrupt: {msg}", self.node_name),
            );
        }
        ev["fatal"] = true.into();
        let first = !self.corrupt.swap(true, Ordering::AcqRel);
        if first {
            tracing::error!(node = %self.node_name, "qcow2: {msg}; image marked corrupt");
            self.events.emit("BLOCK_IMAGE_CORRUPTED", ev);
            self.spawn_mark_corrupt();
        }
        Error::new(
            ErrorKind::Corrupt,
            format!("Image '{}' is corrupt: {msg}", self.node_name),
        )
    }

    /// Write the corrupt bit into the header; best effort, in the background
    /// when a runtime is available.
    fn spawn_mark_corrupt(&self) {
        let file = self.file.clone();
        let corrupt = crate::header::incompat::CORRUPT;
        let incompat = self.known_incompat.fetch_or(corrupt, Ordering::AcqRel) | corrupt;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let buf = IoBuf::from_slice(&incompat.to_be_bytes());
                let r = file
                    .write(crate::header::field::INCOMPAT, buf, Default::default())
                    .await;
                if let Err(e) = r.and(Ok(())) {
                    tracing::warn!("writing the corrupt bit failed: {e}");
                } else if let Err(e) = file.flush().await {
                    tracing::warn!("flushing the corrupt bit failed: {e}");
                }
            });
        }
    }

    /// Refuse writes once the image is known to be corrupt.
    pub(crate) fn check_not_corrupt(&self) -> Result<()> {
        if self.corrupt.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("Image '{}' is corrupt; writes are refused", self.node_name),
            ));
        }
        Ok(())
    }

    /// The external data file is kept a raw image of the guest data.
    pub(crate) fn data_file_raw(&self) -> bool {
        self.data_file.is_some()
            && self.header_copy.autoclear & crate::header::autoclear::DATA_FILE_RAW != 0
    }

    /// Is entry (entry, bm) a cluster we may write in place (refcount 1)?
    pub(crate) fn own_host(&self, entry: u64) -> Option<u64> {
        let host = entry & OFFSET_MASK;
        // Offset 0 is a valid data file cluster when the copied flag says
        // it is allocated (qemu's rule for external data files).
        let at_zero_ok = self.data_file.is_some() && entry & COPIED != 0;
        if entry & crate::entries::COMPRESSED != 0 || (host == 0 && !at_zero_ok) {
            return None;
        }
        (entry & COPIED != 0 || self.data_file.is_some()).then_some(host)
    }
}

/// Does unit mapping `m`, `delta` bytes after the extent start, continue
/// an extent that began with `first`?
fn continues(first: &Mapping, m: &Mapping, delta: u64) -> bool {
    match (first, m) {
        (Mapping::Unallocated, Mapping::Unallocated) => true,
        (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
        (
            Mapping::Normal {
                host: h0,
                copied: c0,
            },
            Mapping::Normal {
                host: h1,
                copied: c1,
            },
        ) => c0 == c1 && h0 + delta == *h1,
        (Mapping::Compressed { host: a, .. }, Mapping::Compressed { host: b, .. }) => a == b,
        _ => false,
    }
}
