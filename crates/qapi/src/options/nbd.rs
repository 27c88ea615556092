//! `--nbd-server` and `nbd-server-start`.

use serde::{Deserialize, Serialize};

use super::{SocketAddress, SocketAddressLegacy};

/// qemu's default for `handshake-max-seconds` (`NBD_DEFAULT_HANDSHAKE_MAX_SECS`).
pub const NBD_DEFAULT_HANDSHAKE_MAX_SECS: u32 = 10;

/// `--nbd-server` (qemu's `NbdServerOptions`): the address is a flat `SocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NbdServerOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_max_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    pub addr: SocketAddress,
}

/// `nbd-server-start` arguments: like [`NbdServerOptions`] with a legacy address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NbdServerStartArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_max_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    pub addr: SocketAddressLegacy,
}

impl NbdServerOptions {
    /// Seconds a client may take for the handshake; 0 means no limit.
    pub fn handshake_max_seconds(&self) -> u32 {
        self.handshake_max_seconds
            .unwrap_or(NBD_DEFAULT_HANDSHAKE_MAX_SECS)
    }

    /// Connection limit; 0 means unlimited.
    pub fn max_connections(&self) -> u32 {
        self.max_connections.unwrap_or(0)
    }
}

impl From<NbdServerStartArgs> for NbdServerOptions {
    fn from(a: NbdServerStartArgs) -> Self {
        NbdServerOptions {
            handshake_max_seconds: a.handshake_max_seconds,
            tls_creds: a.tls_creds,
            tls_authz: a.tls_authz,
            max_connections: a.max_connections,
            addr: a.addr.into(),
        }
    }
}
