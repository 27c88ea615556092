//! Sector encryption of the LUKS1 payload (and of keyslot key material):
//! AES in XTS or CBC mode, the IV derived from the 512-byte sector number.
//!
//! A [`SectorCipher`] holds expanded keys only; encrypt/decrypt take `&self`,
//! allocate nothing and lock nothing, so one instance serves many threads.
//!
//! XTS is done here rather than with the `xts-mode` crate (the tests check
//! the two agree): that crate runs AES one block at a time, which leaves
//! AES-NI/VAES pipelines idle; whitening a whole sector and handing all its
//! blocks to AES at once is several times faster.

use std::fmt;

use aes::cipher::consts::U16;
use aes::cipher::{
    Array, BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt,
    BlockSizeUser, InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};

use crate::hash::sha256;
use crate::{CipherMode, CipherSpec, IvGen, LuksError, MasterKey, SECTOR_SIZE};

type Block = Array<u8, U16>;

/// Bound for the AES variants used below.
trait Aes16:
    BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + KeyInit + Clone
{
}
impl<T> Aes16 for T where
    T: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + KeyInit + Clone
{
}

/// XTS key pair: `data` encrypts blocks, `tweak` encrypts the IV.
struct Xts<C> {
    data: C,
    tweak: C,
}

enum Engine {
    Xts128(Xts<Aes128>),
    Xts192(Xts<Aes192>),
    Xts256(Xts<Aes256>),
    Cbc128(Aes128),
    Cbc192(Aes192),
    Cbc256(Aes256),
}

/// Encrypts and decrypts whole 512-byte sectors in place.
pub struct SectorCipher {
    spec: CipherSpec,
    engine: Engine,
    /// ESSIV's IV cipher, keyed by SHA-256 of the whole key.
    essiv: Option<Aes256>,
}

impl fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SectorCipher")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

fn new_aes<C: KeyInit>(key: &[u8]) -> Option<C> {
    C::new_from_slice(key).ok()
}

fn new_xts<C: Aes16>(key: &[u8]) -> Option<Xts<C>> {
    let (k1, k2) = key.split_at(key.len() / 2);
    Some(Xts {
        data: new_aes(k1)?,
        tweak: new_aes(k2)?,
    })
}

/// Blocks in one sector.
const SECTOR_BLOCKS: usize = SECTOR_SIZE as usize / 16;

/// Multiplies an XTS tweak (a little-endian 128-bit value) by x in GF(2^128)
/// modulo x^128 + x^7 + x^2 + x + 1.
fn mul_x(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

fn xor_block(b: &mut Block, t: u128) {
    let mut v = [0u8; 16];
    v.copy_from_slice(b);
    b.copy_from_slice(&(u128::from_le_bytes(v) ^ t).to_le_bytes());
}

impl<C: Aes16> Xts<C> {
    /// One sector (at most 512 bytes, a multiple of 16) in place.
    fn crypt(&self, iv: &Block, data: &mut [u8], encrypt: bool) {
        let mut t = *iv;
        self.tweak.encrypt_block(&mut t);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&t);
        let mut tweak = u128::from_le_bytes(bytes);
        let mut tweaks = [0u128; SECTOR_BLOCKS];
        let (blocks, _) = Block::slice_as_chunks_mut(data);
        for (b, slot) in blocks.iter_mut().zip(tweaks.iter_mut()) {
            *slot = tweak;
            xor_block(b, tweak);
            tweak = mul_x(tweak);
        }
        if encrypt {
            self.data.encrypt_blocks(blocks);
        } else {
            self.data.decrypt_blocks(blocks);
        }
        for (b, t) in blocks.iter_mut().zip(tweaks) {
            xor_block(b, t);
        }
    }
}

fn cbc_encrypt<C: Aes16>(c: &C, iv: &Block, data: &mut [u8]) {
    let (blocks, _) = Block::slice_as_chunks_mut(data);
    cbc::Encryptor::<C>::inner_iv_init(c.clone(), iv).encrypt_blocks(blocks);
}

fn cbc_decrypt<C: Aes16>(c: &C, iv: &Block, data: &mut [u8]) {
    let (blocks, _) = Block::slice_as_chunks_mut(data);
    cbc::Decryptor::<C>::inner_iv_init(c.clone(), iv).decrypt_blocks(blocks);
}

impl SectorCipher {
    /// Builds the cipher for `spec` keyed with `key` (the whole key: both
    /// halves for XTS).
    pub fn new(spec: CipherSpec, key: &MasterKey) -> Result<Self, LuksError> {
        Self::from_key(spec, key.as_bytes())
    }

