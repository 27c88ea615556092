//! The NBD (Network Block Device) protocol as a pure codec: bytes in, typed
//! messages out, and back. Nothing here touches a socket or a runtime.
//!
//! - [`consts`]: magic numbers, flag sets, numbered values, errno mapping.
//! - [`handshake`]: the fixed-newstyle messages (greeting, options, option
//!   replies) and [`negotiate::Negotiation`], a server-side state machine that
//!   consumes client bytes and writes replies, asking an [`negotiate::ExportCatalog`]
//!   about exports.
//! - [`meta`]: metadata contexts (`base:allocation`, `qemu:allocation-depth`,
//!   `qemu:dirty-bitmap:NAME`) and query matching.
//! - [`transmission`]: request headers and simple / structured replies.
//!
//! Decoders take `&[u8]` and return [`Decoded::Incomplete`] with the number of
//! bytes they need, or the value and the number of bytes consumed. Encoders
//! append to any [`bytes::BufMut`] (`Vec<u8>`, `BytesMut`) without allocating
//! on their own.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod consts;
pub mod handshake;
pub mod meta;
pub mod negotiate;
pub mod transmission;

pub use consts::*;
pub use handshake::{ClientOption, InfoRequest, MetaRequest, OptionHeader};
pub use meta::{MetaContext, MetaSelection};
pub use negotiate::{ExportCatalog, ExportInfo, Negotiated, Negotiation, Step};
pub use transmission::{Extent, Request};

/// Result of decoding from a byte slice that may hold only part of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// At least this many bytes (counted from the start of the slice) are needed.
    Incomplete(usize),
    /// The decoded value and how many bytes it used.
    Done(T, usize),
}

impl<T> Decoded<T> {
    /// The value, if complete.
    pub fn done(self) -> Option<(T, usize)> {
        match self {
            Decoded::Done(v, n) => Some((v, n)),
            Decoded::Incomplete(_) => None,
        }
    }
}

/// A violation that ends the connection (as opposed to an option error, which
/// is answered with an error reply and the negotiation goes on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A magic number did not match.
    #[error("bad magic {found:#x} in {what} (expected {expected:#x})")]
    BadMagic {
        /// Which message.
        what: &'static str,
        /// Expected value.
        expected: u64,
        /// Received value.
        found: u64,
    },
    /// The client set flags the server does not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option's declared length is beyond what the server accepts.
    #[error("option {option} has length {len}, more than the limit of {max}")]
    OptionTooLong {
        /// Option number.
        option: u32,
        /// Declared length.
        len: u32,
        /// Limit.
        max: u32,
    },
    /// The client sent an option other than `NBD_OPT_EXPORT_NAME` without
    /// fixed newstyle, or `NBD_OPT_EXPORT_NAME` with a name the server refuses.
    #[error("{0}")]
    Refused(String),
    /// The client sent data after its last message (e.g. after `NBD_OPT_ABORT`).
    #[error("negotiation already finished")]
    Finished,
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}
