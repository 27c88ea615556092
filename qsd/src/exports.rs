//! Exports: the NBD server and the table of exports behind
//! `--nbd-server`, `--export`, `block-export-*` and `nbd-server-*`; FUSE
//! and vhost-user-blk exports live in the same table.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use qsd_block::{BlockBackend, NodeRef, Perm};
use qsd_export_fuse::{AllowOther, FuseExport, FuseExportOptions};
use qsd_export_nbd::{ExportOptions, ListenAddr, NbdExport, NbdServer, RemoveMode, ServerOptions};
use qsd_export_vhost_user_blk::{VhostAddr, VhostBlkOptions, VhostUserBlkExport};
use qsd_qapi::options::{
    BlockExportDelArgs, BlockExportIothread, BlockExportKind, BlockExportOptions,
    BlockExportOptionsFuse, BlockExportOptionsVhostUserBlk, BlockExportRemoveMode,
    FuseExportAllowOther, NbdServerAddArgs, NbdServerOptions, NbdServerRemoveArgs,
    NbdServerStartArgs, SocketAddress,
};
use qsd_qapi::{InputMode, Raw};
use qsd_qmp::QmpError;
use serde_json::{json, Map, Value};

use crate::commands::generic;
use crate::daemon::Daemon;

/// What kind of export an entry is.
#[derive(Debug)]
enum Kind {
    Nbd(Arc<NbdExport>),
    Fuse(Arc<FuseExport>),
    /// The export and its backend (for statistics); `None` once stopped.
    VhostUserBlk(Option<(VhostUserBlkExport, BlockBackend)>),
}

/// One export in the table.
#[derive(Debug)]
struct Entry {
    id: String,
    node_name: String,
    /// The I/O threads it runs on (several for a vhost-user-blk list).
    iothreads: Vec<String>,
    kind: Kind,
}

impl Entry {
    fn nbd(&self) -> Option<&Arc<NbdExport>> {
        match &self.kind {
            Kind::Nbd(e) => Some(e),
            Kind::Fuse(_) | Kind::VhostUserBlk(_) => None,
        }
    }

    fn is_removed(&self) -> bool {
        match &self.kind {
            Kind::Nbd(e) => e.is_removed(),
            Kind::Fuse(e) => e.is_removed(),
            Kind::VhostUserBlk(v) => v.is_none(),
        }
    }

    fn type_name(&self) -> &'static str {
        match &self.kind {
            Kind::Nbd(_) => "nbd",
            Kind::Fuse(_) => "fuse",
            Kind::VhostUserBlk(_) => "vhost-user-blk",
        }
    }

    /// Statistics JSON of the backend (a removed FUSE export has none).
    fn stats(&self, highest: Option<u64>) -> Option<Value> {
        let json = |s: &qsd_block::stats::Stats| match highest {
            Some(h) => s.to_json_with_highest(h),
            None => s.to_json(),
        };
        match &self.kind {
            Kind::Nbd(e) => Some(json(e.backend().stats())),
            Kind::Fuse(e) => e.backend().map(|b| json(b.stats())),
            Kind::VhostUserBlk(v) => v.as_ref().map(|(_, b)| json(b.stats())),
        }
    }
}

/// The NBD server (if started) and every export.
#[derive(Debug, Default)]
pub struct Exports {
    nbd: Option<NbdServer>,
    list: Vec<Entry>,
}

impl Exports {
    /// `query-block-exports`, newest first as qemu lists them.
    pub fn query(&self) -> Value {
        let list = self
            .list
            .iter()
            .rev()
            .map(|e| {
                json!({"node-name": e.node_name, "shutting-down": e.is_removed(),
                       "type": e.type_name(), "id": e.id})
            })
            .collect();
        Value::Array(list)
    }

    /// `query-blockstats` without `query-nodes`: one entry per export backend.
    pub fn backend_stats(&self) -> Value {
        let list = self
            .list
            .iter()
            .filter_map(|e| {
                let stats = e.stats(None)?;
                Some(json!({"node-name": e.node_name, "stats": stats}))
            })
            .collect();
        Value::Array(list)
    }

