//! The NBD server against a hand-written client over a UNIX socket, with the
//! export on a separate I/O thread; and against libnbd's tools when present.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{io_thread, Client, Fixture, SIZE};
use qsd_export_nbd::{Error, RemoveMode, ServerOptions};
use qsd_nbd_proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NONE: CommandFlags = CommandFlags::EMPTY;

#[tokio::test]
async fn test_structured_write_read_roundtrip_with_holes() {
    let io = io_thread();
    let f = Fixture::new(ServerOptions::default()).await;
    f.add("disk", true, &io);
    let mut c = Client::open(&f.path, "disk", true, &["base:allocation"]).await;
    assert_eq!(c.size, SIZE);
    assert!(c
        .flags
        .contains(TransmissionFlags::SEND_DF | TransmissionFlags::CAN_MULTI_CONN));
    let data = vec![0xabu8; 4096];
    let r = c
        .call(CommandType::Write, CommandFlags::FUA, 8192, 4096, &data)
        .await;
    assert_eq!(r.error, 0);
    // Small read: one data chunk.
    let r = c.call(CommandType::Read, NONE, 8192, 4096, &[]).await;
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(Client::assemble(&r, 8192, 4096), data);
    // Big read: holes are sent as holes.
    let r = c.call(CommandType::Read, NONE, 0, 128 * 1024, &[]).await;
    let kinds: Vec<_> = r.chunks.iter().map(|c| c.0).collect();
    assert_eq!(
        kinds,
        vec![
            ChunkType::OffsetHole,
            ChunkType::OffsetData,
            ChunkType::OffsetHole
        ]
    );
    let got = Client::assemble(&r, 0, 128 * 1024);
    assert_eq!(&got[8192..12288], &data[..]);
    assert!(got[..8192].iter().chain(&got[12288..]).all(|&b| b == 0));
    // DF: a single data chunk even over holes.
    let r = c
        .call(CommandType::Read, CommandFlags::DF, 0, 128 * 1024, &[])
        .await;
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(Client::assemble(&r, 0, 128 * 1024), got);
}

#[tokio::test]
async fn test_block_status_reports_holes_and_req_one() {
    let io = io_thread();
    let f = Fixture::new(ServerOptions::default()).await;
    f.add("disk", true, &io);
    let mut c = Client::open(
        &f.path,
        "disk",
        true,
        &["base:allocation", "qemu:allocation-depth"],
    )
    .await;
    c.call(CommandType::Write, NONE, 4096, 4096, &[1u8; 4096])
        .await;
    let r = c.call(CommandType::BlockStatus, NONE, 0, 65536, &[]).await;
    assert_eq!(r.chunks.len(), 2);
    let (kind, p) = &r.chunks[0];
    assert_eq!(*kind, ChunkType::BlockStatus);
    // context 0, extents: hole 4096, data 4096, hole 57344
    let words: Vec<u32> = p
        .chunks(4)
        .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
        .collect();
    assert_eq!(words, vec![0, 4096, 3, 4096, 0, 57344, 3]);
    let r = c
        .call(
            CommandType::BlockStatus,
            CommandFlags::REQ_ONE,
            0,
            65536,
            &[],
        )
        .await;
    let words: Vec<u32> = r.chunks[0]
        .1
        .chunks(4)
        .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
        .collect();
    assert_eq!(words, vec![0, 4096, 3]);
}

#[tokio::test]
async fn test_simple_replies_and_error_codes() {
    let io = io_thread();
    let f = Fixture::new(ServerOptions::default()).await;
    f.add("disk", true, &io);
    f.add("ro", false, &io);
    let mut c = Client::open(&f.path, "disk", false, &[]).await;
    assert!(!c.flags.contains(TransmissionFlags::SEND_DF));
    c.call(CommandType::Write, NONE, 0, 3, b"abc").await;
    let r = c.call(CommandType::Read, NONE, 0, 3, &[]).await;
    assert_eq!((r.error, &r.data[..]), (0, &b"abc"[..]));
    let cases = [
        (CommandType::Read, NONE, SIZE, 1, 22),
        (CommandType::WriteZeroes, NONE, SIZE - 1, 2, 22),
        (CommandType::Read, CommandFlags::DF, 0, 1, 22),
        (CommandType::BlockStatus, NONE, 0, 512, 22),
        (CommandType::Unknown(42), NONE, 0, 0, 22),
        (CommandType::Read, NONE, 0, MAX_PAYLOAD + 1, 22),
    ];
    for (cmd, flags, off, len, errno) in cases {
        let r = c.call(cmd, flags, off, len, &[]).await;
        assert_eq!(r.error, errno, "{cmd:?} {flags:?}");
    }
    for cmd in [
        CommandType::Flush,
        CommandType::Trim,
        CommandType::Cache,
        CommandType::WriteZeroes,
    ] {
        let r = c.call(cmd, CommandFlags::FUA, 0, 512, &[]).await;
        assert_eq!(r.error, 0, "{cmd:?}");
    }
    let r = c.call(CommandType::Read, NONE, 0, 3, &[]).await;
    assert_eq!(r.data, vec![0, 0, 0]);

    let mut ro = Client::open(&f.path, "ro", true, &[]).await;
    assert!(ro.flags.contains(TransmissionFlags::READ_ONLY));
    let r = ro.call(CommandType::Write, NONE, 0, 2, b"xy").await;
    assert_eq!(r.error, 1);
    assert_eq!(r.chunks[0].0, ChunkType::Error);
    let r = ro.call(CommandType::Trim, NONE, 0, 512, &[]).await;
    assert_eq!(r.error, 1);
}

