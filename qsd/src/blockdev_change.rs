//! `x-blockdev-change`: add a child to, or remove one from, a node whose
//! driver supports it at runtime (quorum), with qemu's checks and texts.

use qsd_block::node::ChildLink;
use qsd_quorum::QuorumDriver;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::commands::{generic, parse};
use crate::daemon::Daemon;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeArgs {
    parent: String,
    child: Option<String>,
    node: Option<String>,
}

/// The QMP command.
pub async fn qmp_x_blockdev_change(
    d: &Daemon,
    args: Map<String, Value>,
) -> Result<Value, qsd_qmp::QmpError> {
    let a: ChangeArgs = parse(args)?;
    let graph = d.graph.lock().await;
    let parent = graph.get(&a.parent).ok_or_else(|| {
        generic(format!(
            "Cannot find device='{p}' nor node-name='{p}'",
            p = a.parent
        ))
    })?;
    let quorum = (parent.driver() as &dyn std::any::Any).downcast_ref::<QuorumDriver>();
    match (a.child, a.node) {
        (Some(_), Some(_)) => Err(generic("The parameters child and node are in conflict")),
        (None, None) => Err(generic("Either child or node must be specified")),
        (Some(child), None) => {
            let Some(q) = quorum else {
                let known = parent.children().iter().any(|c| c.role == child);
                return Err(generic(if known {
                    format!("The node {} does not support removing a child", a.parent)
                } else {
                    format!("Node '{}' does not have child '{child}'", a.parent)
                }));
            };
            q.remove_child(&child).map_err(generic)?;
            parent.remove_child(&child);
            Ok(json!({}))
        }
        (None, Some(node)) => {
            let new = graph
                .get(&node)
                .ok_or_else(|| generic(format!("Node '{node}' not found")))?;
            let Some(q) = quorum else {
                return Err(generic(format!(
                    "The node {} does not support adding a child",
                    a.parent
                )));
            };
            let role = q.add_child(new.clone()).map_err(generic)?;
            parent.add_child(ChildLink { role, node: new });
            Ok(json!({}))
        }
    }
}