    /// A `query-nodes` entry: the node's own `wr_highest_offset`, the
    /// counters of its first export (zeroes if it has none), and its `file`
    /// child's entry as `parent` (qemu's naming).
    pub fn node_stats(&self, node: &NodeRef) -> Value {
        let highest = node.wr_highest_offset();
        let stats = self
            .list
            .iter()
            .filter(|e| e.node_name == node.name())
            .find_map(|e| e.stats(Some(highest)))
            .unwrap_or_else(|| qsd_block::stats::Stats::default().to_json_with_highest(highest));
        let mut entry = json!({"node-name": node.name(), "stats": stats});
        if let Some(file) = node.children().iter().find(|c| c.role == "file") {
            entry["parent"] = self.node_stats(&file.node);
        }
        entry
    }

    /// True when an export runs on I/O thread `id`.
    pub fn uses_iothread(&self, id: &str) -> bool {
        self.list
            .iter()
            .any(|e| e.iothreads.iter().any(|t| t == id))
    }

    fn server(&self) -> Result<&NbdServer> {
        self.nbd
            .as_ref()
            .filter(|s| s.is_running())
            .ok_or_else(|| anyhow!("NBD server not running"))
    }
}

fn listen_addr(addr: SocketAddress) -> Result<ListenAddr> {
    Ok(match addr {
        SocketAddress::Unix(u) => {
            if u.is_abstract == Some(true) {
                bail!("abstract unix sockets are not supported by qsd");
            }
            ListenAddr::Unix(u.path.into())
        }
        SocketAddress::Inet(i) => ListenAddr::Inet {
            host: i.host,
            port: i.port,
        },
        SocketAddress::Fd(f) => {
            let n: i32 =
                f.fd.parse()
                    .map_err(|_| anyhow!("Unable to parse FD number {}", f.fd))?;
            ListenAddr::Fd(qsd_rt::process::take_inherited_fd(n)?)
        }
        SocketAddress::Vsock(_) => bail!("vsock addresses are not supported by qsd"),
    })
}

async fn start_server(d: &Daemon, o: NbdServerOptions) -> Result<()> {
    if o.tls_creds.is_some() || o.tls_authz.is_some() {
        bail!("NBD over TLS is not supported by qsd yet");
    }
    let mut ex = d.exports.lock().await;
    if ex.nbd.as_ref().is_some_and(NbdServer::is_running) {
        bail!("NBD server already running");
    }
    let opts = ServerOptions {
        max_connections: o.max_connections(),
        handshake_max_seconds: o.handshake_max_seconds(),
    };
    let server = NbdServer::new(opts);
    server.start(listen_addr(o.addr)?).await?;
    ex.nbd = Some(server);
    Ok(())
}

/// `--nbd-server`.
pub async fn cli_nbd_server(d: &Daemon, opts: Map<String, Value>, mode: InputMode) -> Result<()> {
    let o: NbdServerOptions = qsd_qapi::from_value(&Value::Object(opts), mode)?;
    start_server(d, o).await
}

/// `nbd-server-start`.
pub async fn qmp_nbd_server_start(
    d: &Arc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let a: NbdServerStartArgs =
        qsd_qapi::from_value(&Value::Object(args), InputMode::Qmp).map_err(generic)?;
    start_server(d, a.into()).await.map_err(generic)?;
    Ok(json!({}))
}

/// `nbd-server-stop`: stop listening and remove every NBD export (hard).
pub async fn qmp_nbd_server_stop(
    d: &Arc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    if !args.is_empty() {
        let k = args.keys().next().cloned().unwrap_or_default();
        return Err(generic(format!("Parameter '{k}' is unexpected")));
    }
    let mut ex = d.exports.lock().await;
    let server = ex.server().map_err(generic)?.clone();
    for (export, gone) in server.stop() {
        let found = ex
            .list
            .iter()
            .find(|e| e.nbd().is_some_and(|n| Arc::ptr_eq(n, &export)));
        if let Some(e) = found {
            watch_gone(d, e.id.clone(), gone.wait());
        }
    }
    ex.nbd = None;
    Ok(json!({}))
}