#[tokio::test]
async fn test_pipelined_requests_all_answered() {
    let io = io_thread();
    let f = Fixture::new(ServerOptions::default()).await;
    f.add("disk", true, &io);
    let mut c = Client::open(&f.path, "disk", true, &[]).await;
    let n = 200u64;
    let mut batch = Vec::new();
    for i in 0..n {
        let data = vec![i as u8; 4096];
        Request {
            flags: NONE,
            command: CommandType::Write,
            cookie: i,
            offset: i * 4096,
            length: 4096,
        }
        .encode(&mut batch);
        batch.extend_from_slice(&data);
    }
    c.s.write_all(&batch).await.unwrap();
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (cookie, r) = c.reply(0).await;
        assert_eq!(r.error, 0);
        seen[cookie as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
    for i in 0..n {
        c.send(CommandType::Read, NONE, 1000 + i, i * 4096, 4096, &[])
            .await;
    }
    for _ in 0..n {
        let (cookie, r) = c.reply(4096).await;
        let i = cookie - 1000;
        assert!(Client::assemble(&r, i * 4096, 4096)
            .iter()
            .all(|&b| b == i as u8));
    }
    c.send(CommandType::Disc, NONE, 0, 0, 0, &[]).await;
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).await.unwrap(), 0);
}

#[tokio::test]
async fn test_bad_magic_closes_only_that_connection() {
    let io = io_thread();
    let f = Fixture::new(ServerOptions::default()).await;
    f.add("disk", true, &io);
    let mut bad = Client::open(&f.path, "disk", true, &[]).await;
    bad.s.write_all(&[0u8; 28]).await.unwrap();
    let mut b = [0u8; 1];
    assert_eq!(bad.s.read(&mut b).await.unwrap(), 0);
    let mut good = Client::open(&f.path, "disk", true, &[]).await;
    assert_eq!(
        good.call(CommandType::Flush, NONE, 0, 0, &[]).await.error,
        0
    );
}

#[tokio::test]
async fn test_short_write_payload_closes_connection() {
    let io = io_thread();
    let f = Fixture::new(ServerOptions::default()).await;
    let export = f.add("disk", true, &io);
    let mut c = Client::open(&f.path, "disk", true, &[]).await;
    let mut v = Vec::new();
    Request {
        flags: NONE,
        command: CommandType::Write,
        cookie: 1,
        offset: 0,
        length: 4096,
    }
    .encode(&mut v);
    v.extend_from_slice(&[1; 100]);
    c.s.write_all(&v).await.unwrap();
    c.s.shutdown().await.unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).await.unwrap(), 0);
    for _ in 0..100 {
        if export.client_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("session did not end");
}

#[tokio::test]
async fn test_remove_export_safe_refuses_hard_disconnects() {
    let io = io_thread();
    let f = Fixture::new(ServerOptions::default()).await;
    let export = f.add("disk", true, &io);
    let mut c = Client::open(&f.path, "disk", true, &[]).await;
    assert_eq!(export.client_count(), 1);
    let err = f
        .server
        .remove_export("disk", RemoveMode::Safe)
        .unwrap_err();
    assert!(matches!(err, Error::ExportInUse(_)));
    let gone = f.server.remove_export("disk", RemoveMode::Hard).unwrap();
    tokio::time::timeout(Duration::from_secs(5), gone.clone().wait())
        .await
        .unwrap();
    assert!(gone.is_gone());
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).await.unwrap(), 0);
    // New clients no longer find it.
    let mut s = Client::connect(&f.path).await;
    let go = handshake::InfoRequest {
        name: "disk".into(),
        requests: vec![],
    };
    Client::send_option(&mut s, &ClientOption::Go(go)).await;
    assert_eq!(
        Client::option_reply(&mut s).await.0,
        OptionReplyType::ErrUnknown
    );
    assert!(matches!(
        f.server.remove_export("disk", RemoveMode::Safe),
        Err(Error::ExportNotFound(_))
    ));
}

