use super::*;
use crate::{format, CipherMode, IvGen};
use proptest::prelude::*;

fn rng() -> impl FnMut(&mut [u8]) {
    let mut s = 0x9e37_79b9u32;
    move |b: &mut [u8]| {
        for x in b {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *x = (s >> 24) as u8;
        }
    }
}

fn valid() -> Vec<u8> {
    static HDR: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    HDR.get_or_init(|| {
        let (hdr, _, _) = format(
            CipherSpec::XTS_PLAIN64,
            64,
            HashAlg::Sha256,
            b"pw",
            1,
            &mut rng(),
        )
        .unwrap();
        hdr.serialize()
    })
    .clone()
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn slot_at(i: usize) -> usize {
    SLOTS_AT + i * SLOT_LEN
}

fn err(b: &[u8]) -> String {
    parse_header(b).unwrap_err().to_string()
}

#[test]
fn test_parse_serialize_valid_round_trips() {
    let b = valid();
    let h = parse_header(&b).unwrap();
    assert_eq!(h.serialize(), b);
    assert_eq!(h.cipher_name(), "aes");
    assert_eq!(h.cipher_mode(), "xts-plain64");
    assert_eq!(h.hash_spec(), "sha256");
    assert_eq!(h.key_bytes(), 64);
    assert_eq!(h.payload_offset_bytes(), 4040 * 512);
    assert_eq!(h.key_material_range(0), Some((4096, 64 * 4000)));
    assert_eq!(h.key_material_range(1), None);
    assert_eq!(h.key_material_range(8), None);
    assert_eq!(
        h.cipher_spec(),
        CipherSpec {
            mode: CipherMode::Xts,
            ivgen: IvGen::Plain64
        }
    );
}

#[test]
fn test_parse_longer_buffer_ignores_tail() {
    let mut b = valid();
    b.extend_from_slice(&[0xff; 100]);
    assert!(parse_header(&b).is_ok());
}

#[test]
fn test_parse_bytes_after_nul_preserved() {
    let mut b = valid();
    b[8 + 10] = b'x'; // garbage after "aes\0" in the cipher name
    assert_eq!(parse_header(&b).unwrap().serialize(), b);
}

#[test]
fn test_debug_hides_salts_and_digest() {
    let h = parse_header(&valid()).unwrap();
    let d = format!("{h:?}");
    assert!(!d.contains("salt") && !d.contains("digest:"), "{d}");
    assert!(d.contains("xts-plain64"));
}

#[test]
fn test_parse_hostile_headers_error() {
    let base = valid();
    let case = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        f(&mut b);
        err(&b)
    };
    assert_eq!(
        err(&base[..591]),
        "LUKS header needs 592 bytes, only 591 available"
    );
    assert_eq!(case(&|b| b[0] = b'X'), "Volume is not in LUKS format");
    assert_eq!(case(&|b| b[7] = 2), "LUKS version 2 is not supported");
    assert_eq!(
        case(&|b| b[8..40].fill(b'a')),
        "LUKS header cipher name is not NUL terminated"
    );
    assert_eq!(
        case(&|b| b[40..72].fill(b'a')),
        "LUKS header cipher mode is not NUL terminated"
    );
    assert_eq!(
        case(&|b| b[72..104].fill(b'a')),
        "LUKS header hash spec is not NUL terminated"
    );
    assert_eq!(
        case(&|b| put32(b, 104, 7)),
        "LUKS payload is overlapping with the header"
    );
    assert_eq!(
        case(&|b| put32(b, 164, 0)),
        "LUKS key iteration count is zero"
    );
    assert_eq!(
        case(&|b| put32(b, slot_at(3) + 44, 0)),
        "Keyslot 3 is corrupted (stripes 0 != 4000)"
    );
    assert_eq!(
        case(&|b| put32(b, slot_at(3) + 44, u32::MAX)),
        "Keyslot 3 is corrupted (stripes 4294967295 != 4000)"
    );
    assert_eq!(
        case(&|b| put32(b, slot_at(2), 1)),
        "Keyslot 2 state (active/disable) is corrupted"
    );
    assert_eq!(
        case(&|b| put32(b, slot_at(0) + 4, 0)),
        "Keyslot 0 iteration count is zero"
    );
    assert_eq!(
        case(&|b| put32(b, slot_at(0) + 40, 7)),
        "Keyslot 0 is overlapping with the LUKS header"
    );
    assert_eq!(
        case(&|b| put32(b, slot_at(7) + 40, 4000)),
        "Keyslot 7 is overlapping with the encrypted payload"
    );
    assert_eq!(
        case(&|b| put32(b, slot_at(7) + 40, u32::MAX)),
        "Keyslot 7 is overlapping with the encrypted payload"
    );
    assert_eq!(
        case(&|b| put32(b, slot_at(5) + 40, 2024)),
        "Keyslots 4 and 5 are overlapping in the header"
    );
    assert_eq!(
        case(&|b| b[8..12].copy_from_slice(b"foo\0")),
        "Algorithm 'foo' with key size 32 bytes not supported"
    );
    assert_eq!(
        case(&|b| b[72..76].copy_from_slice(b"md5\0")),
        "Hash algorithm 'md5' not supported"
    );
}

#[test]
fn test_parse_key_bytes_zero_or_huge_errors() {
    let mut b = valid();
    put32(&mut b, 108, 0);
    assert_eq!(
        err(&b),
        "Algorithm 'aes' with key size 0 bytes not supported"
    );
    // A huge key makes every slot's area huge: caught as overlap first.
    put32(&mut b, 108, u32::MAX);
    assert!(parse_header(&b).is_err());
    // Huge key with a payload far away: caught by the cipher check.
    put32(&mut b, 104, u32::MAX);
    for i in 0..NUM_SLOTS {
        put32(&mut b, slot_at(i), SLOT_DISABLED);
    }
    assert!(parse_header(&b).is_err());
}

#[test]
fn test_parse_detached_allows_payload_zero() {
    let mut b = valid();
    put32(&mut b, 104, 0);
    assert!(parse_header(&b).is_err());
    let h = parse_header_detached(&b).unwrap();
    assert_eq!(h.payload_offset_bytes(), 0);
}

proptest! {
    #[test]
    fn test_parse_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..700)) {
        if let Ok(h) = parse_header(&b) {
            prop_assert_eq!(&h.serialize()[..], &b[..HEADER_LEN]);
        }
    }

    #[test]
    fn test_parse_mutated_header_never_panics(
        edits in proptest::collection::vec((0usize..HEADER_LEN, any::<u8>()), 1..8)
    ) {
        let mut b = valid();
        for (at, v) in edits {
            b[at] = v;
        }
        for h in [parse_header(&b), parse_header_detached(&b)].into_iter().flatten() {
            prop_assert_eq!(h.serialize(), b.clone());
            for s in 0..NUM_SLOTS {
                let _ = h.key_material_range(s);
            }
        }
    }
}
