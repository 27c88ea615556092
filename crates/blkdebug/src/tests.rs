//! The drivers through the graph, as the daemon uses them: a `spy` driver
//! (memory plus a log of the requests that reach it) sits below.

use std::sync::{Arc, Mutex};

use qsd_block::mem::MemDriver;
use qsd_block::{
    BlockBackend, BlockDriver, BlockStatus, BoxFut, DebugEvent, DriverFactory, ErrorKind, Graph,
    ImageInfo, IoBuf, NodeRef, OpenCtx, Perm, Result, WriteFlags, ZeroFlags,
};
use qsd_qapi::InputMode;
use serde_json::{json, Map, Value};

type Log = Arc<Mutex<Vec<(&'static str, u64, u64)>>>;

/// Memory of `size` bytes (default 1 MiB) that logs requests, registered
/// under a driver name qsd does not implement (the names are qemu's enum).
struct SpyFactory(Log);

struct Spy {
    mem: MemDriver,
    log: Log,
    zeroes: bool,
}

impl DriverFactory for SpyFactory {
    fn name(&self) -> &'static str {
        "vvfat"
    }

    fn open<'a>(
        &'a self,
        _ctx: &'a mut OpenCtx<'_>,
        opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>> {
        Box::pin(async move {
            let size = opts.get("size").and_then(Value::as_u64).unwrap_or(1 << 20);
            let zeroes = opts.get("zeroes").and_then(Value::as_bool).unwrap_or(true);
            Ok(Box::new(Spy {
                mem: MemDriver::new(size),
                log: self.0.clone(),
                zeroes,
            }) as Box<dyn BlockDriver>)
        })
    }
}

impl Spy {
    fn note(&self, op: &'static str, offset: u64, len: u64) {
        self.log.lock().unwrap().push((op, offset, len));
    }
}

impl BlockDriver for Spy {
    fn driver_name(&self) -> &'static str {
        "vvfat"
    }
    fn len(&self) -> u64 {
        self.mem.len()
    }
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf> {
        self.note("read", offset, buf.len() as u64);
        self.mem.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        self.note("write", offset, buf.len() as u64);
        self.mem.write(offset, buf, flags)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFut<'_, ()> {
        self.note("zero", offset, len);
        if !self.zeroes {
            return Box::pin(async { Err(qsd_block::Error::unsupported("no")) });
        }
        self.mem.write_zeroes(offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> BoxFut<'_, ()> {
        self.note("discard", offset, len);
        self.mem.discard(offset, len)
    }
    fn flush(&self) -> BoxFut<'_, ()> {
        self.note("flush", 0, 0);
        self.mem.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> BoxFut<'_, BlockStatus> {
        self.mem.block_status(offset, len)
    }
    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            filename: "spy://".into(),
            ..ImageInfo::default()
        }
    }
}

fn graph() -> (Graph, Log) {
    let log: Log = Arc::default();
    let mut g = Graph::new();
    qsd_drivers::register_all(&mut g);
    crate::register(&mut g);
    g.register(Arc::new(SpyFactory(log.clone())));
    (g, log)
}

async fn add(g: &mut Graph, opts: Value) -> Result<NodeRef> {
    let Value::Object(m) = opts else {
        panic!("options must be an object")
    };
    g.open(m, InputMode::Qmp).await
}

fn backend(node: &NodeRef) -> BlockBackend {
    BlockBackend::new(node.clone(), "export 'test'", Perm::ALL, Perm::ALL).unwrap()
}

fn taken(log: &Log) -> Vec<(&'static str, u64, u64)> {
    std::mem::take(&mut *log.lock().unwrap())
}

/// blkdebug named `dbg` over a spy, with `extra` options.
fn dbg_opts(extra: Value) -> Value {
    let mut v = json!({"driver": "blkdebug", "node-name": "dbg", "image": {"driver": "vvfat"}});
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    v
}

/// raw named `top` over `dbg_opts(extra)`.
async fn raw_over_dbg(g: &mut Graph, extra: Value) -> NodeRef {
    add(
        g,
        json!({"driver": "raw", "node-name": "top", "file": dbg_opts(extra)}),
    )
    .await
    .unwrap()
}

fn wbuf(len: usize, byte: u8) -> IoBuf {
    let mut b = IoBuf::new(len);
    b.fill(byte);
    b
}

