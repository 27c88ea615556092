//! `qom-list`, `qom-get` and `qom-set` over the part of qemu's object tree a storage
//! daemon has: the root container, `/objects`, and the user-created
//! objects in it. Paths resolve as in qemu: absolute (`/objects/g0`, empty
//! components ignored) or partial (`g0`, `objects/g0`: any unique object
//! whose path ends that way).
//!
//! Properties: `type` everywhere; `limits` and the `x-` members on
//! throttle groups; the polling and pool members on I/O threads. Secrets
//! are listed with qemu's property names but only `type` can be read.
//! qemu's root also holds the `backend` and `chardevs` containers, which
//! are not modelled here.

use std::sync::Arc;

use qsd_qapi::options::IothreadProps;
use qsd_qapi::InputMode;
use qsd_qmp::{ErrorClass, QmpError};
use qsd_throttle::{ThrottleGroup, ThrottleGroupProps, ThrottleLimits};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::commands::{generic, parse};
use crate::daemon::Daemon;
use crate::objects;

type CmdResult = Result<Value, QmpError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QomGetArgs {
    path: String,
    property: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QomListArgs {
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QomSetArgs {
    path: String,
    property: String,
    value: Value,
}

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Root,
    Objects,
    Object { id: String, qom_type: &'static str },
}

impl Target {
    fn type_name(&self) -> &'static str {
        match self {
            Target::Root | Target::Objects => "container",
            Target::Object { qom_type, .. } => qom_type,
        }
    }
}

/// Resolve `path` given the QOM type of each object id.
fn resolve(path: &str, type_of: impl Fn(&str) -> Option<&'static str>) -> Option<Target> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let object = |id: &str| {
        type_of(id).map(|qom_type| Target::Object {
            id: id.to_string(),
            qom_type,
        })
    };
    if path.starts_with('/') {
        return match parts.as_slice() {
            [] => Some(Target::Root),
            ["objects"] => Some(Target::Objects),
            ["objects", id] => object(id),
            _ => None,
        };
    }
    // A partial path: the unique node whose path ends with `parts`.
    let mut found = Vec::new();
    match parts.as_slice() {
        [] => {}
        ["objects"] => found.push(Target::Objects),
        ["objects", id] => found.extend(object(id)),
        _ => {}
    }
    if let [id] = parts.as_slice() {
        found.extend(object(id));
    }
    match found.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

fn not_found(path: &str) -> QmpError {
    QmpError {
        class: ErrorClass::DeviceNotFound,
        desc: format!("Device '{path}' not found"),
    }
}

fn no_property(t: &Target, property: &str) -> QmpError {
    generic(format!("Property '{}.{property}' not found", t.type_name()))
}

fn lookup(d: &Daemon, path: &str) -> Result<Target, QmpError> {
    let threads = d.iothreads();
    resolve(path, |id| {
        objects::qom_type(&threads, &d.secrets, &d.objects, id)
    })
    .ok_or_else(|| not_found(path))
}

fn group(d: &Daemon, id: &str) -> Option<Arc<ThrottleGroup>> {
    d.objects.get::<ThrottleGroup>(id)
}

/// The `IothreadProps` member of a property name, with qemu's default.
fn iothread_prop(p: &IothreadProps, name: &str) -> Option<i64> {
    Some(match name {
        "poll-max-ns" => p.poll_max_ns.unwrap_or(32768),
        "poll-grow" => p.poll_grow.unwrap_or(0),
        "poll-shrink" => p.poll_shrink.unwrap_or(0),
        "aio-max-batch" => p.aio_max_batch.unwrap_or(0),
        "thread-pool-min" => p.thread_pool_min.unwrap_or(0),
        "thread-pool-max" => p.thread_pool_max.unwrap_or(64),
        _ => return None,
    })
}

/// I/O thread properties, in qemu's `qom-list` order.
const IOTHREAD_PROPERTIES: &[&str] = &[
    "thread-pool-min",
    "aio-max-batch",
    "thread-pool-max",
    "poll-max-ns",
    "poll-grow",
    "poll-shrink",
];

/// Secret properties and their types, in qemu's `qom-list` order.
const SECRET_PROPERTIES: &[(&str, &str)] = &[
    ("iv", "string"),
    ("keyid", "string"),
    ("format", "QCryptoSecretFormat"),
    ("file", "string"),
    ("data", "string"),
];

fn property_info(name: &str, ty: &str) -> Value {
    json!({ "name": name, "type": ty })
}

/// The children of `/objects`: every user-created object, by id.
fn objects_of(d: &Daemon) -> Vec<(String, &'static str)> {
    let mut all: Vec<(String, &'static str)> = d
        .iothreads()
        .ids()
        .into_iter()
        .map(|id| (id, "iothread"))
        .collect();
    all.extend(d.secrets.ids().into_iter().map(|id| (id, "secret")));
    all.extend(d.objects.ids());
    all.sort();
    all
}

/// The properties `qom-list` shows for `target` (after `type`).
fn properties_of(d: &Daemon, target: &Target) -> Vec<Value> {
    match target {
        Target::Root => vec![property_info("objects", "child<container>")],
        Target::Objects => objects_of(d)
            .iter()
            .map(|(id, t)| property_info(id, &format!("child<{t}>")))
            .collect(),
        Target::Object { qom_type, .. } if *qom_type == qsd_throttle::QOM_TYPE => {
            std::iter::once(property_info("limits", "ThrottleLimits"))
                .chain(
                    ThrottleGroupProps::X_NAMES
                        .iter()
                        .map(|n| property_info(n, "int")),
                )
                .collect()
        }
        Target::Object { qom_type, .. } => match *qom_type {
            "iothread" => IOTHREAD_PROPERTIES
                .iter()
                .map(|n| property_info(n, "int"))
                .collect(),
            "secret" => SECRET_PROPERTIES
                .iter()
                .map(|(n, t)| property_info(n, t))
                .collect(),
            _ => Vec::new(),
        },
    }
}

/// `qom-list`.
pub fn qmp_qom_list(d: &Daemon, args: Map<String, Value>) -> CmdResult {
    let a: QomListArgs = parse(args)?;
    let target = lookup(d, &a.path)?;
    let mut list = vec![property_info("type", "string")];
    list.extend(properties_of(d, &target));
    Ok(Value::Array(list))
}

/// `qom-get`.
pub fn qmp_qom_get(d: &Daemon, args: Map<String, Value>) -> CmdResult {
    let a: QomGetArgs = parse(args)?;
    let target = lookup(d, &a.path)?;
    if a.property == "type" {
        return Ok(json!(target.type_name()));
    }
    let value = match &target {
        Target::Object { id, qom_type } if *qom_type == qsd_throttle::QOM_TYPE => {
            group(d, id).and_then(|g| g.property(&a.property))
        }
        Target::Object { id, .. } if target.type_name() == "iothread" => d
            .iothreads()
            .props(id)
            .and_then(|p| iothread_prop(&p, &a.property))
            .map(Value::from),
        _ => None,
    };
    value.ok_or_else(|| no_property(&target, &a.property))
}

/// `qom-set`.
pub fn qmp_qom_set(d: &Daemon, args: Map<String, Value>) -> CmdResult {
    let a: QomSetArgs = parse(args)?;
    let target = lookup(d, &a.path)?;
    if a.property == "type" {
        return Err(generic(format!(
            "Property '{}.type' is not writable",
            target.type_name()
        )));
    }
    match &target {
        Target::Object { id, qom_type } if *qom_type == qsd_throttle::QOM_TYPE => {
            set_group_property(d, id, &target, &a.property, a.value)
        }
        Target::Object { id, .. } if target.type_name() == "iothread" => {
            set_iothread_property(d, id, &target, &a.property, a.value)
        }
        _ => Err(no_property(&target, &a.property)),
    }
}

/// `limits` is the one group property writable at run time; the `x-`
/// members only at creation, as in qemu.
fn set_group_property(
    d: &Daemon,
    id: &str,
    target: &Target,
    property: &str,
    value: Value,
) -> CmdResult {
    let g = group(d, id).ok_or_else(|| no_property(target, property))?;
    if property != "limits" {
        if g.property(property).is_some() {
            return Err(generic("Property cannot be set after initialization"));
        }
        return Err(no_property(target, property));
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wrapped {
        limits: ThrottleLimits,
    }
    // Parsed inside an object so that errors name `limits.<member>`.
    let w: Wrapped =
        qsd_qapi::from_value(&json!({ "limits": value }), InputMode::Qmp).map_err(generic)?;
    g.set_limits(&w.limits).map_err(generic)?;
    Ok(json!({}))
}

fn set_iothread_property(
    d: &Daemon,
    id: &str,
    target: &Target,
    property: &str,
    value: Value,
) -> CmdResult {
    let mut threads = d.iothreads();
    let mut p = threads
        .props(id)
        .ok_or_else(|| no_property(target, property))?;
    if iothread_prop(&p, property).is_none() {
        return Err(no_property(target, property));
    }
    let v = value.as_i64().ok_or_else(|| {
        generic(format!(
            "Invalid parameter type for '{property}', expected: integer"
        ))
    })?;
    // Recorded for queries; the poll and pool settings have no effect on
    // qsd's I/O threads.
    match property {
        "poll-max-ns" => p.poll_max_ns = Some(v),
        "poll-grow" => p.poll_grow = Some(v),
        "poll-shrink" => p.poll_shrink = Some(v),
        "aio-max-batch" => p.aio_max_batch = Some(v),
        "thread-pool-min" => p.thread_pool_min = Some(v),
        _ => p.thread_pool_max = Some(v),
    }
    threads.set_props(id, p);
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(id: &str) -> Option<&'static str> {
        match id {
            "g0" => Some("throttle-group"),
            "io0" => Some("iothread"),
            "objects" => Some("secret"),
            _ => None,
        }
    }

    fn obj(id: &str, t: &'static str) -> Option<Target> {
        Some(Target::Object {
            id: id.into(),
            qom_type: t,
        })
    }

    #[test]
    fn test_qom_resolve_absolute_paths() {
        assert_eq!(resolve("/", types), Some(Target::Root));
        assert_eq!(resolve("/objects", types), Some(Target::Objects));
        assert_eq!(resolve("/objects/g0", types), obj("g0", "throttle-group"));
        assert_eq!(
            resolve("//objects//g0/", types),
            obj("g0", "throttle-group")
        );
        assert_eq!(resolve("/objects/nope", types), None);
        assert_eq!(resolve("/machine", types), None);
        assert_eq!(resolve("/g0", types), None);
    }

    #[test]
    fn test_qom_resolve_partial_paths() {
        assert_eq!(resolve("g0", types), obj("g0", "throttle-group"));
        assert_eq!(resolve("objects/io0", types), obj("io0", "iothread"));
        assert_eq!(resolve("", types), None);
        assert_eq!(resolve("nope", types), None);
        assert_eq!(resolve("g0/x", types), None);
        // Both /objects and /objects/objects end in "objects".
        assert_eq!(resolve("objects", types), None);
        assert_eq!(
            resolve("objects", |id| types(id).filter(|_| id != "objects")),
            Some(Target::Objects)
        );
    }

    #[test]
    fn test_qom_iothread_defaults_as_qemu() {
        let p = IothreadProps::default();
        assert_eq!(iothread_prop(&p, "poll-max-ns"), Some(32768));
        assert_eq!(iothread_prop(&p, "limits"), None);
    }
}
