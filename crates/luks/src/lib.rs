//! LUKS1 for qsd: parsing and writing the on-disk header (LUKS1 On-Disk
//! Format Specification 1.2.3, with qemu's stricter checks), unlocking the
//! master key from a keyslot with a passphrase, and encrypting payload
//! sectors (AES-XTS or AES-CBC with plain, plain64 or ESSIV IVs).
//! [`secret`] decodes the data of qemu `secret` objects.
//!
//! No I/O: callers read the header and key material and hand the bytes in.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod cipher;
mod error;
mod hash;
mod header;
mod keyslot;
pub mod secret;
mod spec;

pub use cipher::SectorCipher;
pub use error::LuksError;
pub use hash::{af_merge, af_split, HashAlg};
pub use header::{
    parse_header, parse_header_detached, KeySlot, LuksHeader, DIGEST_LEN, HEADER_LEN,
    HEADER_SECTORS, MAGIC, NUM_SLOTS, SALT_LEN, SECTOR_SIZE, STRIPES,
};
pub use keyslot::{format, unlock, unlock_slot, MasterKey};
pub use spec::{CipherMode, CipherSpec, IvGen};
