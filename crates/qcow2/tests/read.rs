//! Opening images qemu made and reading what qemu wrote.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use qsd_block::IoBuf;
use serde_json::json;

async fn read_pattern(size_opts: &str) {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "16M", size_opts);
    qemu_io(
        &path,
        &[
            "write -P 0xab 4096 70000",
            "write -z 1M 128k",
            "write -P 0x11 3M 1M",
        ],
    );
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({"read-only": true})))
        .await
        .unwrap();
    assert_eq!(node.len(), 16 << 20);
    let blk = backend_ro(&node);
    let got = blk.read(0, IoBuf::new(80000)).await.unwrap();
    assert!(got[..4096].iter().all(|&b| b == 0), "{size_opts}");
    assert!(got[4096..74096].iter().all(|&b| b == 0xab), "{size_opts}");
    assert!(got[74096..].iter().all(|&b| b == 0), "{size_opts}");
    let got = blk.read(3 << 20, IoBuf::new(1 << 20)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0x11));
    let got = blk.read((1 << 20) - 512, IoBuf::new(2048)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0));
    close(g).await;
}

fn backend_ro(node: &qsd_block::NodeRef) -> qsd_block::BlockBackend {
    qsd_block::BlockBackend::new(
        node.clone(),
        "export 'test'",
        qsd_block::Perm::CONSISTENT_READ,
        qsd_block::Perm::ALL,
    )
    .unwrap()
}

#[tokio::test]
async fn test_read_qemu_written_data_every_layout() {
    for opts in [
        "",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=2M,refcount_bits=64",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
    ] {
        read_pattern(opts).await;
    }
}
