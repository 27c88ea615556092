//! Encrypted qcow2 images: LUKS (`encrypt.format=luks`, a LUKS1 header
//! inside the image named by the full disk encryption header extension) and
//! the legacy AES method (`encrypt.format=aes`, `crypt_method` 1).
//!
//! Data clusters are encrypted in 512-byte sectors. The IV number of a
//! sector is its host offset / 512 for LUKS and its guest offset / 512 for
//! AES, as in qemu.

use qsd_block::{Error, NodeRef, OpenCtx, Result, SecretRef};
use qsd_luks::{CipherMode, CipherSpec, IvGen, LuksHeader, MasterKey, SectorCipher};
use serde_json::{json, Map, Value};

use crate::header::Header;

/// `crypt_method` values of the header.
const METHOD_AES: u32 = 1;
const METHOD_LUKS: u32 = 2;

/// The cipher of an unlocked image.
pub(crate) struct Crypto {
    cipher: SectorCipher,
    /// IVs from host offsets (LUKS) rather than guest offsets (AES).
    physical: bool,
    /// The `encrypt` member of the format-specific query data.
    pub info: Value,
    /// Held for the node's lifetime: the secret stays in use.
    _secret: SecretRef,
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never key material.
        f.debug_struct("Crypto")
            .field("physical", &self.physical)
            .finish_non_exhaustive()
    }
}

fn io_err(e: qsd_luks::LuksError) -> Error {
    Error::new(qsd_block::ErrorKind::Io, format!("encryption failed: {e}"))
}

impl Crypto {
    fn first_sector(&self, host: u64, guest: u64) -> u64 {
        (if self.physical { host } else { guest }) / 512
    }

    /// Decrypt `data` read from `host` (guest offset `guest`) in place.
    pub(crate) fn decrypt(&self, host: u64, guest: u64, data: &mut [u8]) -> Result<()> {
        self.cipher
            .decrypt(self.first_sector(host, guest), data)
            .map_err(io_err)
    }

    /// Encrypt `data` to be written at `host` (guest offset `guest`).
    pub(crate) fn encrypt(&self, host: u64, guest: u64, data: &mut [u8]) -> Result<()> {
        self.cipher
            .encrypt(self.first_sector(host, guest), data)
            .map_err(io_err)
    }
}

/// The `encrypt` option: `format` (the union's discriminator) and
/// `key-secret`.
fn parse_opt(opt: Option<&Value>) -> Result<(Option<&'static str>, Option<String>)> {
    let Some(v) = opt else {
        return Ok((None, None));
    };
    let Some(obj) = v.as_object() else {
        return Err(Error::invalid(
            "Invalid parameter type for 'encrypt', expected: object",
        ));
    };
    let format = match obj.get("format").and_then(Value::as_str) {
        None => return Err(Error::invalid("Parameter 'encrypt.format' is missing")),
        Some("luks") => "luks",
        Some("aes") => "aes",
        Some(other) => {
            return Err(Error::invalid(format!(
                "Parameter 'format' does not accept value '{other}'"
            )))
        }
    };
    for k in obj.keys() {
        if k != "format" && k != "key-secret" {
            return Err(Error::invalid(format!(
                "Parameter 'encrypt.{k}' is unexpected"
            )));
        }
    }
    let secret = obj
        .get("key-secret")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok((Some(format), secret))
}

/// Check the `encrypt` option against the header and unlock the image.
/// None for an unencrypted image.
pub(crate) async fn open_crypto(
    ctx: &OpenCtx<'_>,
    file: &NodeRef,
    h: &Header,
    opt: Option<&Value>,
    name: &str,
) -> Result<Option<Crypto>> {
    let (format, key_id) = parse_opt(opt)?;
    let header_format = match h.crypt_method {
        0 => None,
        METHOD_AES => Some("aes"),
        METHOD_LUKS => Some("luks"),
        m => {
            return Err(Error::unsupported(format!(
                "Unsupported encryption method {m}"
            )))
        }
    };
    let Some(hf) = header_format else {
        if let Some(f) = format {
            return Err(Error::invalid(format!(
                "No encryption in image header, but options specified format '{f}'"
            )));
        }
        return Ok(None);
    };
    if let Some(f) = format.filter(|f| *f != hf) {
        return Err(Error::invalid(format!(
            "Header reported '{hf}' encryption format but options specify '{f}'"
        )));
    }
    let Some(id) = key_id else {
        return Err(Error::invalid(
            "Parameter 'encrypt.key-secret' is required for cipher",
        ));
    };
    let secret = ctx.secret(&id)?;
    if hf == "aes" {
        return aes(secret, &id);
    }
    let Some((off, len)) = h.crypto_ext else {
        return Err(Error::invalid(
            "LUKS encryption requires a full disk encryption header extension",
        ));
    };
    let (hdr, cipher) = qsd_drivers::unlock_luks_at(file, off, len, secret.bytes(), name).await?;
    Ok(Some(Crypto {
        info: luks_info(&hdr),
        cipher,
        physical: true,
        _secret: secret,
    }))
}

