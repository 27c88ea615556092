//! The `throttle` driver through the graph, as the daemon uses it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qsd_block::mem::MemDriver;
use qsd_block::{BlockBackend, Graph, Perm};
use qsd_qapi::InputMode;
use serde_json::json;
use tokio::time::Instant;

use super::*;
use crate::config::ThrottleLimits;

fn graph() -> Graph {
    let mut g = Graph::new();
    qsd_drivers::register_all(&mut g);
    crate::register(&mut g);
    g.register(Arc::new(FailingFactory));
    g
}

fn add_group(g: &Graph, id: &str, iops: i64) -> Arc<ThrottleGroup> {
    let group = ThrottleGroup::new(&ThrottleLimits {
        iops_total: Some(iops),
        ..ThrottleLimits::default()
    })
    .unwrap();
    g.objects()
        .insert(id, crate::QOM_TYPE, group.clone())
        .unwrap();
    group
}

async fn add(g: &mut Graph, opts: Value) -> Result<NodeRef> {
    let Value::Object(m) = opts else {
        panic!("options must be an object")
    };
    g.open(m, InputMode::Qmp).await
}

fn throttle_opts(name: &str, group: &str) -> Value {
    json!({"driver": "throttle", "node-name": name, "throttle-group": group,
           "file": {"driver": "null-co", "size": 1 << 20}})
}

fn backend(node: &NodeRef) -> BlockBackend {
    BlockBackend::new(node.clone(), "export 'test'", Perm::ALL, Perm::ALL).unwrap()
}

/// A child whose every request fails with EIO (an injected error).
#[derive(Debug)]
struct FailingFactory;

#[derive(Debug)]
struct Failing(MemDriver);

impl DriverFactory for FailingFactory {
    fn name(&self) -> &'static str {
        // A name the schema accepts.
        "blkdebug"
    }
    fn open<'a>(
        &'a self,
        _ctx: &'a mut OpenCtx<'_>,
        _opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>> {
        Box::pin(async { Ok(Box::new(Failing(MemDriver::new(1 << 20))) as Box<dyn BlockDriver>) })
    }
}

fn eio() -> Error {
    Error::io("injected", &std::io::Error::from_raw_os_error(5))
}

impl BlockDriver for Failing {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read(&self, _offset: u64, _buf: IoBuf) -> BoxFut<'_, IoBuf> {
        Box::pin(async { Err(eio()) })
    }
    fn write(&self, _offset: u64, _buf: IoBuf, _flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        Box::pin(async { Err(eio()) })
    }
    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(async { Err(eio()) })
    }
    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            filename: "failing".into(),
            ..ImageInfo::default()
        }
    }
}

#[tokio::test]
async fn test_throttle_open_errors_follow_qemu() {
    let mut g = graph();
    add_group(&g, "g0", 100);
    let e = add(&mut g, throttle_opts("t", "gx")).await.unwrap_err();
    assert_eq!(e.message(), "Throttle group 'gx' does not exist");
    // An object of another type is not a group.
    g.objects().insert("s0", "secret", Arc::new(1u8)).unwrap();
    let e = add(&mut g, throttle_opts("t", "s0")).await.unwrap_err();
    assert_eq!(e.message(), "Throttle group 's0' does not exist");
    let e = add(
        &mut g,
        json!({"driver": "throttle", "node-name": "t", "file": {"driver": "null-co"}}),
    )
    .await
    .unwrap_err();
    assert_eq!(e.message(), "Parameter 'throttle-group' is missing");
    let e = add(
        &mut g,
        json!({"driver": "throttle", "node-name": "t", "throttle-group": "g0"}),
    )
    .await
    .unwrap_err();
    assert_eq!(e.message(), "Parameter 'file' is missing");
    let mut bad = throttle_opts("t", "g0");
    bad["limits"] = json!({});
    let e = add(&mut g, bad).await.unwrap_err();
    assert_eq!(e.message(), "Parameter 'limits' is unexpected");
    // Failed opens leave no implicit children behind.
    assert_eq!(g.nodes().count(), 0);
}