/// Emit BLOCK_EXPORT_DELETED and forget the export once `gone` resolves
/// (its last client or request is gone).
fn watch_gone(d: &Arc<Daemon>, id: String, gone: impl Future<Output = ()> + Send + 'static) {
    let d = d.clone();
    tokio::spawn(async move {
        gone.await;
        forget(&d, &id).await;
    });
}

/// Drop a gone export from the table and announce it.
async fn forget(d: &Daemon, id: &str) {
    d.exports.lock().await.list.retain(|e| e.id != id);
    d.events.emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
}

impl Exports {
    /// Export ids are unique across all export types.
    fn check_new_id(&self, id: &str) -> Result<()> {
        if self.list.iter().any(|e| e.id == id) {
            bail!("Block export id '{id}' is already in use");
        }
        Ok(())
    }
}

/// The node an export serves, and whether it is exported writable (refused
/// for a read-only node, as qemu).
async fn exportable_node(d: &Daemon, o: &BlockExportOptions) -> Result<(NodeRef, bool)> {
    let node = d.graph.lock().await.lookup(&o.node_name)?;
    let writable = o.writable.unwrap_or(false);
    if writable && node.is_read_only() {
        bail!("Cannot export read-only node as writable");
    }
    Ok((node, writable))
}

/// The runtime an export's requests run on: its I/O thread, or the main loop.
fn export_runtime(d: &Daemon, iothread: Option<&str>) -> Result<tokio::runtime::Handle> {
    match iothread {
        Some(id) => d
            .iothreads()
            .handle(id)
            .ok_or_else(|| anyhow!("iothread \"{id}\" not found")),
        None => Ok(tokio::runtime::Handle::current()),
    }
}

/// `iothread` of an export type that runs on one thread: qemu's string (a
/// list is a vhost-user-blk extension; a one-element list is accepted).
fn single_iothread(o: &BlockExportOptions) -> Result<Option<&str>> {
    match o.iothread.as_ref().map(BlockExportIothread::names) {
        None => Ok(None),
        Some(v) if v.len() == 1 => Ok(Some(v[0])),
        Some(_) => bail!("a list of iothreads is only supported by vhost-user-blk exports"),
    }
}

/// The names in `iothread`, for the export table.
fn iothread_names(o: &BlockExportOptions) -> Vec<String> {
    o.iothread
        .as_ref()
        .map(|t| t.names().into_iter().map(str::to_string).collect())
        .unwrap_or_default()
}

/// What an export takes on its node.
fn export_perm(writable: bool) -> Perm {
    if writable {
        Perm::CONSISTENT_READ | Perm::WRITE
    } else {
        Perm::CONSISTENT_READ
    }
}

/// `--export` and `block-export-add`.
pub async fn add(d: &Daemon, opts: Map<String, Value>, mode: InputMode) -> Result<()> {
    let o = BlockExportOptions::from_raw(&Raw::new(Value::Object(opts), mode))?;
    let nbd = match &o.kind {
        BlockExportKind::Nbd(n) => n.clone(),
        BlockExportKind::Fuse(f) => return add_fuse(d, &o, f).await,
        BlockExportKind::VhostUserBlk(v) => return add_vhost_user_blk(d, &o, v).await,
        BlockExportKind::VduseBlk(_) => bail!("export type 'vduse-blk' is not supported by qsd"),
    };
    if nbd.bitmaps.as_ref().is_some_and(|b| !b.is_empty()) {
        bail!("exporting dirty bitmaps is not supported by qsd yet");
    }
    if o.writethrough == Some(true) {
        bail!("writethrough=on is not supported by qsd yet");
    }
    let mut ex = d.exports.lock().await;
    ex.check_new_id(&o.id)?;
    let server = ex.server()?.clone();
    let (node, writable) = exportable_node(d, &o).await?;
    let io = export_runtime(d, single_iothread(&o)?)?;
    let name = nbd.name.clone().unwrap_or_else(|| o.node_name.clone());
    if server.export(&name).is_some() {
        bail!("NBD server already has export named '{name}'");
    }
    let perm = export_perm(writable);
    let backend = BlockBackend::new(
        node,
        "an unnamed block device",
        perm,
        Perm::ALL & !Perm::RESIZE,
    )?;
    let export = server.add_export(ExportOptions {
        name,
        description: nbd.description.clone(),
        writable,
        backend,
        io,
        allocation_depth: nbd.allocation_depth.unwrap_or(false),
    })?;
    let iothreads = iothread_names(&o);
    ex.list.push(Entry {
        id: o.id,
        iothreads,
        node_name: o.node_name,
        kind: Kind::Nbd(export),
    });
    Ok(())
}

