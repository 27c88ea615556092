//! The crate's one error type. Messages follow qemu's wording where qemu
//! has a message for the same condition, so users see familiar text.

use thiserror::Error;

/// Everything that can go wrong parsing, unlocking, encrypting or decoding
/// a secret.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LuksError {
    /// Fewer bytes than a LUKS1 header.
    #[error("LUKS header needs {need} bytes, only {got} available")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        got: usize,
    },
    /// The magic bytes are wrong.
    #[error("Volume is not in LUKS format")]
    NotLuks,
    /// A version other than 1.
    #[error("LUKS version {0} is not supported")]
    UnsupportedVersion(u16),
    /// A string field fills its whole slot without a terminating NUL.
    #[error("LUKS header {0} is not NUL terminated")]
    NotNulTerminated(&'static str),
    /// The payload starts inside the header area.
    #[error("LUKS payload is overlapping with the header")]
    PayloadOverlapsHeader,
    /// Master-key digest iteration count of 0.
    #[error("LUKS key iteration count is zero")]
    ZeroDigestIterations,
    /// Stripe count other than 4000.
    #[error("Keyslot {slot} is corrupted (stripes {stripes} != 4000)")]
    BadStripes {
        /// Keyslot index.
        slot: usize,
        /// Stripe count found.
        stripes: u32,
    },
    /// Keyslot state is neither enabled nor disabled.
    #[error("Keyslot {0} state (active/disable) is corrupted")]
    BadSlotState(usize),
    /// Active keyslot with 0 iterations.
    #[error("Keyslot {0} iteration count is zero")]
    ZeroSlotIterations(usize),
    /// Key material starts inside the header.
    #[error("Keyslot {0} is overlapping with the LUKS header")]
    SlotOverlapsHeader(usize),
    /// Key material runs into the payload.
    #[error("Keyslot {0} is overlapping with the encrypted payload")]
    SlotOverlapsPayload(usize),
    /// Two keyslots' key material overlap.
    #[error("Keyslots {0} and {1} are overlapping in the header")]
    SlotsOverlap(usize, usize),
    /// Cipher mode string without `-`.
    #[error("Unexpected cipher mode string format '{0}'")]
    BadModeFormat(String),
    /// Cipher name or key size not supported.
    #[error("Algorithm '{name}' with key size {key_bytes} bytes not supported")]
    UnsupportedCipher {
        /// Cipher name from the header.
        name: String,
        /// Key bytes per cipher instance (half the total for XTS).
        key_bytes: u32,
    },
    /// Block cipher mode not supported.
    #[error("Cipher mode '{0}' not supported")]
    UnsupportedMode(String),
    /// IV generator not supported.
    #[error("IV generator '{0}' not supported")]
    UnsupportedIvGen(String),
    /// Hash not supported.
    #[error("Hash algorithm '{0}' not supported")]
    UnsupportedHash(String),
    /// `essiv` without `:hash`.
    #[error("Missing IV generator hash specification")]
    MissingIvHash,
    /// ESSIV hash whose digest is no AES key size.
    #[error("No AES cipher with key size {0} available")]
    EssivKeySize(usize),
    /// No active keyslot accepted the passphrase.
    #[error("Invalid password, cannot unlock any keyslot")]
    WrongPassphrase,
    /// The key material read for a keyslot has the wrong size.
    #[error("Keyslot {slot} key material is {got} bytes, expected {expected}")]
    KeyMaterialSize {
        /// Keyslot index.
        slot: usize,
        /// Bytes expected.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// Reading key material failed (the reader's message).
    #[error("Cannot read keyslot {slot} key material: {msg}")]
    KeyMaterialRead {
        /// Keyslot index.
        slot: usize,
        /// What the reader reported.
        msg: String,
    },
    /// A key of the wrong length for the cipher.
    #[error("Key of {got} bytes does not fit cipher {mode} (needs {expected})")]
    KeyLength {
        /// Cipher mode name.
        mode: &'static str,
        /// Accepted lengths.
        expected: &'static str,
        /// Length given.
        got: usize,
    },
    /// Data that is not a whole number of blocks/sectors.
    #[error("Length {len} must be a multiple of block size {block}")]
    Unaligned {
        /// Length given.
        len: usize,
        /// Required multiple.
        block: usize,
    },
    /// Invalid argument to `format`.
    #[error("{0}")]
    InvalidArgument(String),
    /// Secret: the master key is not 32 bytes.
    #[error("Key should be 32 bytes in length")]
    SecretKeyLength,
    /// Secret: `keyid` without `iv`.
    #[error("IV is required to decrypt secret")]
    SecretIvRequired,
    /// Secret: the IV does not decode to 16 bytes.
    #[error("IV should be 16 bytes in length not {0}")]
    SecretIvLength(usize),
    /// Secret: last plaintext byte is no valid padding count.
    #[error("Incorrect number of padding bytes ({0}) found on decrypted data")]
    SecretPadding(u8),
    /// Base64 input with characters outside the alphabet.
    #[error("Base64 data contains invalid characters")]
    Base64Invalid,
    /// Base64 input with a NUL byte.
    #[error("Base64 data contains embedded NUL characters")]
    Base64Nul,
    /// A passphrase that is not UTF-8 (or holds NUL).
    #[error("Data from secret {0} is not valid UTF-8")]
    SecretNotUtf8(String),
}