#[tokio::test]
async fn test_raw_read_event_arms_error_with_errno() {
    let (mut g, _) = graph();
    let top = raw_over_dbg(
        &mut g,
        json!({"inject-error": [{"event": "read_aio", "errno": 28}]}),
    )
    .await;
    let blk = backend(&top);
    // writes fire write_aio, which has no rules
    blk.write(0, wbuf(512, 1), WriteFlags::default())
        .await
        .unwrap();
    let err = blk.read(0, IoBuf::new(512)).await.unwrap_err();
    assert_eq!((err.kind(), err.errno()), (ErrorKind::Io, 28));
    assert!(err.message().contains("injected"), "{}", err.message());
    // armed: writes fail too now
    let err = blk
        .write(0, wbuf(512, 1), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(err.errno(), 28);
}

#[tokio::test]
async fn test_set_state_fails_third_write_once() {
    let (mut g, log) = graph();
    let top = raw_over_dbg(
        &mut g,
        json!({
            "inject-error": [{"event": "write_aio", "state": 3, "once": true}],
            "set-state": [
                {"event": "write_aio", "state": 1, "new_state": 2},
                {"event": "write_aio", "state": 2, "new_state": 3},
            ],
        }),
    )
    .await;
    let blk = backend(&top);
    let mut results = Vec::new();
    for i in 0..5u64 {
        let r = blk
            .write(i * 512, wbuf(512, 7), WriteFlags::default())
            .await;
        results.push(r.map(|_| ()).map_err(|e| e.errno()));
    }
    assert_eq!(results, vec![Ok(()), Ok(()), Err(5), Ok(()), Ok(())]);
    let dbg = g.get("dbg").unwrap();
    let driver = (dbg.driver() as &dyn std::any::Any)
        .downcast_ref::<crate::BlkdebugDriver>()
        .unwrap();
    assert_eq!(driver.state(), 3);
    let writes: Vec<u64> = taken(&log).iter().map(|e| e.1).collect();
    assert_eq!(writes, vec![0, 512, 1536, 2048]);
}

#[tokio::test]
async fn test_event_fired_at_blkdebug_node_directly() {
    let (mut g, _) = graph();
    let dbg = add(
        &mut g,
        dbg_opts(json!({"inject-error": [{"event": "l2_update", "sector": 8, "iotype": "read"}]})),
    )
    .await
    .unwrap();
    let blk = backend(&dbg);
    blk.read(4096, IoBuf::new(512)).await.unwrap();
    dbg.debug_event(DebugEvent::L2Update);
    assert!(blk.read(0, IoBuf::new(4096)).await.is_ok());
    assert!(blk
        .write(4096, wbuf(512, 1), WriteFlags::default())
        .await
        .is_ok());
    assert_eq!(blk.read(0, IoBuf::new(8192)).await.unwrap_err().errno(), 5);
}

#[tokio::test]
async fn test_config_file_rules_come_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.ini");
    std::fs::write(
        &path,
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"28\"\n",
    )
    .unwrap();
    let (mut g, _) = graph();
    let top = raw_over_dbg(
        &mut g,
        json!({"config": path.to_str().unwrap(),
               "inject-error": [{"event": "read_aio", "errno": 5}]}),
    )
    .await;
    let err = backend(&top).read(0, IoBuf::new(512)).await.unwrap_err();
    assert_eq!(err.errno(), 28);
    let dbg = g.get("dbg").unwrap();
    assert!(dbg.driver().image_info().filename.starts_with("json:{"));
}

#[tokio::test]
async fn test_config_only_node_has_blkdebug_filename() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.ini");
    std::fs::write(&path, "").unwrap();
    let (mut g, _) = graph();
    let dbg = add(&mut g, dbg_opts(json!({"config": path.to_str().unwrap()})))
        .await
        .unwrap();
    assert_eq!(
        dbg.driver().image_info().filename,
        format!("blkdebug:{}:spy://", path.to_str().unwrap())
    );
}

async fn err(g: &mut Graph, v: Value) -> String {
    add(g, v).await.unwrap_err().to_string()
}

#[tokio::test]
async fn test_open_errors_use_qemu_wording() {
    let (mut g, _) = graph();
    assert_eq!(
        err(&mut g, json!({"driver": "blkdebug", "node-name": "d"})).await,
        "Parameter 'image' is missing"
    );
    assert_eq!(
        err(&mut g, dbg_opts(json!({"align": 3}))).await,
        "Cannot meet constraints with align 3"
    );
    assert_eq!(
        err(
            &mut g,
            dbg_opts(json!({"inject-error": [{"event": "bogus"}]}))
        )
        .await,
        "Parameter 'event' does not accept value 'bogus'"
    );
    assert_eq!(
        err(&mut g, dbg_opts(json!({"config": "/nonexistent/x.ini"}))).await,
        "Could not read blkdebug config file: No such file or directory"
    );
    assert_eq!(
        err(
            &mut g,
            dbg_opts(json!({"set-state": [{"event": "read_aio"}]}))
        )
        .await,
        "Parameter 'set-state[0].new_state' is missing"
    );
    // nothing was left behind by the failures
    assert!(add(&mut g, dbg_opts(json!({}))).await.is_ok());
}

