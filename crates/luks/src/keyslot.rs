//! Keyslots: recovering the master key with a passphrase, and formatting a
//! new header with one keyslot.

use std::fmt;

use zeroize::Zeroizing;

use crate::cipher::SectorCipher;
use crate::hash::{af_merge, af_split};
use crate::header::{material_sectors, name_field, KeySlot};
use crate::{
    CipherSpec, HashAlg, LuksError, LuksHeader, DIGEST_LEN, HEADER_SECTORS, NUM_SLOTS, SALT_LEN,
    SECTOR_SIZE, STRIPES,
};

/// The volume master key; wiped on drop, never printed.
#[derive(Clone)]
pub struct MasterKey(Zeroizing<Vec<u8>>);

impl MasterKey {
    /// Wraps key bytes (e.g. a key kept elsewhere, or for tests).
    pub fn new(bytes: Vec<u8>) -> Self {
        MasterKey(Zeroizing::new(bytes))
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Key length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for an empty key (never the case for a real volume).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({} bytes)", self.0.len())
    }
}

/// Compares without an early exit on the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn mk_digest(hdr: &LuksHeader, candidate: &[u8]) -> [u8; DIGEST_LEN] {
    let mut d = [0u8; DIGEST_LEN];
    hdr.hash.pbkdf2(
        candidate,
        &hdr.mk_digest_salt,
        hdr.mk_digest_iterations,
        &mut d,
    );
    d
}

/// Tries one keyslot with `passphrase`, given that slot's key material
/// (`key_material_range(slot)` bytes). `Ok(None)` when the slot is inactive
/// or the passphrase does not open it.
pub fn unlock_slot(
    hdr: &LuksHeader,
    slot: usize,
    passphrase: &[u8],
    material: Vec<u8>,
) -> Result<Option<MasterKey>, LuksError> {
    let mut material = Zeroizing::new(material);
    let Some(s) = hdr.slots.get(slot).filter(|s| s.active) else {
        return Ok(None);
    };
    let key_len = hdr.key_bytes();
    let expected = key_len * s.stripes as usize;
    if material.len() != expected {
        return Err(LuksError::KeyMaterialSize {
            slot,
            expected,
            got: material.len(),
        });
    }
    let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
    hdr.hash
        .pbkdf2(passphrase, &s.salt, s.iterations, &mut slot_key);
    SectorCipher::from_key(hdr.spec, &slot_key)?.crypt_material(&mut material, false)?;
    let Some(candidate) = af_merge(hdr.hash, &material, key_len, s.stripes) else {
        return Ok(None);
    };
    if same(&mk_digest(hdr, &candidate), &hdr.mk_digest) {
        Ok(Some(MasterKey(candidate)))
    } else {
        Ok(None)
    }
}

/// Tries every active keyslot in order with `passphrase`; `key_material(n)`
/// returns slot `n`'s key material (the bytes at
/// [`LuksHeader::key_material_range`]). Each try costs the slot's PBKDF2
/// iterations. Fails with [`LuksError::WrongPassphrase`] if no slot opens.
pub fn unlock<F>(
    hdr: &LuksHeader,
    passphrase: &[u8],
    mut key_material: F,
) -> Result<MasterKey, LuksError>
where
    F: FnMut(usize) -> Result<Vec<u8>, LuksError>,
{
    for slot in 0..NUM_SLOTS {
        if !hdr.slots[slot].active {
            continue;
        }
        let material = key_material(slot)?;
        if let Some(key) = unlock_slot(hdr, slot, passphrase, material)? {
            return Ok(key);
        }
    }
    Err(LuksError::WrongPassphrase)
}

