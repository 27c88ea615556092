//! The block layer's error type: a matchable kind, a message for humans, and
//! the host errno that protocol edges turn into their own status codes.

use std::io;

/// What kind of failure, for callers that need to react differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An I/O error from the layer below (errno kept).
    Io,
    /// A bad argument: option value, offset, length.
    InvalidArgument,
    /// A named thing does not exist.
    NotFound,
    /// Permissions of two users conflict, or an image lock is held elsewhere.
    PermissionConflict,
    /// A write to a read-only node or export.
    ReadOnly,
    /// The operation is not supported by this driver.
    Unsupported,
    /// The name is taken or the node is in use.
    Busy,
    /// An image's metadata is inconsistent.
    Corrupt,
}

/// A block layer error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{msg}")]
pub struct Error {
    kind: ErrorKind,
    msg: String,
    errno: i32,
}

/// Result alias for the block layer.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error of `kind` with a message; errno chosen from the kind.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        let errno = match kind {
            ErrorKind::Io | ErrorKind::Corrupt => libc_errno::EIO,
            ErrorKind::InvalidArgument | ErrorKind::NotFound => libc_errno::EINVAL,
            ErrorKind::PermissionConflict | ErrorKind::ReadOnly => libc_errno::EPERM,
            ErrorKind::Unsupported => libc_errno::ENOTSUP,
            ErrorKind::Busy => libc_errno::EBUSY,
        };
        Error {
            kind,
            msg: msg.into(),
            errno,
        }
    }

    /// An I/O error: `what` says which operation on which object failed.
    pub fn io(what: impl std::fmt::Display, err: &io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            msg: format!("{what}: {err}"),
            errno: err.raw_os_error().unwrap_or(libc_errno::EIO),
        }
    }

    /// Shorthand for an invalid argument.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, msg)
    }

    /// Shorthand for an unsupported operation.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, msg)
    }

    /// Replace the errno (for example EROFS, ENOSPC).
    pub fn with_errno(mut self, errno: i32) -> Self {
        self.errno = errno;
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The host errno a protocol edge should report.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.msg
    }
}

impl From<qsd_qapi::Error> for Error {
    fn from(e: qsd_qapi::Error) -> Self {
        Error::invalid(e.to_string())
    }
}

/// Linux errno values used here (kept local so this crate needs no libc).
pub mod libc_errno {
    /// Operation not permitted.
    pub const EPERM: i32 = 1;
    /// I/O error.
    pub const EIO: i32 = 5;
    /// Device or resource busy.
    pub const EBUSY: i32 = 16;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// No space left on device.
    pub const ENOSPC: i32 = 28;
    /// Read-only file system.
    pub const EROFS: i32 = 30;
    /// Operation not supported.
    pub const ENOTSUP: i32 = 95;
}
