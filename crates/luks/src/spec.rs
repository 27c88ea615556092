//! The payload cipher a header names: `aes` with `xts` or `cbc`, and the IV
//! generator `plain`, `plain64` or `essiv:sha256`.

use crate::LuksError;

/// Block cipher mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherMode {
    /// XTS; the key is two AES keys back to back.
    Xts,
    /// CBC, the IV reset at every sector.
    Cbc,
}

/// How the per-sector IV is made from the sector number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IvGen {
    /// Little-endian sector number truncated to 32 bits.
    Plain,
    /// Little-endian 64-bit sector number.
    Plain64,
    /// The `plain64` IV encrypted with AES-256 keyed by SHA-256 of the key.
    EssivSha256,
}

/// The payload cipher of a LUKS1 volume (the cipher is always AES; the key
/// size is the header's `key-bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CipherSpec {
    /// Block mode.
    pub mode: CipherMode,
    /// IV generator.
    pub ivgen: IvGen,
}

impl CipherSpec {
    /// AES-XTS with plain64 IVs, qemu's default.
    pub const XTS_PLAIN64: CipherSpec = CipherSpec {
        mode: CipherMode::Xts,
        ivgen: IvGen::Plain64,
    };

    /// The header's `cipher-mode` string, e.g. `cbc-essiv:sha256`.
    pub fn mode_string(&self) -> String {
        let mode = match self.mode {
            CipherMode::Xts => "xts",
            CipherMode::Cbc => "cbc",
        };
        let iv = match self.ivgen {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::EssivSha256 => "essiv:sha256",
        };
        format!("{mode}-{iv}")
    }

    /// Key sizes (total bytes) this mode takes with AES.
    pub fn key_sizes(&self) -> &'static [usize] {
        match self.mode {
            CipherMode::Xts => &[32, 48, 64],
            CipherMode::Cbc => &[16, 24, 32],
        }
    }

    /// Parses the header's `cipher-name` and `cipher-mode` strings and
    /// checks `key_bytes` fits, in the order qemu checks them.
    pub fn parse(name: &str, mode: &str, key_bytes: u32) -> Result<Self, LuksError> {
        let (mode_name, iv) = mode
            .split_once('-')
            .ok_or_else(|| LuksError::BadModeFormat(mode.to_owned()))?;
        let (iv_name, iv_hash) = match iv.split_once(':') {
            Some((n, h)) => (n, Some(h)),
            None => (iv, None),
        };
        if let Some(h) = iv_hash {
            // qemu looks the hash up even when the generator ignores it.
            crate::HashAlg::from_name(h)?;
        }
        let mode = match mode_name {
            "xts" => CipherMode::Xts,
            "cbc" => CipherMode::Cbc,
            other => return Err(LuksError::UnsupportedMode(other.to_owned())),
        };
        let per_cipher = match mode {
            CipherMode::Xts => key_bytes / 2,
            CipherMode::Cbc => key_bytes,
        };
        let key_ok = matches!(per_cipher, 16 | 24 | 32)
            && (mode == CipherMode::Cbc || key_bytes.is_multiple_of(2));
        if name != "aes" || !key_ok {
            return Err(LuksError::UnsupportedCipher {
                name: name.to_owned(),
                key_bytes: per_cipher,
            });
        }
        let ivgen = match (iv_name, iv_hash) {
            ("plain", _) => IvGen::Plain,
            ("plain64", _) => IvGen::Plain64,
            ("essiv", None) => return Err(LuksError::MissingIvHash),
            ("essiv", Some("sha256")) => IvGen::EssivSha256,
            ("essiv", Some(h)) => {
                let len = crate::HashAlg::from_name(h)?.digest_len();
                return Err(LuksError::EssivKeySize(len));
            }
            (other, _) => return Err(LuksError::UnsupportedIvGen(other.to_owned())),
        };
        Ok(CipherSpec { mode, ivgen })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_spec_parse_known_modes_round_trip() {
        for (m, kb) in [
            ("xts-plain64", 64),
            ("xts-plain", 32),
            ("xts-essiv:sha256", 48),
            ("cbc-plain64", 16),
            ("cbc-plain", 24),
            ("cbc-essiv:sha256", 32),
        ] {
            let spec = CipherSpec::parse("aes", m, kb).unwrap();
            assert_eq!(spec.mode_string(), m);
            assert!(spec.key_sizes().contains(&(kb as usize)));
        }
    }

    #[test]
    fn test_spec_parse_plain_with_hash_accepted() {
        let s = CipherSpec::parse("aes", "cbc-plain64:sha1", 32).unwrap();
        assert_eq!(s.ivgen, IvGen::Plain64);
    }

    #[test]
    fn test_spec_parse_bad_inputs_error() {
        let e = |n, m, k| CipherSpec::parse(n, m, k).unwrap_err().to_string();
        assert_eq!(
            e("aes", "xts", 64),
            "Unexpected cipher mode string format 'xts'"
        );
        assert_eq!(e("aes", "ecb-plain", 32), "Cipher mode 'ecb' not supported");
        assert_eq!(
            e("serpent", "xts-plain64", 64),
            "Algorithm 'serpent' with key size 32 bytes not supported"
        );
        assert_eq!(
            e("aes", "cbc-plain64", 0),
            "Algorithm 'aes' with key size 0 bytes not supported"
        );
        assert_eq!(
            e("aes", "xts-plain64", 33),
            "Algorithm 'aes' with key size 16 bytes not supported"
        );
        assert_eq!(
            e("aes", "cbc-essiv", 32),
            "Missing IV generator hash specification"
        );
        assert_eq!(
            e("aes", "cbc-essiv:sha1", 32),
            "No AES cipher with key size 20 available"
        );
        assert_eq!(
            e("aes", "cbc-essiv:md5", 32),
            "Hash algorithm 'md5' not supported"
        );
        assert_eq!(e("aes", "cbc-lmk", 32), "IV generator 'lmk' not supported");
    }
}
