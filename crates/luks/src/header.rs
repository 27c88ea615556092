//! The LUKS1 partition header (`phdr`): 592 big-endian bytes at offset 0,
//! eight keyslot descriptors included. Parsing validates everything qemu
//! validates before it would touch key material.

use std::fmt;

use crate::{CipherSpec, HashAlg, LuksError};

/// `LUKS\xba\xbe`
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Bytes of the header proper (phdr with keyslot descriptors).
pub const HEADER_LEN: usize = 592;
/// LUKS1 sector size; offsets in the header count these.
pub const SECTOR_SIZE: u64 = 512;
/// Keyslots in a LUKS1 header.
pub const NUM_SLOTS: usize = 8;
/// Anti-forensic stripes per keyslot (the only count qemu accepts).
pub const STRIPES: u32 = 4000;
/// Salt length.
pub const SALT_LEN: usize = 32;
/// Master-key digest length.
pub const DIGEST_LEN: usize = 20;
/// Sectors reserved for the header before the first key material (4 KiB);
/// key material areas are also aligned to this many sectors.
pub const HEADER_SECTORS: u32 = 8;

const SLOT_ENABLED: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
const NAME_LEN: usize = 32;
const UUID_LEN: usize = 40;
const SLOT_LEN: usize = 48;
const SLOTS_AT: usize = 208;

/// One keyslot descriptor.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// Enabled (`0x00AC71F3`) rather than disabled (`0x0000DEAD`).
    pub active: bool,
    /// PBKDF2 iterations for the passphrase.
    pub iterations: u32,
    /// PBKDF2 salt for the passphrase.
    pub salt: [u8; SALT_LEN],
    /// Start of the key material, in 512-byte sectors.
    pub key_material_offset: u32,
    /// AF stripes.
    pub stripes: u32,
}

impl fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySlot")
            .field("active", &self.active)
            .field("iterations", &self.iterations)
            .field("key_material_offset", &self.key_material_offset)
            .field("stripes", &self.stripes)
            .finish_non_exhaustive()
    }
}

/// A parsed, validated LUKS1 header. Debug shows no salts or digest.
#[derive(Clone, PartialEq, Eq)]
pub struct LuksHeader {
    pub(crate) cipher_name: [u8; NAME_LEN],
    pub(crate) cipher_mode: [u8; NAME_LEN],
    pub(crate) hash_spec: [u8; NAME_LEN],
    pub(crate) payload_offset: u32,
    pub(crate) key_bytes: u32,
    pub(crate) mk_digest: [u8; DIGEST_LEN],
    pub(crate) mk_digest_salt: [u8; SALT_LEN],
    pub(crate) mk_digest_iterations: u32,
    pub(crate) uuid: [u8; UUID_LEN],
    pub(crate) slots: [KeySlot; NUM_SLOTS],
    pub(crate) spec: CipherSpec,
    pub(crate) hash: HashAlg,
}

impl fmt::Debug for LuksHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LuksHeader")
            .field("cipher_name", &self.cipher_name())
            .field("cipher_mode", &self.cipher_mode())
            .field("hash_spec", &self.hash_spec())
            .field("payload_offset", &self.payload_offset)
            .field("key_bytes", &self.key_bytes)
            .field("mk_digest_iterations", &self.mk_digest_iterations)
            .field("uuid", &self.uuid())
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

/// The text of a NUL-padded string field (up to the first NUL).
fn c_str(field: &[u8]) -> std::borrow::Cow<'_, str> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end])
}

fn be32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_be_bytes(b)
}

fn array<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&buf[at..at + N]);
    a
}

/// Sectors a keyslot's key material occupies, rounded up to the 4 KiB
/// alignment qemu and cryptsetup use.
pub(crate) fn material_sectors(key_bytes: u32, stripes: u32) -> u64 {
    let bytes = u64::from(key_bytes) * u64::from(stripes);
    let align = u64::from(HEADER_SECTORS);
    bytes.div_ceil(SECTOR_SIZE).div_ceil(align) * align
}

