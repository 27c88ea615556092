//! Images made by cryptsetup (required: the test fails with a clear message when it is not
//! installed; CI installs `cryptsetup-bin`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;
use qsd_luks::{LuksError, SectorCipher};

fn cryptsetup_image(cipher: &str, key_bits: u32, hash: &str) -> Option<tempfile::TempDir> {
    assert!(
        have("cryptsetup"),
        "cryptsetup not installed: run scripts/setup-test-deps.sh (package cryptsetup-bin)"
    );
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.luks");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let script = format!(
        "printf pw | cryptsetup luksFormat --type luks1 --cipher {cipher} --key-size {key_bits} \
         --hash {hash} --pbkdf-force-iterations 1000 --batch-mode --key-file=- '{}'",
        img.display()
    );
    run(Command::new("sh").arg("-c").arg(script));
    Some(dir)
}

#[test]
fn test_cryptsetup_aes192_cbc_partial_sector_material_unlocks() {
    // 24-byte key * 4000 stripes = 96000 bytes: the last key material
    // sector is half used.
    let Some(dir) = cryptsetup_image("aes-cbc-plain64", 192, "sha256") else {
        return;
    };
    let img = dir.path().join("t.luks");
    let (hdr, bytes) = header_of(&img);
    assert_eq!(hdr.key_bytes(), 24);
    assert_eq!(
        unlock_image(&hdr, &bytes, b"nope").unwrap_err(),
        LuksError::WrongPassphrase
    );
    let key = unlock_image(&hdr, &bytes, b"pw").unwrap();
    assert_eq!(
        Some(to_hex(key.as_bytes())),
        cryptsetup_master_key(&img, "pw")
    );
    SectorCipher::new(hdr.cipher_spec(), &key).unwrap();
}

#[test]
fn test_cryptsetup_xts_image_unlocks() {
    let Some(dir) = cryptsetup_image("aes-xts-plain64", 512, "sha512") else {
        return;
    };
    let img = dir.path().join("t.luks");
    let (hdr, bytes) = header_of(&img);
    assert_eq!(hdr.serialize(), bytes[..592]);
    let key = unlock_image(&hdr, &bytes, b"pw").unwrap();
    assert_eq!(
        Some(to_hex(key.as_bytes())),
        cryptsetup_master_key(&img, "pw")
    );
}
