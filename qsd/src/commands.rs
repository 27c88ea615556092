//! QMP command handlers: one small function per command, dispatched by name.

use std::sync::Arc;

use qsd_block::{BlockBackend, Perm};
use qsd_qapi::options::{
    BlockResizeArgs, BlockdevDelArgs, QueryBlockstatsArgs, QueryNamedBlockNodesArgs,
};
use qsd_qapi::InputMode;
use qsd_qmp::{BoxFuture, Dispatcher, ErrorClass, QmpError};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::daemon::{Daemon, StopReason};
use crate::{exports, objects, qom, query};

/// Every command we answer (besides `qmp_capabilities`, handled by the
/// monitor itself but listed here too, as qemu lists it).
pub const COMMANDS: &[&str] = &[
    "block-export-add",
    "block-export-del",
    "block_resize",
    "blockdev-add",
    "blockdev-del",
    "nbd-server-add",
    "nbd-server-remove",
    "nbd-server-start",
    "nbd-server-stop",
    "object-add",
    "object-del",
    "qmp_capabilities",
    "qom-get",
    "qom-list",
    "qom-set",
    "query-block",
    "query-block-exports",
    "query-blockstats",
    "query-commands",
    "query-iothreads",
    "query-named-block-nodes",
    "query-qmp-schema",
    "query-version",
    "quit",
    "x-blockdev-change",
];

/// Every event we may emit.
pub const EVENTS: &[&str] = &[
    "BLOCK_EXPORT_DELETED",
    "BLOCK_IMAGE_CORRUPTED",
    "QUORUM_FAILURE",
    "QUORUM_REPORT_BAD",
    "SHUTDOWN",
];

/// The dispatcher the monitors call.
#[derive(Debug, Clone)]
pub struct Commands(pub Arc<Daemon>);

impl Dispatcher for Commands {
    fn dispatch(
        &self,
        name: &str,
        args: Map<String, Value>,
    ) -> BoxFuture<'static, Result<Value, QmpError>> {
        let d = self.0.clone();
        let name = name.to_string();
        Box::pin(async move { run(&d, &name, args).await })
    }
}

type CmdResult = Result<Value, QmpError>;

/// A `GenericError` carrying the whole message (anyhow's context chain included).
pub fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(format!("{e:#}"))
}

pub(crate) fn parse<T: DeserializeOwned>(args: Map<String, Value>) -> Result<T, QmpError> {
    qsd_qapi::from_value(&Value::Object(args), InputMode::Qmp).map_err(generic)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

fn no_args(args: Map<String, Value>) -> Result<(), QmpError> {
    parse::<NoArgs>(args).map(|_| ())
}

async fn run(d: &Arc<Daemon>, name: &str, args: Map<String, Value>) -> CmdResult {
    match name {
        "query-version" => no_args(args).map(|()| query::version()),
        "query-commands" => no_args(args).map(|()| query_commands()),
        "query-qmp-schema" => {
            no_args(args).map(|()| qsd_qapi::schema::qmp_schema(COMMANDS, EVENTS))
        }
        "quit" => quit(d, args),
        "x-blockdev-change" => crate::blockdev_change::qmp_x_blockdev_change(d, args).await,
        "blockdev-add" => blockdev_add(d, args).await,
        "blockdev-del" => blockdev_del(d, args).await,
        "query-named-block-nodes" => query_named_block_nodes(d, args).await,
        "query-block" => no_args(args).map(|()| json!([])),
        "query-blockstats" => query_blockstats(d, args).await,
        "block_resize" => block_resize(d, args).await,
        "object-add" => object_add(d, args).await,
        "object-del" => object_del(d, args).await,
        "query-iothreads" => no_args(args).map(|()| d.iothreads().query()),
        "qom-get" => qom::qmp_qom_get(d, args),
        "qom-list" => qom::qmp_qom_list(d, args),
        "qom-set" => qom::qmp_qom_set(d, args),
        "nbd-server-start" => exports::qmp_nbd_server_start(d, args).await,
        "nbd-server-stop" => exports::qmp_nbd_server_stop(d, args).await,
        "nbd-server-add" => exports::qmp_nbd_server_add(d, args).await,
        "nbd-server-remove" => exports::qmp_nbd_server_remove(d, args).await,
        "block-export-add" => exports::qmp_block_export_add(d, args).await,
        "block-export-del" => exports::qmp_block_export_del(d, args).await,
        "query-block-exports" => {
            no_args(args)?;
            Ok(d.exports.lock().await.query())
        }
        _ => Err(QmpError {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {name} has not been found"),
        }),
    }
}

fn query_commands() -> Value {
    Value::Array(COMMANDS.iter().map(|c| json!({ "name": c })).collect())
}

fn quit(d: &Daemon, args: Map<String, Value>) -> CmdResult {
    no_args(args)?;
    d.request_stop(StopReason::Quit);
    Ok(json!({}))
}

async fn blockdev_add(d: &Daemon, args: Map<String, Value>) -> CmdResult {
    d.graph
        .lock()
        .await
        .open(args, InputMode::Qmp)
        .await
        .map_err(generic)?;
    Ok(json!({}))
}

async fn blockdev_del(d: &Daemon, args: Map<String, Value>) -> CmdResult {
    let a: BlockdevDelArgs = parse(args)?;
    d.graph
        .lock()
        .await
        .delete(&a.node_name)
        .await
        .map_err(generic)?;
    Ok(json!({}))
}

async fn query_named_block_nodes(d: &Daemon, args: Map<String, Value>) -> CmdResult {
    // `flat` only matters for backing chains (qcow2), which come with issue #3.
    let _a: QueryNamedBlockNodesArgs = parse(args)?;
    Ok(query::named_block_nodes(&*d.graph.lock().await))
}

async fn query_blockstats(d: &Daemon, args: Map<String, Value>) -> CmdResult {
    let a: QueryBlockstatsArgs = parse(args)?;
    let exports = d.exports.lock().await;
    if a.query_nodes == Some(true) {
        let graph = d.graph.lock().await;
        let list = graph
            .nodes_newest_first()
            .map(|n| exports.node_stats(n))
            .collect();
        return Ok(Value::Array(list));
    }
    Ok(exports.backend_stats())
}

async fn block_resize(d: &Daemon, args: Map<String, Value>) -> CmdResult {
    let a: BlockResizeArgs = parse(args)?;
    let name = match (a.device, a.node_name) {
        (_, Some(n)) => n,
        (Some(dev), None) => dev,
        (None, None) => return Err(generic("Need device or node-name")),
    };
    if a.size < 0 {
        return Err(generic("Parameter 'size' expects a >0 size"));
    }
    let node = d.graph.lock().await.lookup(&name).map_err(generic)?;
    if node.is_read_only() {
        return Err(generic("Image is read-only"));
    }
    let blk = BlockBackend::new(node, "an unnamed block device", Perm::RESIZE, Perm::ALL)
        .map_err(generic)?;
    blk.truncate(a.size as u64).await.map_err(generic)?;
    drop(blk);
    exports::notify_resize(d).await;
    Ok(json!({}))
}

async fn object_add(d: &Daemon, args: Map<String, Value>) -> CmdResult {
    d.object_tables(|t| objects::add(t, args, InputMode::Qmp))
        .map_err(generic)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdArg {
    id: String,
}

async fn object_del(d: &Daemon, args: Map<String, Value>) -> CmdResult {
    let a: IdArg = parse(args)?;
    let in_use = d.exports.lock().await.uses_iothread(&a.id);
    d.object_tables(|t| objects::del(t, &a.id, in_use))
        .map_err(generic)?;
    Ok(json!({}))
}
