//! Mounts a memory node through the kernel's FUSE and uses it as a file.
//! Needs root and /dev/fuse; skipped (passes) without them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use qsd_block::mem::MemDriver;
use qsd_block::{CommonOptions, Node, NodeRef};
use qsd_export_fuse::{AllowOther, FuseExport, FuseExportOptions};

const SIZE: u64 = 8 << 20;

fn can_mount() -> bool {
    nix::unistd::geteuid().is_root() && std::path::Path::new("/dev/fuse").exists()
}

fn node() -> NodeRef {
    let opts = CommonOptions {
        discard_unmap: true,
        ..CommonOptions::default()
    };
    Node::new(
        "n0".into(),
        false,
        opts,
        Box::new(MemDriver::new(SIZE)),
        vec![],
    )
}

fn start(
    rt: &tokio::runtime::Runtime,
    dir: &tempfile::TempDir,
    writable: bool,
    growable: bool,
) -> (Arc<FuseExport>, String) {
    let mp = dir.path().join("disk");
    std::fs::write(&mp, b"").unwrap();
    let mp = mp.to_str().unwrap().to_owned();
    let opts = FuseExportOptions {
        mountpoint: mp.clone(),
        writable,
        growable,
        allow_other: AllowOther::Auto,
        io: Some(rt.handle().clone()),
    };
    (FuseExport::start(node(), opts).unwrap(), mp)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn test_mount_read_write_seek_punch_and_remove() {
    if !can_mount() {
        return;
    }
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (exp, mp) = start(&rt, &dir, true, false);
    let f = OpenOptions::new().read(true).write(true).open(&mp).unwrap();
    assert_eq!(f.metadata().unwrap().len(), SIZE);
    f.write_all_at(&[0xab; 65536], 4096).unwrap();
    let mut back = vec![0; 65536];
    f.read_exact_at(&mut back, 4096).unwrap();
    assert!(back.iter().all(|&b| b == 0xab));
    // Short read at the end; nothing past it.
    let mut tail = vec![0; 8192];
    assert_eq!(f.read_at(&mut tail, SIZE - 4096).unwrap(), 4096);
    assert_eq!(f.read_at(&mut tail, SIZE).unwrap(), 0);
    // Writes past the end of a fixed-size export.
    assert_eq!(f.write_at(&[1; 8192], SIZE - 4096).unwrap(), 4096);
    let err = f.write_at(&[1; 512], SIZE).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    // Punch a hole and read zeroes.
    nix::fcntl::fallocate(
        &f,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        4096,
        4096,
    )
    .unwrap();
    f.read_exact_at(&mut back[..4096], 4096).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    f.sync_all().unwrap();
    drop(f);
    let gone = exp.remove();
    rt.block_on(gone.wait());
    assert_eq!(std::fs::metadata(&mp).unwrap().len(), 0);
}

#[test]
fn test_read_only_export_refuses_writes_with_eacces() {
    if !can_mount() {
        return;
    }
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (exp, mp) = start(&rt, &dir, false, false);
    let md = std::fs::metadata(&mp).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
        0o400
    );
    // Root passes the mode check at open; the write itself is refused.
    let f = OpenOptions::new().write(true).open(&mp).unwrap();
    let err = f.write_at(&[1; 512], 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    drop(f);
    rt.block_on(exp.remove().wait());
}

#[test]
fn test_growable_write_past_end_grows() {
    if !can_mount() {
        return;
    }
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (exp, mp) = start(&rt, &dir, true, true);
    let f = OpenOptions::new().read(true).write(true).open(&mp).unwrap();
    let err = f.write_at(&[7; 4096], SIZE + 4096);
    // MemDriver cannot resize: the error comes back to the writer.
    assert!(err.is_err() || f.metadata().unwrap().len() == SIZE + 8192);
    drop(f);
    rt.block_on(exp.remove().wait());
}
