//! Feeds arbitrary bytes to the LUKS1 header parser (attached and detached)
//! and, for the same bytes, to the qemu secret decoders. Parsing must never
//! panic; an accepted header must serialize back to exactly the bytes it
//! was parsed from, report in-bounds key material for its active slots and
//! give a cipher spec that builds a working sector cipher.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qsd_luks::secret::{base64_decode, decode_secret, SecretFormat};
use qsd_luks::{
    parse_header, parse_header_detached, LuksHeader, MasterKey, SectorCipher, HEADER_LEN,
    NUM_SLOTS,
};

fn check(hdr: &LuksHeader, data: &[u8], detached: bool) {
    assert_eq!(hdr.serialize(), data[..HEADER_LEN], "serialize differs");
    for slot in 0..NUM_SLOTS {
        if let Some((off, len)) = hdr.key_material_range(slot) {
            assert_eq!(len, hdr.key_bytes() as u64 * 4000);
            assert!(off >= 4096, "key material inside the header");
            if !detached {
                assert!(off + len <= hdr.payload_offset_bytes(), "key material in payload");
            }
        }
    }
    let key = MasterKey::new(vec![0x42; hdr.key_bytes()]);
    let cipher = SectorCipher::new(hdr.cipher_spec(), &key).expect("parsed spec must build");
    let mut sector = [0x17u8; 512];
    cipher.encrypt(7, &mut sector).expect("one sector");
    cipher.decrypt(7, &mut sector).expect("one sector");
    assert!(sector.iter().all(|&b| b == 0x17), "sector round trip");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse_header(data) {
        check(&h, data, false);
    }
    if let Ok(h) = parse_header_detached(data) {
        check(&h, data, true);
    }
    let _ = base64_decode(data);
    let key = [0x24u8; 32];
    let _ = decode_secret(data, SecretFormat::Raw, Some((&key, Some("AAECAwQFBgcICQoLDA0ODw=="))));
    let _ = decode_secret(data, SecretFormat::Base64, Some((&key, Some("AAECAwQFBgcICQoLDA0ODw=="))));
});
