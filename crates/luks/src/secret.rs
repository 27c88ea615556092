//! Decoding the data of qemu's `secret` object: raw or base64, optionally
//! AES-256-CBC encrypted under another secret (`keyid` + `iv`).
//!
//! Base64 is decoded the way qemu (through glib) decodes it, including its
//! leniency: newlines are skipped, a trailing partial group is dropped.

use aes::cipher::consts::U16;
use aes::cipher::{Array, BlockModeDecrypt, KeyIvInit};
use aes::Aes256;
use zeroize::{Zeroize, Zeroizing};

use crate::LuksError;

/// The secret's `format` property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretFormat {
    /// Bytes as given.
    Raw,
    /// Base64 text.
    Base64,
}

/// Value of one base64 character; `=` counts as 0 (glib's table).
fn rank(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        b'=' => 0,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Decodes base64 as qemu does: only the alphabet, `=` and `\n` are
/// allowed; every complete group of four characters yields three bytes,
/// less one for each of the group's last two characters that is `=`.
pub fn base64_decode(input: &[u8]) -> Result<Zeroizing<Vec<u8>>, LuksError> {
    if input.contains(&0) {
        return Err(LuksError::Base64Nul);
    }
    if input.iter().any(|&c| c != b'\n' && rank(c).is_none()) {
        return Err(LuksError::Base64Invalid);
    }
    let mut out = Zeroizing::new(Vec::with_capacity(input.len() / 4 * 3));
    let (mut acc, mut n) = (0u32, 0);
    let mut last = [0u8; 2]; // the two most recent characters, newest first
    for &c in input {
        let Some(v) = rank(c) else { continue };
        last = [c, last[0]];
        acc = (acc << 6) | v;
        n += 1;
        if n == 4 {
            // The shifts keep 24 bits; `as u8` takes one byte of them.
            out.push((acc >> 16) as u8);
            if last[1] != b'=' {
                out.push((acc >> 8) as u8);
            }
            if last[0] != b'=' {
                out.push(acc as u8);
            }
            acc = 0;
            n = 0;
        }
    }
    acc.zeroize();
    Ok(out)
}

/// Returns the plain secret bytes from a secret's `data` (or file
/// contents) and `format`. With `master` = (bytes of the `keyid` secret,
/// its `iv` property), the data is AES-256-CBC ciphertext (base64 when
/// `format` is base64) whose PKCS#7 padding is stripped, as qemu checks it.
pub fn decode_secret(
    data: &[u8],
    format: SecretFormat,
    master: Option<(&[u8], Option<&str>)>,
) -> Result<Zeroizing<Vec<u8>>, LuksError> {
    let Some((key, iv)) = master else {
        return match format {
            SecretFormat::Raw => Ok(Zeroizing::new(data.to_vec())),
            SecretFormat::Base64 => base64_decode(data),
        };
    };
    if key.len() != 32 {
        return Err(LuksError::SecretKeyLength);
    }
    let iv = base64_decode(iv.ok_or(LuksError::SecretIvRequired)?.as_bytes())?;
    if iv.len() != 16 {
        return Err(LuksError::SecretIvLength(iv.len()));
    }
    let mut text = match format {
        SecretFormat::Raw => Zeroizing::new(data.to_vec()),
        SecretFormat::Base64 => base64_decode(data)?,
    };
    if !text.len().is_multiple_of(16) {
        return Err(LuksError::Unaligned {
            len: text.len(),
            block: 16,
        });
    }
    let mut dec = cbc::Decryptor::<Aes256>::new_from_slices(key, &iv).map_err(|_| {
        // Both lengths were checked above.
        LuksError::SecretKeyLength
    })?;
    let (blocks, _) = Array::<u8, U16>::slice_as_chunks_mut(&mut text);
    dec.decrypt_blocks(blocks);
    // qemu reads the last byte without checking the data is non-empty;
    // an empty plaintext is reported as padding 0 here.
    let pad = text.last().copied().unwrap_or(0);
    if pad > 16 || usize::from(pad) > text.len() || text.is_empty() {
        return Err(LuksError::SecretPadding(pad));
    }
    let keep = text.len() - usize::from(pad);
    text.truncate(keep);
    Ok(text)
}

/// The passphrase text of secret `id`, as qemu's LUKS code requires it:
/// valid UTF-8 without NUL bytes.
pub fn passphrase_utf8<'a>(id: &str, bytes: &'a [u8]) -> Result<&'a str, LuksError> {
    match std::str::from_utf8(bytes) {
        Ok(s) if !bytes.contains(&0) => Ok(s),
        _ => Err(LuksError::SecretNotUtf8(id.to_owned())),
    }
}

#[cfg(test)]
#[path = "secret_tests.rs"]
mod tests;
