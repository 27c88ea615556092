//! Damaged images: errors are fine, panics and hangs are not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use qsd_block::{IoBuf, WriteFlags};
use serde_json::json;

async fn exercise(path: &std::path::Path, read_only: bool) {
    let mut g = graph();
    let Ok(node) = add(&mut g, qcow2_opts(path, json!({"read-only": read_only}))).await else {
        return;
    };
    let len = node.len().min(4 << 20);
    let _ = node.read(0, IoBuf::new(len as usize)).await;
    let mut off = 0;
    while off < len {
        match node.block_status(off, len - off).await {
            Ok(st) => off += st.len,
            Err(_) => break,
        }
    }
    if !read_only {
        let _ = node
            .write(4096, IoBuf::new(70000), WriteFlags::default())
            .await;
        let _ = node
            .write_zeroes(1 << 20, 1 << 20, Default::default())
            .await;
        let _ = node.flush().await;
    }
    let _ = node.driver().image_info();
    g.close_all().await;
}

#[tokio::test]
async fn test_damaged_metadata_never_panics_or_hangs() {
    let dir = tempdir();
    let good = create(dir.path(), "good.qcow2", "4M", "cluster_size=4096");
    qemu_io(&good, &["write -P 1 0 1M", "write -z 2M 64k"]);
    run(tool("qemu-img").args(["snapshot", "-c", "s1", s(&good)]));
    let image = std::fs::read(&good).unwrap();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for round in 0..120 {
        let path = dir.path().join(format!("bad{round}.qcow2"));
        std::fs::write(&path, &image).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        for _ in 0..(1 + round % 40) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Damage the metadata clusters at the start of the image.
            let at = x % (12 * 4096);
            f.write_all_at(&[(x >> 32) as u8], at).unwrap();
        }
        drop(f);
        let ro = tokio::time::timeout(Duration::from_secs(20), exercise(&path, true)).await;
        assert!(ro.is_ok(), "round {round} hung (read-only)");
        let rw = tokio::time::timeout(Duration::from_secs(20), exercise(&path, false)).await;
        assert!(rw.is_ok(), "round {round} hung (read-write)");
    }
}
