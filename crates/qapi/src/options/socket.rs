//! `SocketAddress` (flat union) and `SocketAddressLegacy` (`{type, data}`).

use serde::de::Error as _;
use serde::{Deserialize, Serialize};

use crate::raw::{flat_union, Raw};

/// qemu's `InetSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InetSocketAddress {
    pub host: String,
    pub port: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numeric: Option<bool>,
    /// Try ports `port..=to` until one is free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mptcp: Option<bool>,
}

/// qemu's `UnixSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct UnixSocketAddress {
    pub path: String,
    /// Linux abstract socket namespace.
    #[serde(default, rename = "abstract", skip_serializing_if = "Option::is_none")]
    pub is_abstract: Option<bool>,
    /// For abstract sockets: address length is the name's length (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tight: Option<bool>,
}

/// qemu's `VsockSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VsockSocketAddress {
    pub cid: String,
    pub port: String,
}

/// qemu's `String` wrapper used for `fd` addresses: a file descriptor number or the
/// name of a monitor fd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FdSocketAddress {
    #[serde(rename = "str")]
    pub fd: String,
}

/// qemu's `SocketAddressType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketAddressType {
    Inet,
    Unix,
    Vsock,
    Fd,
}

/// qemu's flat `SocketAddress`: `{"type": "unix", "path": "/tmp/s"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SocketAddress {
    Inet(InetSocketAddress),
    Unix(UnixSocketAddress),
    Vsock(VsockSocketAddress),
    Fd(FdSocketAddress),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SocketAddressBase {
    #[serde(rename = "type")]
    kind: SocketAddressType,
}

impl SocketAddress {
    /// Parses the flat union from a captured node.
    pub fn from_raw(raw: &Raw) -> Result<Self, crate::Error> {
        let (_, addr) = flat_union(raw, &["type"], |base: &SocketAddressBase, rest| {
            Ok(match base.kind {
                SocketAddressType::Inet => SocketAddress::Inet(rest.parse()?),
                SocketAddressType::Unix => SocketAddress::Unix(rest.parse()?),
                SocketAddressType::Vsock => SocketAddress::Vsock(rest.parse()?),
                SocketAddressType::Fd => SocketAddress::Fd(rest.parse()?),
            })
        })?;
        Ok(addr)
    }

    /// The address type.
    pub fn kind(&self) -> SocketAddressType {
        match self {
            SocketAddress::Inet(_) => SocketAddressType::Inet,
            SocketAddress::Unix(_) => SocketAddressType::Unix,
            SocketAddress::Vsock(_) => SocketAddressType::Vsock,
            SocketAddress::Fd(_) => SocketAddressType::Fd,
        }
    }
}

impl<'de> Deserialize<'de> for SocketAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Raw::deserialize(d)?;
        Self::from_raw(&raw).map_err(D::Error::custom)
    }
}

/// qemu's `SocketAddressLegacy`: `{"type": "unix", "data": {"path": "/tmp/s"}}`, used by
/// `nbd-server-start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum SocketAddressLegacy {
    Inet(InetSocketAddress),
    Unix(UnixSocketAddress),
    Vsock(VsockSocketAddress),
    Fd(FdSocketAddress),
}

impl SocketAddressLegacy {
    /// Parses the union from a captured node, checking members in qemu's order
    /// (`type`, `data`, then unexpected ones).
    pub fn from_raw(raw: &Raw) -> Result<Self, crate::Error> {
        let (base, rest) = raw.split(&["type"])?;
        let base: SocketAddressBase = base.parse()?;
        let data = raw.member("data").ok_or_else(|| raw.missing("data"))?;
        let addr = match base.kind {
            SocketAddressType::Inet => SocketAddressLegacy::Inet(data.parse()?),
            SocketAddressType::Unix => SocketAddressLegacy::Unix(data.parse()?),
            SocketAddressType::Vsock => SocketAddressLegacy::Vsock(data.parse()?),
            SocketAddressType::Fd => SocketAddressLegacy::Fd(data.parse()?),
        };
        if let Some(extra) = rest.as_object()?.keys().find(|k| *k != "data") {
            return Err(raw.unexpected(extra));
        }
        Ok(addr)
    }
}

impl<'de> Deserialize<'de> for SocketAddressLegacy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Raw::deserialize(d)?;
        Self::from_raw(&raw).map_err(D::Error::custom)
    }
}

impl From<SocketAddressLegacy> for SocketAddress {
    fn from(a: SocketAddressLegacy) -> Self {
        match a {
            SocketAddressLegacy::Inet(x) => SocketAddress::Inet(x),
            SocketAddressLegacy::Unix(x) => SocketAddress::Unix(x),
            SocketAddressLegacy::Vsock(x) => SocketAddress::Vsock(x),
            SocketAddressLegacy::Fd(x) => SocketAddress::Fd(x),
        }
    }
}

impl From<SocketAddress> for SocketAddressLegacy {
    fn from(a: SocketAddress) -> Self {
        match a {
            SocketAddress::Inet(x) => SocketAddressLegacy::Inet(x),
            SocketAddress::Unix(x) => SocketAddressLegacy::Unix(x),
            SocketAddress::Vsock(x) => SocketAddressLegacy::Vsock(x),
            SocketAddress::Fd(x) => SocketAddressLegacy::Fd(x),
        }
    }
}
