//! `--export` / `block-export-add` and the export removal commands.

use serde::de::Error as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::SocketAddress;
use crate::de::Size;
use crate::error::Error;
use crate::raw::{flat_union, Raw};

/// qemu's `BlockExportType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockExportType {
    Nbd,
    VhostUserBlk,
    Fuse,
    VduseBlk,
}

/// qemu's `BlockDirtyBitmap`: a bitmap named by node and bitmap name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockDirtyBitmap {
    pub node: String,
    pub name: String,
}

/// qemu's alternate `BlockDirtyBitmapOrStr`: a bitmap of the exported node by name, or
/// any node's bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum BlockDirtyBitmapOrStr {
    Local(String),
    External(BlockDirtyBitmap),
}

impl<'de> Deserialize<'de> for BlockDirtyBitmapOrStr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Raw::deserialize(d)?;
        match &raw.value {
            Value::String(s) => Ok(BlockDirtyBitmapOrStr::Local(s.clone())),
            Value::Object(_) => raw
                .parse()
                .map(BlockDirtyBitmapOrStr::External)
                .map_err(D::Error::custom),
            // qemu names the alternate by the member's own name here.
            _ => Err(D::Error::custom(format!(
                "Invalid parameter type for '{}', expected: BlockDirtyBitmapOrStr",
                raw.name()
            ))),
        }
    }
}

/// `iothread` of an export: qemu's single I/O thread name, or (a qsd
/// extension, `iothread.0=a,iothread.1=b` on the command line) a list of
/// threads over which a multiqueue export spreads its queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum BlockExportIothread {
    Single(String),
    List(Vec<String>),
}

impl BlockExportIothread {
    /// The thread names, in order.
    pub fn names(&self) -> Vec<&str> {
        match self {
            BlockExportIothread::Single(s) => vec![s.as_str()],
            BlockExportIothread::List(l) => l.iter().map(String::as_str).collect(),
        }
    }
}

impl<'de> Deserialize<'de> for BlockExportIothread {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Raw::deserialize(d)?;
        match &raw.value {
            Value::String(s) => Ok(BlockExportIothread::Single(s.clone())),
            Value::Array(_) => raw
                .parse()
                .map(BlockExportIothread::List)
                .map_err(D::Error::custom),
            _ => Err(D::Error::custom(format!(
                "Invalid parameter type for '{}', expected: string",
                raw.name()
            ))),
        }
    }
}

/// The `nbd` variant of `block-export-add`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockExportOptionsNbd {
    /// Export name; defaults to the node name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BlockDirtyBitmapOrStr>>,
    /// Expose the `qemu:allocation-depth` metadata context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_depth: Option<bool>,
}

/// The `vhost-user-blk` variant of `block-export-add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockExportOptionsVhostUserBlk {
    pub addr: SocketAddress,
    /// QAPI `size`; qemu's default is 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_block_size: Option<Size>,
    /// qemu's default is 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
}

/// qemu's `FuseExportAllowOther`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FuseExportAllowOther {
    Off,
    On,
    #[default]
    Auto,
}

/// The `fuse` variant of `block-export-add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockExportOptionsFuse {
    pub mountpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub growable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_other: Option<FuseExportAllowOther>,
}

/// The `vduse-blk` variant of `block-export-add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockExportOptionsVduseBlk {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_block_size: Option<Size>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

/// The type-specific part of [`BlockExportOptions`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum BlockExportKind {
    Nbd(BlockExportOptionsNbd),
    VhostUserBlk(BlockExportOptionsVhostUserBlk),
    Fuse(BlockExportOptionsFuse),
    VduseBlk(BlockExportOptionsVduseBlk),
}

/// `--export` and `block-export-add` (qemu's flat union `BlockExportOptions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportOptions {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fixed_iothread: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iothread: Option<BlockExportIothread>,
    pub node_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writable: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writethrough: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_inactive: Option<bool>,
    #[serde(flatten)]
    pub kind: BlockExportKind,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockExportBase {
    #[serde(rename = "type")]
    kind: BlockExportType,
    id: String,
    #[serde(default)]
    fixed_iothread: Option<bool>,
    #[serde(default)]
    iothread: Option<BlockExportIothread>,
    node_name: String,
    #[serde(default)]
    writable: Option<bool>,
    #[serde(default)]
    writethrough: Option<bool>,
    #[serde(default)]
    allow_inactive: Option<bool>,
}

const BLOCK_EXPORT_BASE_KEYS: &[&str] = &[
    "type",
    "id",
    "fixed-iothread",
    "iothread",
    "node-name",
    "writable",
    "writethrough",
    "allow-inactive",
];

impl BlockExportOptions {
    /// Parses the flat union from a captured node.
    pub fn from_raw(raw: &Raw) -> Result<Self, Error> {
        let (b, kind) = flat_union(raw, BLOCK_EXPORT_BASE_KEYS, |b: &BlockExportBase, rest| {
            Ok(match b.kind {
                BlockExportType::Nbd => BlockExportKind::Nbd(rest.parse()?),
                BlockExportType::VhostUserBlk => BlockExportKind::VhostUserBlk(rest.parse()?),
                BlockExportType::Fuse => BlockExportKind::Fuse(rest.parse()?),
                BlockExportType::VduseBlk => BlockExportKind::VduseBlk(rest.parse()?),
            })
        })?;
        Ok(BlockExportOptions {
            id: b.id,
            fixed_iothread: b.fixed_iothread,
            iothread: b.iothread,
            node_name: b.node_name,
            writable: b.writable,
            writethrough: b.writethrough,
            allow_inactive: b.allow_inactive,
            kind,
        })
    }

    pub fn export_type(&self) -> BlockExportType {
        match self.kind {
            BlockExportKind::Nbd(_) => BlockExportType::Nbd,
            BlockExportKind::VhostUserBlk(_) => BlockExportType::VhostUserBlk,
            BlockExportKind::Fuse(_) => BlockExportType::Fuse,
            BlockExportKind::VduseBlk(_) => BlockExportType::VduseBlk,
        }
    }

    /// Exports are read-only unless `writable=on`.
    pub fn writable(&self) -> bool {
        self.writable.unwrap_or(false)
    }

    pub fn writethrough(&self) -> bool {
        self.writethrough.unwrap_or(false)
    }

    pub fn fixed_iothread(&self) -> bool {
        self.fixed_iothread.unwrap_or(false)
    }

    pub fn allow_inactive(&self) -> bool {
        self.allow_inactive.unwrap_or(false)
    }

    /// For an NBD export, its name (defaults to the node name).
    pub fn nbd_export_name(&self) -> Option<&str> {
        match &self.kind {
            BlockExportKind::Nbd(n) => Some(n.name.as_deref().unwrap_or(&self.node_name)),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for BlockExportOptions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Raw::deserialize(d)?;
        Self::from_raw(&raw).map_err(D::Error::custom)
    }
}

/// qemu's `BlockExportRemoveMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockExportRemoveMode {
    /// Fail if the export is in use.
    #[default]
    Safe,
    /// Disconnect clients.
    Hard,
}

/// `block-export-del` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockExportDelArgs {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BlockExportRemoveMode>,
}

/// `nbd-server-add` arguments (deprecated in qemu, still served).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NbdServerAddArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
}

/// `nbd-server-remove` arguments (deprecated in qemu, still served).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NbdServerRemoveArgs {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BlockExportRemoveMode>,
}
