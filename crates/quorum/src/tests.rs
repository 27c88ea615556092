//! Tests of the quorum driver through the graph, with children that can be
//! corrupted or made to fail.

use std::sync::{Arc, Mutex};

use qsd_block::mem::MemDriver;
use qsd_block::{
    BlockBackend, BlockDriver, BlockStatus, BoxFut, DriverFactory, Error, ErrorKind, EventSink,
    Graph, ImageInfo, NodeRef, OpenCtx, Perm, WriteFlags, ZeroFlags,
};
use qsd_qapi::InputMode;
use qsd_rt::IoBuf;
use serde_json::{json, Map, Value};

use crate::QuorumDriver;

const SIZE: u64 = 1 << 20;

/// What a fake child does wrong.
#[derive(Debug, Default)]
struct Faults {
    read: Option<i32>,
    write: Option<i32>,
    flush: Option<i32>,
    zero_unsupported: bool,
}

/// A handle on one fake child: its memory and its faults.
#[derive(Debug, Clone)]
struct Handle {
    mem: Arc<MemDriver>,
    faults: Arc<Mutex<Faults>>,
}

impl Handle {
    /// Change the child's data behind the quorum's back.
    async fn poke(&self, offset: u64, len: usize, byte: u8) {
        self.mem
            .write(offset, filled(len, byte), WriteFlags::default())
            .await
            .unwrap();
    }

    async fn peek(&self, offset: u64, len: usize) -> Vec<u8> {
        self.mem
            .read(offset, IoBuf::new(len))
            .await
            .unwrap()
            .to_vec()
    }

    fn set(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.faults.lock().unwrap());
    }
}

fn fail(errno: Option<i32>, what: &str) -> qsd_block::Result<()> {
    match errno {
        Some(e) => Err(Error::new(ErrorKind::Io, format!("injected {what} error")).with_errno(e)),
        None => Ok(()),
    }
}

#[derive(Debug)]
struct FaultDriver(Handle);

impl BlockDriver for FaultDriver {
    fn driver_name(&self) -> &'static str {
        "fault"
    }
    fn len(&self) -> u64 {
        self.0.mem.len()
    }
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            fail(self.0.faults.lock().unwrap().read, "read")?;
            self.0.mem.read(offset, buf).await
        })
    }
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            fail(self.0.faults.lock().unwrap().write, "write")?;
            self.0.mem.write(offset, buf, flags).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let (errno, unsupported) = {
                let f = self.0.faults.lock().unwrap();
                (f.write, f.zero_unsupported)
            };
            if unsupported {
                return Err(Error::unsupported("no fast zeroes"));
            }
            fail(errno, "write")?;
            self.0.mem.write_zeroes(offset, len, flags).await
        })
    }
    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(async move { fail(self.0.faults.lock().unwrap().flush, "flush") })
    }
    fn block_status(&self, offset: u64, len: u64) -> BoxFut<'_, BlockStatus> {
        self.0.mem.block_status(offset, len)
    }
    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            filename: "fault://".into(),
            actual_size: Some(4096),
            ..ImageInfo::default()
        }
    }
}

/// Opens fake children; registered as "blkdebug" (a name the schema has).
#[derive(Debug, Default)]
struct FaultFactory(Arc<Mutex<Vec<Handle>>>);

impl DriverFactory for FaultFactory {
    fn name(&self) -> &'static str {
        "blkdebug"
    }
    fn open<'a>(
        &'a self,
        _ctx: &'a mut OpenCtx<'_>,
        opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>> {
        let size = opts.get("size").and_then(Value::as_u64).unwrap_or(SIZE);
        Box::pin(async move {
            let h = Handle {
                mem: Arc::new(MemDriver::new(size)),
                faults: Arc::default(),
            };
            self.0.lock().unwrap().push(h.clone());
            Ok(Box::new(FaultDriver(h)) as Box<dyn BlockDriver>)
        })
    }
}

type Events = Arc<Mutex<Vec<(String, Value)>>>;

struct Env {
    g: Graph,
    events: Events,
    kids: Arc<Mutex<Vec<Handle>>>,
}

