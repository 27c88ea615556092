//! Opens arbitrary bytes as a qcow2 image through the production path (a
//! `file` node under a `qcow2` node, opened by the graph as `blockdev-add`
//! does; `backing: null` so that a named backing file is parsed but not
//! opened), then reads the start of the image and asks for block status.
//! Any outcome but a panic or a hang is fine: hostile images must give errors.
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use qsd_block::{Graph, IoBuf};
use qsd_qapi::InputMode;
use serde_json::json;

/// Bytes of the image read per input: enough to reach L2 tables and
/// compressed clusters of small images, bounded so a huge virtual size does
/// not make one input slow.
const READ_LIMIT: u64 = 4 << 20;
const CHUNK: usize = 64 << 10;

fn image_path() -> &'static std::path::PathBuf {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("qsd-fuzz-qcow2-{}.img", std::process::id()))
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| qsd_rt::build_runtime("fuzz").expect("runtime"))
}

async fn exercise(path: &str) {
    let mut graph = Graph::new();
    qsd_drivers::register_all(&mut graph);
    qsd_qcow2::register(&mut graph);
    let opts = json!({
        "driver": "qcow2", "node-name": "fuzz", "read-only": true, "backing": null,
        "file": {"driver": "file", "filename": path, "locking": "off"},
    });
    let Some(map) = opts.as_object().cloned() else {
        return;
    };
    let Ok(node) = graph.open(map, InputMode::Qmp).await else {
        return;
    };
    let end = node.len().min(READ_LIMIT);
    let mut off = 0;
    while off < end {
        let n = CHUNK.min((end - off) as usize);
        let _ = node.read(off, IoBuf::new(n)).await;
        let _ = node.block_status(off, n as u64).await;
        off += n as u64;
    }
    let _ = node.driver().image_info();
    graph.close_all().await;
}

fuzz_target!(|data: &[u8]| {
    let path = image_path();
    {
        let Ok(mut f) = std::fs::File::create(path) else {
            return;
        };
        if f.write_all(data).is_err() {
            return;
        }
    }
    let Some(p) = path.to_str() else {
        return;
    };
    qsd_rt::block_on_with_ring(runtime(), exercise(p));
});
