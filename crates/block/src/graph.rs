//! The graph: named nodes, the registry of driver factories, and opening a
//! node (with inline children) from `blockdev-add` options.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use qsd_qapi::de::{from_value, InputMode};
use qsd_qapi::options::{
    split_blockdev, BlockdevCommon, BlockdevDetectZeroesOptions, BlockdevDiscardOptions,
};
use serde_json::{Map, Value};

use crate::driver::{BlockDriver, BoxFut};
use crate::events::EventSink;
use crate::node::{ChildLink, CommonOptions, DetectZeroes, Node};
use crate::objects::ObjectStore;
use crate::secrets::{SecretRef, SecretStore};
use crate::{Error, ErrorKind, NodeRef, Result};

/// Opens one kind of driver from its options (the common options already
/// taken out). Children are opened through `ctx`.
pub trait DriverFactory: Send + Sync + 'static {
    /// The `driver=` name.
    fn name(&self) -> &'static str;

    /// Open a node of this driver.
    fn open<'a>(
        &'a self,
        ctx: &'a mut OpenCtx<'_>,
        opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>>;
}

/// Resolve the common members of `BlockdevOptions` against the parent's
/// options (inline children inherit read-only, cache and discard settings,
/// as in qemu).
fn resolve_common(args: &BlockdevCommon, parent: Option<&CommonOptions>) -> Result<CommonOptions> {
    let base = parent.cloned().unwrap_or_default();
    let cache = args.cache.as_ref();
    let opts = CommonOptions {
        read_only: args.read_only.unwrap_or(base.read_only),
        auto_read_only: args.auto_read_only.unwrap_or(base.auto_read_only),
        force_share: args.force_share.unwrap_or(base.force_share),
        discard_unmap: args
            .discard
            .map_or(base.discard_unmap, |d| d == BlockdevDiscardOptions::Unmap),
        detect_zeroes: match args.detect_zeroes.unwrap_or_default() {
            BlockdevDetectZeroesOptions::Off => DetectZeroes::Off,
            BlockdevDetectZeroesOptions::On => DetectZeroes::On,
            BlockdevDetectZeroesOptions::Unmap => DetectZeroes::Unmap,
        },
        cache_direct: cache.and_then(|c| c.direct).unwrap_or(base.cache_direct),
        cache_no_flush: cache
            .and_then(|c| c.no_flush)
            .unwrap_or(base.cache_no_flush),
    };
    if args.active == Some(false) {
        return Err(Error::unsupported(
            "inactive nodes (active=off) are not supported by qsd",
        ));
    }
    if opts.force_share && !opts.read_only {
        return Err(Error::invalid(
            "force-share=on can only be used with read-only images",
        ));
    }
    if opts.detect_zeroes == DetectZeroes::Unmap && !opts.discard_unmap {
        return Err(Error::invalid(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        ));
    }
    Ok(opts)
}

/// qemu's rule for node names: a letter first, then letters, digits, '-', '.', '_'.
pub fn is_valid_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && name.len() < 32
}

/// Context handed to a factory while it opens a node.
pub struct OpenCtx<'g> {
    graph: &'g mut Graph,
    name: String,
    mode: InputMode,
    opts: CommonOptions,
    children: Vec<ChildLink>,
}

impl std::fmt::Debug for OpenCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCtx").field("opts", &self.opts).finish()
    }
}

