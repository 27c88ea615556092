use qsd_block::{ErrorKind, IoBuf, Perm, WriteFlags, ZeroFlags};
use serde_json::json;

use super::*;

fn file_opts(path: &Path) -> Value {
    json!({"driver": "file", "node-name": "f0", "filename": path_str(path)})
}

#[tokio::test]
async fn test_file_write_then_read_returns_data() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let node = add(&mut g, file_opts(&path)).await.unwrap();
    let blk = backend(&node);
    assert_eq!(blk.len(), 1 << 20);
    blk.write(
        8192,
        filled(4096, 0x5a),
        WriteFlags {
            fua: true,
            ..WriteFlags::default()
        },
    )
    .await
    .unwrap();
    let got = blk.read(8192 - 1, IoBuf::new(4098)).await.unwrap();
    assert_eq!(got[0], 0);
    assert!(got[1..4097].iter().all(|&b| b == 0x5a));
    assert_eq!(got[4097], 0);
    blk.flush().await.unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk[8192..12288].iter().all(|&b| b == 0x5a));
}

#[test]
fn test_file_io_uring_write_then_read_returns_data() {
    let (_dir, path) = image(1 << 20);
    let rt = qsd_rt::build_runtime("drivers-test").unwrap();
    qsd_rt::block_on_with_ring(&rt, async {
        let mut g = graph();
        let opts = json!({"driver": "file", "node-name": "f0", "filename": path_str(&path),
                          "aio": "io_uring"});
        let blk = backend(&add(&mut g, opts).await.unwrap());
        assert_eq!(qsd_rt::current_has_ring(), qsd_rt::io_uring_available());
        blk.write(4096, filled(65536, 7), WriteFlags::default())
            .await
            .unwrap();
        let got = blk.read(4096, IoBuf::new(65536)).await.unwrap();
        assert!(got.iter().all(|&b| b == 7));
        blk.flush().await.unwrap();
    });
}

#[tokio::test]
async fn test_file_direct_unaligned_request_is_padded() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let opts = json!({"driver": "file", "node-name": "f0", "filename": path_str(&path),
                      "cache": {"direct": true}});
    let node = add(&mut g, opts).await.unwrap();
    let align = node.driver().limits().request_alignment;
    assert!(align >= 512 && align.is_power_of_two(), "alignment {align}");
    let blk = backend(&node);
    blk.write(1000, filled(100, 0x11), WriteFlags::default())
        .await
        .unwrap();
    let got = blk.read(999, IoBuf::new(102)).await.unwrap();
    assert_eq!((got[0], got[1], got[100], got[101]), (0, 0x11, 0x11, 0));
}

#[tokio::test]
async fn test_file_read_past_eof_returns_zeroes() {
    let (_dir, path) = image(0);
    std::fs::write(&path, [0xffu8; 1000]).unwrap();
    let mut g = graph();
    let node = add(&mut g, file_opts(&path)).await.unwrap();
    // qemu counts in sectors: 1000 bytes show as 1024.
    assert_eq!(node.len(), 1024);
    let got = backend(&node).read(0, IoBuf::new(1024)).await.unwrap();
    assert!(got[..1000].iter().all(|&b| b == 0xff));
    assert!(got[1000..].iter().all(|&b| b == 0));
}

#[tokio::test]
async fn test_file_discard_punches_hole_seen_by_block_status() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let opts = json!({"driver": "file", "node-name": "f0", "filename": path_str(&path),
                      "discard": "unmap"});
    let blk = backend(&add(&mut g, opts).await.unwrap());
    blk.write(0, filled(1 << 20, 1), WriteFlags::default())
        .await
        .unwrap();
    blk.flush().await.unwrap();
    let st = blk.block_status(0, 1 << 20).await.unwrap();
    assert!(st.data && !st.zero && st.len == 1 << 20, "{st:?}");
    blk.discard(65536, 65536).await.unwrap();
    let st = blk.block_status(65536, 1 << 19).await.unwrap();
    assert!(!st.data && st.zero && st.allocated, "{st:?}");
    assert_eq!(st.len, 65536);
    let st = blk.block_status(0, 1 << 20).await.unwrap();
    assert!(st.data && st.len == 65536, "{st:?}");
    let got = blk.read(65536, IoBuf::new(65536)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0));
}

