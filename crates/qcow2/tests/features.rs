//! Queries, backing chains, compression, data files, resize, corruption
//! handling and options, checked against qemu's tools.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use qsd_block::{ErrorKind, EventSink, IoBuf, WriteFlags};
use serde_json::{json, Value};

fn qemu_info(path: &std::path::Path) -> Value {
    let out = run(tool("qemu-img").args(["info", "--force-share", "--output=json", s(path)]));
    serde_json::from_str(&out).unwrap()
}

#[tokio::test]
async fn test_format_specific_info_matches_qemu_img() {
    let dir = tempdir();
    let cases = [
        ("a.qcow2", ""),
        ("b.qcow2", "compat=0.10"),
        (
            "c.qcow2",
            "extended_l2=on,lazy_refcounts=on,refcount_bits=64",
        ),
        ("d.qcow2", "data_file_raw=on"),
        ("e.qcow2", "compression_type=zstd"),
    ];
    for (name, opts) in cases {
        let opts = if name == "d.qcow2" {
            format!("data_file={},{opts}", s(&dir.path().join("d.raw")))
        } else {
            opts.to_string()
        };
        let path = create(dir.path(), name, "64M", &opts);
        if name == "a.qcow2" {
            run(tool("qemu-img").args(["bitmap", "--add", s(&path), "bm0"]));
        }
        let want = qemu_info(&path);
        let mut g = graph();
        let node = add(&mut g, qcow2_opts(&path, json!({"read-only": true})))
            .await
            .unwrap();
        let info = node.driver().image_info();
        assert_eq!(
            info.format_specific.as_ref(),
            want.get("format-specific"),
            "{name}"
        );
        assert_eq!(info.cluster_size, want["cluster-size"].as_u64(), "{name}");
        assert_eq!(info.dirty_flag, want["dirty-flag"].as_bool(), "{name}");
        assert_eq!(info.filename, s(&path));
        close(g).await;
    }
}

#[tokio::test]
async fn test_snapshots_are_listed_like_qemu_img() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "16M", "");
    run(tool("qemu-img").args(["snapshot", "-c", "snap1", s(&path)]));
    let want = qemu_info(&path);
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({"read-only": true})))
        .await
        .unwrap();
    let info = node.driver().image_info();
    let snaps = info.snapshots.unwrap();
    assert_eq!(snaps[0]["name"], want["snapshots"][0]["name"]);
    assert_eq!(snaps[0]["id"], want["snapshots"][0]["id"]);
    close(g).await;
}

