//! Feeds a guest memory image and a ring position through the
//! vhost-user-blk descriptor chain walker (`walk_chain`, as a resubmitted
//! request takes it), the chain parser and the request executor, over a
//! 1 MiB null node. Input: 8 control bytes (see
//! `qsd_export_vhost_user_blk::fuzzing::chain`), then the memory image.
//! Checks: a walked chain never has more descriptors than a table holds and
//! every descriptor but the last links on; a parsed chain has a writable
//! byte; the status is OK, IOERR or UNSUPP and the bytes reported written
//! fit in the writable segments without the status byte.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use qsd_block::{BlockBackend, Graph, Perm};
use qsd_export_vhost_user_blk::fuzzing;
use qsd_qapi::InputMode;
use serde_json::json;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

// The null node does no I/O, so inputs run with a plain `block_on`:
// `qsd_rt::block_on_with_ring` once per input grew the process by about
// 460 bytes a call (in qsd-rt, even for an empty future), which a long
// campaign would hit as an out-of-memory "crash".
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| qsd_rt::build_runtime("fuzz").expect("runtime"))
}

fn backend() -> &'static BlockBackend {
    static BLK: OnceLock<(Graph, BlockBackend)> = OnceLock::new();
    &BLK.get_or_init(|| {
        let mut graph = Graph::new();
        qsd_drivers::register_all(&mut graph);
        let opts = json!({"driver": "null-co", "node-name": "null", "size": 1 << 20,
                          "read-zeroes": true});
        let map = opts.as_object().cloned().expect("object");
        let node = runtime()
            .block_on(graph.open(map, InputMode::Qmp))
            .expect("null node");
        let blk = BlockBackend::new(node, "fuzz", Perm::ALL, Perm::ALL).expect("backend");
        (graph, blk)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let blk = backend();
    let out = runtime()
        .block_on(fuzzing::chain(blk, data))
        .expect("guest memory");
    let Some(walked) = out.walked else {
        assert!(out.parsed.is_none() && out.result.is_none());
        return;
    };
    assert!(!walked.is_empty() && walked.len() <= usize::from(u16::MAX));
    let (last, links) = walked.split_last().expect("non-empty");
    assert_eq!(last.2 & F_NEXT, 0, "chain ends on a linked descriptor");
    for d in links.iter().chain([last]) {
        assert_eq!(d.2 & F_INDIRECT, 0, "indirect descriptor in the chain");
    }
    assert!(
        links.iter().all(|d| d.2 & F_NEXT != 0),
        "chain continues unlinked"
    );
    let Some((readable, writable)) = out.parsed else {
        assert!(out.result.is_none());
        return;
    };
    assert_eq!(readable + writable, walked.len());
    assert!(walked[readable..].iter().all(|d| d.2 & F_WRITE != 0));
    assert!(out.writable_bytes > 0, "parsed chain without a status byte");
    let (status, n) = out.result.expect("parsed chains run");
    assert!(status <= 2, "status {status}");
    assert!(u64::from(n) < out.writable_bytes, "{n} bytes reported");
});