#[tokio::test]
async fn test_file_write_zeroes_with_and_without_unmap_reads_zeroes() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let opts = json!({"driver": "file", "node-name": "f0", "filename": path_str(&path),
                      "discard": "unmap"});
    let blk = backend(&add(&mut g, opts).await.unwrap());
    blk.write(0, filled(1 << 20, 9), WriteFlags::default())
        .await
        .unwrap();
    let unmap = ZeroFlags {
        may_unmap: true,
        ..ZeroFlags::default()
    };
    blk.write_zeroes(0, 131072, unmap).await.unwrap();
    let st = blk.block_status(0, 1 << 20).await.unwrap();
    assert!(st.zero && !st.data && st.len == 131072, "{st:?}");
    blk.write_zeroes(262144 + 100, 5000, ZeroFlags::default())
        .await
        .unwrap();
    let got = blk.read(262144, IoBuf::new(8192)).await.unwrap();
    assert!(got[..100].iter().all(|&b| b == 9));
    assert!(got[100..5100].iter().all(|&b| b == 0));
    assert!(got[5100..].iter().all(|&b| b == 9));
}

#[tokio::test]
async fn test_file_truncate_grows_and_shrinks() {
    let (_dir, path) = image(65536);
    let mut g = graph();
    let node = add(&mut g, file_opts(&path)).await.unwrap();
    let blk = backend(&node);
    blk.truncate(1 << 20).await.unwrap();
    assert_eq!(node.len(), 1 << 20);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    let st = blk.block_status(65536, 65536).await.unwrap();
    assert!(st.zero && !st.data, "{st:?}");
    blk.truncate(4096).await.unwrap();
    assert_eq!(node.len(), 4096);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
}

#[tokio::test]
async fn test_file_missing_file_reports_like_qemu() {
    let (dir, _path) = image(0);
    let missing = dir.path().join("nope");
    let mut g = graph();
    let err = add(&mut g, file_opts(&missing)).await.unwrap_err();
    assert_eq!(
        err.message(),
        format!(
            "Could not open '{}': No such file or directory",
            missing.display()
        )
    );
    assert_eq!(err.errno(), 2);
}

#[tokio::test]
async fn test_file_kind_mismatch_is_refused() {
    let (_dir, path) = image(4096);
    let mut g = graph();
    let err = add(
        &mut g,
        json!({"driver": "file", "node-name": "a", "filename": "/dev/null"}),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.message(),
        "'file' driver requires '/dev/null' to be a regular file"
    );
    let opts = json!({"driver": "host_device", "node-name": "b", "filename": path_str(&path)});
    let err = add(&mut g, opts).await.unwrap_err();
    assert_eq!(
        err.message(),
        format!(
            "'host_device' driver requires '{}' to be either a character or block device",
            path.display()
        )
    );
}

#[tokio::test]
async fn test_file_host_device_opens_char_device() {
    let mut g = graph();
    let opts = json!({"driver": "host_device", "node-name": "z", "filename": "/dev/zero",
                      "read-only": true});
    let node = add(&mut g, opts).await.unwrap();
    let blk = BlockBackend::new(node, "e", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    assert_eq!(blk.len(), 0);
}

#[tokio::test]
async fn test_file_bad_options_are_refused() {
    let (_dir, path) = image(4096);
    let p = path_str(&path);
    let mut g = graph();
    let err = add(
        &mut g,
        json!({"driver": "file", "node-name": "a", "filename": p,
                                 "aio": "native"}),
    )
    .await
    .unwrap_err();
    assert!(err
        .message()
        .starts_with("aio=native was specified, but it requires cache.direct=on"));
    let err = add(
        &mut g,
        json!({"driver": "file", "node-name": "a", "filename": p,
                                 "pr-manager": "pr0"}),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.message(),
        "No persistent reservation manager with id 'pr0'"
    );
    let err = add(
        &mut g,
        json!({"driver": "file", "node-name": "a", "filename": p,
                                 "bogus": 1}),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    // Every schema member is accepted.
    add(
        &mut g,
        json!({"driver": "file", "node-name": "a", "filename": p, "aio": "threads",
                       "aio-max-batch": 0, "locking": "off", "drop-cache": true,
                       "x-check-cache-dropped": false}),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn test_file_keyval_options_are_coerced() {
    let (_dir, path) = image(4096);
    let mut g = graph();
    let opts = json!({"driver": "file", "node-name": "a", "filename": path_str(&path),
                      "aio-max-batch": "16", "drop-cache": "off", "locking": "auto"});
    let Value::Object(m) = opts else {
        unreachable!()
    };
    g.open(m, InputMode::Keyval).await.unwrap();
}

#[tokio::test]
async fn test_file_read_only_node_refuses_writer_and_reports_info() {
    let (_dir, path) = image(8192);
    let mut g = graph();
    let opts = json!({"driver": "file", "node-name": "f0", "filename": path_str(&path),
                      "read-only": true});
    let node = add(&mut g, opts).await.unwrap();
    let err = BlockBackend::new(node.clone(), "e", Perm::WRITE, Perm::ALL).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
    let info = node.driver().image_info();
    assert_eq!(info.filename, path_str(&path));
    assert_eq!(info.actual_size, Some(0));
}
