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
    if info.encrypted {
        image["encrypted"] = json!(true);
    }
    if let Some(s) = info.snapshots {
        image["snapshots"] = s;
    }
    if let Some(b) = info.backing_filename {
        image["backing-filename"] = json!(b);
    }
    if let Some(f) = info.backing_format {
        image["backing-filename-format"] = json!(f);
    }
    if let Some(backing) = backing_child(node) {
        let inner = image_info(&backing);
        image["full-backing-filename"] = inner["filename"].clone();
        image["backing-image"] = inner;
    } else if let Some(filtered) = filtered_child(node) {
        // qemu shows a filter's child as its backing image, without names.
        image["backing-image"] = image_info(&filtered);
    }
    image
}

/// The child of a filter node that qemu's queries treat like a backing
/// file (only `throttle` for now).
fn filtered_child(node: &NodeRef) -> Option<NodeRef> {
    if node.driver().driver_name() != "throttle" {
        return None;
    }
    node.primary_child().cloned()
}

/// The node's backing child, if it has one.
fn backing_child(node: &NodeRef) -> Option<NodeRef> {
    node.children()
        .iter()
        .find(|c| c.role == "backing")
        .map(|c| c.node.clone())
}

/// How many backing files are below `node`.
fn backing_depth(node: &NodeRef) -> usize {
    let mut depth = 0;
    let mut cur = backing_child(node).or_else(|| filtered_child(node));
    while let Some(n) = cur {
        depth += 1;
        cur = backing_child(&n).or_else(|| filtered_child(&n));
    }
    depth
}

/// One entry of `query-named-block-nodes` (`BlockDeviceInfo`).
pub fn node_info(node: &NodeRef) -> Value {
    let o = node.options();
    let image = image_info(node);
    let encrypted = node.driver().image_info().encrypted;
    let mut info = json!({
        "iops_rd": 0, "detect_zeroes": detect_zeroes_name(node), "active": true,
        "image": image.clone(), "iops_wr": 0, "ro": o.read_only, "node-name": node.name(),
        "backing_file_depth": backing_depth(node), "drv": node.driver().driver_name(),
        "iops": 0, "bps_wr": 0, "write_threshold": 0, "encrypted": encrypted, "bps": 0,
        "bps_rd": 0,
        "cache": {"no-flush": o.cache_no_flush, "direct": o.cache_direct, "writeback": true},
        "file": image["filename"].clone(),
    });
    if let Some(full) = image.get("full-backing-filename") {
        info["backing_file"] = full.clone();
    }
    throttle_info(node, &mut info);
    info
}

/// For a `throttle` node, the limits of its group in the members qemu
/// fills for legacy per-device throttling (qemu itself leaves them 0 for
/// throttle nodes; showing them is our behaviour).
fn throttle_info(node: &NodeRef, info: &mut Value) {
    let driver: &dyn std::any::Any = node.driver();
    let Some(t) = driver.downcast_ref::<qsd_throttle::ThrottleDriver>() else {
        return;
    };
    let limits = t.group().limits();
    let members = [
        ("bps", limits.bps_total),
        ("bps_rd", limits.bps_read),
        ("bps_wr", limits.bps_write),
        ("iops", limits.iops_total),
        ("iops_rd", limits.iops_read),
        ("iops_wr", limits.iops_write),
        ("bps_max", limits.bps_total_max),
        ("bps_rd_max", limits.bps_read_max),
        ("bps_wr_max", limits.bps_write_max),
        ("iops_max", limits.iops_total_max),
        ("iops_rd_max", limits.iops_read_max),
        ("iops_wr_max", limits.iops_write_max),
        ("bps_max_length", limits.bps_total_max_length),
        ("bps_rd_max_length", limits.bps_read_max_length),
        ("bps_wr_max_length", limits.bps_write_max_length),
        ("iops_max_length", limits.iops_total_max_length),
        ("iops_rd_max_length", limits.iops_read_max_length),
        ("iops_wr_max_length", limits.iops_write_max_length),
        ("iops_size", limits.iops_size),
    ];
    for (name, v) in members {
        info[name] = json!(v.unwrap_or(0));
    }
    info["group"] = json!(t.group_name());
}

/// `query-named-block-nodes`: newest node first, as qemu lists them.
pub fn named_block_nodes(graph: &Graph) -> Value {
    Value::Array(graph.nodes_newest_first().map(node_info).collect())
}