#[tokio::test]
async fn test_writes_after_internal_snapshot_keep_snapshot_data() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "16M", "");
    qemu_io(&path, &["write -P 0x11 0 1M"]);
    run(tool("qemu-img").args(["snapshot", "-c", "snap1", s(&path)]));
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({"overlap-check": "all"})))
        .await
        .unwrap();
    let blk = backend(&node);
    blk.write(4096, filled(8192, 0x22), WriteFlags::default())
        .await
        .unwrap();
    blk.write_zeroes(1 << 19, 1 << 19, Default::default())
        .await
        .unwrap();
    drop(blk);
    close(g).await;
    check(&path);
    let out = qemu_io(
        &path,
        &[
            "read -P 0x11 0 4096",
            "read -P 0x22 4096 8192",
            "read -P 0 512k 512k",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    run(tool("qemu-img").args(["snapshot", "-a", "snap1", s(&path)]));
    let out = qemu_io(&path, &["read -P 0x11 0 1M"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[tokio::test]
async fn test_backing_chain_depth_three_reads_and_status() {
    let dir = tempdir();
    let base = create(dir.path(), "base.qcow2", "4M", "");
    qemu_io(&base, &["write -P 1 0 1M"]);
    let mid = create(
        dir.path(),
        "mid.qcow2",
        "4M",
        "backing_file=base.qcow2,backing_fmt=qcow2",
    );
    qemu_io(&mid, &["write -P 2 1M 1M"]);
    let top = create(
        dir.path(),
        "top.qcow2",
        "4M",
        "backing_file=mid.qcow2,backing_fmt=qcow2",
    );
    qemu_io(&top, &["write -P 3 2M 64k", "write -z 512k 64k"]);
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&top, json!({}))).await.unwrap();
    let blk = backend(&node);
    let got = blk.read(0, IoBuf::new(4 << 20)).await.unwrap();
    let mb: usize = 1 << 20;
    assert!(got[..512 << 10].iter().all(|&b| b == 1));
    assert!(got[512 << 10..576 << 10].iter().all(|&b| b == 0));
    assert!(got[576 << 10..mb].iter().all(|&b| b == 1));
    assert!(got[mb..2 * mb].iter().all(|&b| b == 2));
    assert!(got[2 * mb..2 * mb + 65536].iter().all(|&b| b == 3));
    assert!(got[2 * mb + 65536..].iter().all(|&b| b == 0));
    let st = blk.block_status(0, 1 << 20).await.unwrap();
    assert_eq!(
        (st.allocated, st.depth, st.data, st.len),
        (false, 3, true, 512 << 10)
    );
    let st = blk.block_status(512 << 10, 1 << 20).await.unwrap();
    assert_eq!(
        (st.allocated, st.zero, st.data, st.depth, st.len),
        (true, true, false, 1, 65536)
    );
    let st = blk.block_status(1 << 20, 1 << 20).await.unwrap();
    assert_eq!((st.allocated, st.depth, st.len), (false, 2, mb as u64));
    let st = blk.block_status(2 << 20, 1 << 20).await.unwrap();
    assert_eq!(
        (st.allocated, st.data, st.depth, st.len),
        (true, true, 1, 65536)
    );
    let st = blk.block_status(3 << 20, 1 << 20).await.unwrap();
    assert!(!st.allocated && !st.data && st.zero);
    let info = node.driver().image_info();
    assert_eq!(info.backing_filename.as_deref(), Some("mid.qcow2"));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    // Copy-on-write from the chain into the top layer.
    blk.write((1 << 20) - 512, filled(1024, 9), WriteFlags::default())
        .await
        .unwrap();
    drop(blk);
    close(g).await;
    check(&top);
    let out = qemu_io(
        &top,
        &[
            "read -P 1 589824 458240",
            "read -P 9 1048064 1024",
            "read -P 2 1049088 1047552",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[tokio::test]
async fn test_backing_null_hides_header_backing() {
    let dir = tempdir();
    let base = create(dir.path(), "base.qcow2", "1M", "");
    qemu_io(&base, &["write -P 1 0 1M"]);
    let top = create(
        dir.path(),
        "top.qcow2",
        "1M",
        "backing_file=base.qcow2,backing_fmt=qcow2",
    );
    let mut g = graph();
    let node = add(
        &mut g,
        qcow2_opts(&top, json!({"backing": null, "read-only": true})),
    )
    .await
    .unwrap();
    let got = node.read(0, IoBuf::new(4096)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0));
    close(g).await;
}

#[tokio::test]
async fn test_compressed_clusters_read_and_write() {
    let dir = tempdir();
    let src = create(dir.path(), "src.qcow2", "4M", "");
    qemu_io(&src, &["write -P 0x42 0 2M"]);
    for ct in ["zlib", "zstd"] {
        let path = dir.path().join(format!("c-{ct}.qcow2"));
        run(tool("qemu-img").args([
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ct}"),
            s(&src),
            s(&path),
        ]));
        let mut g = graph();
        let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
        let blk = backend(&node);
        let got = blk.read(0, IoBuf::new(4 << 20)).await.unwrap();
        assert!(got[..2 << 20].iter().all(|&b| b == 0x42), "{ct}");
        assert!(got[2 << 20..].iter().all(|&b| b == 0), "{ct}");
        // Overwrite part of a compressed cluster: copy-on-write decompresses.
        blk.write(100, filled(100, 7), WriteFlags::default())
            .await
            .unwrap();
        let q = qsd_qcow2::qcow2_of(&node).unwrap();
        q.write_compressed(3 << 20, filled(65536, 0x33))
            .await
            .unwrap();
        drop(blk);
        close(g).await;
        check(&path);
        let out = qemu_io(
            &path,
            &[
                "read -P 0x42 0 100",
                "read -P 7 100 100",
                "read -P 0x42 200 2096952",
                "read -P 0x33 3M 64k",
            ],
        );
        assert!(!out.contains("Pattern verification failed"), "{ct}: {out}");
        let map = run(tool("qemu-img").args(["map", "--output=json", s(&path)]));
        assert!(map.contains("\"compressed\": true"), "{map}");
    }
}

#[tokio::test]
async fn test_external_data_file_maps_identity() {
    let dir = tempdir();
    let opts = format!(
        "data_file={},data_file_raw=on",
        s(&dir.path().join("a.raw"))
    );
    let path = create(dir.path(), "a.qcow2", "4M", &opts);
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    let blk = backend(&node);
    blk.write(1 << 20, filled(70000, 0x61), WriteFlags::default())
        .await
        .unwrap();
    drop(blk);
    close(g).await;
    check(&path);
    let raw = std::fs::read(dir.path().join("a.raw")).unwrap();
    assert!(raw[1 << 20..(1 << 20) + 70000].iter().all(|&b| b == 0x61));
    let out = qemu_io(&path, &["read -P 0x61 1M 70000"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[tokio::test]
async fn test_resize_grows_l1_and_shrinks_dropping_data() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "1M", "cluster_size=512");
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    let blk = backend(&node);
    blk.truncate(64 << 20).await.unwrap();
    assert_eq!(node.len(), 64 << 20);
    blk.write(60 << 20, filled(4096, 5), WriteFlags::default())
        .await
        .unwrap();
    blk.write(40 << 20, filled(4096, 6), WriteFlags::default())
        .await
        .unwrap();
    blk.truncate(62 << 20).await.unwrap();
    blk.truncate((40 << 20) + 1024).await.unwrap();
    blk.truncate(48 << 20).await.unwrap();
    let got = blk.read(40 << 20, IoBuf::new(4096)).await.unwrap();
    assert!(got[..1024].iter().all(|&b| b == 6));
    assert!(got[1024..].iter().all(|&b| b == 0));
    drop(blk);
    close(g).await;
    check(&path);
    let info = qemu_info(&path);
    assert_eq!(info["virtual-size"], 48 << 20);
    let out = qemu_io(&path, &["read -P 6 40M 1k", "read -P 0 41944064 3k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[tokio::test]
async fn test_concurrent_writes_to_shared_clusters_stay_consistent() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "8M", "");
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    let blk = backend(&node);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..64u64 {
        let b = blk.clone();
        // Pairs of requests land in the same unallocated cluster.
        let off = (i / 2) * 65536 * 3 % (8 << 20) + (i % 2) * 4096;
        set.spawn(async move {
            b.write(off, filled(4096, i as u8 + 1), WriteFlags::default())
                .await
                .unwrap();
            (off, i as u8 + 1)
        });
    }
    let mut expect = Vec::new();
    while let Some(r) = set.join_next().await {
        expect.push(r.unwrap());
    }
    for (off, byte) in &expect {
        let got = blk.read(*off, IoBuf::new(4096)).await.unwrap();
        assert!(got.iter().all(|b| b == byte), "offset {off}");
    }
    drop(blk);
    close(g).await;
    check(&path);
}

/// Point the first L2 entry past the end of the file.
fn corrupt_l2(path: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut hdr = [0u8; 48];
    f.read_exact_at(&mut hdr, 0).unwrap();
    let l1_off = u64::from_be_bytes(hdr[40..48].try_into().unwrap());
    let mut l1e = [0u8; 8];
    f.read_exact_at(&mut l1e, l1_off).unwrap();
    let l2 = u64::from_be_bytes(l1e) & 0x00ff_ffff_ffff_fe00;
    let bad = (1u64 << 63) | (1u64 << 40);
    f.write_all_at(&bad.to_be_bytes(), l2).unwrap();
}

#[tokio::test]
async fn test_invalid_l2_entry_marks_image_corrupt_and_emits_event() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "4M", "");
    qemu_io(&path, &["write -P 1 0 64k"]);
    corrupt_l2(&path);
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut g = graph();
    let ev = events.clone();
    g.set_event_sink(EventSink::new(move |n, d| {
        ev.lock().unwrap().push((n.to_string(), d))
    }));
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    let blk = backend(&node);
    let err = blk.read(0, IoBuf::new(4096)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    let err = blk
        .write(1 << 20, IoBuf::new(4096), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    {
        let ev = events.lock().unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].0, "BLOCK_IMAGE_CORRUPTED");
        assert_eq!(ev[0].1["node-name"], "q0");
        assert_eq!(ev[0].1["fatal"], true);
        assert_eq!(ev[0].1["device"], "");
    }
    // The corrupt bit reaches the header in the background.
    for _ in 0..100 {
        if qemu_info(&path)["format-specific"]["data"]["corrupt"] == true {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop(blk);
    close(g).await;
    assert_eq!(qemu_info(&path)["format-specific"]["data"]["corrupt"], true);
    let mut g = graph();
    let err = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap_err();
    assert_eq!(
        err.message(),
        "qcow2: Image is corrupt; cannot be opened read/write"
    );
    add(&mut g, qcow2_opts(&path, json!({"read-only": true})))
        .await
        .unwrap();
}

#[tokio::test]
async fn test_open_errors_follow_qemu() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "4M", "");
    let mut g = graph();
    let err = add(&mut g, qcow2_opts(&path, json!({"bogus": 1})))
        .await
        .unwrap_err();
    assert!(err.message().contains("bogus"), "{}", err.message());
    let err = add(
        &mut g,
        qcow2_opts(&path, json!({"overlap-check": "sometimes"})),
    )
    .await
    .unwrap_err();
    assert!(err.message().contains("overlap-check"), "{}", err.message());
    let err = add(
        &mut g,
        qcow2_opts(
            &path,
            json!({"cache-size": 1, "l2-cache-size": 1, "refcount-cache-size": 1}),
        ),
    )
    .await
    .unwrap_err();
    assert!(err.message().contains("may not be set at the same time"));
    let err = add(
        &mut g,
        qcow2_opts(
            &path,
            json!({"encrypt": {"format": "luks", "key-secret": "s"}}),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.message(),
        "No encryption in image header, but options specified format 'luks'"
    );
    let opts = json!({"overlap-check": {"template": "all", "inactive-l2": false}, "lazy-refcounts": false,
                      "pass-discard-request": true, "cache-size": 1048576, "cache-clean-interval": 0});
    add(&mut g, qcow2_opts(&path, opts)).await.unwrap();

    let enc = dir.path().join("enc.qcow2");
    run(tool("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=x",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        s(&enc),
        "1M",
    ]));
    let mut g = graph();
    let err = add(&mut g, qcow2_opts(&enc, json!({}))).await.unwrap_err();
    assert_eq!(
        err.message(),
        "Parameter 'encrypt.key-secret' is required for cipher"
    );

    let raw = dir.path().join("x.raw");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    let err = add(&mut g, qcow2_opts(&raw, json!({}))).await.unwrap_err();
    assert_eq!(err.message(), "Image is not in qcow2 format");
}

#[tokio::test]
async fn test_unknown_incompatible_feature_is_refused_by_name() {
    use std::os::unix::fs::FileExt;
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "4M", "");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&(1u64 << 40).to_be_bytes(), 72).unwrap();
    let mut g = graph();
    let err = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap_err();
    let qemu = tool("qemu-img").args(["info", s(&path)]).output().unwrap();
    let qemu = String::from_utf8_lossy(&qemu.stderr).to_string();
    assert!(
        qemu.contains(err.message()),
        "qemu said {qemu}, we said {}",
        err.message()
    );
}

#[tokio::test]
async fn test_dirty_image_is_repaired_on_read_write_open() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "16M", "lazy_refcounts=on");
    // qemu-io killed mid-session leaves the dirty bit and stale refcounts.
    let _ = tool("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 7 0 3M",
            "-c",
            "sigraise 9",
            s(&path),
        ])
        .output()
        .unwrap();
    assert_eq!(qemu_info(&path)["dirty-flag"], true);
    let mut g = graph();
    let ro = add(&mut g, qcow2_opts(&path, json!({"read-only": true})))
        .await
        .unwrap();
    assert_eq!(ro.driver().image_info().dirty_flag, Some(true));
    close(g).await;
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    assert_eq!(node.driver().image_info().dirty_flag, Some(false));
    let blk = backend(&node);
    blk.write(8 << 20, filled(65536, 8), WriteFlags::default())
        .await
        .unwrap();
    drop(blk);
    close(g).await;
    check(&path);
    assert_eq!(qemu_info(&path)["dirty-flag"], false);
    let out = qemu_io(&path, &["read -P 7 0 3M", "read -P 8 8M 64k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// Writes with tiny caches, then the process "crashes" (nothing flushed
/// or closed): the image may leak but must not be corrupt.
#[tokio::test]
async fn test_unflushed_crash_leaves_no_corruption() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "64M", "cluster_size=4096");
    qemu_io(&path, &["write -P 1 0 8M"]);
    {
        let mut g = graph();
        let opts = json!({"l2-cache-size": 8192, "refcount-cache-size": 16384, "discard": "unmap"});
        let node = add(&mut g, qcow2_opts(&path, opts)).await.unwrap();
        let blk = backend(&node);
        for i in 0..400u64 {
            let off = (i * 7919 * 4096) % (60 << 20);
            blk.write(off, filled(4096, 2), WriteFlags::default())
                .await
                .unwrap();
            if i % 3 == 0 {
                blk.discard((i * 104_729 * 4096) % (8 << 20), 8192)
                    .await
                    .unwrap();
            }
        }
        // Dropped without close: only evictions reached the disk.
        std::mem::forget(blk);
        std::mem::forget(node);
        std::mem::forget(g);
    }
    let out = tool("qemu-img")
        .args(["check", "-U", "-f", "qcow2", s(&path)])
        .output()
        .unwrap();
    let code = out.status.code();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(matches!(code, Some(0 | 3)), "{code:?}: {text}");
}

