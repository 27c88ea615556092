//! Volumes made by our `format()`, opened by qemu-io (and cryptsetup when
//! installed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::*;
use qsd_luks::{format, CipherMode, CipherSpec, HashAlg, IvGen, SectorCipher};

fn urandom(buf: &mut [u8]) {
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(buf)
        .unwrap();
}

fn check_format(spec: CipherSpec, key_bytes: usize, hash: HashAlg) {
    let what = format!("{} {key_bytes} {}", spec.mode_string(), hash.name());
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ours.luks");
    let (hdr, area, key) = format(spec, key_bytes, hash, b"secret pw", 1000, &mut urandom).unwrap();
    let payload = area.len() as u64;
    std::fs::write(&img, &area).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    f.set_len(payload + (4 << 20)).unwrap();

    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&img));
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(info.contains("\"format\": \"luks\""), "{what}: {info}");
    assert!(
        info.contains(&format!("\"uuid\": \"{}\"", hdr.uuid())),
        "{what}: {info}"
    );
    assert!(info.contains("\"virtual-size\": 4194304"), "{what}: {info}");

    // qemu writes, we decrypt.
    qemu_io(&img, "data=secret pw", &["write -P 0x33 0 64k"]);
    let cipher = SectorCipher::new(spec, &key).unwrap();
    let mut buf = vec![0u8; 65536];
    f.read_exact_at(&mut buf, payload).unwrap();
    cipher.decrypt(0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0x33),
        "{what}: qemu data decrypts wrong"
    );

    // We write, qemu reads.
    let mut ours = vec![0x77u8; 65536];
    cipher.encrypt(4096, &mut ours).unwrap();
    f.write_all_at(&ours, payload + (2 << 20)).unwrap();
    qemu_io(&img, "data=secret pw", &["read -P 0x77 2M 64k"]);

    if let Some(hex) = cryptsetup_master_key(&img, "secret pw") {
        assert_eq!(
            hex,
            to_hex(key.as_bytes()),
            "{what}: cryptsetup key differs"
        );
    }
}

#[test]
fn test_format_images_open_in_qemu() {
    require("qemu-img", "qemu-utils");
    require("qemu-io", "qemu-utils");
    let spec = |mode, ivgen| CipherSpec { mode, ivgen };
    check_format(CipherSpec::XTS_PLAIN64, 64, HashAlg::Sha256);
    check_format(spec(CipherMode::Xts, IvGen::Plain64), 32, HashAlg::Sha1);
    check_format(
        spec(CipherMode::Xts, IvGen::EssivSha256),
        48,
        HashAlg::Sha512,
    );
    check_format(
        spec(CipherMode::Cbc, IvGen::EssivSha256),
        32,
        HashAlg::Sha256,
    );
    check_format(spec(CipherMode::Cbc, IvGen::Plain), 16, HashAlg::Sha1);
    check_format(spec(CipherMode::Cbc, IvGen::Plain64), 32, HashAlg::Sha512);
}

#[test]
fn test_format_image_passes_cryptsetup_luksdump() {
    assert!(
        have("cryptsetup"),
        "cryptsetup not installed: run scripts/setup-test-deps.sh (package cryptsetup-bin)"
    );
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ours.luks");
    let (hdr, area, _) = format(
        CipherSpec::XTS_PLAIN64,
        64,
        HashAlg::Sha256,
        b"pw",
        1000,
        &mut urandom,
    )
    .unwrap();
    std::fs::write(&img, &area).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(area.len() as u64 + (1 << 20))
        .unwrap();
    let out = run(Command::new("cryptsetup").arg("luksDump").arg(&img));
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(dump.contains("Version:       \t1"), "{dump}");
    assert!(dump.contains("xts-plain64"), "{dump}");
    assert!(dump.contains(&hdr.uuid()), "{dump}");
    assert!(dump.contains("Key Slot 0: ENABLED"), "{dump}");
    run(Command::new("cryptsetup").arg("isLuks").arg(&img));
}