#[tokio::test]
async fn test_remove_export_safe_without_clients_is_gone_at_once() {
    let io = io_thread();
    let f = Fixture::new(ServerOptions::default()).await;
    f.add("disk", true, &io);
    let gone = f.server.remove_export("disk", RemoveMode::Safe).unwrap();
    assert!(gone.is_gone());
}

#[tokio::test]
async fn test_list_and_single_connection_flags() {
    let io = io_thread();
    let opts = ServerOptions {
        max_connections: 1,
        ..ServerOptions::default()
    };
    let f = Fixture::new(opts).await;
    f.add("a", true, &io);
    assert!(matches!(f.add_err("a", &io), Error::ExportExists(_)));
    let mut s = Client::connect(&f.path).await;
    Client::send_option(&mut s, &ClientOption::List).await;
    let r = Client::option_replies(&mut s).await;
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].1, b"\x00\x00\x00\x01aa disk");
    drop(s);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let c = Client::open(&f.path, "a", false, &[]).await;
    assert!(!c.flags.contains(TransmissionFlags::CAN_MULTI_CONN));
}

#[tokio::test]
async fn test_handshake_timeout_drops_silent_client() {
    let opts = ServerOptions {
        handshake_max_seconds: 1,
        ..ServerOptions::default()
    };
    let f = Fixture::new(opts).await;
    let mut s = tokio::net::UnixStream::connect(&f.path).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn test_stop_removes_exports_and_listener() {
    let io = io_thread();
    let f = Fixture::new(ServerOptions::default()).await;
    f.add("disk", true, &io);
    let _c = Client::open(&f.path, "disk", true, &[]).await;
    let removed = f.server.stop();
    assert_eq!(removed.len(), 1);
    let gone = removed[0].1.clone();
    tokio::time::timeout(Duration::from_secs(5), gone.wait())
        .await
        .unwrap();
    assert!(!f.path.exists());
    assert!(!f.server.is_running());
}

fn tool(name: &str) -> bool {
    std::process::Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// nbdsh, or the system python's `nbd` module when nbdsh runs under another
/// python (pyenv) that lacks it.
fn nbdsh() -> Option<Vec<&'static str>> {
    let candidates: [&[&'static str]; 2] = [&["nbdsh"], &["/usr/bin/python3", "-m", "nbd"]];
    candidates.into_iter().find_map(|c| {
        let ok = std::process::Command::new(c[0])
            .args(&c[1..])
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| c.to_vec())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_nbdinfo_sees_export() {
    if !tool("nbdinfo") {
        eprintln!("nbdinfo not installed; skipped");
        return;
    }
    let io = io_thread();
    let f = Fixture::new(ServerOptions::default()).await;
    f.add("disk", true, &io);
    let uri = format!("nbd+unix:///disk?socket={}", f.path.display());
    let out = tokio::process::Command::new("nbdinfo")
        .arg("--json")
        .arg(&uri)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("\"export-size\": {SIZE}")), "{text}");
    assert!(text.contains("base:allocation"), "{text}");
    let out = tokio::process::Command::new("nbdinfo")
        .arg("--map")
        .arg(&uri)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_nbdsh_write_read_zero() {
    let Some(nbdsh) = nbdsh() else {
        eprintln!("nbdsh not installed; skipped");
        return;
    };
    let io = io_thread();
    let f = Fixture::new(ServerOptions::default()).await;
    f.add("disk", true, &io);
    let uri = format!("nbd+unix:///disk?socket={}", f.path.display());
    let script = "\
h.pwrite(b'x' * 65536, 1048576, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 1048576) == b'x' * 65536
h.zero(4096, 1048576 + 4096, nbd.CMD_FLAG_FAST_ZERO)
buf = h.pread(65536, 1048576)
assert buf[:4096] == b'x' * 4096 and buf[4096:8192] == bytes(4096)
h.trim(65536, 0)
h.flush()
assert h.can_multi_conn() and h.can_fast_zero() and h.can_df()
print('ok')
";
    let out = tokio::process::Command::new(nbdsh[0])
        .args(&nbdsh[1..])
        .args(["-u", &uri, "-c", script])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok"));
}
