//! Hash algorithms a LUKS1 header may name, PBKDF2 over them, and the
//! anti-forensic (AF) splitter that spreads a key over many stripes.

use hmac::EagerHash;
use sha1::Sha1;
use sha2::digest::Digest;
use sha2::{Sha224, Sha256, Sha384, Sha512};
use zeroize::Zeroizing;

use crate::LuksError;

/// A hash named in a LUKS1 header (`hash-spec`), used for PBKDF2 and the AF
/// splitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlg {
    /// `sha1`
    Sha1,
    /// `sha224`
    Sha224,
    /// `sha256`
    Sha256,
    /// `sha384`
    Sha384,
    /// `sha512`
    Sha512,
}

impl HashAlg {
    /// Every supported hash.
    pub const ALL: [HashAlg; 5] = [
        HashAlg::Sha1,
        HashAlg::Sha224,
        HashAlg::Sha256,
        HashAlg::Sha384,
        HashAlg::Sha512,
    ];

    /// The name as written in the header.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Parses a header name; unknown names give
    /// [`LuksError::UnsupportedHash`].
    pub fn from_name(name: &str) -> Result<Self, LuksError> {
        Self::ALL
            .into_iter()
            .find(|h| h.name() == name)
            .ok_or_else(|| LuksError::UnsupportedHash(name.to_owned()))
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        fn run<D: EagerHash>(p: &[u8], s: &[u8], r: u32, out: &mut [u8]) {
            pbkdf2::pbkdf2_hmac::<D>(p, s, r, out);
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(password, salt, rounds, out),
            HashAlg::Sha224 => run::<Sha224>(password, salt, rounds, out),
            HashAlg::Sha256 => run::<Sha256>(password, salt, rounds, out),
            HashAlg::Sha384 => run::<Sha384>(password, salt, rounds, out),
            HashAlg::Sha512 => run::<Sha512>(password, salt, rounds, out),
        }
    }

    /// The AF diffusion step on `block`, in place: every digest-sized piece
    /// `i` is replaced by the hash of (big-endian `i` || piece), the last,
    /// shorter piece by a prefix of its hash.
    fn diffuse(self, block: &mut [u8]) {
        fn run<D: Digest>(block: &mut [u8]) {
            let step = <D as Digest>::output_size();
            for (i, piece) in block.chunks_mut(step).enumerate() {
                let mut d = D::new();
                // LUKS1 limits keys far below 2^32 digests.
                d.update((i as u32).to_be_bytes());
                d.update(&*piece);
                let out = d.finalize();
                piece.copy_from_slice(&out[..piece.len()]);
            }
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(block),
            HashAlg::Sha224 => run::<Sha224>(block),
            HashAlg::Sha256 => run::<Sha256>(block),
            HashAlg::Sha384 => run::<Sha384>(block),
            HashAlg::Sha512 => run::<Sha512>(block),
        }
    }
}

