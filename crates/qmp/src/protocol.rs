//! QMP messages: errors, request validation, responses, greeting.

use serde_json::{json, Map, Value};

use crate::writer::qdict_order;

/// The error classes qemu-storage-daemon reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Everything that is not one of the classes below.
    GenericError,
    /// Unknown command, or a command not allowed now.
    CommandNotFound,
    /// A device exists but is not active.
    DeviceNotActive,
    /// A device or node was not found.
    DeviceNotFound,
    /// KVM lacks a capability (kept for wire compatibility).
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// Human-readable description.
    pub desc: String,
}

impl QmpError {
    /// An error of class `class`.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// qemu's reply for an unknown command.
    pub fn command_not_found(name: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }

    /// The `error` member's value.
    pub fn to_value(&self) -> Value {
        json!({"class": self.class.as_str(), "desc": self.desc})
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The `id` member, echoed in the reply.
    pub id: Option<Value>,
    /// Command name (from `execute` or `exec-oob`).
    pub command: String,
    /// The `arguments` object, empty if absent.
    pub arguments: Map<String, Value>,
    /// Whether the command came as `exec-oob`.
    pub oob: bool,
}

/// A request that failed validation, with the `id` to echo if it had one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{error}")]
pub struct RequestError {
    /// The request's `id`, if the request was an object with one.
    pub id: Option<Value>,
    /// What to reply.
    pub error: QmpError,
}

impl RequestError {
    fn new(id: Option<Value>, desc: String) -> Self {
        Self {
            id,
            error: QmpError::generic(desc),
        }
    }

    /// The full error reply.
    pub fn response(&self) -> Value {
        error_response(&self.error, self.id.clone())
    }
}

/// Validate one parsed input value as qemu's dispatcher does.
///
/// Members are checked in qemu's iteration order, so when several are wrong
/// the same one is reported. `exec-oob` is only recognised once the `oob`
/// capability has been negotiated.
pub fn parse_request(value: Value, oob_enabled: bool) -> Result<Request, RequestError> {
    let Value::Object(mut map) = value else {
        return Err(RequestError::new(
            None,
            "QMP input must be a JSON object".to_owned(),
        ));
    };
    let id = map.get("id").cloned();
    let mut exec_key: Option<&str> = None;
    for (key, val) in qdict_order(&map) {
        match key.as_str() {
            "execute" | "exec-oob" if key == "execute" || oob_enabled => {
                if !val.is_string() {
                    let desc = format!("QMP input member '{key}' must be a string");
                    return Err(RequestError::new(id, desc));
                }
                if let Some(prev) = exec_key {
                    let desc = format!("QMP input member '{key}' clashes with '{prev}'");
                    return Err(RequestError::new(id, desc));
                }
                exec_key = Some(if key == "execute" {
                    "execute"
                } else {
                    "exec-oob"
                });
            }
            "arguments" if !val.is_object() => {
                let desc = "QMP input member 'arguments' must be an object".to_owned();
                return Err(RequestError::new(id, desc));
            }
            "arguments" | "id" => {}
            _ => {
                let desc = format!("QMP input member '{key}' is unexpected");
                return Err(RequestError::new(id, desc));
            }
        }
    }
    let Some(exec_key) = exec_key else {
        let desc = "QMP input lacks member 'execute'".to_owned();
        return Err(RequestError::new(id, desc));
    };
    let command = match map.remove(exec_key) {
        Some(Value::String(s)) => s,
        _ => String::new(),
    };
    let arguments = match map.remove("arguments") {
        Some(Value::Object(args)) => args,
        _ => Map::new(),
    };
    Ok(Request {
        id,
        command,
        arguments,
        oob: exec_key == "exec-oob",
    })
}

fn with_id(mut map: Map<String, Value>, id: Option<Value>) -> Value {
    if let Some(id) = id {
        map.insert("id".to_owned(), id);
    }
    Value::Object(map)
}

/// `{"return": value, "id": id}`.
pub fn success_response(value: Value, id: Option<Value>) -> Value {
    let mut map = Map::new();
    map.insert("return".to_owned(), value);
    with_id(map, id)
}

/// `{"error": {...}, "id": id}`.
pub fn error_response(error: &QmpError, id: Option<Value>) -> Value {
    let mut map = Map::new();
    map.insert("error".to_owned(), error.to_value());
    with_id(map, id)
}

/// The reply to a command, given its outcome.
pub fn response(result: Result<Value, QmpError>, id: Option<Value>) -> Value {
    match result {
        Ok(v) => success_response(v, id),
        Err(e) => error_response(&e, id),
    }
}

/// Version information sent in the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// Major version (qemu's numbering: 10 for 10.0.2).
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
    /// Package string, e.g. a distribution version.
    pub package: String,
}

