//! Throughput smoke checks (ignored by default; run with
//! `cargo test --release -p qsd-qcow2 --test perf -- --ignored --nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Instant;

use common::*;
use qsd_block::{BlockBackend, IoBuf, WriteFlags};
use serde_json::json;

const QD: u64 = 32;

async fn random_io(blk: &BlockBackend, ops: u64, size: u64, write: bool) -> f64 {
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..QD {
        let b = blk.clone();
        set.spawn(async move {
            let mut x = w.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut buf = IoBuf::new(4096);
            for _ in 0..ops / QD {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (size / 4096)) * 4096;
                buf = if write {
                    b.write(off, buf, WriteFlags::default()).await.unwrap()
                } else {
                    b.read(off, buf).await.unwrap()
                };
            }
        });
    }
    while set.join_next().await.is_some() {}
    ops as f64 / start.elapsed().as_secs_f64()
}

fn on_ring<F: std::future::Future>(f: F) -> F::Output {
    let rt = qsd_rt::build_runtime("perf").unwrap();
    qsd_rt::block_on_with_ring(&rt, f)
}

#[test]
#[ignore = "throughput measurement"]
fn test_perf_random_4k_qcow2_against_raw() {
    let dir = tempdir();
    let size: u64 = 512 << 20;
    let q = create(dir.path(), "a.qcow2", "512M", "preallocation=falloc");
    let raw = dir.path().join("a.raw");
    run(tool("qemu-img").args([
        "create",
        "-q",
        "-f",
        "raw",
        "-o",
        "preallocation=falloc",
        s(&raw),
        "512M",
    ]));
    on_ring(async {
        let mut g = graph();
        let direct = json!({"cache": {"direct": true}});
        let node = add(&mut g, qcow2_opts(&q, direct.clone())).await.unwrap();
        let blk = backend(&node);
        let qr = random_io(&blk, 100_000, size, false).await;
        let qw = random_io(&blk, 100_000, size, true).await;
        let rnode = add(
            &mut g,
            json!({"driver": "raw", "node-name": "r0", "cache": {"direct": true},
            "file": {"driver": "file", "filename": s(&raw)}}),
        )
        .await
        .unwrap();
        let rblk = backend(&rnode);
        let rr = random_io(&rblk, 100_000, size, false).await;
        let rw = random_io(&rblk, 100_000, size, true).await;
        let fresh = create(dir.path(), "b.qcow2", "512M", "");
        let fnode = add(
            &mut g,
            json!({"driver": "qcow2", "node-name": "f0", "cache": {"direct": true},
            "file": {"driver": "file", "filename": s(&fresh)}}),
        )
        .await
        .unwrap();
        let fblk = backend(&fnode);
        let alloc = random_io(&fblk, 20_000, size, true).await;
        println!("4k QD32 IOPS: qcow2 read {qr:.0} (raw {rr:.0}), overwrite {qw:.0} (raw {rw:.0}), allocating write {alloc:.0}");
        drop((blk, rblk, fblk));
        close(g).await;
    });
    check(&dir.path().join("b.qcow2"));
}