#[tokio::test]
async fn test_throttle_node_holds_group_until_deleted() {
    let mut g = graph();
    let group = add_group(&g, "g0", 100);
    drop(group);
    let node = add(&mut g, throttle_opts("t0", "g0")).await.unwrap();
    let d = (node.driver() as &dyn std::any::Any)
        .downcast_ref::<ThrottleDriver>()
        .unwrap();
    assert_eq!(d.group_name(), "g0");
    assert_eq!(d.group().member_count(), 1);
    assert_eq!(
        node.driver().image_info().filename,
        r#"json:{"throttle-group": "g0", "driver": "throttle", "file": {"driver": "null-co", "size": 1048576}}"#
    );
    assert_eq!(
        g.objects().remove("g0").unwrap_err().message(),
        "object 'g0' is in use, can not be deleted"
    );
    drop(node);
    g.delete("t0").await.unwrap();
    g.objects().remove("g0").unwrap();
}

#[tokio::test]
async fn test_throttle_injected_errors_surface_above() {
    let mut g = graph();
    add_group(&g, "g0", 1000);
    let node = add(
        &mut g,
        json!({"driver": "throttle", "node-name": "t", "throttle-group": "g0",
               "file": {"driver": "blkdebug"}}),
    )
    .await
    .unwrap();
    let blk = backend(&node);
    for _ in 0..3 {
        let e = blk.read(0, IoBuf::new(512)).await.unwrap_err();
        assert_eq!(e.errno(), 5);
        let e = blk
            .write(0, IoBuf::new(512), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(e.errno(), 5);
    }
    assert_eq!(blk.flush().await.unwrap_err().errno(), 5);
}

#[tokio::test(start_paused = true)]
async fn test_throttle_two_nodes_in_one_group_share_limit() {
    let mut g = graph();
    add_group(&g, "g0", 100);
    let a = backend(&add(&mut g, throttle_opts("a", "g0")).await.unwrap());
    let b = backend(&add(&mut g, throttle_opts("b", "g0")).await.unwrap());
    let end = Instant::now() + Duration::from_secs(4);
    let counts: Vec<Arc<AtomicU64>> = [a, b]
        .into_iter()
        .map(|blk| {
            let n = Arc::new(AtomicU64::new(0));
            for _ in 0..4 {
                let (blk, n) = (blk.clone(), n.clone());
                tokio::spawn(async move {
                    while Instant::now() < end {
                        blk.read(0, IoBuf::new(4096)).await.unwrap();
                        if Instant::now() < end {
                            n.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            n
        })
        .collect();
    tokio::time::sleep_until(end + Duration::from_millis(10)).await;
    let (na, nb) = (
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
    );
    assert!((400..=412).contains(&(na + nb)), "{na} + {nb}");
    assert!(na.abs_diff(nb) <= 12, "{na} vs {nb}");
}

#[tokio::test(start_paused = true)]
async fn test_throttle_flush_and_block_status_are_not_throttled() {
    let mut g = graph();
    add_group(&g, "g0", 1);
    let blk = backend(&add(&mut g, throttle_opts("t", "g0")).await.unwrap());
    let start = Instant::now();
    for _ in 0..100 {
        blk.flush().await.unwrap();
        blk.block_status(0, 4096).await.unwrap();
    }
    assert_eq!(Instant::now(), start);
    // Writes and write-zeroes share the write buckets: at 1 IOPS the
    // second waits 0.9 s (the bucket holds a tenth of a second).
    blk.write(0, IoBuf::new(512), WriteFlags::default())
        .await
        .unwrap();
    blk.write_zeroes(0, 512, ZeroFlags::default())
        .await
        .unwrap();
    assert!(Instant::now() - start >= Duration::from_millis(899));
}
