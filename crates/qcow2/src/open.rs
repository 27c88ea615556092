//! Opening a qcow2 node: options, header validation, tables, children.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;

use qsd_block::perm::UserDesc;
use qsd_block::{Error, NodeRef, OpenCtx, Perm, PermUser, Result};
use qsd_rt::IoBuf;
use serde_json::{json, Map, Value};

use crate::cache::TableCache;
use crate::codec::Kind;
use crate::core::{Info, Meta, Qcow2, State};
use crate::entries::{get_u64, Layout};
use crate::header::{
    autoclear, field, incompat, Header, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS,
};
use crate::options::{cache_sizes, overlap_mask, Qcow2Opts};

fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid(msg)
}

/// Read `len` bytes at `off` of `node` as a plain vector.
async fn read_vec(node: &NodeRef, off: u64, len: u64) -> Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    Ok(node.read(off, IoBuf::new(len as usize)).await?.to_vec())
}

/// Read the header and extensions, and check what qemu checks.
async fn read_header(file: &NodeRef) -> Result<Header> {
    let flen = file.len();
    let head = read_vec(file, 0, flen.min(112)).await?;
    let mut h = Header::parse_fixed(&head)?;
    let cs = h.cluster_size();
    let cluster = read_vec(file, 0, flen.min(cs)).await?;
    h.parse_extensions(&cluster)?;
    if let Some(msg) = h.unsupported_features() {
        return Err(Error::unsupported(msg));
    }
    if h.incompatible & incompat::EXTENDED_L2 != 0 && h.cluster_bits < 14 {
        return Err(invalid(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    validate_tables(&h, flen)?;
    Ok(h)
}

fn validate_tables(h: &Header, flen: u64) -> Result<()> {
    let cs = h.cluster_size();
    let fend = flen.next_multiple_of(cs);
    let inside = |off: u64, len: u64| {
        off.is_multiple_of(cs) && off.checked_add(len).is_some_and(|e| e <= fend)
    };
    if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
        return Err(invalid("Active L1 table too large"));
    }
    let span = cs
        * (cs
            / if h.incompatible & incompat::EXTENDED_L2 != 0 {
                16
            } else {
                8
            });
    if h.size.div_ceil(span) > u64::from(h.l1_size) {
        return Err(invalid("L1 table is too small"));
    }
    if h.l1_size > 0 && !inside(h.l1_table_offset, u64::from(h.l1_size) * 8) {
        return Err(invalid("Invalid L1 table offset"));
    }
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    if rt_bytes > MAX_REFTABLE_BYTES {
        return Err(invalid("Reference count table too large"));
    }
    if h.refcount_table_clusters == 0 {
        return Err(invalid("Image does not contain a reference count table"));
    }
    if !inside(h.refcount_table_offset, rt_bytes) {
        return Err(invalid("Invalid reference count table offset"));
    }
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(invalid("Too many snapshots"));
    }
    if h.nb_snapshots > 0 && !inside(h.snapshots_offset, 0) {
        return Err(invalid("Invalid snapshot table offset"));
    }
    if let Some(b) = &h.bitmaps {
        if b.directory_size > 64 << 20
            || (b.nb_bitmaps > 0 && !inside(b.directory_offset, b.directory_size))
        {
            return Err(invalid(
                "bitmaps_ext: Invalid bitmap directory offset or size",
            ));
        }
    }
    Ok(())
}

fn u64_table(bytes: &[u8]) -> Vec<u64> {
    (0..bytes.len() / 8).map(|i| get_u64(bytes, i)).collect()
}

/// The snapshot table: its length in bytes and each snapshot's L1 table.
async fn read_snapshot_index(file: &NodeRef, h: &Header) -> Result<(Vec<u8>, Vec<(u64, u64)>)> {
    let mut table = Vec::new();
    let mut l1s = Vec::new();
    let mut at = h.snapshots_offset;
    for _ in 0..h.nb_snapshots {
        let fixed = read_vec(file, at, 40).await?;
        if fixed.len() < 40 {
            return Err(invalid("Snapshot table is truncated"));
        }
        let l1_off = get_u64(&fixed, 0);
        let l1_size = u64::from(u32::from_be_bytes([
            fixed[8], fixed[9], fixed[10], fixed[11],
        ]));
        let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra = u64::from(u32::from_be_bytes([
            fixed[36], fixed[37], fixed[38], fixed[39],
        ]));
        if extra > 1024 || l1_size * 8 > MAX_L1_BYTES {
            return Err(invalid("Snapshot table entry is invalid"));
        }
        let len = (40 + extra + id_len + name_len).next_multiple_of(8);
        if table.len() as u64 + len > 64 << 20 || at + len > file.len() {
            return Err(invalid("Snapshot table is too large or truncated"));
        }
        table.extend_from_slice(&read_vec(file, at, len).await?);
        l1s.push((l1_off, l1_size));
        at += len;
    }
    Ok((table, l1s))
}

/// What a qcow2 node takes on and shares of its image (and data) file,
/// given what its parents take and share.
pub(crate) fn storage_perms(perm: Perm, shared: Perm, read_only: bool) -> (Perm, Perm) {
    let mut perm = perm | Perm::CONSISTENT_READ;
    if !read_only {
        perm = perm | Perm::WRITE | Perm::RESIZE;
    }
    (perm, shared & !(Perm::WRITE | Perm::RESIZE))
}

/// Options accepted with little or no effect, checked as qemu does.
fn check_accepted(o: &Qcow2Opts) -> Result<()> {
    if let Some(e) = o.l2_cache_entry_size {
        // TODO(#3): honour smaller L2 cache entries; whole tables are cached.
        if !e.is_power_of_two() || !(512..=2 << 20).contains(&e) {
            return Err(invalid(
                "L2 cache entry size must be a power of two between 512 and the cluster size",
            ));
        }
    }
    // TODO(#3): pass-discard-snapshot (no internal snapshot operations yet).
    let _ = o.pass_discard_snapshot;
    Ok(())
}

/// Options taken out before the rest is parsed.
struct Children {
    backing: Option<Value>,
    data_file: Option<Value>,
}

/// Header checks that depend on how the node is opened.
fn check_open_mode(h: &Header, o: &Qcow2Opts, read_only: bool) -> Result<Kind> {
    if !read_only && h.incompatible & incompat::CORRUPT != 0 {
        return Err(invalid(
            "qcow2: Image is corrupt; cannot be opened read/write",
        ));
    }
    if o.lazy_refcounts == Some(true) && h.version < 3 {
        return Err(invalid(
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
        ));
    }
    if h.incompatible & incompat::COMPRESSION != 0 {
        Kind::from_header(h.compression_type)
            .map_err(|_| invalid(format!("Unknown compression type '{}'", h.compression_type)))
    } else if h.compression_type != 0 {
        Err(invalid(
            "Invalid compression type: compression type bit is not set",
        ))
    } else {
        Ok(Kind::Zlib)
    }
}

/// Tables read at open.
struct Tables {
    l1: Vec<u64>,
    reftable: Vec<u64>,
    snap_table: Vec<u8>,
    snapshot_l1s: Vec<(u64, u64)>,
    info: Info,
}

async fn read_tables(file: &NodeRef, h: &Header) -> Result<Tables> {
    let cs = h.cluster_size();
    let l1 = u64_table(&read_vec(file, h.l1_table_offset, u64::from(h.l1_size) * 8).await?);
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    let reftable = u64_table(&read_vec(file, h.refcount_table_offset, rt_bytes).await?);
    let (snap_table, snapshot_l1s) = read_snapshot_index(file, h).await?;
    let info = Info {
        snapshots: crate::tables::snapshots_json(&snap_table, h.nb_snapshots)?,
        bitmaps: read_bitmaps(file, h).await?,
        data_file_name: h.data_file.clone(),
    };
    Ok(Tables {
        l1,
        reftable,
        snap_table,
        snapshot_l1s,
        info,
    })
}

/// The L2 tables the snapshots' L1 tables point to.
async fn inactive_l2_tables(file: &NodeRef, l1s: &[(u64, u64)]) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for &(off, n) in l1s {
        let raw = read_vec(file, off, n * 8).await?;
        out.extend(
            u64_table(&raw)
                .into_iter()
                .map(|e| e & crate::entries::OFFSET_MASK)
                .filter(|&o| o != 0),
        );
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Clear the autoclear bits we do not keep valid (read-write opens).
async fn clear_autoclear(file: &NodeRef, h: &mut Header) -> Result<()> {
    let keep = h.autoclear & autoclear::MAINTAINED;
    if keep != h.autoclear {
        h.autoclear = keep;
        let buf = IoBuf::from_slice(&keep.to_be_bytes());
        file.write(field::AUTOCLEAR, buf, Default::default())
            .await?;
        file.flush().await?;
    }
    Ok(())
}

pub(crate) async fn open(ctx: &mut OpenCtx<'_>, mut opts: Map<String, Value>) -> Result<Qcow2> {
    let file = ctx.required_child(&mut opts, "file").await?;
    let kids = Children {
        backing: opts.remove("backing"),
        data_file: opts.remove("data-file"),
    };
    let o: Qcow2Opts = ctx.parse(opts)?;
    let name = ctx.node_name().to_string();
    let overlap = overlap_mask(o.overlap_check.as_ref())?;
    check_accepted(&o)?;
    let read_only = ctx.options().read_only;
    let desc = |role: &str| UserDesc {
        who: format!("node '{name}'"),
        role: role.into(),
    };
    let (perm, shared) = storage_perms(Perm::NONE, Perm::ALL, read_only);
    let file_user = file.add_user(desc("file"), perm, shared)?;
    let mut h = read_header(&file).await?;
    let compression = check_open_mode(&h, &o, read_only)?;
    let crypto = crate::crypto::open_crypto(ctx, &file, &h, o.encrypt.as_ref(), &name).await?;
    let (data_file, data_user) =
        open_data_file(ctx, &file, &h, kids.data_file, &desc("data-file")).await?;
    let (backing, backing_user) = open_backing(ctx, &file, &h, kids.backing, &name).await?;
    let t = read_tables(&file, &h).await?;
    if !read_only {
        clear_autoclear(&file, &mut h).await?;
    }
    let layout = Layout {
        cluster_bits: h.cluster_bits,
        extended: h.incompatible & incompat::EXTENDED_L2 != 0,
        zero_flag: h.version >= 3,
        data_file: h.incompatible & incompat::DATA_FILE != 0,
    };
    let cs = h.cluster_size();
    let (l2_bytes, rc_bytes) = cache_sizes(&o, h.size, cs, layout.l2_entry_bytes())?;
    let q = Qcow2 {
        data_file,
        backing,
        file_user,
        data_user,
        _backing_user: backing_user,
        layout,
        compression,
        refcount_order: h.refcount_order,
        size: AtomicU64::new(h.size),
        state: Mutex::new(State {
            l1: t.l1,
            l2: TableCache::new((l2_bytes / cs) as usize),
            claims: HashMap::new(),
        }),
        meta: tokio::sync::Mutex::new(Meta {
            header: h.clone(),
            reftable: t.reftable,
            reftable_dirty: false,
            rc: TableCache::new((rc_bytes / cs) as usize),
            cursor: 0,
            high: file.len().div_ceil(cs),
            l1_dirty: false,
            pending_free: Vec::new(),
            inactive_l2: if overlap & crate::options::overlap::INACTIVE_L2 != 0 {
                inactive_l2_tables(&file, &t.snapshot_l1s).await?
            } else {
                Vec::new()
            },
            snapshot_l1s: t.snapshot_l1s,
            snapshot_table_len: t.snap_table.len() as u64,
            dirty_set: false,
            free_byte: 0,
        }),
        barrier: tokio::sync::RwLock::new(()),
        corrupt: AtomicBool::new(false),
        known_incompat: AtomicU64::new(h.incompatible),
        read_only,
        lazy: !read_only
            && h.version >= 3
            && o.lazy_refcounts
                .unwrap_or(h.compatible & crate::header::compat::LAZY_REFCOUNTS != 0),
        events: ctx.events(),
        node_name: name,
        overlap,
        pass_discard_request: o
            .pass_discard_request
            .unwrap_or(ctx.options().discard_unmap),
        pass_discard_other: o.pass_discard_other.unwrap_or(false),
        discard_no_unref: o.discard_no_unref.unwrap_or(false),
        info: t.info,
        header_copy: h,
        prealloc: std::sync::atomic::AtomicU8::new(0),
        crypto,
        // qemu's default on Linux: ten minutes.
        clean_interval: o.cache_clean_interval.unwrap_or(600),
        file,
    };
    if !read_only && q.header_copy.incompatible & incompat::DIRTY != 0 {
        q.repair_dirty().await?;
    }
    Ok(q)
}

async fn read_bitmaps(file: &NodeRef, h: &Header) -> Result<Option<Value>> {
    let Some(b) = &h.bitmaps else {
        return Ok(None);
    };
    if h.autoclear & autoclear::BITMAPS == 0 || b.nb_bitmaps == 0 {
        return Ok(None);
    }
    let dir = read_vec(file, b.directory_offset, b.directory_size).await?;
    crate::tables::bitmaps_json(&dir, b.nb_bitmaps)
}

/// Directory of the image file, when its node names a real file.
fn image_dir(file: &NodeRef) -> Option<std::path::PathBuf> {
    let name = file.driver().image_info().filename;
    if name.starts_with("json:") || !matches!(file.driver().driver_name(), "file" | "host_device") {
        return None;
    }
    std::path::Path::new(&name)
        .parent()
        .map(std::path::Path::to_path_buf)
}

fn resolve(file: &NodeRef, name: &str) -> String {
    let p = std::path::Path::new(name);
    if p.is_absolute() || name.contains("://") {
        return name.to_string();
    }
    match image_dir(file) {
        Some(dir) => dir.join(p).to_string_lossy().into_owned(),
        None => name.to_string(),
    }
}

/// Guess qcow2 or raw from the first bytes of a file.
fn probe_format(path: &str) -> &'static str {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let ok = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    if ok.is_ok() && u32::from_be_bytes(magic) == crate::header::MAGIC {
        "qcow2"
    } else {
        "raw"
    }
}