/// `block-export-add type=fuse`: mount the node over a regular file. The
/// common checks and their wording are the NBD path's.
async fn add_fuse(d: &Daemon, o: &BlockExportOptions, f: &BlockExportOptionsFuse) -> Result<()> {
    if o.writethrough == Some(true) {
        bail!("writethrough=on is not supported by qsd yet");
    }
    let mut ex = d.exports.lock().await;
    ex.check_new_id(&o.id)?;
    let (node, writable) = exportable_node(d, o).await?;
    // Without an iothread the export gets a thread of its own, not the
    // main loop (see `FuseExportOptions::io`).
    let io = match single_iothread(o)? {
        Some(id) => Some(export_runtime(d, Some(id))?),
        None => None,
    };
    let mounted_there = |e: &Entry| match &e.kind {
        Kind::Fuse(x) => !x.is_removed() && x.is_mounted_at(&f.mountpoint),
        Kind::Nbd(_) | Kind::VhostUserBlk(_) => false,
    };
    if ex.list.iter().any(mounted_there) {
        bail!("There already is a FUSE export on '{}'", f.mountpoint);
    }
    let opts = FuseExportOptions {
        mountpoint: f.mountpoint.clone(),
        writable,
        growable: f.growable.unwrap_or(false),
        allow_other: match f.allow_other.unwrap_or_default() {
            FuseExportAllowOther::On => AllowOther::On,
            FuseExportAllowOther::Off => AllowOther::Off,
            FuseExportAllowOther::Auto => AllowOther::Auto,
        },
        io,
    };
    // Mounting blocks (mount(2), the FUSE handshake): keep it off this thread.
    let export = tokio::task::spawn_blocking(move || FuseExport::start(node, opts))
        .await
        .map_err(|e| anyhow!("FUSE export set-up failed: {e}"))?
        .map_err(|e| {
            if let qsd_export_fuse::Error::Mount { path, source } = &e {
                tracing::warn!("mounting a FUSE export on '{path}': {source}");
            }
            anyhow!(e)
        })?;
    ex.list.push(Entry {
        id: o.id.clone(),
        node_name: o.node_name.clone(),
        iothreads: iothread_names(o),
        kind: Kind::Fuse(export),
    });
    Ok(())
}

/// The listening socket of a vhost-user-blk export.
fn vhost_addr(addr: &SocketAddress) -> Result<VhostAddr> {
    match listen_addr(addr.clone())? {
        ListenAddr::Unix(path) => Ok(VhostAddr::Path(path)),
        ListenAddr::Fd(fd) => Ok(VhostAddr::Fd(fd)),
        ListenAddr::Inet { .. } => {
            bail!("vhost-user-blk exports need a unix socket (addr.type=unix or fd)")
        }
    }
}

/// `block-export-add type=vhost-user-blk`: serve the node to a VM. The
/// common checks and their wording are the NBD path's.
async fn add_vhost_user_blk(
    d: &Daemon,
    o: &BlockExportOptions,
    v: &BlockExportOptionsVhostUserBlk,
) -> Result<()> {
    let mut ex = d.exports.lock().await;
    ex.check_new_id(&o.id)?;
    let (node, writable) = exportable_node(d, o).await?;
    let rts = vhost_runtimes(d, o)?;
    let mut opts = VhostBlkOptions::new(o.id.clone(), vhost_addr(&v.addr)?);
    opts.writable = writable;
    opts.writethrough = o.writethrough.unwrap_or(false);
    if let Some(size) = v.logical_block_size {
        opts.logical_block_size = u32::try_from(size.0)
            .map_err(|_| anyhow!("logical-block-size must be a power of 2 from 512 to 32768"))?;
    }
    if let Some(n) = v.num_queues {
        opts.num_queues = n;
    }
    let perm = export_perm(writable);
    // Others may resize the node (block_resize): the device then tells the
    // guest (notify_resize), as qemu's vhost-user-blk export does.
    let backend = BlockBackend::new(node, "an unnamed block device", perm, Perm::ALL)?;
    let export = VhostUserBlkExport::start_on(opts, backend.clone(), rts)?;
    ex.list.push(Entry {
        id: o.id.clone(),
        node_name: o.node_name.clone(),
        iothreads: iothread_names(o),
        kind: Kind::VhostUserBlk(Some((export, backend))),
    });
    Ok(())
}

