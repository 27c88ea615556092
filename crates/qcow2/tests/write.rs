//! Writes through qsd checked by `qemu-img check` and `qemu-img compare`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use qsd_block::{IoBuf, WriteFlags, ZeroFlags};
use serde_json::json;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn raw_model(dir: &Path, len: u64) -> std::path::PathBuf {
    let p = dir.join("model.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(len).unwrap();
    p
}

fn model_write(raw: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(raw).unwrap();
    f.write_all_at(data, off).unwrap();
}

/// Random writes, zeroes and discards against a raw model.
async fn random_workload(opts: &str, backing_pattern: bool, seed: u64) {
    let dir = tempdir();
    let size: u64 = 8 << 20;
    let raw = raw_model(dir.path(), size);
    let path = if backing_pattern {
        let base = create(dir.path(), "base.qcow2", "8M", "");
        qemu_io(&base, &["write -P 0x5a 0 8M"]);
        model_write(&raw, 0, &vec![0x5a; size as usize]);
        let o = if opts.is_empty() {
            "backing_file=base.qcow2,backing_fmt=qcow2".to_string()
        } else {
            format!("{opts},backing_file=base.qcow2,backing_fmt=qcow2")
        };
        let p = dir.path().join("top.qcow2");
        run(tool("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", &o, s(&p)]));
        p
    } else {
        create(dir.path(), "a.qcow2", "8M", opts)
    };
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({"discard": "unmap"})))
        .await
        .unwrap();
    let blk = backend(&node);
    let mut rng = Rng(seed);
    for i in 0..300u32 {
        let off = rng.below(size - 1);
        let len = (1 + rng.below(200_000)).min(size - off);
        let off = if rng.below(2) == 0 { off & !511 } else { off };
        let len = if rng.below(2) == 0 {
            len.next_multiple_of(512).min(size - off)
        } else {
            len
        };
        match rng.below(10) {
            0..=5 => {
                let byte = (i % 250) as u8 + 1;
                blk.write(off, filled(len as usize, byte), WriteFlags::default())
                    .await
                    .unwrap();
                model_write(&raw, off, &vec![byte; len as usize]);
            }
            6 | 7 => {
                let flags = ZeroFlags {
                    may_unmap: rng.below(2) == 0,
                    ..ZeroFlags::default()
                };
                blk.write_zeroes(off, len, flags).await.unwrap();
                model_write(&raw, off, &vec![0; len as usize]);
            }
            8 => {
                // Discard is advisory: only check the image stays consistent
                // by rewriting what the model says afterwards.
                blk.discard(off, len).await.unwrap();
                let want = std::fs::read(&raw).unwrap();
                let buf = IoBuf::from_slice(&want[off as usize..(off + len) as usize]);
                blk.write(off, buf, WriteFlags::default()).await.unwrap();
            }
            _ => blk.flush().await.unwrap(),
        }
        if i % 50 == 0 {
            let got = blk.read(off, IoBuf::new(len as usize)).await.unwrap();
            let want = std::fs::read(&raw).unwrap();
            assert!(
                got[..] == want[off as usize..(off + len) as usize],
                "{opts} step {i}"
            );
        }
    }
    drop(blk);
    close(g).await;
    check(&path);
    compare(&path, &raw);
}

#[tokio::test]
async fn test_random_workload_default_image_matches_model() {
    random_workload("", false, 1).await;
}

#[tokio::test]
async fn test_random_workload_small_clusters_and_narrow_refcounts() {
    random_workload("cluster_size=512,refcount_bits=1", false, 2).await;
    random_workload("cluster_size=4096,refcount_bits=64", false, 3).await;
    // 2 MiB of refcount coverage per table cluster: the table must grow.
    random_workload("cluster_size=512,refcount_bits=64", false, 9).await;
}

#[tokio::test]
async fn test_random_workload_v2_and_extended_l2() {
    random_workload("compat=0.10", false, 4).await;
    random_workload("extended_l2=on", false, 5).await;
    random_workload("extended_l2=on,cluster_size=16k", true, 6).await;
}

#[tokio::test]
async fn test_random_workload_over_backing_file() {
    random_workload("", true, 7).await;
    random_workload("compat=0.10", true, 8).await;
}

#[tokio::test]
async fn test_write_then_qemu_reads_back() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "64M", "");
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    let blk = backend(&node);
    blk.write(65536 + 512, filled(200_000, 0xcd), WriteFlags::default())
        .await
        .unwrap();
    blk.flush().await.unwrap();
    drop(blk);
    close(g).await;
    check(&path);
    let out = qemu_io(&path, &["read -P 0xcd 66048 200000", "read -P 0 0 66048"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// Tasks writing interleaved sectors of the same clusters at once: every
/// task's data survives the others' allocations and copy-on-write.
async fn interleaved_writers(opts: &str, backing: bool) {
    const TASKS: u64 = 8;
    let dir = tempdir();
    let size: u64 = 4 << 20;
    let raw = raw_model(dir.path(), size);
    let path = if backing {
        let base = create(dir.path(), "base.qcow2", "4M", "");
        qemu_io(&base, &["write -P 0x77 0 4M"]);
        model_write(&raw, 0, &vec![0x77; size as usize]);
        let o = format!("{opts},backing_file=base.qcow2,backing_fmt=qcow2");
        create(dir.path(), "top.qcow2", "4M", o.trim_start_matches(','))
    } else {
        create(dir.path(), "a.qcow2", "4M", opts)
    };
    let mut g = graph();
    let small = json!({"l2-cache-size": 65536, "refcount-cache-size": 262144});
    let node = add(&mut g, qcow2_opts(&path, small)).await.unwrap();
    let blk = backend(&node);
    let mut set = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let b = blk.clone();
        set.spawn(async move {
            let mut rng = Rng(t + 11);
            let mut done = Vec::new();
            for _ in 0..150 {
                let sector = rng.below(size / 512 / TASKS) * TASKS + t;
                let byte = (t as u8) * 16 + 1 + (rng.below(15) as u8);
                b.write(sector * 512, filled(512, byte), WriteFlags::default())
                    .await
                    .unwrap();
                done.push((sector, byte));
            }
            done
        });
    }
    let flusher = {
        let b = blk.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                b.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    while let Some(r) = set.join_next().await {
        for (sector, byte) in r.unwrap() {
            model_write(&raw, sector * 512, &[byte; 512]);
        }
    }
    flusher.await.unwrap();
    let got = blk.read(0, IoBuf::new(size as usize)).await.unwrap();
    let want = std::fs::read(&raw).unwrap();
    let bad = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(bad.is_none(), "{opts}: first difference at {bad:?}");
    drop(blk);
    close(g).await;
    check(&path);
    compare(&path, &raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_interleaved_concurrent_writers_keep_every_sector() {
    interleaved_writers("", false).await;
    interleaved_writers("cluster_size=4096", true).await;
    interleaved_writers("extended_l2=on,cluster_size=16k", true).await;
    interleaved_writers("extended_l2=on", false).await;
}