impl Env {
    fn new() -> Self {
        let mut g = Graph::new();
        qsd_drivers::register_all(&mut g);
        crate::register(&mut g);
        let kids: Arc<Mutex<Vec<Handle>>> = Arc::default();
        g.register(Arc::new(FaultFactory(kids.clone())));
        let events: Events = Arc::default();
        let ev = events.clone();
        g.set_event_sink(EventSink::new(move |n, d| {
            ev.lock().unwrap().push((n.to_string(), d));
        }));
        Env { g, events, kids }
    }

    async fn add(&mut self, opts: Value) -> qsd_block::Result<NodeRef> {
        let Value::Object(m) = opts else {
            panic!("options must be an object")
        };
        self.g.open(m, InputMode::Qmp).await
    }

    /// `n` fake children f0..f(n-1) and quorum `q` over them.
    async fn quorum(&mut self, n: usize, extra: Value) -> NodeRef {
        let mut names = Vec::new();
        for i in 0..n {
            let name = format!("f{i}");
            self.add(json!({"driver": "blkdebug", "node-name": name}))
                .await
                .unwrap();
            names.push(Value::String(name));
        }
        let mut opts = json!({"driver": "quorum", "node-name": "q", "children": names});
        if let (Value::Object(o), Value::Object(e)) = (&mut opts, extra) {
            o.extend(e);
        }
        self.add(opts).await.unwrap()
    }

    fn kid(&self, i: usize) -> Handle {
        self.kids.lock().unwrap()[i].clone()
    }

    fn take_events(&self) -> Vec<(String, Value)> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

fn filled(len: usize, byte: u8) -> IoBuf {
    let mut b = IoBuf::new(len);
    b.fill(byte);
    b
}

fn backend(node: &NodeRef) -> BlockBackend {
    BlockBackend::new(node.clone(), "export 'test'", Perm::ALL, Perm::ALL).unwrap()
}

fn reader(node: &NodeRef) -> BlockBackend {
    BlockBackend::new(
        node.clone(),
        "export 'ro'",
        Perm::CONSISTENT_READ,
        Perm::ALL,
    )
    .unwrap()
}

fn quorum_of(node: &NodeRef) -> &QuorumDriver {
    (node.driver() as &dyn std::any::Any)
        .downcast_ref::<QuorumDriver>()
        .unwrap()
}

async fn fill_all(env: &Env, n: usize, byte: u8) {
    for i in 0..n {
        env.kid(i).poke(0, SIZE as usize, byte).await;
    }
}

fn bad(op: &str, node: &str, sector: u64, count: u64, error: Option<&str>) -> (String, Value) {
    let mut d = json!({"type": op});
    if let Some(e) = error {
        d["error"] = e.into();
    }
    d["node-name"] = node.into();
    d["sector-num"] = sector.into();
    d["sectors-count"] = count.into();
    ("QUORUM_REPORT_BAD".into(), d)
}

fn failure(sector: u64, count: u64) -> (String, Value) {
    (
        "QUORUM_FAILURE".into(),
        json!({"reference": "q", "sector-num": sector, "sectors-count": count}),
    )
}

#[tokio::test]
async fn test_read_all_children_agree_returns_data_without_events() {
    let mut env = Env::new();
    let q = env.quorum(3, json!({"vote-threshold": 2})).await;
    fill_all(&env, 3, 0x11).await;
    let got = reader(&q).read(4000, IoBuf::new(1000)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0x11));
    assert!(env.take_events().is_empty());
}

#[tokio::test]
async fn test_read_corrupted_child_is_outvoted_and_reported() {
    let mut env = Env::new();
    let q = env.quorum(3, json!({"vote-threshold": 2})).await;
    fill_all(&env, 3, 0x11).await;
    env.kid(1).poke(4096, 512, 0x22).await;
    let got = reader(&q).read(4000, IoBuf::new(1000)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0x11));
    assert_eq!(env.take_events(), vec![bad("read", "f1", 7, 3, None)]);
    // Without rewrite-corrupted the child keeps its bad data.
    assert_eq!(env.kid(1).peek(4096, 1).await, vec![0x22]);
}