/// The runtimes of a vhost-user-blk export's queues: queue `i` runs on
/// `iothread[i % n]` (`iothread` as a list is a qsd extension), or all on
/// the main loop.
fn vhost_runtimes(d: &Daemon, o: &BlockExportOptions) -> Result<Vec<tokio::runtime::Handle>> {
    let Some(t) = &o.iothread else {
        return Ok(vec![export_runtime(d, None)?]);
    };
    let names = t.names();
    if names.is_empty() {
        bail!("iothread must name at least one I/O thread");
    }
    names
        .into_iter()
        .map(|id| export_runtime(d, Some(id)))
        .collect()
}

/// After a node was resized (block_resize): every vhost-user-blk export
/// whose size changed sends its front-end a config-change message, so the
/// guest sees the new capacity. Exports of other nodes see no change and
/// send nothing, so this may be called after any resize.
pub async fn notify_resize(d: &Daemon) {
    let ex = d.exports.lock().await;
    for e in &ex.list {
        if let Kind::VhostUserBlk(Some((v, _))) = &e.kind {
            v.resize_notify();
        }
    }
}

/// `block-export-add`.
pub async fn qmp_block_export_add(
    d: &Arc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    add(d, args, InputMode::Qmp).await.map_err(generic)?;
    Ok(json!({}))
}

fn remove_mode(m: Option<BlockExportRemoveMode>) -> RemoveMode {
    match m {
        Some(BlockExportRemoveMode::Hard) => RemoveMode::Hard,
        _ => RemoveMode::Safe,
    }
}

async fn remove(d: &Arc<Daemon>, id: &str, mode: RemoveMode) -> Result<()> {
    let ex = d.exports.lock().await;
    let Some(e) = ex.list.iter().find(|e| e.id == id) else {
        bail!("Export '{id}' is not found");
    };
    if e.is_removed() {
        bail!("Export '{id}' is already shutting down");
    }
    let nbd = match &e.kind {
        Kind::Nbd(n) => n,
        Kind::VhostUserBlk(_) => {
            // The front-end is disconnected and requests in flight complete
            // before the export stops (both removal modes).
            drop(ex);
            stop_vhost(d, id).await;
            forget(d, id).await;
            return Ok(());
        }
        Kind::Fuse(f) => {
            // Like qemu: open files do not hold a FUSE export, both modes
            // unmount at once; the event follows when no request is left.
            let gone = f.remove();
            drop(ex);
            if gone.is_gone() {
                forget(d, id).await;
            } else {
                watch_gone(d, id.to_string(), gone.wait());
            }
            return Ok(());
        }
    };
    let server = ex.server()?;
    let gone = server
        .remove_export(nbd.name(), mode)
        .map_err(|err| match err {
            qsd_export_nbd::Error::ExportInUse(_) => {
                anyhow!("export '{id}' still in use")
            }
            other => anyhow!(other),
        })?;
    watch_gone(d, id.to_string(), gone.wait());
    Ok(())
}

/// `block-export-del`.
pub async fn qmp_block_export_del(
    d: &Arc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let a: BlockExportDelArgs =
        qsd_qapi::from_value(&Value::Object(args), InputMode::Qmp).map_err(generic)?;
    remove(d, &a.id, remove_mode(a.mode))
        .await
        .map_err(generic)?;
    Ok(json!({}))
}