#[tokio::test]
async fn test_keyval_options_are_coerced() {
    let (mut g, _) = graph();
    let v = qsd_qapi::keyval::parse_keyval(
        "driver=blkdebug,node-name=k,image.driver=vvfat,align=4096,max-transfer=65536,\
         inject-error.0.event=read_aio,inject-error.0.once=on,inject-error.0.errno=5",
        None,
    )
    .unwrap();
    let Value::Object(m) = v else { panic!() };
    let node = g.open(m, InputMode::Keyval).await.unwrap();
    let limits = node.driver().limits();
    assert_eq!(
        (limits.request_alignment, limits.max_transfer),
        (4096, 65536)
    );
    let name = node.driver().image_info().filename;
    assert!(name.contains("\"inject-error.0.once\": true"), "{name}");
    assert!(name.contains("\"max-transfer\": 65536"), "{name}");
}

#[tokio::test]
async fn test_max_transfer_splits_reads_and_writes() {
    let (mut g, log) = graph();
    let dbg = add(&mut g, dbg_opts(json!({"max-transfer": 4096})))
        .await
        .unwrap();
    let blk = backend(&dbg);
    blk.write(0, wbuf(10000, 9), WriteFlags::default())
        .await
        .unwrap();
    let got = blk.read(0, IoBuf::new(10000)).await.unwrap();
    assert!(got.iter().all(|&b| b == 9));
    assert_eq!(
        taken(&log),
        vec![
            ("write", 0, 4096),
            ("write", 4096, 4096),
            ("write", 8192, 1808),
            ("read", 0, 4096),
            ("read", 4096, 4096),
            ("read", 8192, 1808),
        ]
    );
}

#[tokio::test]
async fn test_write_zeroes_split_by_granularity() {
    let (mut g, log) = graph();
    let dbg = add(
        &mut g,
        dbg_opts(json!({"opt-write-zero": 4096, "max-write-zero": 8192})),
    )
    .await
    .unwrap();
    let blk = backend(&dbg);
    blk.write_zeroes(1000, 20000, ZeroFlags::default())
        .await
        .unwrap();
    assert_eq!(
        taken(&log),
        vec![
            ("write", 1000, 3096),
            ("zero", 4096, 8192),
            ("zero", 12288, 8192),
            ("write", 20480, 520),
        ]
    );
    // FAST_ZERO cannot be honoured for the unaligned head
    let flags = ZeroFlags {
        no_fallback: true,
        ..ZeroFlags::default()
    };
    let err = blk.write_zeroes(1000, 20000, flags).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
}

#[tokio::test]
async fn test_write_zeroes_child_node_falls_back_when_driver_cannot() {
    let (mut g, log) = graph();
    let dbg = add(
        &mut g,
        json!({"driver": "blkdebug", "node-name": "dbg",
               "image": {"driver": "vvfat", "zeroes": false}, "max-transfer": 4096}),
    )
    .await
    .unwrap();
    backend(&dbg)
        .write_zeroes(0, 8192, ZeroFlags::default())
        .await
        .unwrap();
    // The child's node writes zero buffers itself (its own limits, not
    // blkdebug's max-transfer).
    assert_eq!(taken(&log), vec![("zero", 0, 8192), ("write", 0, 8192)]);
}

#[tokio::test]
async fn test_discard_drops_unaligned_parts() {
    let (mut g, log) = graph();
    let dbg = add(
        &mut g,
        json!({"driver": "blkdebug", "node-name": "dbg", "discard": "unmap",
               "image": {"driver": "vvfat"}, "opt-discard": 4096, "max-discard": 4096}),
    )
    .await
    .unwrap();
    backend(&dbg).discard(100, 10000).await.unwrap();
    assert_eq!(taken(&log), vec![("discard", 4096, 4096)]);
}