/// Parses and validates a LUKS1 header whose payload follows it in the same
/// file. `buf` must hold at least [`HEADER_LEN`] bytes; more is ignored.
pub fn parse_header(buf: &[u8]) -> Result<LuksHeader, LuksError> {
    parse(buf, false)
}

/// Like [`parse_header`] for a detached header (payload in another file, so
/// the payload offset may be 0 and keyslots are not checked against it).
pub fn parse_header_detached(buf: &[u8]) -> Result<LuksHeader, LuksError> {
    parse(buf, true)
}

fn parse(buf: &[u8], detached: bool) -> Result<LuksHeader, LuksError> {
    if buf.len() < HEADER_LEN {
        return Err(LuksError::Truncated {
            need: HEADER_LEN,
            got: buf.len(),
        });
    }
    if buf[..6] != MAGIC {
        return Err(LuksError::NotLuks);
    }
    let version = u16::from_be_bytes([buf[6], buf[7]]);
    if version != 1 {
        return Err(LuksError::UnsupportedVersion(version));
    }
    let cipher_name = array::<NAME_LEN>(buf, 8);
    let cipher_mode = array::<NAME_LEN>(buf, 40);
    let hash_spec = array::<NAME_LEN>(buf, 72);
    for (field, what) in [
        (&cipher_name, "cipher name"),
        (&cipher_mode, "cipher mode"),
        (&hash_spec, "hash spec"),
    ] {
        if !field.contains(&0) {
            return Err(LuksError::NotNulTerminated(what));
        }
    }
    let slots: [KeySlot; NUM_SLOTS] = std::array::from_fn(|i| {
        let at = SLOTS_AT + i * SLOT_LEN;
        KeySlot {
            active: be32(buf, at) == SLOT_ENABLED,
            iterations: be32(buf, at + 4),
            salt: array(buf, at + 8),
            key_material_offset: be32(buf, at + 40),
            stripes: be32(buf, at + 44),
        }
    });
    let hdr = LuksHeader {
        cipher_name,
        cipher_mode,
        hash_spec,
        payload_offset: be32(buf, 104),
        key_bytes: be32(buf, 108),
        mk_digest: array(buf, 112),
        mk_digest_salt: array(buf, 132),
        mk_digest_iterations: be32(buf, 164),
        uuid: array(buf, 168),
        slots,
        spec: CipherSpec::XTS_PLAIN64,
        hash: HashAlg::Sha256,
    };
    let states: [u32; NUM_SLOTS] = std::array::from_fn(|i| be32(buf, SLOTS_AT + i * SLOT_LEN));
    hdr.check_layout(&states, detached)?;
    let spec = CipherSpec::parse(&hdr.cipher_name(), &hdr.cipher_mode(), hdr.key_bytes)?;
    let hash = HashAlg::from_name(&hdr.hash_spec())?;
    Ok(LuksHeader { spec, hash, ..hdr })
}