#[tokio::test]
async fn test_read_rewrite_corrupted_repairs_the_losers() {
    let mut env = Env::new();
    let q = env
        .quorum(4, json!({"vote-threshold": 2, "rewrite-corrupted": true}))
        .await;
    fill_all(&env, 4, 0x11).await;
    env.kid(0).poke(0, 512, 0x22).await;
    env.kid(2).poke(100, 1, 0x33).await;
    let got = reader(&q).read(0, IoBuf::new(4096)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0x11));
    // Losers reported newest version first, as qemu lists them.
    assert_eq!(
        env.take_events(),
        vec![bad("read", "f2", 0, 8, None), bad("read", "f0", 0, 8, None)]
    );
    for i in 0..4 {
        assert!(env.kid(i).peek(0, 4096).await.iter().all(|&b| b == 0x11));
    }
}

#[tokio::test]
async fn test_read_majority_wins_even_against_first_child() {
    let mut env = Env::new();
    let q = env.quorum(3, json!({"vote-threshold": 2})).await;
    fill_all(&env, 3, 0x11).await;
    env.kid(1).poke(0, 512, 0x22).await;
    env.kid(2).poke(0, 512, 0x22).await;
    let got = reader(&q).read(0, IoBuf::new(512)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0x22));
    assert_eq!(env.take_events(), vec![bad("read", "f0", 0, 1, None)]);
}

#[tokio::test]
async fn test_read_without_majority_fails_eio_with_quorum_failure() {
    let mut env = Env::new();
    let q = env.quorum(3, json!({"vote-threshold": 2})).await;
    env.kid(1).poke(8192, 512, 0x22).await;
    env.kid(2).poke(8192, 512, 0x33).await;
    let e = reader(&q).read(8192, IoBuf::new(512)).await.unwrap_err();
    assert_eq!(e.errno(), 5);
    assert_eq!(env.take_events(), vec![failure(16, 1)]);
}

#[tokio::test]
async fn test_read_error_is_outvoted_and_reported_with_its_text() {
    let mut env = Env::new();
    let q = env.quorum(3, json!({"vote-threshold": 2})).await;
    fill_all(&env, 3, 0x11).await;
    env.kid(1).set(|f| f.read = Some(5));
    let got = reader(&q).read(1000, IoBuf::new(1000)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0x11));
    assert_eq!(
        env.take_events(),
        vec![bad("read", "f1", 1, 3, Some("Input/output error"))]
    );
}

#[tokio::test]
async fn test_read_too_many_errors_fails_with_voted_errno() {
    let mut env = Env::new();
    let q = env.quorum(3, json!({"vote-threshold": 2})).await;
    env.kid(0).set(|f| f.read = Some(28));
    env.kid(2).set(|f| f.read = Some(28));
    let e = reader(&q).read(0, IoBuf::new(512)).await.unwrap_err();
    assert_eq!(e.errno(), 28);
    let ev = env.take_events();
    assert_eq!(ev.len(), 3);
    assert_eq!(ev[2], failure(0, 1));
}

#[tokio::test]
async fn test_fifo_reads_first_child_and_falls_back_on_error() {
    let mut env = Env::new();
    // rewrite-corrupted is accepted and ignored in fifo mode, as in qemu.
    let q = env
        .quorum(
            3,
            json!({"vote-threshold": 2, "read-pattern": "fifo", "rewrite-corrupted": true}),
        )
        .await;
    fill_all(&env, 3, 0x11).await;
    env.kid(0).poke(0, 512, 0x22).await;
    let blk = reader(&q);
    let got = blk.read(0, IoBuf::new(512)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0x22));
    assert!(env.take_events().is_empty());
    env.kid(0).set(|f| f.read = Some(5));
    let got = blk.read(0, IoBuf::new(512)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0x11));
    assert_eq!(
        env.take_events(),
        vec![bad("read", "f0", 0, 1, Some("Input/output error"))]
    );
    for i in 1..3 {
        env.kid(i).set(|f| f.read = Some(5));
    }
    assert_eq!(blk.read(0, IoBuf::new(512)).await.unwrap_err().errno(), 5);
    // Each child is reported; fifo raises no QUORUM_FAILURE.
    assert_eq!(env.take_events().len(), 3);
}