/// `nbd-server-add` (deprecated in qemu; the export id is the export name).
pub async fn qmp_nbd_server_add(
    d: &Arc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let a: NbdServerAddArgs =
        qsd_qapi::from_value(&Value::Object(args), InputMode::Qmp).map_err(generic)?;
    if a.bitmap.is_some() {
        return Err(generic(
            "exporting dirty bitmaps is not supported by qsd yet",
        ));
    }
    let name = a.name.clone().unwrap_or_else(|| a.device.clone());
    let mut opts = Map::new();
    opts.insert("type".into(), json!("nbd"));
    opts.insert("id".into(), json!(name));
    opts.insert("node-name".into(), json!(a.device));
    opts.insert("name".into(), json!(name));
    opts.insert("writable".into(), json!(a.writable.unwrap_or(false)));
    if let Some(desc) = a.description {
        opts.insert("description".into(), json!(desc));
    }
    add(d, opts, InputMode::Qmp).await.map_err(generic)?;
    Ok(json!({}))
}

/// `nbd-server-remove`.
pub async fn qmp_nbd_server_remove(
    d: &Arc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let a: NbdServerRemoveArgs =
        qsd_qapi::from_value(&Value::Object(args), InputMode::Qmp).map_err(generic)?;
    let id = {
        let ex = d.exports.lock().await;
        ex.list
            .iter()
            .find(|e| e.nbd().is_some_and(|n| n.name() == a.name))
            .map(|e| e.id.clone())
    };
    let Some(id) = id else {
        return Err(generic(format!("Export '{}' is not found", a.name)));
    };
    remove(d, &id, remove_mode(a.mode)).await.map_err(generic)?;
    Ok(json!({}))
}

/// Stop the vhost-user-blk export `id` (waiting for its requests) and mark
/// it removed.
async fn stop_vhost(d: &Daemon, id: &str) {
    let export = {
        let mut ex = d.exports.lock().await;
        ex.list
            .iter_mut()
            .find(|e| e.id == id)
            .and_then(|e| match &mut e.kind {
                Kind::VhostUserBlk(v) => v.take(),
                _ => None,
            })
    };
    if let Some((export, _backend)) = export {
        export.stop_async().await;
    }
}

/// Daemon shutdown: stop the server, disconnect clients (requests in flight
/// complete first), and wait — bounded — until every export is gone.
pub async fn shutdown(d: &Arc<Daemon>) {
    type Gone = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;
    // Requests held back by throttling go now, so clients are answered and
    // disconnect without waiting for their turn (never ended: we stop).
    for node in d.graph.lock().await.nodes() {
        node.driver().drain_begin();
    }
    let removed = {
        let mut ex = d.exports.lock().await;
        let removed = ex.nbd.take().map(|s| s.stop()).unwrap_or_default();
        let mut ids: Vec<(String, Gone)> = removed
            .into_iter()
            .filter_map(|(exp, gone)| {
                ex.list
                    .iter()
                    .find(|e| e.nbd().is_some_and(|n| Arc::ptr_eq(n, &exp)))
                    .map(|e| (e.id.clone(), Box::pin(gone.wait()) as Gone))
            })
            .collect();
        // vhost-user-blk exports: disconnect the front-ends (below).
        let vhost: Vec<String> = ex
            .list
            .iter()
            .filter(|e| matches!(e.kind, Kind::VhostUserBlk(Some(_))))
            .map(|e| e.id.clone())
            .collect();
        for id in vhost {
            ids.push((id, Box::pin(std::future::ready(()))));
        }
        // FUSE exports: unmount now (a hard removal).
        for e in &ex.list {
            if let Kind::Fuse(f) = &e.kind {
                if !f.is_removed() {
                    ids.push((e.id.clone(), Box::pin(f.remove().wait())));
                }
            }
        }
        ids
    };
    for (id, gone) in removed {
        stop_vhost(d, &id).await;
        if tokio::time::timeout(Duration::from_secs(10), gone)
            .await
            .is_err()
        {
            tracing::warn!(export = %id, "clients did not disconnect within 10 s");
        }
        forget(d, &id).await;
    }
}