impl LuksHeader {
    /// Checks offsets, counts and keyslot placement (qemu's order, so the
    /// first problem reported is the one qemu would report).
    fn check_layout(&self, states: &[u32; NUM_SLOTS], detached: bool) -> Result<(), LuksError> {
        if !detached && self.payload_offset < HEADER_SECTORS {
            return Err(LuksError::PayloadOverlapsHeader);
        }
        if self.mk_digest_iterations == 0 {
            return Err(LuksError::ZeroDigestIterations);
        }
        let extent = |s: &KeySlot| {
            let start = u64::from(s.key_material_offset);
            (start, start + material_sectors(self.key_bytes, s.stripes))
        };
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.stripes != STRIPES {
                return Err(LuksError::BadStripes {
                    slot: i,
                    stripes: slot.stripes,
                });
            }
            if states[i] != SLOT_ENABLED && states[i] != SLOT_DISABLED {
                return Err(LuksError::BadSlotState(i));
            }
            if slot.active && slot.iterations == 0 {
                return Err(LuksError::ZeroSlotIterations(i));
            }
            if slot.key_material_offset < HEADER_SECTORS {
                return Err(LuksError::SlotOverlapsHeader(i));
            }
            let (start, end) = extent(slot);
            if !detached && end > u64::from(self.payload_offset) {
                return Err(LuksError::SlotOverlapsPayload(i));
            }
            for (j, other) in self.slots.iter().enumerate().skip(i + 1) {
                let (s2, e2) = extent(other);
                if start < e2 && s2 < end {
                    return Err(LuksError::SlotsOverlap(i, j));
                }
            }
        }
        Ok(())
    }

    /// Offset of the encrypted payload in bytes.
    pub fn payload_offset_bytes(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR_SIZE
    }

    /// Offset of the encrypted payload in 512-byte sectors.
    pub fn payload_offset_sectors(&self) -> u32 {
        self.payload_offset
    }

    /// The payload cipher.
    pub fn cipher_spec(&self) -> CipherSpec {
        self.spec
    }

    /// The header's hash (PBKDF2 and AF).
    pub fn hash(&self) -> HashAlg {
        self.hash
    }

    /// Master key length in bytes.
    pub fn key_bytes(&self) -> usize {
        self.key_bytes as usize
    }

    /// `cipher-name` as written (e.g. `aes`).
    pub fn cipher_name(&self) -> String {
        c_str(&self.cipher_name).into_owned()
    }

    /// `cipher-mode` as written (e.g. `xts-plain64`).
    pub fn cipher_mode(&self) -> String {
        c_str(&self.cipher_mode).into_owned()
    }

    /// `hash-spec` as written (e.g. `sha256`).
    pub fn hash_spec(&self) -> String {
        c_str(&self.hash_spec).into_owned()
    }

    /// The volume UUID text.
    pub fn uuid(&self) -> String {
        c_str(&self.uuid).into_owned()
    }

    /// PBKDF2 iterations of the master-key digest.
    pub fn mk_digest_iterations(&self) -> u32 {
        self.mk_digest_iterations
    }

    /// The eight keyslot descriptors.
    pub fn slots(&self) -> &[KeySlot; NUM_SLOTS] {
        &self.slots
    }

    /// `(offset, length)` in bytes of an active keyslot's key material
    /// (`key_bytes * stripes` bytes); `None` for an inactive or unknown slot.
    pub fn key_material_range(&self, slot: usize) -> Option<(u64, u64)> {
        let s = self.slots.get(slot).filter(|s| s.active)?;
        let offset = u64::from(s.key_material_offset) * SECTOR_SIZE;
        Some((offset, u64::from(self.key_bytes) * u64::from(s.stripes)))
    }

    /// The 592 header bytes, as they were parsed (or as `format` made them).
    pub fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&self.cipher_name);
        out.extend_from_slice(&self.cipher_mode);
        out.extend_from_slice(&self.hash_spec);
        out.extend_from_slice(&self.payload_offset.to_be_bytes());
        out.extend_from_slice(&self.key_bytes.to_be_bytes());
        out.extend_from_slice(&self.mk_digest);
        out.extend_from_slice(&self.mk_digest_salt);
        out.extend_from_slice(&self.mk_digest_iterations.to_be_bytes());
        out.extend_from_slice(&self.uuid);
        for s in &self.slots {
            let state = if s.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            out.extend_from_slice(&state.to_be_bytes());
            out.extend_from_slice(&s.iterations.to_be_bytes());
            out.extend_from_slice(&s.salt);
            out.extend_from_slice(&s.key_material_offset.to_be_bytes());
            out.extend_from_slice(&s.stripes.to_be_bytes());
        }
        debug_assert_eq!(out.len(), HEADER_LEN);
        out
    }
}

/// Copies a string into a NUL-padded field; `None` if it does not fit with
/// its terminator.
pub(crate) fn name_field<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut f = [0u8; N];
    if s.len() >= N {
        return None;
    }
    f[..s.len()].copy_from_slice(s.as_bytes());
    Some(f)
}

#[cfg(test)]
#[path = "header_tests.rs"]
mod tests;