#[tokio::test]
async fn test_write_goes_to_every_child() {
    let mut env = Env::new();
    let q = env.quorum(3, json!({"vote-threshold": 2})).await;
    let blk = backend(&q);
    blk.write(1000, filled(1000, 0x55), WriteFlags::default())
        .await
        .unwrap();
    for i in 0..3 {
        assert!(env.kid(i).peek(1000, 1000).await.iter().all(|&b| b == 0x55));
    }
    blk.write_zeroes(1000, 500, ZeroFlags::default())
        .await
        .unwrap();
    for i in 0..3 {
        assert!(env.kid(i).peek(1000, 500).await.iter().all(|&b| b == 0));
    }
    assert!(env.take_events().is_empty());
}

#[tokio::test]
async fn test_write_error_below_threshold_is_reported_and_succeeds() {
    let mut env = Env::new();
    let q = env.quorum(3, json!({"vote-threshold": 2})).await;
    env.kid(1).set(|f| f.write = Some(28));
    backend(&q)
        .write(1000, filled(1000, 0x55), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(
        env.take_events(),
        vec![bad("write", "f1", 1, 3, Some("No space left on device"))]
    );
}

#[tokio::test]
async fn test_write_errors_above_threshold_fail_with_quorum_failure() {
    let mut env = Env::new();
    let q = env.quorum(3, json!({"vote-threshold": 2})).await;
    env.kid(0).set(|f| f.write = Some(5));
    env.kid(1).set(|f| f.write = Some(28));
    let e = backend(&q)
        .write(0, filled(512, 1), WriteFlags::default())
        .await
        .unwrap_err();
    // A tie between errors goes to the one seen last, as in qemu.
    assert_eq!(e.errno(), 28);
    let ev = env.take_events();
    assert_eq!(ev.len(), 3);
    assert_eq!(ev[2], failure(0, 1));
}

#[tokio::test]
async fn test_fast_zero_unsupported_by_a_child_fails_without_events() {
    let mut env = Env::new();
    let q = env.quorum(2, json!({"vote-threshold": 1})).await;
    env.kid(1).set(|f| f.zero_unsupported = true);
    let flags = ZeroFlags {
        no_fallback: true,
        ..ZeroFlags::default()
    };
    let e = backend(&q).write_zeroes(0, 4096, flags).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(env.take_events().is_empty());
}

#[tokio::test]
async fn test_flush_errors_are_reported_with_empty_range() {
    let mut env = Env::new();
    let q = env.quorum(3, json!({"vote-threshold": 2})).await;
    let blk = backend(&q);
    env.kid(2).set(|f| f.flush = Some(5));
    // A child with nothing written since its last flush is not flushed
    // (qemu's write generation): write first.
    let write = || blk.write(0, filled(512, 1), WriteFlags::default());
    write().await.unwrap();
    blk.flush().await.unwrap();
    assert_eq!(
        env.take_events(),
        vec![bad("flush", "f2", 0, 0, Some("Input/output error"))]
    );
    env.kid(1).set(|f| f.flush = Some(5));
    write().await.unwrap();
    assert_eq!(blk.flush().await.unwrap_err().errno(), 5);
    // No QUORUM_FAILURE for flushes.
    assert_eq!(env.take_events().len(), 2);
}

#[tokio::test]
async fn test_block_status_zero_only_where_all_children_read_zero() {
    let mut env = Env::new();
    let q = env.quorum(2, json!({"vote-threshold": 1})).await;
    let blk = reader(&q);
    assert_eq!(
        blk.block_status(0, SIZE).await.unwrap(),
        BlockStatus::hole(SIZE)
    );
    env.kid(1).poke(8192, 10, 1).await;
    assert_eq!(
        blk.block_status(0, SIZE).await.unwrap(),
        BlockStatus::hole(8192)
    );
    assert_eq!(
        blk.block_status(8192, SIZE - 8192).await.unwrap(),
        BlockStatus::data(4096)
    );
}

#[tokio::test]
async fn test_blkverify_mismatch_fails_read_with_eio() {
    let mut env = Env::new();
    let q = env
        .quorum(2, json!({"vote-threshold": 2, "blkverify": true}))
        .await;
    env.kid(1).poke(100, 1, 7).await;
    let err = reader(&q).read(0, IoBuf::new(4096)).await.unwrap_err();
    assert_eq!(err.errno(), 5);
    assert_eq!(
        err.message(),
        "quorum: offset=0 bytes=4096 contents mismatch at offset 100"
    );
}

#[tokio::test]
async fn test_blkverify_equal_children_read_fine() {
    let mut env = Env::new();
    let q = env
        .quorum(2, json!({"vote-threshold": 2, "blkverify": true}))
        .await;
    let blk = backend(&q);
    blk.write(0, filled(4096, 5), WriteFlags::default())
        .await
        .unwrap();
    let got = blk.read(0, IoBuf::new(4096)).await.unwrap();
    assert!(got.iter().all(|&b| b == 5));
}

async fn open_err(opts: Value) -> String {
    let mut env = Env::new();
    for i in 0..3 {
        env.add(json!({"driver": "blkdebug", "node-name": format!("f{i}")}))
            .await
            .unwrap();
    }
    let mut o = json!({"driver": "quorum", "node-name": "q"});
    if let (Value::Object(o), Value::Object(e)) = (&mut o, opts) {
        o.extend(e);
    }
    env.add(o).await.unwrap_err().message().to_string()
}

#[tokio::test]
async fn test_bad_options_give_qemu_errors() {
    let three = json!(["f0", "f1", "f2"]);
    let cases = [
        (
            json!({"vote-threshold": 4, "children": three}),
            "threshold may not exceed children count",
        ),
        (
            json!({"vote-threshold": 0, "children": three}),
            "Parameter 'vote-threshold' expects a value >= 1",
        ),
        (
            json!({"vote-threshold": 1, "children": []}),
            "Number of provided children must be 1 or more",
        ),
        (
            json!({"children": three}),
            "Parameter 'vote-threshold' is missing",
        ),
        (
            json!({"vote-threshold": 1}),
            "Parameter 'children' is missing",
        ),
        (
            json!({"vote-threshold": 2, "children": three, "blkverify": true}),
            "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
        ),
        (
            json!({"vote-threshold": 2, "children": ["f0", "f1"], "blkverify": true,
                   "rewrite-corrupted": true}),
            "rewrite-corrupted=on cannot be used with blkverify=on",
        ),
        (
            json!({"vote-threshold": 2, "children": ["f0", "nope"]}),
            "Cannot find device='nope' nor node-name='nope'",
        ),
        (
            json!({"vote-threshold": 2, "children": ["f0", "f1"], "read-pattern": "bad"}),
            "Parameter 'read-pattern' does not accept value 'bad'",
        ),
        (
            json!({"vote-threshold": "2", "children": ["f0", "f1"]}),
            "Invalid parameter type for 'vote-threshold', expected: integer",
        ),
        (
            json!({"vote-threshold": 2, "children": ["f0", 3]}),
            "Invalid parameter type for 'null', expected: BlockdevRef",
        ),
        (
            json!({"vote-threshold": 2, "children": ["f0", "f1"], "foo": 1}),
            "Parameter 'foo' is unexpected",
        ),
        (
            json!({"vote-threshold": 1, "children": ["f0", {"driver": "blkdebug", "size": 4096}]}),
            "Could not refresh total sector count: Input/output error",
        ),
        (
            json!({"vote-threshold": 2, "read-only": true, "rewrite-corrupted": true,
                   "children": ["f0", {"driver": "blkdebug"}]}),
            "Block node is read-only",
        ),
    ];
    for (opts, want) in cases {
        assert_eq!(open_err(opts.clone()).await, want, "options {opts}");
    }
}

#[tokio::test]
async fn test_same_node_twice_and_fifo_blkverify_are_accepted() {
    let mut env = Env::new();
    env.add(json!({"driver": "blkdebug", "node-name": "f0"}))
        .await
        .unwrap();
    env.add(
        json!({"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                   "children": ["f0", "f0"]}),
    )
    .await
    .unwrap();
    env.add(json!({"driver": "quorum", "node-name": "q2", "vote-threshold": 1,
                   "read-pattern": "fifo", "blkverify": true,
                   "children": [{"driver": "blkdebug"}, {"driver": "blkdebug"}, {"driver": "blkdebug"}]}))
        .await
        .unwrap();
}

#[tokio::test]
async fn test_children_unshare_write_and_rewrite_takes_write() {
    let mut env = Env::new();
    let q = env.quorum(2, json!({"vote-threshold": 2})).await;
    let f0 = env.g.get("f0").unwrap();
    assert_eq!(
        f0.cumulative_perms(),
        (Perm::NONE, Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED)
    );
    let _blk = backend(&q);
    assert_eq!(f0.cumulative_perms().0, Perm::ALL);
    let e = BlockBackend::new(f0.clone(), "export 'x'", Perm::WRITE, Perm::ALL).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionConflict);

    let mut env = Env::new();
    let _q = env
        .quorum(2, json!({"vote-threshold": 2, "rewrite-corrupted": true}))
        .await;
    let f1 = env.g.get("f1").unwrap();
    assert_eq!(f1.cumulative_perms().0, Perm::WRITE);
}

#[tokio::test]
async fn test_add_and_remove_child_follow_qemu_names_and_errors() {
    let mut env = Env::new();
    let q = env.quorum(3, json!({"vote-threshold": 2})).await;
    for i in 3..5 {
        env.add(json!({"driver": "blkdebug", "node-name": format!("f{i}")}))
            .await
            .unwrap();
    }
    let qd = quorum_of(&q);
    qd.remove_child("children.1").unwrap();
    let e = qd.remove_child("children.1").unwrap_err();
    assert_eq!(e.message(), "Node 'q' does not have child 'children.1'");
    let f3 = env.g.get("f3").unwrap();
    assert_eq!(qd.add_child(f3.clone()).unwrap(), "children.3");
    let e = qd.add_child(f3).unwrap_err();
    assert_eq!(e.message(), "The node f3 already has a parent");
    let f1 = env.g.get("f1").unwrap();
    assert!(f1.user_names().is_empty(), "removed child keeps no user");
    assert_eq!(qd.add_child(f1).unwrap(), "children.4");
    let names: Vec<String> = qd.children().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["children.0", "children.2", "children.3", "children.4"]
    );
    // Removing the newest child frees its index; others do not.
    qd.remove_child("children.4").unwrap();
    qd.remove_child("children.0").unwrap();
    let e = qd.remove_child("children.2").unwrap_err();
    assert_eq!(
        e.message(),
        "The number of children cannot be lower than the vote threshold 2"
    );
    let f4 = env.g.get("f4").unwrap();
    assert_eq!(qd.add_child(f4).unwrap(), "children.4");
    // The new child is written and read like the others.
    let blk = backend(&q);
    blk.write(0, filled(512, 9), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(env.kid(4).peek(0, 1).await, vec![9]);
    assert_eq!(env.kid(1).peek(0, 1).await, vec![0]);
    assert_eq!(env.g.get("f4").unwrap().cumulative_perms().0, Perm::ALL);
}

#[tokio::test]
async fn test_add_child_in_blkverify_mode_is_refused() {
    let mut env = Env::new();
    let q = env
        .quorum(2, json!({"vote-threshold": 2, "blkverify": true}))
        .await;
    let f = env
        .add(json!({"driver": "blkdebug", "node-name": "extra"}))
        .await
        .unwrap();
    let e = quorum_of(&q).add_child(f).unwrap_err();
    assert_eq!(
        e.message(),
        "Cannot add a child to a quorum in blkverify mode"
    );
}

#[tokio::test]
async fn test_image_info_json_name_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = Env::new();
    let mut kids = Vec::new();
    for i in 0..2 {
        let p = dir.path().join(format!("c{i}.raw"));
        std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
        kids.push(p.to_str().unwrap().to_string());
    }
    env.add(json!({"driver": "file", "node-name": "f0", "filename": kids[0]}))
        .await
        .unwrap();
    let q = env
        .add(json!({"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                    "read-pattern": "quorum", "rewrite-corrupted": false, "blkverify": false,
                    "children": ["f0", {"driver": "raw", "file": {"driver": "file", "filename": kids[1]}},
                                 {"driver": "null-co", "size": SIZE}]}))
        .await
        .unwrap();
    let want = format!(
        r#"json:{{"read-pattern": "quorum", "children": [{{"driver": "file", "filename": "{}"}}, {{"driver": "raw", "file": {{"driver": "file", "filename": "{}"}}}}, {{"driver": "null-co", "size": 1048576}}], "driver": "quorum", "blkverify": false, "rewrite-corrupted": false, "vote-threshold": 2}}"#,
        kids[0], kids[1]
    );
    let info = q.driver().image_info();
    assert_eq!(info.filename, want);
    assert_eq!(q.len(), SIZE);
}