#[tokio::test]
async fn test_flush_rule_fails_flush_only() {
    let (mut g, log) = graph();
    let top = raw_over_dbg(
        &mut g,
        json!({"inject-error": [{"event": "flush_to_disk", "iotype": "flush", "errno": 5}]}),
    )
    .await;
    let blk = backend(&top);
    // Nothing written since open: no flush_to_disk, the rule stays quiet.
    blk.flush().await.unwrap();
    blk.write(0, wbuf(512, 1), WriteFlags::default())
        .await
        .unwrap();
    // raw's flush fires flush_to_os/flush_to_disk at blkdebug, then flushes it
    assert_eq!(blk.flush().await.unwrap_err().errno(), 5);
    blk.write(0, wbuf(512, 1), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(taken(&log), vec![("write", 0, 512), ("write", 0, 512)]);
}

#[tokio::test]
async fn test_block_status_rule() {
    let (mut g, _) = graph();
    let dbg = add(
        &mut g,
        dbg_opts(json!({"inject-error": [{"event": "none", "iotype": "block-status"}]})),
    )
    .await
    .unwrap();
    let blk = backend(&dbg);
    dbg.debug_event(DebugEvent::None);
    assert!(dbg.block_status(0, 512).await.is_err());
    assert!(blk.read(0, IoBuf::new(512)).await.is_ok());
}

#[tokio::test]
async fn test_take_child_perms_reach_child() {
    let (mut g, _) = graph();
    let dbg = add(
        &mut g,
        dbg_opts(json!({"take-child-perms": ["resize"], "unshare-child-perms": ["write"]})),
    )
    .await
    .unwrap();
    // as in qemu, permission options are not part of the name
    assert_eq!(dbg.driver().image_info().filename, "blkdebug::spy://");
    let child = dbg.primary_child().unwrap().clone();
    assert!(child.cumulative_perms().0.contains(Perm::RESIZE));
    let _blk =
        BlockBackend::new(dbg.clone(), "export 'r'", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    let (perm, _) = child.cumulative_perms();
    assert!(perm.contains(Perm::RESIZE) && perm.contains(Perm::CONSISTENT_READ));
    // blkdebug does not share write on its child: another writer is refused
    let err = BlockBackend::new(child.clone(), "export 'w'", Perm::WRITE, Perm::ALL);
    assert!(err.is_err());
}

fn verify_opts() -> Value {
    json!({"driver": "blkverify", "node-name": "v",
           "test": {"driver": "vvfat", "node-name": "t"},
           "raw": {"driver": "vvfat", "node-name": "r"}})
}

#[tokio::test]
async fn test_blkverify_writes_both_and_compares_reads() {
    let (mut g, log) = graph();
    let v = add(&mut g, verify_opts()).await.unwrap();
    assert_eq!(v.driver().image_info().filename, "blkverify:spy://:spy://");
    let blk = backend(&v);
    blk.write(0, wbuf(4096, 3), WriteFlags::default())
        .await
        .unwrap();
    let got = blk.read(0, IoBuf::new(4096)).await.unwrap();
    assert!(got.iter().all(|&b| b == 3));
    assert_eq!(taken(&log).len(), 4);
    // make the test child differ
    let t = g.get("t").unwrap();
    t.write(100, wbuf(1, 0xee), WriteFlags::default())
        .await
        .unwrap();
    let err = blk.read(0, IoBuf::new(4096)).await.unwrap_err();
    assert_eq!((err.kind(), err.errno()), (ErrorKind::Io, 5));
    assert_eq!(
        err.message(),
        "blkverify: read offset=0 bytes=4096 contents mismatch at offset 100"
    );
    // other ranges still read fine
    assert!(blk.read(512, IoBuf::new(512)).await.is_ok());
}

#[tokio::test]
async fn test_blkverify_result_mismatch_is_eio() {
    let (mut g, _) = graph();
    let v = add(
        &mut g,
        json!({"driver": "blkverify", "node-name": "v",
               "test": {"driver": "vvfat", "size": 8192},
               "raw": {"driver": "vvfat", "size": 4096}}),
    )
    .await
    .unwrap();
    let err = backend(&v).read(4096, IoBuf::new(512)).await.unwrap_err();
    assert!(
        err.message().contains("return value mismatch 0 != -22"),
        "{}",
        err.message()
    );
    assert_eq!(err.errno(), 5);
}

#[tokio::test]
async fn test_blkverify_passes_events_to_raw_child() {
    let (mut g, _) = graph();
    let v = add(
        &mut g,
        json!({"driver": "blkverify", "node-name": "v",
               "test": {"driver": "vvfat"},
               "raw": dbg_opts(json!({"inject-error": [{"event": "read_aio"}]}))}),
    )
    .await
    .unwrap();
    v.debug_event(DebugEvent::ReadAio);
    let err = backend(&v).read(0, IoBuf::new(512)).await.unwrap_err();
    assert!(err.message().contains("return value mismatch 0 != -5"));
    assert_eq!(
        add(
            &mut g,
            json!({"driver": "blkverify", "node-name": "w", "raw": "t"})
        )
        .await
        .unwrap_err()
        .to_string(),
        "Parameter 'test' is missing"
    );
}
