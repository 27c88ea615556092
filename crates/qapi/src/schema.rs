//! The `query-qmp-schema` answer, restricted to what the caller implements.
//!
//! The data is qemu-storage-daemon 10.0.2's own introspection (regenerate it with
//! `tools/extract-schema.py`). Implicit types keep qemu's numeric names ("1", "2", ...),
//! so a full schema is identical to qemu's and restricted ones stay consistent with it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::OnceLock;

use serde_json::Value;

static SCHEMA_JSON: &str = include_str!("../data/qmp-schema.json");

struct Schema {
    entities: Vec<Value>,
    by_name: HashMap<String, usize>,
}

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        // The file is generated and checked by tests; a broken file yields an empty schema
        // rather than a panic in a running daemon.
        let entities: Vec<Value> = serde_json::from_str(SCHEMA_JSON).unwrap_or_default();
        let by_name = entities
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((e.get("name")?.as_str()?.to_owned(), i)))
            .collect();
        Schema { entities, by_name }
    })
}

fn meta_type(e: &Value) -> &str {
    e.get("meta-type").and_then(Value::as_str).unwrap_or("")
}

fn names_of(meta: &str) -> Vec<&'static str> {
    schema()
        .entities
        .iter()
        .filter(|e| meta_type(e) == meta)
        .filter_map(|e| e.get("name")?.as_str())
        .collect()
}

/// Every command in the reference schema, in qemu's order.
pub fn command_names() -> Vec<&'static str> {
    names_of("command")
}

/// Every event in the reference schema, in qemu's order.
pub fn event_names() -> Vec<&'static str> {
    names_of("event")
}

/// One schema entity by name (a command, event or type).
pub fn entity(name: &str) -> Option<&'static Value> {
    let s = schema();
    s.by_name.get(name).map(|&i| &s.entities[i])
}

/// Type names an entity refers to directly.
fn referenced_types(e: &Value) -> Vec<&str> {
    let direct = ["arg-type", "ret-type", "element-type"]
        .into_iter()
        .filter_map(|key| e.get(key));
    let nested = ["members", "variants"]
        .into_iter()
        .filter_map(|list| e.get(list).and_then(Value::as_array))
        .flatten()
        .filter_map(|m| m.get("type"));
    direct.chain(nested).filter_map(Value::as_str).collect()
}

/// The `query-qmp-schema` return value for the given commands and events plus every type
/// reachable from them, in qemu's order. Unknown names are ignored.
pub fn qmp_schema(commands: &[&str], events: &[&str]) -> Value {
    let s = schema();
    let mut keep: HashSet<usize> = HashSet::new();
    let mut queue: VecDeque<usize> = VecDeque::new();
    let roots = commands
        .iter()
        .filter_map(|c| {
            s.by_name
                .get(*c)
                .filter(|&&i| meta_type(&s.entities[i]) == "command")
        })
        .chain(events.iter().filter_map(|e| {
            s.by_name
                .get(*e)
                .filter(|&&i| meta_type(&s.entities[i]) == "event")
        }));
    for &i in roots {
        if keep.insert(i) {
            queue.push_back(i);
        }
    }
    while let Some(i) = queue.pop_front() {
        for t in referenced_types(&s.entities[i]) {
            if let Some(&j) = s.by_name.get(t) {
                if keep.insert(j) {
                    queue.push_back(j);
                }
            }
        }
    }
    Value::Array(
        s.entities
            .iter()
            .enumerate()
            .filter(|(i, _)| keep.contains(i))
            .map(|(_, e)| e.clone())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_schema_data_loads_all_entities() {
        assert_eq!(schema().entities.len(), 513);
        assert_eq!(command_names().len(), 76);
        assert_eq!(event_names().len(), 13);
    }

    #[test]
    fn test_qmp_schema_all_names_is_whole_reference() {
        let all = qmp_schema(&command_names(), &event_names());
        let reference: Vec<Value> = serde_json::from_str(SCHEMA_JSON).unwrap();
        assert_eq!(all, Value::Array(reference));
    }

    #[test]
    fn test_qmp_schema_one_command_closed_under_references() {
        let v = qmp_schema(&["block-export-del"], &["BLOCK_EXPORT_DELETED"]);
        let list = v.as_array().unwrap();
        let names: HashSet<&str> = list.iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert!(names.contains("block-export-del"));
        assert!(names.contains("BLOCK_EXPORT_DELETED"));
        assert!(!names.contains("blockdev-add"));
        for e in list {
            for t in referenced_types(e) {
                assert!(names.contains(t), "{t} referenced but missing");
            }
        }
        // block-export-del({id:string, ?mode:enum(safe|hard)}) -> {}
        let cmd = entity("block-export-del").unwrap();
        let args = entity(cmd["arg-type"].as_str().unwrap()).unwrap();
        assert_eq!(args["members"][0]["name"], "id");
    }

    #[test]
    fn test_qmp_schema_unknown_names_ignored() {
        let v = qmp_schema(
            &["no-such-command", "JOB_STATUS_CHANGE"],
            &["no-such-event"],
        );
        assert_eq!(v, Value::Array(vec![]));
    }
}
