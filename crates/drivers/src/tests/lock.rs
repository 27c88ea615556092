use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use qsd_block::ErrorKind;
use serde_json::json;

use super::*;

/// qemu-io, or a clear failure: these tests check interoperation for real.
fn qemu_io() -> Command {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-io").is_file()));
    assert!(
        found,
        "qemu-io is not installed: the lock interop tests need it (apt install qemu-utils)"
    );
    Command::new("qemu-io")
}

fn qemu_io_write(path: &Path) -> Output {
    qemu_io()
        .args(["-f", "raw", "-c", "write 0 4k", path_str(path)])
        .output()
        .unwrap()
}

/// qemu-io can write the image (nothing holds a conflicting lock).
fn assert_qemu_io_writes(path: &Path) {
    let out = qemu_io_write(path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A background process, killed when dropped.
struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// qemu-io holding the image open read-write until killed.
fn qemu_io_holding(path: &Path) -> Bg {
    let child = qemu_io()
        .args(["-f", "raw", "-c", "sleep 60000", path_str(path)])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let bg = Bg(child);
    let probe = std::fs::File::open(path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // qemu-io marks its write permission on byte 101.
    while !crate::lock::lock_held_elsewhere(&probe, 101).unwrap() {
        assert!(Instant::now() < deadline, "qemu-io did not lock the image");
        std::thread::sleep(Duration::from_millis(20));
    }
    bg
}

fn file_opts(name: &str, path: &Path) -> Value {
    json!({"driver": "file", "node-name": name, "filename": path_str(path)})
}

/// A writer that does not let others write (like a guest device).
fn exclusive_writer(node: &NodeRef) -> Result<BlockBackend> {
    BlockBackend::new(
        node.clone(),
        "export 'w'",
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    )
}

#[tokio::test]
async fn test_lock_qsd_exclusive_writer_blocks_qemu_io_write() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let node = add(&mut g, file_opts("f0", &path)).await.unwrap();
    let blk = exclusive_writer(&node).unwrap();
    let out = qemu_io_write(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "qemu-io wrote: {stderr}");
    assert!(stderr.contains("Failed to get \"write\" lock"), "{stderr}");
    drop(blk);
    assert_qemu_io_writes(&path);
}

#[tokio::test]
async fn test_lock_qemu_io_writer_blocks_unsharing_qsd_user() {
    let (_dir, path) = image(1 << 20);
    let _qemu = qemu_io_holding(&path);
    let mut g = graph();
    let node = add(&mut g, file_opts("f0", &path)).await.unwrap();
    let err = BlockBackend::new(
        node.clone(),
        "export 'r'",
        Perm::CONSISTENT_READ,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionConflict);
    assert_eq!(err.message(), "Failed to get shared \"write\" lock");
    // qemu-io shares everything, so a sharing writer coexists with it.
    BlockBackend::new(
        node,
        "export 'w'",
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::ALL,
    )
    .unwrap();
}

#[tokio::test]
async fn test_lock_two_nodes_on_one_file_conflict() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let a = add(&mut g, file_opts("a", &path)).await.unwrap();
    let b = add(&mut g, file_opts("b", &path)).await.unwrap();
    let held = exclusive_writer(&a).unwrap();
    let err = BlockBackend::new(b.clone(), "export 'b'", Perm::WRITE, Perm::ALL).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionConflict);
    assert_eq!(err.message(), "Failed to get \"write\" lock");
    // The failed attempt left no locks behind on b: a reader that shares
    // everything is still fine, and after a lets go, b may write.
    BlockBackend::new(b.clone(), "export 'r'", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    drop(held);
    BlockBackend::new(b, "export 'b'", Perm::WRITE, Perm::ALL).unwrap();
}

#[tokio::test]
async fn test_lock_raw_forwards_permissions_to_file() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let opts = json!({"driver": "raw", "node-name": "r0",
                      "file": {"driver": "file", "filename": path_str(&path)}});
    let node = add(&mut g, opts).await.unwrap();
    let blk = exclusive_writer(&node).unwrap();
    let out = qemu_io_write(&path);
    assert!(!out.status.success(), "qemu-io wrote through raw's lock");
    drop(blk);
    assert_qemu_io_writes(&path);
}

#[tokio::test]
async fn test_lock_off_takes_no_locks() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let opts = json!({"driver": "file", "node-name": "f0", "filename": path_str(&path),
                      "locking": "off"});
    let node = add(&mut g, opts).await.unwrap();
    let _blk = exclusive_writer(&node).unwrap();
    assert_qemu_io_writes(&path);
}

#[tokio::test]
async fn test_lock_released_by_blockdev_del() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let node = add(&mut g, file_opts("f0", &path)).await.unwrap();
    let blk = exclusive_writer(&node).unwrap();
    let probe = std::fs::File::open(&path).unwrap();
    assert!(crate::lock::lock_held_elsewhere(&probe, 201).unwrap());
    drop(blk);
    assert!(!crate::lock::lock_held_elsewhere(&probe, 201).unwrap());
    let reader = BlockBackend::new(node.clone(), "r", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    assert!(crate::lock::lock_held_elsewhere(&probe, 100).unwrap());
    // Closing lets go even while handles on the node linger.
    node.close().await.unwrap();
    assert!(!crate::lock::lock_held_elsewhere(&probe, 100).unwrap());
    drop(reader);
}