async fn open_backing(
    ctx: &mut OpenCtx<'_>,
    file: &NodeRef,
    h: &Header,
    opt: Option<Value>,
    name: &str,
) -> Result<(Option<NodeRef>, Option<PermUser>)> {
    let spec = match opt {
        Some(Value::Null) => return Ok((None, None)),
        Some(Value::String(s)) if s.is_empty() => return Ok((None, None)),
        Some(v) => v,
        None => match &h.backing_file {
            None => return Ok((None, None)),
            Some(b) => {
                let path = resolve(file, b);
                let fmt = h
                    .backing_format
                    .clone()
                    .unwrap_or_else(|| probe_format(&path).into());
                json!({"driver": fmt, "file": {"driver": "file", "filename": path}})
            }
        },
    };
    let node = ctx.child_from("backing", spec).await.map_err(|e| {
        Error::new(
            e.kind(),
            format!("Could not open backing file: {}", e.message()),
        )
    })?;
    let desc = UserDesc {
        who: format!("node '{name}'"),
        role: "backing".into(),
    };
    let user = node.add_user(desc, Perm::CONSISTENT_READ, Perm::ALL & !Perm::WRITE)?;
    Ok((Some(node), Some(user)))
}

async fn open_data_file(
    ctx: &mut OpenCtx<'_>,
    file: &NodeRef,
    h: &Header,
    opt: Option<Value>,
    desc: &UserDesc,
) -> Result<(Option<NodeRef>, Option<PermUser>)> {
    let has = h.incompatible & incompat::DATA_FILE != 0;
    let spec = match (opt, has) {
        (Some(_), false) => {
            return Err(invalid(
                "'data-file' can only be set for images with an external data file",
            ))
        }
        (None, false) => return Ok((None, None)),
        (Some(v), true) => v,
        (None, true) => match &h.data_file {
            Some(n) => json!({"driver": "file", "filename": resolve(file, n)}),
            None => return Err(invalid("'data-file' is required for this image")),
        },
    };
    let node = ctx.child_from("data-file", spec).await?;
    let (perm, shared) = storage_perms(Perm::NONE, Perm::ALL, ctx.options().read_only);
    let user = node.add_user(desc.clone(), perm, shared)?;
    Ok((Some(node), Some(user)))
}

/// The factory for `driver=qcow2`.
#[derive(Debug, Default)]
pub struct Qcow2Factory;
