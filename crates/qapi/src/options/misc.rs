//! `object-add`/`--object`, `--chardev socket` and `--monitor`.

use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::de::InputMode;
use crate::error::Error;
use crate::raw::Raw;

/// `object-add` and `--object`: the type and id, with the type-specific properties kept
/// as a captured node for the object's own type (e.g. [`IothreadProps`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectAddArgs {
    pub qom_type: String,
    pub id: String,
    /// The remaining members; parse with `props.parse::<T>()` to keep keyval coercion.
    pub props: Raw,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ObjectAddBase {
    qom_type: String,
    id: String,
}

impl ObjectAddArgs {
    /// Parses the flat union's base from a captured node.
    pub fn from_raw(raw: &Raw) -> Result<Self, Error> {
        let (base, props) = raw.split(&["qom-type", "id"])?;
        let base: ObjectAddBase = base.parse()?;
        Ok(ObjectAddArgs {
            qom_type: base.qom_type,
            id: base.id,
            props,
        })
    }

    /// The type-specific properties as `T`.
    pub fn props<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        self.props.parse()
    }
}

impl<'de> Deserialize<'de> for ObjectAddArgs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Raw::deserialize(d)?;
        Self::from_raw(&raw).map_err(D::Error::custom)
    }
}

impl Serialize for ObjectAddArgs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let props = self.props.value.as_object();
        let mut m = s.serialize_map(Some(2 + props.map_or(0, |p| p.len())))?;
        m.serialize_entry("qom-type", &self.qom_type)?;
        m.serialize_entry("id", &self.id)?;
        for (k, v) in props.into_iter().flatten() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// Properties of an `iothread` object (qemu's `IothreadProperties`, including the
/// event-loop base members).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct IothreadProps {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aio_max_batch: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_pool_min: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_pool_max: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_max_ns: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_grow: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_shrink: Option<i64>,
}

/// qemu's `MonitorMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MonitorMode {
    Readline,
    #[default]
    Control,
}

/// `--monitor` (qemu's `MonitorOptions`; the implied key is `chardev`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MonitorOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MonitorMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretty: Option<bool>,
    pub chardev: String,
}

impl MonitorOptions {
    /// The storage daemon's default mode is `control`.
    pub fn mode(&self) -> MonitorMode {
        self.mode.unwrap_or_default()
    }

    pub fn pretty(&self) -> bool {
        self.pretty.unwrap_or(false)
    }
}

/// `--chardev socket,...` as parsed from QemuOpts (see
/// [`crate::keyval::parse_qemu_opts`] with implied key `backend`). Values are strings
/// converted like keyval input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ChardevSocketOptions {
    pub backend: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numeric: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mptcp: Option<bool>,
    #[serde(default, rename = "abstract", skip_serializing_if = "Option::is_none")]
    pub is_abstract: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tight: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodelay: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telnet: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tn3270: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logfile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logappend: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mux: Option<bool>,
}

/// Keys QemuOpts accepts for any chardev backend that [`ChardevSocketOptions`] does not
/// model; they are accepted and ignored for a socket, as in qemu.
const CHARDEV_OTHER_KEYS: &[&str] = &[
    "size",
    "chardev",
    "signal",
    "name",
    "debug",
    "localaddr",
    "localport",
    "append",
    "input-path",
    "rows",
    "cols",
    "width",
    "height",
];

const CHARDEV_SOCKET_KEYS: &[&str] = &[
    "backend",
    "id",
    "path",
    "host",
    "port",
    "fd",
    "to",
    "ipv4",
    "ipv6",
    "numeric",
    "keep-alive",
    "mptcp",
    "abstract",
    "tight",
    "server",
    "wait",
    "delay",
    "nodelay",
    "telnet",
    "tn3270",
    "websocket",
    "reconnect-ms",
    "tls-creds",
    "tls-authz",
    "logfile",
    "logappend",
    "mux",
];

impl ChardevSocketOptions {
    /// Builds the options from QemuOpts output, with qemu's "Invalid parameter 'x'" for
    /// keys no chardev backend knows.
    pub fn from_opts(opts: &Value) -> Result<Self, Error> {
        let raw = Raw::new(opts.clone(), InputMode::Keyval);
        let m = raw.as_object()?;
        if let Some(bad) = m.keys().find(|k| {
            !CHARDEV_SOCKET_KEYS.contains(&k.as_str()) && !CHARDEV_OTHER_KEYS.contains(&k.as_str())
        }) {
            return Err(Error::syntax(format!("Invalid parameter '{bad}'")));
        }
        let (known, _ignored) = raw.split(CHARDEV_SOCKET_KEYS)?;
        known.parse()
    }

    /// The effective `server` flag (default off).
    pub fn server(&self) -> bool {
        self.server.unwrap_or(false)
    }

    /// The effective `wait` flag: servers wait for a client by default.
    pub fn wait(&self) -> bool {
        self.wait.unwrap_or(true)
    }
}