fn uuid_text(rng: &mut dyn FnMut(&mut [u8])) -> String {
    let mut b = [0u8; 16];
    rng(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn bad(msg: String) -> LuksError {
    LuksError::InvalidArgument(msg)
}

/// Creates a LUKS1 volume header with keyslot 0 opened by `passphrase`, laid
/// out as qemu lays it out (key material from sector 8, each slot's area
/// 4 KiB aligned, payload right after slot 7's area). `iter` is used for the
/// keyslot and the master-key digest alike. `rng` supplies the master key,
/// salts, AF stripes and UUID.
///
/// Returns the header, the bytes from offset 0 to the payload (header and
/// key material; unused areas zero) and the new master key.
pub fn format(
    spec: CipherSpec,
    key_bytes: usize,
    hash: HashAlg,
    passphrase: &[u8],
    iter: u32,
    rng: &mut dyn FnMut(&mut [u8]),
) -> Result<(LuksHeader, Vec<u8>, MasterKey), LuksError> {
    if !spec.key_sizes().contains(&key_bytes) {
        return Err(bad(format!(
            "key size {key_bytes} bytes does not fit {}",
            spec.mode_string()
        )));
    }
    if iter == 0 {
        return Err(bad("iteration count must not be zero".into()));
    }
    // key_bytes <= 64 was checked above.
    let kb = key_bytes as u32;
    let mut master = Zeroizing::new(vec![0u8; key_bytes]);
    rng(&mut master);
    let master = MasterKey(master);

    let area_sectors = material_sectors(kb, STRIPES) as u32;
    let mut slots: [KeySlot; NUM_SLOTS] = std::array::from_fn(|i| KeySlot {
        active: false,
        iterations: 0,
        salt: [0; SALT_LEN],
        key_material_offset: HEADER_SECTORS + area_sectors * i as u32,
        stripes: STRIPES,
    });
    slots[0].active = true;
    slots[0].iterations = iter;
    rng(&mut slots[0].salt);
    let mut mk_digest_salt = [0u8; SALT_LEN];
    rng(&mut mk_digest_salt);

    let mode = spec.mode_string();
    let mut hdr = LuksHeader {
        cipher_name: name_field("aes").ok_or_else(|| bad("cipher name".into()))?,
        cipher_mode: name_field(&mode).ok_or_else(|| bad(mode.clone()))?,
        hash_spec: name_field(hash.name()).ok_or_else(|| bad(hash.name().into()))?,
        payload_offset: HEADER_SECTORS + area_sectors * NUM_SLOTS as u32,
        key_bytes: kb,
        mk_digest: [0; DIGEST_LEN],
        mk_digest_salt,
        mk_digest_iterations: iter,
        uuid: name_field(&uuid_text(rng)).ok_or_else(|| bad("uuid".into()))?,
        slots,
        spec,
        hash,
    };
    hdr.mk_digest = mk_digest(&hdr, master.as_bytes());

    let mut slot_key = Zeroizing::new(vec![0u8; key_bytes]);
    hash.pbkdf2(passphrase, &hdr.slots[0].salt, iter, &mut slot_key);
    let mut material = af_split(hash, master.as_bytes(), STRIPES, rng);
    SectorCipher::from_key(spec, &slot_key)?.crypt_material(&mut material, true)?;

    let mut area = vec![0u8; hdr.payload_offset_bytes() as usize];
    area[..crate::HEADER_LEN].copy_from_slice(&hdr.serialize());
    let at = (u64::from(hdr.slots[0].key_material_offset) * SECTOR_SIZE) as usize;
    area[at..at + material.len()].copy_from_slice(&material);
    Ok((hdr, area, master))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_header, CipherMode, IvGen};

    fn counter_rng(seed: u8) -> impl FnMut(&mut [u8]) {
        let mut state = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
        move |b: &mut [u8]| {
            for x in b {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                *x = state as u8;
            }
        }
    }

    fn material_of(area: &[u8], hdr: &LuksHeader, slot: usize) -> Vec<u8> {
        let (off, len) = hdr.key_material_range(slot).unwrap();
        area[off as usize..(off + len) as usize].to_vec()
    }

    #[test]
    fn test_format_then_unlock_every_spec_round_trips() {
        let ivgens = [IvGen::Plain, IvGen::Plain64, IvGen::EssivSha256];
        for mode in [CipherMode::Xts, CipherMode::Cbc] {
            for ivgen in ivgens {
                let spec = CipherSpec { mode, ivgen };
                for &kb in spec.key_sizes() {
                    let mut rng = counter_rng(kb as u8);
                    let (hdr, area, mk) =
                        format(spec, kb, HashAlg::Sha256, b"pw", 10, &mut rng).unwrap();
                    let parsed = parse_header(&area).unwrap();
                    assert_eq!(parsed, hdr);
                    assert_eq!(area.len() as u64, hdr.payload_offset_bytes());
                    let got = unlock(&parsed, b"pw", |s| Ok(material_of(&area, &parsed, s)));
                    assert_eq!(got.unwrap().as_bytes(), mk.as_bytes(), "{spec:?} {kb}");
                }
            }
        }
    }

    #[test]
    fn test_unlock_wrong_passphrase_errors() {
        let mut rng = counter_rng(1);
        let (hdr, area, _) = format(
            CipherSpec::XTS_PLAIN64,
            32,
            HashAlg::Sha1,
            b"pw",
            5,
            &mut rng,
        )
        .unwrap();
        let r = unlock(&hdr, b"px", |s| Ok(material_of(&area, &hdr, s)));
        assert_eq!(r.unwrap_err(), LuksError::WrongPassphrase);
    }

    #[test]
    fn test_unlock_short_material_errors() {
        let mut rng = counter_rng(2);
        let (hdr, _, _) = format(
            CipherSpec::XTS_PLAIN64,
            64,
            HashAlg::Sha512,
            b"pw",
            5,
            &mut rng,
        )
        .unwrap();
        let r = unlock(&hdr, b"pw", |_| Ok(vec![0; 10]));
        assert!(matches!(r, Err(LuksError::KeyMaterialSize { slot: 0, .. })));
    }

    #[test]
    fn test_unlock_reader_error_propagates() {
        let mut rng = counter_rng(3);
        let (hdr, _, _) = format(
            CipherSpec::XTS_PLAIN64,
            64,
            HashAlg::Sha256,
            b"pw",
            5,
            &mut rng,
        )
        .unwrap();
        let e = LuksError::KeyMaterialRead {
            slot: 0,
            msg: "eio".into(),
        };
        assert_eq!(unlock(&hdr, b"pw", |_| Err(e.clone())).unwrap_err(), e);
    }

    #[test]
    fn test_format_bad_arguments_error() {
        let mut rng = counter_rng(4);
        let spec = CipherSpec::XTS_PLAIN64;
        assert!(format(spec, 16, HashAlg::Sha256, b"pw", 5, &mut rng).is_err());
        assert!(format(spec, 64, HashAlg::Sha256, b"pw", 0, &mut rng).is_err());
    }

    #[test]
    fn test_format_layout_matches_qemu() {
        let mut rng = counter_rng(5);
        let (hdr, _, _) = format(
            CipherSpec::XTS_PLAIN64,
            64,
            HashAlg::Sha256,
            b"",
            1,
            &mut rng,
        )
        .unwrap();
        // What qemu-img writes for aes-256-xts: slots every 504 sectors.
        let offsets: Vec<u32> = hdr.slots().iter().map(|s| s.key_material_offset).collect();
        assert_eq!(offsets, [8, 512, 1016, 1520, 2024, 2528, 3032, 3536]);
        assert_eq!(hdr.payload_offset_sectors(), 4040);
        assert_eq!(hdr.uuid().len(), 36);
    }

    #[test]
    fn test_master_key_debug_hides_bytes() {
        let k = MasterKey::new(vec![0xab; 32]);
        assert_eq!(format!("{k:?}"), "MasterKey(32 bytes)");
    }
}
