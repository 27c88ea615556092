//! The error type of the FUSE export's control plane, worded as qemu words it.

use std::io;

/// What went wrong when setting up a FUSE export.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The mount point could not be examined.
    #[error("Failed to stat '{path}': {reason}")]
    Stat {
        /// The mount point as given.
        path: String,
        /// The system's text for the errno.
        reason: String,
    },
    /// The mount point is a directory, device, ...
    #[error("'{0}' is not a regular file")]
    NotRegularFile(String),
    /// Mounting failed (qemu gives no detail; the cause is kept for logs).
    #[error("Failed to mount FUSE session to export")]
    Mount {
        /// The mount point.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The session's `/dev/fuse` descriptor could not be duplicated.
    #[error("Failed to set up FUSE session: {0}")]
    Session(io::Error),
    /// The block layer refused (permissions).
    #[error("{0}")]
    Block(#[from] qsd_block::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The C library's text for an errno, without Rust's "(os error N)" suffix.
pub(crate) fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_owned(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_strerror_enoent_matches_libc_text() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(strerror(&e), "No such file or directory");
    }

    #[test]
    fn test_stat_error_wording_is_qemus() {
        let e = Error::Stat {
            path: "/x".into(),
            reason: "No such file or directory".into(),
        };
        assert_eq!(
            e.to_string(),
            "Failed to stat '/x': No such file or directory"
        );
    }
}