impl OpenCtx<'_> {
    /// The name the node being opened will have (given or generated), for
    /// messages such as "node 'fmt'" in permission conflicts.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// The common options of the node being opened.
    pub fn options(&self) -> &CommonOptions {
        &self.opts
    }

    /// How option values arrived (QMP types are strict, keyval is coerced).
    pub fn mode(&self) -> InputMode {
        self.mode
    }

    /// Open (or look up) the child given by member `key` of `opts`: a node
    /// name, or an object describing a new implicit node. `None` when the
    /// member is absent.
    pub async fn child(
        &mut self,
        opts: &mut Map<String, Value>,
        key: &str,
    ) -> Result<Option<NodeRef>> {
        let Some(v) = opts.remove(key) else {
            return Ok(None);
        };
        let node = match v {
            Value::String(name) => self.graph.lookup_for_child(&name)?,
            Value::Object(o) => {
                let mut parent = self.opts.clone();
                // As in qemu, a backing file inherits the parent's options
                // but is opened read-only unless it says otherwise.
                if key == "backing" {
                    parent.read_only = true;
                }
                Box::pin(self.graph.open_inner(o, self.mode, Some(&parent))).await?
            }
            _ => {
                return Err(Error::invalid(format!(
                    "Invalid parameter type for '{key}', expected: BlockdevRef"
                )))
            }
        };
        self.children.push(ChildLink {
            role: key.to_string(),
            node: node.clone(),
        });
        Ok(Some(node))
    }

    /// Open a child the driver found itself (a backing file named in an
    /// image header): `opts` describe a new implicit node, or a string names
    /// an existing one. The child is recorded under `role`.
    pub async fn child_from(&mut self, role: &str, opts: Value) -> Result<NodeRef> {
        let mut m = Map::new();
        m.insert(role.to_string(), opts);
        self.required_child(&mut m, role).await
    }

    /// Look up secret `id` (a `key-secret` option). Keep the handle for as
    /// long as the node needs the secret: that keeps it from being deleted.
    pub fn secret(&self, id: &str) -> Result<SecretRef> {
        self.graph.secrets.get(id)
    }

    /// User-created object `id` of type `T` (for example a throttle group).
    /// Keep the handle for as long as the node uses the object: that keeps
    /// it from being deleted. `None` if it is missing or of another type.
    pub fn object<T: std::any::Any + Send + Sync>(&self, id: &str) -> Option<Arc<T>> {
        self.graph.objects.get(id)
    }

    /// Where the node raises QMP events.
    pub fn events(&self) -> EventSink {
        self.graph.events.clone()
    }

    /// Like [`OpenCtx::child`], but the member is required.
    pub async fn required_child(
        &mut self,
        opts: &mut Map<String, Value>,
        key: &str,
    ) -> Result<NodeRef> {
        self.child(opts, key)
            .await?
            .ok_or_else(|| Error::invalid(format!("Parameter '{key}' is missing")))
    }

    /// Deserialize the driver's own options.
    pub fn parse<T: serde::de::DeserializeOwned>(&self, opts: Map<String, Value>) -> Result<T> {
        Ok(from_value(&Value::Object(opts), self.mode)?)
    }
}

/// The named nodes and the driver registry. Owned by the control plane.
#[derive(Default)]
pub struct Graph {
    nodes: BTreeMap<String, NodeRef>,
    /// Names in creation order, for queries.
    order: Vec<String>,
    factories: HashMap<&'static str, Arc<dyn DriverFactory>>,
    next_auto: u64,
    events: EventSink,
    secrets: SecretStore,
    objects: ObjectStore,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("nodes", &self.nodes.keys())
            .finish()
    }
}

impl Graph {
    /// An empty graph with no drivers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Send the events drivers raise (BLOCK_IMAGE_CORRUPTED, ...) to `sink`.
    pub fn set_event_sink(&mut self, sink: EventSink) {
        self.events = sink;
    }

    /// The secrets drivers may look up (shared with the daemon's objects).
    pub fn secrets(&self) -> &SecretStore {
        &self.secrets
    }

    /// The user-created objects drivers look up (throttle groups, ...).
    pub fn objects(&self) -> &ObjectStore {
        &self.objects
    }

    /// Make a driver available.
    pub fn register(&mut self, factory: Arc<dyn DriverFactory>) {
        self.factories.insert(factory.name(), factory);
    }

    /// Names of the registered drivers, sorted.
    pub fn driver_names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.factories.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// A node by name.
    pub fn get(&self, name: &str) -> Option<NodeRef> {
        self.nodes.get(name).cloned()
    }