impl Greeting {
    /// The greeting message; the monitor always offers the `oob` capability.
    pub fn to_value(&self) -> Value {
        json!({"QMP": {
            "version": {
                "qemu": {"major": self.major, "minor": self.minor, "micro": self.micro},
                "package": self.package,
            },
            "capabilities": ["oob"],
        }})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::to_json;

    fn desc(v: Value, oob: bool) -> (Option<Value>, String) {
        let e = parse_request(v, oob).unwrap_err();
        (e.id, e.error.desc)
    }

    #[test]
    fn test_parse_request_valid_execute_returns_parts() {
        let r = parse_request(
            json!({"execute": "x", "id": [1], "arguments": {"a": 1}}),
            false,
        )
        .unwrap();
        assert_eq!(r.command, "x");
        assert_eq!(r.id, Some(json!([1])));
        assert_eq!(Value::Object(r.arguments), json!({"a": 1}));
        assert!(!r.oob);
        let r = parse_request(json!({"exec-oob": "y"}), true).unwrap();
        assert!(r.oob);
        assert!(r.arguments.is_empty());
    }

    #[test]
    fn test_parse_request_errors_match_qemu_texts() {
        let cases = [
            (json!([1]), "QMP input must be a JSON object"),
            (json!(null), "QMP input must be a JSON object"),
            (
                json!({"execute": 5}),
                "QMP input member 'execute' must be a string",
            ),
            (
                json!({"execute": "x", "arguments": 5}),
                "QMP input member 'arguments' must be an object",
            ),
            (
                json!({"execute": "x", "arguments": null}),
                "QMP input member 'arguments' must be an object",
            ),
            (json!({"foo": 5}), "QMP input member 'foo' is unexpected"),
            (
                json!({"execute": "x", "control": {}}),
                "QMP input member 'control' is unexpected",
            ),
            (
                json!({"exec-oob": "x"}),
                "QMP input member 'exec-oob' is unexpected",
            ),
            (json!({}), "QMP input lacks member 'execute'"),
        ];
        for (input, want) in cases {
            assert_eq!(desc(input.clone(), false).1, want, "{input}");
        }
        assert_eq!(
            desc(json!({"execute": "x", "exec-oob": "x"}), true).1,
            "QMP input member 'execute' clashes with 'exec-oob'"
        );
    }

    #[test]
    fn test_parse_request_error_echoes_id() {
        assert_eq!(desc(json!({"id": 3}), false).0, Some(json!(3)));
        let e = parse_request(json!({"execute": "q", "id": 1, "arguments": 5}), false).unwrap_err();
        assert_eq!(
            to_json(&e.response(), false),
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}"#
        );
    }

    #[test]
    fn test_greeting_serialises_like_qemu() {
        let g = Greeting {
            major: 10,
            minor: 0,
            micro: 2,
            package: "pkg".into(),
        };
        assert_eq!(
            to_json(&g.to_value(), false),
            r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "pkg"}, "capabilities": ["oob"]}}"#
        );
    }
}
