//! Answers of the query commands, in qemu's shapes.

use qsd_block::{Graph, NodeRef};
use serde_json::{json, Value};

use crate::daemon::QEMU_COMPAT_VERSION;

/// `query-version`.
pub fn version() -> Value {
    let (major, minor, micro) = QEMU_COMPAT_VERSION;
    json!({
        "qemu": {"micro": micro, "minor": minor, "major": major},
        "package": format!("qsd {}", env!("CARGO_PKG_VERSION")),
    })
}

fn detect_zeroes_name(node: &NodeRef) -> &'static str {
    match node.options().detect_zeroes {
        qsd_block::DetectZeroes::Off => "off",
        qsd_block::DetectZeroes::On => "on",
        qsd_block::DetectZeroes::Unmap => "unmap",
    }
}

/// The `image` member of a node's info.
fn image_info(node: &NodeRef) -> Value {
    let info = node.driver().image_info();
    let mut image = json!({
        "virtual-size": node.len(),
        "filename": info.filename,
        "format": node.driver().driver_name(),
    });
    if let Some(a) = info.actual_size {
        image["actual-size"] = json!(a);
    }
    if let Some(c) = info.cluster_size {
        image["cluster-size"] = json!(c);
    }
    if let Some(d) = info.dirty_flag {
        image["dirty-flag"] = json!(d);
    }
    if let Some(f) = info.format_specific {
        image["format-specific"] = f;
    }
    image
}

/// One entry of `query-named-block-nodes` (`BlockDeviceInfo`).
pub fn node_info(node: &NodeRef) -> Value {
    let o = node.options();
    let image = image_info(node);
    json!({
        "iops_rd": 0, "detect_zeroes": detect_zeroes_name(node), "active": true,
        "image": image.clone(), "iops_wr": 0, "ro": o.read_only, "node-name": node.name(),
        "backing_file_depth": 0, "drv": node.driver().driver_name(), "iops": 0, "bps_wr": 0,
        "write_threshold": 0, "encrypted": false, "bps": 0, "bps_rd": 0,
        "cache": {"no-flush": o.cache_no_flush, "direct": o.cache_direct, "writeback": true},
        "file": image["filename"].clone(),
    })
}

/// `query-named-block-nodes`: newest node first, as qemu lists them.
pub fn named_block_nodes(graph: &Graph) -> Value {
    Value::Array(graph.nodes_newest_first().map(node_info).collect())
}