    pub(crate) fn from_key(spec: CipherSpec, key: &[u8]) -> Result<Self, LuksError> {
        let engine = match (spec.mode, key.len()) {
            (CipherMode::Xts, 32) => new_xts(key).map(Engine::Xts128),
            (CipherMode::Xts, 48) => new_xts(key).map(Engine::Xts192),
            (CipherMode::Xts, 64) => new_xts(key).map(Engine::Xts256),
            (CipherMode::Cbc, 16) => new_aes(key).map(Engine::Cbc128),
            (CipherMode::Cbc, 24) => new_aes(key).map(Engine::Cbc192),
            (CipherMode::Cbc, 32) => new_aes(key).map(Engine::Cbc256),
            _ => None,
        };
        let engine = engine.ok_or(LuksError::KeyLength {
            mode: match spec.mode {
                CipherMode::Xts => "aes-xts",
                CipherMode::Cbc => "aes-cbc",
            },
            expected: match spec.mode {
                CipherMode::Xts => "32, 48 or 64",
                CipherMode::Cbc => "16, 24 or 32",
            },
            got: key.len(),
        })?;
        let essiv = match spec.ivgen {
            IvGen::EssivSha256 => new_aes::<Aes256>(&sha256(key)[..]),
            IvGen::Plain | IvGen::Plain64 => None,
        };
        Ok(SectorCipher {
            spec,
            engine,
            essiv,
        })
    }

    /// The cipher spec this was built for.
    pub fn spec(&self) -> CipherSpec {
        self.spec
    }

    /// Bytes per encryption sector (always 512 for LUKS1).
    pub fn sector_size(&self) -> usize {
        SECTOR_SIZE as usize
    }

    fn iv(&self, sector: u64) -> Block {
        let mut iv = Block::default();
        match self.spec.ivgen {
            // Truncation to 32 bits is what `plain` means.
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 | IvGen::EssivSha256 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
        }
        if let Some(e) = &self.essiv {
            e.encrypt_block(&mut iv);
        }
        iv
    }

    /// Encrypts `data` (a multiple of 512 bytes) in place; its first sector
    /// has IV number `first_sector`.
    pub fn encrypt(&self, first_sector: u64, data: &mut [u8]) -> Result<(), LuksError> {
        check_len(data.len(), SECTOR_SIZE as usize)?;
        self.crypt(first_sector, data, true);
        Ok(())
    }

    /// Decrypts `data` (a multiple of 512 bytes) in place; its first sector
    /// has IV number `first_sector`.
    pub fn decrypt(&self, first_sector: u64, data: &mut [u8]) -> Result<(), LuksError> {
        check_len(data.len(), SECTOR_SIZE as usize)?;
        self.crypt(first_sector, data, false);
        Ok(())
    }

    /// Like encrypt/decrypt but the last sector may be short (any multiple
    /// of 16 bytes): key material of `key_bytes * 4000` bytes is not always
    /// whole sectors.
    pub(crate) fn crypt_material(&self, data: &mut [u8], encrypt: bool) -> Result<(), LuksError> {
        check_len(data.len(), 16)?;
        self.crypt(0, data, encrypt);
        Ok(())
    }

    fn crypt(&self, first_sector: u64, data: &mut [u8], encrypt: bool) {
        let mut sector = first_sector;
        for chunk in data.chunks_mut(SECTOR_SIZE as usize) {
            let iv = self.iv(sector);
            self.crypt_one(&iv, chunk, encrypt);
            sector = sector.wrapping_add(1);
        }
    }

    fn crypt_one(&self, iv: &Block, chunk: &mut [u8], encrypt: bool) {
        match (&self.engine, encrypt) {
            (Engine::Xts128(x), _) => x.crypt(iv, chunk, encrypt),
            (Engine::Xts192(x), _) => x.crypt(iv, chunk, encrypt),
            (Engine::Xts256(x), _) => x.crypt(iv, chunk, encrypt),
            (Engine::Cbc128(c), true) => cbc_encrypt(c, iv, chunk),
            (Engine::Cbc128(c), false) => cbc_decrypt(c, iv, chunk),
            (Engine::Cbc192(c), true) => cbc_encrypt(c, iv, chunk),
            (Engine::Cbc192(c), false) => cbc_decrypt(c, iv, chunk),
            (Engine::Cbc256(c), true) => cbc_encrypt(c, iv, chunk),
            (Engine::Cbc256(c), false) => cbc_decrypt(c, iv, chunk),
        }
    }
}

fn check_len(len: usize, block: usize) -> Result<(), LuksError> {
    if len.is_multiple_of(block) {
        Ok(())
    } else {
        Err(LuksError::Unaligned { len, block })
    }
}

#[cfg(test)]
#[path = "cipher_tests.rs"]
mod tests;
