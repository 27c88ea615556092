use super::*;

#[test]
fn test_base64_standard_vectors_decode() {
    for (enc, dec) in [
        ("", ""),
        ("Zg==", "f"),
        ("Zm8=", "fo"),
        ("Zm9v", "foo"),
        ("Zm9vYg==", "foob"),
        ("Zm9vYmE=", "fooba"),
        ("Zm9vYmFy", "foobar"),
        ("Zm9v\nYmFy\n", "foobar"),
    ] {
        assert_eq!(&base64_decode(enc.as_bytes()).unwrap()[..], dec.as_bytes());
    }
}

#[test]
fn test_base64_lenient_like_glib() {
    // A trailing partial group is dropped ("pw" decodes to nothing).
    assert!(base64_decode(b"pw").unwrap().is_empty());
    assert_eq!(&base64_decode(b"cHc").unwrap()[..], b"");
    assert_eq!(&base64_decode(b"cHc=AA").unwrap()[..], b"pw");
}

#[test]
fn test_base64_bad_input_errors() {
    assert_eq!(
        base64_decode(b"cH*c").unwrap_err(),
        LuksError::Base64Invalid
    );
    assert_eq!(
        base64_decode(b"cH c").unwrap_err(),
        LuksError::Base64Invalid
    );
    assert_eq!(base64_decode(b"cHc=\0").unwrap_err(), LuksError::Base64Nul);
}

#[test]
fn test_decode_secret_raw_and_base64() {
    assert_eq!(
        &decode_secret(b"pw", SecretFormat::Raw, None).unwrap()[..],
        b"pw"
    );
    assert_eq!(
        &decode_secret(b"cHc=", SecretFormat::Base64, None).unwrap()[..],
        b"pw"
    );
}

/// Ciphertext made with `openssl enc -aes-256-cbc` (PKCS#7 padding).
const KEY: &[u8; 32] = b"0123456789abcdef0123456789abcdef";
const IV_B64: &str = "AAECAwQFBgcICQoLDA0ODw==";

fn encrypt(plain: &[u8], pad: u8) -> Vec<u8> {
    use aes::cipher::{BlockModeEncrypt, KeyIvInit};
    let mut buf = plain.to_vec();
    buf.extend(std::iter::repeat_n(pad, usize::from(pad)));
    let iv: Vec<u8> = (0..16).collect();
    let mut enc = cbc::Encryptor::<Aes256>::new_from_slices(KEY, &iv).unwrap();
    let (blocks, rest) = Array::<u8, U16>::slice_as_chunks_mut(&mut buf);
    assert!(rest.is_empty());
    enc.encrypt_blocks(blocks);
    buf
}

#[test]
fn test_decode_secret_encrypted_round_trips() {
    let ct = encrypt(b"hello", 11);
    let got = decode_secret(&ct, SecretFormat::Raw, Some((KEY, Some(IV_B64)))).unwrap();
    assert_eq!(&got[..], b"hello");
    let ct = encrypt(&[7u8; 16], 16);
    let got = decode_secret(&ct, SecretFormat::Raw, Some((KEY, Some(IV_B64)))).unwrap();
    assert_eq!(&got[..], &[7u8; 16]);
}

#[test]
fn test_decode_secret_errors_match_qemu() {
    let m = |k: &'static [u8], iv: Option<&'static str>| Some((k, iv));
    let e = |d: &[u8], f, k| decode_secret(d, f, k).unwrap_err().to_string();
    assert_eq!(
        e(b"x", SecretFormat::Raw, m(b"short", Some(IV_B64))),
        "Key should be 32 bytes in length"
    );
    assert_eq!(
        e(b"x", SecretFormat::Raw, m(KEY, None)),
        "IV is required to decrypt secret"
    );
    assert_eq!(
        e(b"x", SecretFormat::Raw, m(KEY, Some("AAAA"))),
        "IV should be 16 bytes in length not 3"
    );
    assert_eq!(
        e(b"cHc=", SecretFormat::Base64, m(KEY, Some(IV_B64))),
        "Length 2 must be a multiple of block size 16"
    );
    assert_eq!(
        e(&[], SecretFormat::Raw, m(KEY, Some(IV_B64))),
        "Incorrect number of padding bytes (0) found on decrypted data"
    );
    let mut plain = [b'a'; 32];
    plain[31] = 17; // more than a block of padding
    assert_eq!(
        e(&encrypt(&plain, 0), SecretFormat::Raw, m(KEY, Some(IV_B64))),
        "Incorrect number of padding bytes (17) found on decrypted data"
    );
    // qemu checks only the last byte: a pad count of 0 keeps everything.
    plain[31] = 0;
    let got = decode_secret(&encrypt(&plain, 0), SecretFormat::Raw, m(KEY, Some(IV_B64)));
    assert_eq!(&got.unwrap()[..], &plain[..]);
}

#[test]
fn test_passphrase_utf8_rules() {
    assert_eq!(passphrase_utf8("s0", b"pw").unwrap(), "pw");
    assert_eq!(
        passphrase_utf8("s0", b"p\0w").unwrap_err().to_string(),
        "Data from secret s0 is not valid UTF-8"
    );
    assert!(passphrase_utf8("s0", &[0xff]).is_err());
}