    /// Every node, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRef> {
        self.nodes.values()
    }

    /// Every node, the most recently created first (qemu's query order).
    pub fn nodes_newest_first(&self) -> impl Iterator<Item = &NodeRef> {
        self.order.iter().rev().filter_map(|n| self.nodes.get(n))
    }

    /// A node by name, or qemu's error for a missing one.
    pub fn lookup(&self, name: &str) -> Result<NodeRef> {
        self.get(name).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("Cannot find device='' nor node-name='{name}'"),
            )
        })
    }

    fn lookup_for_child(&self, name: &str) -> Result<NodeRef> {
        self.get(name).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("Cannot find device='{name}' nor node-name='{name}'"),
            )
        })
    }

    /// `blockdev-add`: open a node and its inline children. The top node
    /// must be named; inline children get qemu-style generated names.
    pub async fn open(&mut self, opts: Map<String, Value>, mode: InputMode) -> Result<NodeRef> {
        if !opts.contains_key("node-name") {
            return Err(Error::invalid(
                "'node-name' must be specified for the root node",
            ));
        }
        self.open_inner(opts, mode, None).await
    }

    async fn open_inner(
        &mut self,
        opts: Map<String, Value>,
        mode: InputMode,
        parent: Option<&CommonOptions>,
    ) -> Result<NodeRef> {
        let (args, rest) = split_blockdev(Value::Object(opts), mode)?;
        let implicit = args.node_name.is_none();
        let name = match &args.node_name {
            Some(n) => self.check_new_name(n)?,
            None => self.auto_name(),
        };
        let factory = self
            .factories
            .get(args.driver.as_str())
            .cloned()
            .ok_or_else(|| {
                Error::invalid(format!(
                    "Parameter 'driver' does not accept value '{}'",
                    args.driver
                ))
            })?;
        let common = resolve_common(&args, parent)?;
        let mut ctx = OpenCtx {
            graph: self,
            name: name.clone(),
            mode,
            opts: common.clone(),
            children: Vec::new(),
        };
        let opened = factory.open(&mut ctx, rest).await;
        let children = std::mem::take(&mut ctx.children);
        let driver = match opened {
            Ok(d) => d,
            Err(e) => {
                let kids: Vec<NodeRef> = children.into_iter().map(|c| c.node).collect();
                for child in kids {
                    if child.is_implicit() && Arc::strong_count(&child) == 2 {
                        let _ = Box::pin(self.close_tree(child)).await;
                    }
                }
                return Err(e);
            }
        };
        let node = Node::new(name.clone(), implicit, common, driver, children);
        self.order.push(name.clone());
        self.nodes.insert(name, node.clone());
        Ok(node)
    }

    fn check_new_name(&self, name: &str) -> Result<String> {
        if !is_valid_node_name(name) {
            return Err(Error::invalid(
                "Invalid node-name: '".to_string() + name + "'",
            ));
        }
        if self.nodes.contains_key(name) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("Duplicate nodes with node-name='{name}'"),
            ));
        }
        Ok(name.to_string())
    }

    /// qemu names implicit nodes "#block" + a counter + two pseudo-random digits.
    fn auto_name(&mut self) -> String {
        let n = self.next_auto;
        self.next_auto += 1;
        let salt = (n.wrapping_mul(2_654_435_761) >> 7) % 100;
        format!("#block{n}{salt:02}")
    }

    /// `blockdev-del`: close a monitor-owned node nobody uses, and the
    /// implicit children only it used.
    pub async fn delete(&mut self, name: &str) -> Result<()> {
        let node = self.get(name).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("Failed to find node with node-name='{name}'"),
            )
        })?;
        if node.is_implicit() {
            return Err(Error::invalid(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        self.ensure_unused(&node)?;
        self.close_tree(node).await
    }

    fn ensure_unused(&self, node: &NodeRef) -> Result<()> {
        let users = node.root_user_names();
        let parents: Vec<&str> = self
            .nodes
            .values()
            .filter(|n| n.children().iter().any(|c| Arc::ptr_eq(&c.node, node)))
            .map(|n| n.name())
            .collect();
        if users.is_empty() && parents.is_empty() && node.user_names().is_empty() {
            return Ok(());
        }
        let msg = if users.is_empty() {
            format!("Block device {} is in use", node.name())
        } else {
            format!("Node {} is in use", node.name())
        };
        Err(Error::new(ErrorKind::Busy, msg))
    }

    fn forget(&mut self, name: &str) -> Option<NodeRef> {
        self.order.retain(|n| n != name);
        self.nodes.remove(name)
    }

    async fn close_tree(&mut self, node: NodeRef) -> Result<()> {
        self.forget(node.name());
        let closed = node.close().await;
        let children: Vec<NodeRef> = node.children().iter().map(|c| c.node.clone()).collect();
        drop(node);
        for child in children {
            let still_parented = self
                .nodes
                .values()
                .any(|n| n.children().iter().any(|c| Arc::ptr_eq(&c.node, &child)));
            // The count is 1 when only our local handle is left.
            if child.is_implicit() && !still_parented && Arc::strong_count(&child) == 1 {
                Box::pin(self.close_tree(child)).await?;
            }
        }
        closed
    }

    /// Close every node (daemon shutdown): parents before children.
    pub async fn close_all(&mut self) {
        while let Some(name) = self.top_node_name() {
            if let Some(node) = self.forget(&name) {
                if let Err(e) = node.close().await {
                    tracing::warn!(node = %name, "closing failed: {e}");
                }
            }
        }
    }

    fn top_node_name(&self) -> Option<String> {
        let is_child = |n: &NodeRef| {
            self.nodes
                .values()
                .any(|p| p.children().iter().any(|c| Arc::ptr_eq(&c.node, n)))
        };
        self.nodes
            .values()
            .find(|n| !is_child(n))
            .map(|n| n.name().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_node_name_validation_follows_qemu() {
        assert!(is_valid_node_name("disk0"));
        assert!(is_valid_node_name("a.b-c_d"));
        assert!(!is_valid_node_name("0disk"));
        assert!(!is_valid_node_name("#block1"));
        assert!(!is_valid_node_name(""));
    }

    #[test]
    fn test_auto_name_has_block_prefix() {
        let mut g = Graph::new();
        let a = g.auto_name();
        let b = g.auto_name();
        assert!(a.starts_with("#block0") && b.starts_with("#block1") && a != b);
    }
}
