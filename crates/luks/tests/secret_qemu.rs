//! Secret decoding against what qemu accepts: the same secret object
//! properties must give the passphrase that opens a qemu-made image, and
//! bad secrets must fail with qemu's message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use qsd_luks::secret::{decode_secret, SecretFormat};

const MASTER: &str = "0123456789abcdef0123456789abcdef";

fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// AES-256-CBC with PKCS#7 padding by an independent implementation:
/// python3 `cryptography` if installed, else the openssl CLI.
fn encrypt_secret(key: &[u8], iv: &[u8], plain: &[u8]) -> Vec<u8> {
    let py = format!(
        "import sys\n\
         from cryptography.hazmat.primitives import padding\n\
         from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes\n\
         p = padding.PKCS7(128).padder()\n\
         d = p.update(bytes.fromhex('{}')) + p.finalize()\n\
         e = Cipher(algorithms.AES(bytes.fromhex('{}')), modes.CBC(bytes.fromhex('{}'))).encryptor()\n\
         sys.stdout.buffer.write(e.update(d) + e.finalize())\n",
        to_hex(plain),
        to_hex(key),
        to_hex(iv)
    );
    if let Ok(out) = Command::new("python3").arg("-c").arg(&py).output() {
        if out.status.success() {
            return out.stdout;
        }
    }
    require("openssl", "openssl");
    let script = format!(
        "printf '{}' | xxd -r -p | openssl enc -aes-256-cbc -K {} -iv {}",
        to_hex(plain),
        to_hex(key),
        to_hex(iv)
    );
    run(Command::new("sh").arg("-c").arg(script)).stdout
}

fn make_image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("s.luks");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=pass word",
            "-f",
            "luks",
        ])
        .args(["-o", "key-secret=s0,iter-time=1"])
        .arg(&img)
        .arg("1M"));
    img
}

/// Opens `img` with qemu-io using secret `s0` built from `props` (plus a
/// master secret `k0`); returns qemu-io's stderr on failure.
fn qemu_open(img: &Path, props: &str) -> Result<(), String> {
    let out = Command::new("qemu-io")
        .arg("--object")
        .arg(format!("secret,id=k0,data={MASTER}"))
        .arg("--object")
        .arg(format!("secret,id=s0,{props}"))
        .arg("--image-opts")
        .arg(format!(
            "driver=luks,key-secret=s0,file.filename={}",
            img.display()
        ))
        .args(["-c", "read 0 512"])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn test_secret_forms_open_qemu_image() {
    require("qemu-img", "qemu-utils");
    require("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let pw = b"pass word";

    assert_eq!(&decode_secret(pw, SecretFormat::Raw, None).unwrap()[..], pw);
    qemu_open(&img, "data=pass word").unwrap();

    let enc = b64(pw);
    assert_eq!(
        &decode_secret(enc.as_bytes(), SecretFormat::Base64, None).unwrap()[..],
        pw
    );
    qemu_open(&img, &format!("data={enc},format=base64")).unwrap();

    let iv: Vec<u8> = (0..16u8)
        .map(|i| i.wrapping_mul(17).wrapping_add(3))
        .collect();
    let ct = encrypt_secret(MASTER.as_bytes(), &iv, pw);
    let (ct64, iv64) = (b64(&ct), b64(&iv));
    let master = Some((MASTER.as_bytes(), Some(iv64.as_str())));
    let got = decode_secret(ct64.as_bytes(), SecretFormat::Base64, master).unwrap();
    assert_eq!(&got[..], pw);
    qemu_open(
        &img,
        &format!("data={ct64},format=base64,keyid=k0,iv={iv64}"),
    )
    .unwrap();
}

#[test]
fn test_secret_errors_match_qemu_messages() {
    require("qemu-img", "qemu-utils");
    require("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let iv64 = b64(&[9u8; 16]);
    let key = MASTER.as_bytes();
    let cases: Vec<(String, Result<_, _>)> = vec![
        (
            "data=cH*c,format=base64".into(),
            decode_secret(b"cH*c", SecretFormat::Base64, None),
        ),
        (
            "data=cHc=,keyid=k0".into(),
            decode_secret(b"cHc=", SecretFormat::Raw, Some((key, None))),
        ),
        (
            "data=cHc=,keyid=k0,iv=AAAA".into(),
            decode_secret(b"cHc=", SecretFormat::Raw, Some((key, Some("AAAA")))),
        ),
        (
            format!("data=cHc=,format=base64,keyid=k0,iv={iv64}"),
            decode_secret(b"cHc=", SecretFormat::Base64, Some((key, Some(&iv64)))),
        ),
        (
            format!("data=AAAAAAAAAAAAAAAA,keyid=k0,iv={iv64}"),
            decode_secret(
                b"AAAAAAAAAAAAAAAA",
                SecretFormat::Raw,
                Some((key, Some(&iv64))),
            ),
        ),
    ];
    for (props, ours) in cases {
        let ours = ours.unwrap_err().to_string();
        let qemu = qemu_open(&img, &props).unwrap_err();
        assert!(
            qemu.contains(&ours),
            "{props}: qemu said {qemu:?}, we say {ours:?}"
        );
    }
}