/// The legacy method: AES-128-CBC, plain64 IVs, the key is the passphrase
/// cut or zero-padded to 16 bytes.
fn aes(secret: SecretRef, id: &str) -> Result<Option<Crypto>> {
    let pass = qsd_luks::secret::passphrase_utf8(id, secret.bytes())
        .map_err(|e| Error::invalid(e.to_string()))?;
    let mut key = vec![0u8; 16];
    let n = pass.len().min(16);
    key[..n].copy_from_slice(&pass.as_bytes()[..n]);
    let spec = CipherSpec {
        mode: CipherMode::Cbc,
        ivgen: IvGen::Plain64,
    };
    let cipher =
        SectorCipher::new(spec, &MasterKey::new(key)).map_err(|e| Error::invalid(e.to_string()))?;
    Ok(Some(Crypto {
        cipher,
        physical: false,
        info: json!({"format": "aes"}),
        _secret: secret,
    }))
}

/// qemu's `QCryptoBlockInfo` of a LUKS header, with `format` first.
fn luks_info(hdr: &LuksHeader) -> Value {
    let spec = hdr.cipher_spec();
    let (mode, key_bits) = match spec.mode {
        CipherMode::Xts => ("xts", hdr.key_bytes() * 4),
        CipherMode::Cbc => ("cbc", hdr.key_bytes() * 8),
    };
    let ivgen = match spec.ivgen {
        IvGen::Plain => "plain",
        IvGen::Plain64 => "plain64",
        IvGen::EssivSha256 => "essiv",
    };
    let slots: Vec<Value> = hdr
        .slots()
        .iter()
        .map(|s| {
            let key_offset = u64::from(s.key_material_offset) * 512;
            if s.active {
                json!({"active": true, "iters": s.iterations,
                       "key-offset": key_offset, "stripes": s.stripes})
            } else {
                json!({"active": false, "key-offset": key_offset})
            }
        })
        .collect();
    let mut d = Map::new();
    d.insert("format".into(), "luks".into());
    d.insert(
        "cipher-alg".into(),
        format!("{}-{key_bits}", hdr.cipher_name()).into(),
    );
    d.insert("cipher-mode".into(), mode.into());
    d.insert("ivgen-alg".into(), ivgen.into());
    if spec.ivgen == IvGen::EssivSha256 {
        d.insert("ivgen-hash-alg".into(), "sha256".into());
    }
    d.insert("hash-alg".into(), hdr.hash_spec().into());
    d.insert("detached-header".into(), false.into());
    d.insert("payload-offset".into(), hdr.payload_offset_bytes().into());
    d.insert("master-key-iters".into(), hdr.mk_digest_iterations().into());
    d.insert("uuid".into(), hdr.uuid().into());
    d.insert("slots".into(), slots.into());
    Value::Object(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_encrypt_option_without_format_is_refused_as_qemu() {
        let v = json!({"key-secret": "s0"});
        let e = parse_opt(Some(&v)).unwrap_err();
        assert_eq!(e.message(), "Parameter 'encrypt.format' is missing");
        let v = json!({"format": "xts", "key-secret": "s0"});
        let e = parse_opt(Some(&v)).unwrap_err();
        assert_eq!(
            e.message(),
            "Parameter 'format' does not accept value 'xts'"
        );
    }

    #[test]
    fn test_encrypt_option_with_format_and_secret_parses() {
        let v = json!({"format": "luks", "key-secret": "s0"});
        let (f, k) = parse_opt(Some(&v)).unwrap();
        assert_eq!((f, k.as_deref()), (Some("luks"), Some("s0")));
        assert_eq!(parse_opt(None).unwrap(), (None, None));
    }

    #[test]
    fn test_aes_cipher_uses_guest_offsets_and_round_trips() {
        let store = qsd_block::SecretStore::default();
        store
            .insert("s", zeroize::Zeroizing::new(b"pw".to_vec()))
            .unwrap();
        let c = aes(store.get("s").unwrap(), "s").unwrap().unwrap();
        assert_eq!(c.first_sector(1 << 20, 1024), 2);
        let mut a = vec![7u8; 1024];
        c.encrypt(1 << 20, 1024, &mut a).unwrap();
        let mut b = vec![7u8; 1024];
        c.encrypt(2 << 20, 1024, &mut b).unwrap();
        assert_eq!(a, b, "the host offset must not change AES ciphertext");
        c.decrypt(0, 1024, &mut a).unwrap();
        assert_eq!(a, vec![7u8; 1024]);
    }
}
