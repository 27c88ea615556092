//! Helpers for the tests that run qemu-img, qemu-io and cryptsetup.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use qsd_luks::{parse_header, unlock, LuksError, LuksHeader, MasterKey};

/// Panics with an install hint when `tool` cannot be run.
pub fn require(tool: &str, package: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{tool}` is needed by this test: install the `{package}` package"
    );
}

/// True when `tool` can be run (for optional cross-checks).
pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// qemu-io on a LUKS image with passphrase secret `pw`; returns stdout.
pub fn qemu_io(img: &Path, secret: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.arg("--object")
        .arg(format!("secret,id=s0,{secret}"))
        .arg("--image-opts")
        .arg(format!(
            "driver=luks,key-secret=s0,file.filename={}",
            img.display()
        ));
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = run(&mut c);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !text.contains("Pattern verification failed"),
        "qemu-io {cmds:?}: {text}"
    );
    text
}

/// Reads and parses the header of an image file.
pub fn header_of(img: &Path) -> (LuksHeader, Vec<u8>) {
    let bytes = std::fs::read(img).unwrap();
    (parse_header(&bytes).unwrap(), bytes)
}

/// Unlocks with key material taken from the image bytes.
pub fn unlock_image(hdr: &LuksHeader, bytes: &[u8], pw: &[u8]) -> Result<MasterKey, LuksError> {
    unlock(hdr, pw, |slot| {
        let (off, len) = hdr.key_material_range(slot).unwrap();
        let (off, len) = (off as usize, len as usize);
        bytes
            .get(off..off + len)
            .map(<[u8]>::to_vec)
            .ok_or(LuksError::KeyMaterialRead {
                slot,
                msg: "past end of file".into(),
            })
    })
}

/// The master key as cryptsetup reveals it (hex, no spaces), if installed.
pub fn cryptsetup_master_key(img: &Path, pw: &str) -> Option<String> {
    if !have("cryptsetup") {
        return None;
    }
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!(
        "printf %s '{pw}' | cryptsetup luksDump --dump-master-key --key-file=- -q '{}'",
        img.display()
    ));
    let out = c.output().unwrap();
    if !out.status.success() {
        // cryptsetup falls back to a device-mapper mapping for ciphers the
        // kernel crypto API lacks; without device-mapper it cannot decrypt.
        eprintln!(
            "cryptsetup cannot reveal the key here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    let out = String::from_utf8(out.stdout).unwrap();
    // "MK dump:\tb8 c2 ...", continued on indented lines.
    let at = out.find("MK dump:")?;
    let hex: String = out[at + 8..]
        .lines()
        .take_while(|l| {
            !l.contains(':') || l.trim_start().starts_with(|c: char| c.is_ascii_hexdigit())
        })
        .flat_map(|l| l.split_whitespace())
        .filter(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    Some(hex)
}

pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
