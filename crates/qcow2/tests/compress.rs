//! Compressed writes (`WriteFlags::compress` and the `compress` filter):
//! qemu's alignment and overwrite rules, packing of several compressed
//! clusters into one host cluster, and refcounts qemu-img check accepts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;
use qsd_block::{ErrorKind, IoBuf, WriteFlags};
use serde_json::json;

const CS: usize = 65536;

fn compressed() -> WriteFlags {
    WriteFlags {
        compress: true,
        ..WriteFlags::default()
    }
}

/// A compressible cluster that differs per `seed`.
fn text(len: usize, seed: u8) -> IoBuf {
    let mut b = IoBuf::new(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = b"qsd compressed cluster "[i % 23].wrapping_add(seed);
    }
    b
}

/// Bytes that do not compress.
fn noise(len: usize) -> IoBuf {
    let mut b = IoBuf::new(len);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for v in b.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *v = x as u8;
    }
    b
}

fn map(path: &Path) -> Vec<serde_json::Value> {
    let out = run(tool("qemu-img").args(["map", "--output=json", "-f", "qcow2", s(path)]));
    serde_json::from_str(&out).unwrap()
}

fn compressed_bytes(path: &Path) -> u64 {
    map(path)
        .iter()
        .filter(|e| e["compressed"] == json!(true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn test_compressed_writes_pack_into_shared_host_clusters() {
    for ct in ["zlib", "zstd"] {
        let dir = tempdir();
        let path = create(
            dir.path(),
            "a.qcow2",
            "4M",
            &format!("compression_type={ct}"),
        );
        let before = std::fs::metadata(&path).unwrap().len();
        let mut g = graph();
        let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
        let blk = backend(&node);
        // 32 clusters in one request, then one more on its own.
        let mut data = IoBuf::new(32 * CS);
        for (i, c) in data.chunks_mut(CS).enumerate() {
            c.copy_from_slice(&text(CS, i as u8));
        }
        blk.write(0, data, compressed()).await.unwrap();
        blk.write(40 * CS as u64, text(CS, 99), compressed())
            .await
            .unwrap();
        drop(blk);
        close(g).await;
        check(&path);
        assert_eq!(compressed_bytes(&path), 33 * CS as u64, "{ct}");
        // Each cluster deflates to a few hundred bytes: all share a few
        // host clusters instead of taking one each.
        let grown = std::fs::metadata(&path).unwrap().len() - before;
        assert!(grown < 4 * CS as u64, "{ct}: the file grew by {grown}");
        let out = qemu_io(&path, &["read -P 0x71 0 1", "read -P 0xd4 2621440 1"]);
        assert!(!out.contains("verification failed"), "{out}");
        let out = qemu_io(&path, &["read -v 0 23"]);
        assert!(out.contains("qsd.compressed.c"), "{ct}: {out}");
    }
}

#[tokio::test]
async fn test_compressed_clusters_overwritten_free_packed_clusters() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "4M", "");
    let raw = dir.path().join("model.raw");
    let mut model = vec![0u8; 4 << 20];
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({"discard": "unmap"})))
        .await
        .unwrap();
    let blk = backend(&node);
    for i in 0..16 {
        let d = text(CS, i as u8);
        model[i * CS..(i + 1) * CS].copy_from_slice(&d);
        blk.write((i * CS) as u64, d, compressed()).await.unwrap();
    }
    // Overwrite some in part (copy-on-write), discard others, rewrite one
    // compressed after its discard.
    for i in [1usize, 5, 6, 15] {
        let at = i * CS + 1000;
        model[at..at + 100].fill(0xee);
        blk.write(at as u64, filled(100, 0xee), WriteFlags::default())
            .await
            .unwrap();
    }
    for i in [2usize, 3, 9] {
        model[i * CS..(i + 1) * CS].fill(0);
        blk.discard((i * CS) as u64, CS as u64).await.unwrap();
    }
    let d = text(CS, 200);
    model[3 * CS..4 * CS].copy_from_slice(&d);
    blk.write(3 * CS as u64, d, compressed()).await.unwrap();
    drop(blk);
    close(g).await;
    std::fs::write(&raw, &model).unwrap();
    check(&path);
    compare(&path, &raw);
}