/// Clear the refcount of the first L2 table (16-bit refcounts).
fn forget_l2_refcount(path: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut hdr = [0u8; 56];
    f.read_exact_at(&mut hdr, 0).unwrap();
    let be = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap());
    let l1_off = be(&hdr[40..48]);
    let rt_off = be(&hdr[48..56]);
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, l1_off).unwrap();
    let l2 = be(&e) & 0x00ff_ffff_ffff_fe00;
    f.read_exact_at(&mut e, rt_off).unwrap();
    let block = be(&e) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&[0, 0], block + 2 * (l2 >> 16)).unwrap();
}

#[tokio::test]
async fn test_overlap_check_stops_allocation_over_l2_table() {
    let dir = tempdir();
    let path = create(dir.path(), "a.qcow2", "64M", "");
    qemu_io(&path, &["write -P 1 0 64k"]);
    forget_l2_refcount(&path);
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut g = graph();
    let ev = events.clone();
    g.set_event_sink(EventSink::new(move |n, d| {
        ev.lock().unwrap().push((n.to_string(), d))
    }));
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    let blk = backend(&node);
    let err = blk
        .write(32 << 20, filled(4096, 2), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(
        err.message().contains("overlaps with active L2 table"),
        "{}",
        err.message()
    );
    let ev = events.lock().unwrap().clone();
    assert_eq!(ev.len(), 1);
    assert_eq!(
        ev[0].1["msg"],
        "Preventing invalid write on metadata (overlaps with active L2 table)"
    );
    let got = blk.read(0, IoBuf::new(65536)).await.unwrap();
    assert!(got.iter().all(|&b| b == 1));
    drop(blk);
    close(g).await;
}

#[tokio::test]
async fn test_image_and_backing_locks_against_qemu_io() {
    let dir = tempdir();
    let base = create(dir.path(), "base.qcow2", "1M", "");
    let top = create(
        dir.path(),
        "top.qcow2",
        "1M",
        "backing_file=base.qcow2,backing_fmt=qcow2",
    );
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&top, json!({}))).await.unwrap();
    let blk = backend(&node);
    let io = |path: &std::path::Path, cmd: &str, ro: bool| {
        let mut c = tool("qemu-io");
        c.args(["-f", "qcow2"]);
        if ro {
            c.arg("-r");
        }
        c.args(["-c", cmd, s(path)]).output().unwrap()
    };
    // The image in use refuses a second writer; the backing file takes
    // readers but not writers.
    assert!(!io(&top, "write 0 4k", false).status.success());
    assert!(io(&base, "read 0 4k", true).status.success());
    let w = io(&base, "write 0 4k", false);
    assert!(
        !w.status.success(),
        "{}",
        String::from_utf8_lossy(&w.stderr)
    );
    drop(blk);
    close(g).await;
    assert!(io(&top, "write 0 4k", false).status.success());
}

