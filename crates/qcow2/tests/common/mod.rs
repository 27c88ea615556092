//! Helpers for the qcow2 integration tests: qemu tools, graphs, images.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use qsd_block::{BlockBackend, Graph, NodeRef, Perm, Result};
use qsd_qapi::InputMode;
use serde_json::{json, Value};

/// A qemu tool, or a clear failure: these tests check interoperation.
pub fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()));
    assert!(
        found,
        "{name} is not installed: the qcow2 interop tests need it (apt install qemu-utils)"
    );
    Command::new(name)
}

/// Run a tool, panicking with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// A temporary directory on a disk file system (not tmpfs: O_DIRECT).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qsd-qcow2-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img create -f qcow2 -o <opts> path size`.
pub fn create(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = tool("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    run(cmd.args([s(&path), size]));
    path
}

/// `qemu-io -c <cmd>` on a qcow2 image.
pub fn qemu_io(path: &Path, cmds: &[&str]) -> String {
    let mut cmd = tool("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(s(path)))
}

/// `qemu-img check`: exit 0 and no leaks.
pub fn check(path: &Path) {
    let out = tool("qemu-img")
        .args(["check", "-f", "qcow2", s(path)])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-img check failed: {text}");
    assert!(
        !text.contains("leaked"),
        "qemu-img check found leaks: {text}"
    );
}

/// `qemu-img compare` of an image against a raw model: identical.
pub fn compare(path: &Path, raw: &Path) {
    run(tool("qemu-img").args(["compare", "-q", "-f", "qcow2", "-F", "raw", s(path), s(raw)]));
}

pub fn graph() -> Graph {
    let mut g = Graph::new();
    qsd_drivers::register_all(&mut g);
    qsd_qcow2::register(&mut g);
    g
}

pub async fn add(g: &mut Graph, opts: Value) -> Result<NodeRef> {
    g.open(opts.as_object().cloned().unwrap(), InputMode::Qmp)
        .await
}

/// Options of a qcow2 node over a file.
pub fn qcow2_opts(path: &Path, extra: Value) -> Value {
    let mut v = json!({"driver": "qcow2", "node-name": "q0",
                       "file": {"driver": "file", "filename": s(path)}});
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    v
}

pub fn backend(node: &NodeRef) -> BlockBackend {
    BlockBackend::new(node.clone(), "export 'test'", Perm::ALL, Perm::ALL).unwrap()
}

pub fn filled(len: usize, byte: u8) -> qsd_rt::IoBuf {
    let mut b = qsd_rt::IoBuf::new(len);
    b.fill(byte);
    b
}

/// Close every node (flushes) so qemu tools see a clean image.
pub async fn close(mut g: Graph) {
    g.close_all().await;
}
