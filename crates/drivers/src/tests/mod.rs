//! Tests of the drivers through the graph, as the daemon uses them.

use std::path::{Path, PathBuf};

use qsd_block::{BlockBackend, Graph, NodeRef, Perm, Result};
use qsd_qapi::InputMode;
use serde_json::Value;

mod file;
mod lock;
mod null;
mod raw;

/// A graph with this crate's drivers.
pub(crate) fn graph() -> Graph {
    let mut g = Graph::new();
    crate::register_all(&mut g);
    g
}

/// `blockdev-add` with QMP-typed options.
pub(crate) async fn add(g: &mut Graph, opts: Value) -> Result<NodeRef> {
    let Value::Object(m) = opts else {
        panic!("options must be an object")
    };
    g.open(m, InputMode::Qmp).await
}

/// A backend taking everything and sharing everything.
pub(crate) fn backend(node: &NodeRef) -> BlockBackend {
    BlockBackend::new(node.clone(), "export 'test'", Perm::ALL, Perm::ALL).unwrap()
}

/// A temporary image of `len` bytes on a disk file system (O_DIRECT does
/// not work on tmpfs, which /tmp may be).
pub(crate) fn image(len: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("qsd-drivers-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let path = dir.path().join("img.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(len).unwrap();
    (dir, path)
}

pub(crate) fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A buffer filled with `byte`.
pub(crate) fn filled(len: usize, byte: u8) -> qsd_rt::IoBuf {
    let mut b = qsd_rt::IoBuf::new(len);
    b.fill(byte);
    b
}