#[tokio::test]
async fn test_compressed_write_rules_match_qemu() {
    let dir = tempdir();
    // 100 KiB: the last cluster is partial.
    let path = create(dir.path(), "a.qcow2", "100K", "");
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    let blk = backend(&node);
    // Misaligned offset or a length that is not whole clusters: EINVAL.
    let e = blk.write(512, text(CS, 1), compressed()).await.unwrap_err();
    assert_eq!((e.kind(), e.errno()), (ErrorKind::InvalidArgument, 22));
    let e = blk.write(0, text(4096, 1), compressed()).await.unwrap_err();
    assert_eq!(e.errno(), 22);
    // The last, partial cluster may be written on its own.
    blk.write(CS as u64, text(100 * 1024 - CS, 2), compressed())
        .await
        .unwrap();
    blk.write(0, text(CS, 1), compressed()).await.unwrap();
    // Compressed data never overwrites an allocated cluster: EIO.
    let e = blk.write(0, text(CS, 3), compressed()).await.unwrap_err();
    assert_eq!(e.errno(), 5);
    // An empty compressed write rounds the file up to whole sectors.
    let q = qsd_qcow2::qcow2_of(&node).unwrap();
    q.write_compressed(0, IoBuf::new(0)).await.unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len() % 512, 0);
    drop(blk);
    close(g).await;
    check(&path);
    assert_eq!(compressed_bytes(&path), 100 * 1024);
}

#[tokio::test]
async fn test_compressed_write_incompressible_cluster_stored_plain() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "1M", "");
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    let blk = backend(&node);
    blk.write(0, noise(CS), compressed()).await.unwrap();
    blk.write(CS as u64, text(CS, 0), compressed())
        .await
        .unwrap();
    drop(blk);
    close(g).await;
    check(&path);
    let m = map(&path);
    assert_eq!(m[0]["compressed"], json!(false), "{m:?}");
    assert_eq!(compressed_bytes(&path), CS as u64);
}

#[tokio::test]
async fn test_compressed_writes_one_bit_refcounts_do_not_pack() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "1M", "refcount_bits=1");
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    let blk = backend(&node);
    for i in 0..4u64 {
        blk.write(i * CS as u64, text(CS, i as u8), compressed())
            .await
            .unwrap();
    }
    drop(blk);
    close(g).await;
    check(&path);
    assert_eq!(compressed_bytes(&path), 4 * CS as u64);
}

#[tokio::test]
async fn test_compress_filter_over_qcow2_writes_compressed() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "1M", "");
    let mut g = graph();
    let opts =
        json!({"driver": "compress", "node-name": "c", "file": qcow2_opts(&path, json!({}))});
    let node = add(&mut g, opts).await.unwrap();
    assert_eq!(node.driver().limits().request_alignment, CS as u32);
    let blk = backend(&node);
    // Unaligned writes to unallocated clusters are padded, as in qemu.
    blk.write(3 * CS as u64 + 10, filled(100, 4), WriteFlags::default())
        .await
        .unwrap();
    blk.write(0, text(2 * CS, 5), WriteFlags::default())
        .await
        .unwrap();
    let e = blk
        .write(10, filled(10, 1), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.errno(), 5);
    drop(blk);
    close(g).await;
    check(&path);
    assert_eq!(compressed_bytes(&path), 3 * CS as u64);
    let out = qemu_io(&path, &["read -P 4 196618 100", "read -P 0 196608 10"]);
    assert!(!out.contains("verification failed"), "{out}");
}

#[tokio::test]
async fn test_compressed_write_with_data_file_is_unsupported() {
    let dir = tempdir();
    let df = dir.path().join("d.raw");
    let path = create(
        dir.path(),
        "a.qcow2",
        "1M",
        &format!("data_file={}", s(&df)),
    );
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    let blk = backend(&node);
    let e = blk.write(0, text(CS, 1), compressed()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    drop(blk);
    close(g).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_concurrent_compressed_writes_pack_consistently() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "8M", "");
    let raw = dir.path().join("model.raw");
    let mut model = vec![0u8; 8 << 20];
    let mut g = graph();
    let node = add(
        &mut g,
        qcow2_opts(&path, json!({"cache": {"direct": true}})),
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for t in 0..8usize {
        let blk = backend(&node);
        for i in 0..16 {
            let c = i * 8 + t;
            model[c * CS..(c + 1) * CS].copy_from_slice(&text(CS, c as u8));
        }
        tasks.push(tokio::spawn(async move {
            for i in 0..16 {
                let c = i * 8 + t;
                blk.write((c * CS) as u64, text(CS, c as u8), compressed())
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    close(g).await;
    std::fs::write(&raw, &model).unwrap();
    check(&path);
    compare(&path, &raw);
    assert_eq!(compressed_bytes(&path), 128 * CS as u64);
}