/// In a child process: write with lazy refcounts, flush, write more, then
/// exit without closing (a crash as far as the image is concerned).
async fn lazy_crash_writer(path: &std::path::Path) {
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(path, json!({}))).await.unwrap();
    let blk = backend(&node);
    for i in 0..200u64 {
        blk.write(
            (i * 7919 * 4096) % (30 << 20),
            filled(4096, 3),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    }
    blk.flush().await.unwrap();
    assert_eq!(node.driver().image_info().dirty_flag, Some(true));
    blk.write(31 << 20, filled(4096, 4), WriteFlags::default())
        .await
        .unwrap();
    std::process::exit(0);
}

#[tokio::test]
async fn test_lazy_refcounts_set_dirty_bit_and_recover_after_crash() {
    if let Some(p) = std::env::var_os("QSD_QCOW2_CRASH_WRITER") {
        lazy_crash_writer(std::path::Path::new(&p)).await;
    }
    let dir = tempdir();
    let path = create(
        dir.path(),
        "a.qcow2",
        "32M",
        "lazy_refcounts=on,cluster_size=4096",
    );
    let me = std::env::current_exe().unwrap();
    let st = std::process::Command::new(me)
        .args([
            "--exact",
            "test_lazy_refcounts_set_dirty_bit_and_recover_after_crash",
        ])
        .env("QSD_QCOW2_CRASH_WRITER", &path)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(qemu_info(&path)["dirty-flag"], true);
    let mut g = graph();
    let node = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap();
    let blk = backend(&node);
    blk.write(0, filled(4096, 5), WriteFlags::default())
        .await
        .unwrap();
    drop(blk);
    close(g).await;
    assert_eq!(qemu_info(&path)["dirty-flag"], false);
    check(&path);
    let out = qemu_io(&path, &["read -P 5 0 4k", "read -P 3 978944 4k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}