/// SHA-256 of `data` (the ESSIV key derivation).
pub(crate) fn sha256(data: &[u8]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(Sha256::digest(data).into())
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// AF-splits `key` into `stripes` stripes of `key.len()` bytes. `rng` fills
/// the first `stripes - 1` stripes; the last one is computed so that
/// [`af_merge`] gives `key` back.
pub fn af_split(
    hash: HashAlg,
    key: &[u8],
    stripes: u32,
    rng: &mut dyn FnMut(&mut [u8]),
) -> Zeroizing<Vec<u8>> {
    let n = key.len();
    let stripes = stripes.max(1) as usize;
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    let mut acc = Zeroizing::new(vec![0u8; n]);
    let (random, last) = out.split_at_mut(n * (stripes - 1));
    rng(random);
    for stripe in random.chunks_exact(n) {
        xor_into(&mut acc, stripe);
        hash.diffuse(&mut acc);
    }
    last.copy_from_slice(&acc);
    xor_into(last, key);
    out
}

/// Merges AF stripes (`material.len()` = `key_len * stripes`) back into a
/// key of `key_len` bytes. Returns `None` when the sizes do not fit.
pub fn af_merge(
    hash: HashAlg,
    material: &[u8],
    key_len: usize,
    stripes: u32,
) -> Option<Zeroizing<Vec<u8>>> {
    let stripes = stripes as usize;
    if key_len == 0 || stripes == 0 || material.len() != key_len.checked_mul(stripes)? {
        return None;
    }
    let mut acc = Zeroizing::new(vec![0u8; key_len]);
    let (head, last) = material.split_at(key_len * (stripes - 1));
    for stripe in head.chunks_exact(key_len) {
        xor_into(&mut acc, stripe);
        hash.diffuse(&mut acc);
    }
    xor_into(&mut acc, last);
    Some(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pbkdf2_hex(h: HashAlg, p: &[u8], s: &[u8], c: u32, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        h.pbkdf2(p, s, c, &mut out);
        out
    }

    #[test]
    fn test_pbkdf2_sha1_rfc6070_vectors_match() {
        let cases: [(&[u8], &[u8], u32, &str); 5] = [
            (
                b"password",
                b"salt",
                1,
                "0c60c80f961f0e71f3a9b524af6012062fe037a6",
            ),
            (
                b"password",
                b"salt",
                2,
                "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957",
            ),
            (
                b"password",
                b"salt",
                4096,
                "4b007901b765489abead49d926f721d065a429c1",
            ),
            (
                b"passwordPASSWORDpassword",
                b"saltSALTsaltSALTsaltSALTsaltSALTsalt",
                4096,
                "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038",
            ),
            (
                b"pass\0word",
                b"sa\0lt",
                4096,
                "56fa6aa75548099dcc37d7f03425e0c3",
            ),
        ];
        for (p, s, c, want) in cases {
            let want = hex(want);
            assert_eq!(pbkdf2_hex(HashAlg::Sha1, p, s, c, want.len()), want);
        }
    }

    #[test]
    fn test_pbkdf2_sha256_known_vector_matches() {
        // Widely published PBKDF2-HMAC-SHA256 vectors (same inputs as RFC 6070).
        let want = hex("120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b");
        assert_eq!(
            pbkdf2_hex(HashAlg::Sha256, b"password", b"salt", 1, 32),
            want
        );
        let want = hex("c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a");
        assert_eq!(
            pbkdf2_hex(HashAlg::Sha256, b"password", b"salt", 4096, 32),
            want
        );
    }

    #[test]
    fn test_pbkdf2_sha512_known_vector_matches() {
        let want = hex(
            "867f70cf1ade02cff3752599a3a53dc4af34c7a669815ae5d513554e1c8cf252\
             c02d470a285a0501bad999bfe943c08f050235d7d68b1da55e63f73b60a57fce",
        );
        assert_eq!(
            pbkdf2_hex(HashAlg::Sha512, b"password", b"salt", 1, 64),
            want
        );
    }

    #[test]
    fn test_af_split_merge_every_hash_round_trips() {
        let mut ctr = 0u8;
        let mut rng = |b: &mut [u8]| {
            for x in b {
                ctr = ctr.wrapping_mul(31).wrapping_add(7);
                *x = ctr;
            }
        };
        for h in HashAlg::ALL {
            for len in [16usize, 24, 32, 48, 64, 65] {
                let key: Vec<u8> = (0..len as u8).collect();
                let split = af_split(h, &key, 4000, &mut rng);
                assert_eq!(split.len(), len * 4000);
                let merged = af_merge(h, &split, len, 4000).unwrap();
                assert_eq!(&merged[..], &key[..], "{h:?} {len}");
            }
        }
    }

    #[test]
    fn test_af_merge_one_stripe_is_identity() {
        let m = af_merge(HashAlg::Sha256, &[1, 2, 3], 3, 1).unwrap();
        assert_eq!(&m[..], &[1, 2, 3]);
    }

    #[test]
    fn test_af_merge_size_mismatch_none() {
        assert!(af_merge(HashAlg::Sha1, &[0; 10], 3, 4).is_none());
        assert!(af_merge(HashAlg::Sha1, &[], 0, 4).is_none());
        assert!(af_merge(HashAlg::Sha1, &[0; 4], 4, 0).is_none());
    }

    #[test]
    fn test_hash_from_name_unknown_errors() {
        assert_eq!(HashAlg::from_name("sha256"), Ok(HashAlg::Sha256));
        assert_eq!(
            HashAlg::from_name("md5"),
            Err(LuksError::UnsupportedHash("md5".into()))
        );
    }
}
