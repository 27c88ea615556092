//! The error type of the NBD server's control plane.

use std::io;

/// What went wrong when starting the server or managing exports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A listening socket could not be set up.
    #[error("failed to listen on {addr}: {source}")]
    Listen {
        /// The address, as the user wrote it.
        addr: String,
        /// The cause.
        source: io::Error,
    },
    /// A host name did not resolve to any address.
    #[error("address resolution failed for {addr}: {source}")]
    Resolve {
        /// `host:port`.
        addr: String,
        /// The cause.
        source: io::Error,
    },
    /// Exports need a running server (qemu's rule).
    #[error("NBD server not running")]
    NotRunning,
    /// The server is already listening.
    #[error("NBD server already running")]
    AlreadyRunning,
    /// An export with this name exists.
    #[error("NBD server already has export named '{0}'")]
    ExportExists(String),
    /// No export with this name.
    #[error("export '{0}' not found")]
    ExportNotFound(String),
    /// Safe removal refused because clients are connected.
    #[error("export '{0}' still in use")]
    ExportInUse(String),
    /// An export name longer than the protocol allows.
    #[error("export name '{0}' too long")]
    NameTooLong(String),
    /// A description longer than the protocol allows.
    #[error("description '{0}' too long")]
    DescriptionTooLong(String),
    /// The export's size could not be used.
    #[error("{0}")]
    Block(#[from] qsd_block::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
