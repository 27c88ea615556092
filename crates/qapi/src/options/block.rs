//! `--blockdev` / `blockdev-add` common members and small block-layer commands.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::de::InputMode;
use crate::error::Error;
use crate::raw::Raw;

/// Every value of qemu 10.0's `BlockdevDriver` enum; other names are rejected with
/// "Parameter 'driver' does not accept value ...".
pub const BLOCKDEV_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// qemu's `BlockdevDiscardOptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevDiscardOptions {
    #[default]
    Ignore,
    Unmap,
}

/// qemu's `BlockdevDetectZeroesOptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevDetectZeroesOptions {
    #[default]
    Off,
    On,
    Unmap,
}

/// qemu's `BlockdevCacheOptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevCacheOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_flush: Option<bool>,
}

/// The members every `blockdev-add` driver shares (base of qemu's `BlockdevOptions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevCommon {
    pub driver: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discard: Option<BlockdevDiscardOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<BlockdevCacheOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_share: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_zeroes: Option<BlockdevDetectZeroesOptions>,
}

/// The wire names of [`BlockdevCommon`]'s members.
pub const BLOCKDEV_COMMON_KEYS: &[&str] = &[
    "driver",
    "node-name",
    "discard",
    "cache",
    "active",
    "read-only",
    "auto-read-only",
    "force-share",
    "detect-zeroes",
];

impl BlockdevCommon {
    /// Takes the common members out of a `blockdev-add` node and checks the driver name;
    /// the driver-specific rest keeps the node's mode and location.
    pub fn split(raw: &Raw) -> Result<(BlockdevCommon, Raw), Error> {
        let (common, rest) = raw.split(BLOCKDEV_COMMON_KEYS)?;
        let common: BlockdevCommon = common.parse()?;
        if !BLOCKDEV_DRIVERS.contains(&common.driver.as_str()) {
            return Err(raw.bad_value("driver", &common.driver));
        }
        Ok((common, rest))
    }

    pub fn discard(&self) -> BlockdevDiscardOptions {
        self.discard.unwrap_or_default()
    }

    pub fn detect_zeroes(&self) -> BlockdevDetectZeroesOptions {
        self.detect_zeroes.unwrap_or_default()
    }

    pub fn cache_direct(&self) -> bool {
        self.cache.and_then(|c| c.direct).unwrap_or(false)
    }

    pub fn cache_no_flush(&self) -> bool {
        self.cache.and_then(|c| c.no_flush).unwrap_or(false)
    }

    pub fn read_only(&self) -> bool {
        self.read_only.unwrap_or(false)
    }

    pub fn auto_read_only(&self) -> bool {
        self.auto_read_only.unwrap_or(false)
    }

    pub fn force_share(&self) -> bool {
        self.force_share.unwrap_or(false)
    }

    /// Nodes are active unless created with `active=off`.
    pub fn active(&self) -> bool {
        self.active.unwrap_or(true)
    }
}

/// [`BlockdevCommon::split`] on a root node: returns the common members and the
/// driver-specific members (still strings for keyval input; parse them with
/// [`crate::from_value`] and the same `mode`).
pub fn split_blockdev(
    v: Value,
    mode: InputMode,
) -> Result<(BlockdevCommon, Map<String, Value>), Error> {
    let (common, rest) = BlockdevCommon::split(&Raw::new(v, mode))?;
    match rest.value {
        Value::Object(m) => Ok((common, m)),
        _ => Ok((common, Map::new())),
    }
}

/// `blockdev-del` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevDelArgs {
    pub node_name: String,
}

/// `block_resize` arguments. `size` is QAPI `int`; the command itself rejects negative
/// values ("Parameter 'size' expects a >0 size").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockResizeArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    pub size: i64,
}

/// `query-named-block-nodes` arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct QueryNamedBlockNodesArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat: Option<bool>,
}

/// `query-blockstats` arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct QueryBlockstatsArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_nodes: Option<bool>,
}
