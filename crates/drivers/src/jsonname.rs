//! qemu's `json:{...}` pseudo file names.
//!
//! qemu prints a node's options as a QDict, whose members come out in the
//! order of their hash bucket. Using the same hash gives the same text, so
//! names compare equal with what qemu-storage-daemon reports.

use qsd_block::NodeRef;
use serde_json::{Map, Value};

/// Buckets of a QDict.
const BUCKETS: u32 = 512;

/// The QDict hash of a key (the "tdb" hash qemu uses).
fn bucket(key: &str) -> u32 {
    let mut v = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, b) in key.bytes().enumerate() {
        v = v.wrapping_add(u32::from(b) << ((i as u32 * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % BUCKETS
}

fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Object(m) => write_object(out, m),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, x);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn write_object(out: &mut String, m: &Map<String, Value>) {
    let mut keys: Vec<&String> = m.keys().collect();
    // Keys sharing a bucket come out last-inserted first.
    let pos = |k: &String| m.keys().position(|x| x == k).unwrap_or(0);
    keys.sort_by_key(|k| (bucket(k), std::cmp::Reverse(pos(k))));
    out.push('{');
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&Value::String((*k).clone()).to_string());
        out.push_str(": ");
        write_value(out, &m[k.as_str()]);
    }
    out.push('}');
}

/// `json:` followed by the options in qemu's member order and spacing.
pub fn json_filename(opts: &Map<String, Value>) -> String {
    let mut out = String::from("json:");
    write_object(&mut out, opts);
    out
}

/// The options qemu shows for `node` inside a parent's `json:` name: its
/// own `json:` name if it has one, else a format over its `file` child, else
/// a protocol with its file name.
pub fn node_options(node: &NodeRef) -> Value {
    let info = node.driver().image_info();
    if let Some(v) = info
        .filename
        .strip_prefix("json:")
        .and_then(|j| serde_json::from_str::<Value>(j).ok())
    {
        return v;
    }
    let mut m = Map::new();
    m.insert("driver".into(), node.driver().driver_name().into());
    match node.children().iter().find(|c| c.role == "file") {
        Some(file) => m.insert("file".into(), node_options(&file.node)),
        None => m.insert("filename".into(), info.filename.into()),
    };
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_json_filename_raw_window_matches_qemu_order() {
        let v = serde_json::json!({
            "driver": "raw", "offset": 4096, "size": 8192,
            "file": {"driver": "file", "filename": "/x/img.raw"}
        });
        let Value::Object(m) = v else { unreachable!() };
        assert_eq!(
            json_filename(&m),
            "json:{\"offset\": 4096, \"driver\": \"raw\", \"size\": 8192, \
             \"file\": {\"driver\": \"file\", \"filename\": \"/x/img.raw\"}}"
        );
    }

    #[test]
    fn test_json_filename_null_options_match_qemu_order() {
        let v = serde_json::json!({"driver": "null-co", "size": 1048576, "read-zeroes": true});
        let Value::Object(m) = v else { unreachable!() };
        assert_eq!(
            json_filename(&m),
            "json:{\"read-zeroes\": true, \"driver\": \"null-co\", \"size\": 1048576}"
        );
    }
}
