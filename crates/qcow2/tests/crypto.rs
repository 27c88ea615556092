//! Encrypted images (LUKS and the legacy AES method) made and checked by
//! qemu-img and qemu-io: each side reads what the other wrote.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;
use qsd_block::{Graph, IoBuf, WriteFlags, ZeroFlags};
use serde_json::json;

const SECRET: &str = "secret,id=s0,data=hunter2";

fn graph_with_secret() -> Graph {
    let g = graph();
    g.secrets()
        .insert("s0", zeroize::Zeroizing::new(b"hunter2".to_vec()))
        .unwrap();
    g.secrets()
        .insert("bad", zeroize::Zeroizing::new(b"wrong".to_vec()))
        .unwrap();
    g
}

fn image_opts(path: &Path, format: &str) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.format={format},encrypt.key-secret=s0",
        s(path)
    )
}

/// An encrypted image, optionally over a backing file.
fn create_encrypted(dir: &Path, format: &str, backing: Option<&Path>) -> std::path::PathBuf {
    let path = dir.join(format!("{format}.qcow2"));
    let mut o = format!("encrypt.format={format},encrypt.key-secret=s0");
    if format == "luks" {
        o.push_str(",encrypt.iter-time=10");
    }
    if let Some(b) = backing {
        o.push_str(&format!(",backing_file={},backing_fmt=qcow2", s(b)));
    }
    run(tool("qemu-img")
        .args(["create", "-q", "--object", SECRET, "-f", "qcow2", "-o", &o])
        .args([s(&path), "8M"]));
    path
}

fn qemu_io_enc(path: &Path, format: &str, cmds: &[&str]) -> String {
    let mut cmd = tool("qemu-io");
    cmd.args(["--object", SECRET, "--image-opts"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(image_opts(path, format)))
}

fn check_enc(path: &Path, format: &str) {
    let text = run(tool("qemu-img").args([
        "check",
        "--object",
        SECRET,
        "--image-opts",
        &image_opts(path, format),
    ]));
    assert!(!text.contains("leaked"), "{text}");
}

fn compare_enc(path: &Path, format: &str, raw: &Path) {
    run(tool("qemu-img").args([
        "compare",
        "--object",
        SECRET,
        "--image-opts",
        &image_opts(path, format),
        &format!("driver=raw,file.filename={}", s(raw)),
    ]));
}

fn enc_opts(path: &Path, format: &str, secret: &str) -> serde_json::Value {
    qcow2_opts(
        path,
        json!({"encrypt": {"format": format, "key-secret": secret}}),
    )
}

/// qemu-io writes, qsd reads them and writes over them (partial sectors,
/// partial clusters over a backing file, zeroes), qemu reads the result.
async fn round_trip(format: &str) {
    let dir = tempdir();
    let base = create(dir.path(), "base.qcow2", "8M", "");
    qemu_io(&base, &["write -P 0x5a 0 8M"]);
    let backing = (format == "luks").then_some(base.as_path());
    let path = create_encrypted(dir.path(), format, backing);
    qemu_io_enc(
        &path,
        format,
        &["write -P 0x11 64k 200k", "write -P 0x22 3M 64k"],
    );
    let fill = if backing.is_some() { 0x5a } else { 0 };
    let mut model = vec![fill; 8 << 20];
    model[64 << 10..264 << 10].fill(0x11);
    model[3 << 20..(3 << 20) + (64 << 10)].fill(0x22);

    let mut g = graph_with_secret();
    let node = add(&mut g, enc_opts(&path, format, "s0")).await.unwrap();
    let info = node.driver().image_info();
    assert!(info.encrypted);
    let fs = info.format_specific.unwrap();
    assert_eq!(fs["data"]["encrypt"]["format"], format);
    let blk = backend(&node);
    let all = blk.read(0, IoBuf::new(8 << 20)).await.unwrap();
    assert!(all[..] == model[..], "qsd reads what qemu wrote");
    for (off, len, byte) in [
        (1000u64, 5000u64, 0x33u8),
        (4 << 20, 70_000, 0x44),
        (100_000, 300, 0x55),
        (3 << 20, 4096, 0x66),
    ] {
        blk.write(off, filled(len as usize, byte), WriteFlags::default())
            .await
            .unwrap();
        model[off as usize..(off + len) as usize].fill(byte);
    }
    blk.write_zeroes(6 << 20, 1 << 20, ZeroFlags::default())
        .await
        .unwrap();
    model[6 << 20..7 << 20].fill(0);
    let all = blk.read(0, IoBuf::new(8 << 20)).await.unwrap();
    assert!(all[..] == model[..], "qsd reads back its writes");
    drop(blk);
    close(g).await;
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    compare_enc(&path, format, &raw);
    check_enc(&path, format);
}

#[tokio::test]
async fn test_luks_image_with_backing_round_trips_with_qemu() {
    round_trip("luks").await;
}

#[tokio::test]
async fn test_aes_image_round_trips_with_qemu() {
    round_trip("aes").await;
}

#[tokio::test]
async fn test_luks_image_errors_match_qemu() {
    let dir = tempdir();
    let path = create_encrypted(dir.path(), "luks", None);
    let mut g = graph_with_secret();
    let err = |e: qsd_block::Error| e.message().to_string();
    let e = add(&mut g, qcow2_opts(&path, json!({}))).await.unwrap_err();
    assert_eq!(
        err(e),
        "Parameter 'encrypt.key-secret' is required for cipher"
    );
    let e = add(&mut g, enc_opts(&path, "luks", "bad"))
        .await
        .unwrap_err();
    assert_eq!(err(e), "Invalid password, cannot unlock any keyslot");
    let e = add(&mut g, enc_opts(&path, "aes", "s0")).await.unwrap_err();
    assert_eq!(
        err(e),
        "Header reported 'luks' encryption format but options specify 'aes'"
    );
    let e = add(
        &mut g,
        qcow2_opts(&path, json!({"encrypt": {"key-secret": "s0"}})),
    )
    .await
    .unwrap_err();
    assert_eq!(err(e), "Parameter 'encrypt.format' is missing");
    let plain = create(dir.path(), "plain.qcow2", "1M", "");
    let e = add(&mut g, enc_opts(&plain, "luks", "s0"))
        .await
        .unwrap_err();
    assert_eq!(
        err(e),
        "No encryption in image header, but options specified format 'luks'"
    );
}
