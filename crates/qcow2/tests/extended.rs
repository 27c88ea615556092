//! Subcluster zeroes with extended L2 entries, and cluster 0 of external
//! data files, checked with qemu-img and qemu-io.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use qsd_block::{IoBuf, WriteFlags, ZeroFlags};
use serde_json::{json, Value};

#[tokio::test]
async fn test_extended_l2_partial_zeroes_set_subcluster_zero_bits() {
    let dir = tempdir();
    let base = create(dir.path(), "base.qcow2", "1M", "");
    qemu_io(&base, &["write -P 0x5a 0 1M"]);
    let o = format!(
        "extended_l2=on,cluster_size=64k,backing_file={},backing_fmt=qcow2",
        s(&base)
    );
    let path = create(dir.path(), "top.qcow2", "1M", &o);
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    let blk = backend(&node);
    blk.write(0, filled(65536, 0x11), WriteFlags::default())
        .await
        .unwrap();
    // Subclusters 2..6 of cluster 0 (2 KiB each) plus a ragged edge, and
    // two subclusters of the unallocated cluster 1 (over the backing file).
    blk.write_zeroes(4096, 8192 + 100, ZeroFlags::default())
        .await
        .unwrap();
    blk.write_zeroes(65536 + 2048, 4096, ZeroFlags::default())
        .await
        .unwrap();
    let got = blk.read(0, IoBuf::new(3 * 65536)).await.unwrap();
    let mut want = vec![0x11u8; 65536];
    want.extend(vec![0x5au8; 2 * 65536]);
    want[4096..4096 + 8192 + 100].fill(0);
    want[65536 + 2048..65536 + 6144].fill(0);
    assert!(got[..] == want[..]);
    drop(blk);
    close(g).await;
    check(&path);
    let out = run(tool("qemu-img").args(["map", "--output=json", s(&path)]));
    let map: Vec<Value> = serde_json::from_str(&out).unwrap();
    let zero_at = |start: u64| {
        map.iter().any(|e| {
            e["start"] == start && e["zero"] == true && e["depth"] == 0 && e["data"] == false
        })
    };
    assert!(zero_at(4096), "{out}");
    assert!(zero_at(65536 + 2048), "{out}");
    qemu_io(
        &path,
        &[
            "read -P 0x11 0 4096",
            "read -P 0 4096 8292",
            "read -P 0x11 12388 53148",
            "read -P 0x5a 65536 2048",
            "read -P 0 67584 4096",
        ],
    );
}

#[tokio::test]
async fn test_data_file_guest_cluster_zero_is_host_offset_zero() {
    let dir = tempdir();
    let data = dir.path().join("a.data");
    let path = create(
        dir.path(),
        "a.qcow2",
        "1M",
        &format!("data_file={}", s(&data)),
    );
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    let blk = backend(&node);
    blk.write(512, filled(70000, 0x77), WriteFlags::default())
        .await
        .unwrap();
    let got = blk.read(0, IoBuf::new(80000)).await.unwrap();
    assert!(got[..512].iter().all(|&b| b == 0));
    assert!(got[512..70512].iter().all(|&b| b == 0x77));
    drop(blk);
    close(g).await;
    check(&path);
    qemu_io(&path, &["read -P 0 0 512", "read -P 0x77 512 70000"]);
    let raw = std::fs::read(&data).unwrap();
    assert!(raw[512..70512].iter().all(|&b| b == 0x77));
}
