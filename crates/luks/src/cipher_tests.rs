use super::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn xts(key: &str, iv: IvGen) -> SectorCipher {
    let spec = CipherSpec {
        mode: CipherMode::Xts,
        ivgen: iv,
    };
    SectorCipher::from_key(spec, &hex(key)).unwrap()
}

fn check_xts_vector(key: &str, sector: u64, ptx: &[u8], ctx: &str) {
    let c = xts(key, IvGen::Plain64);
    let mut buf = ptx.to_vec();
    c.crypt(sector, &mut buf, true);
    let want = hex(ctx);
    assert_eq!(&buf[..want.len()], &want[..], "key {key}");
    c.crypt(sector, &mut buf, false);
    assert_eq!(buf, ptx);
}

#[test]
fn test_xts_ieee1619_vectors_match() {
    // IEEE P1619/D16 Annex B, vectors 1-3 (32-byte data units).
    check_xts_vector(
        &"00".repeat(32),
        0,
        &[0; 32],
        "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e",
    );
    check_xts_vector(
        &format!("{}{}", "11".repeat(16), "22".repeat(16)),
        0x33_3333_3333,
        &[0x44; 32],
        "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0",
    );
    check_xts_vector(
        &format!("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0{}", "22".repeat(16)),
        0x33_3333_3333,
        &[0x44; 32],
        "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89",
    );
}

#[test]
fn test_xts_ieee1619_512_byte_unit_matches() {
    // Vector 4: a full 512-byte data unit; XTS blocks are independent, so
    // checking the first 32 bytes of the output is a valid check.
    let ptx: Vec<u8> = (0..512).map(|i| i as u8).collect();
    check_xts_vector(
        "27182818284590452353602874713526 31415926535897932384626433832795",
        0,
        &ptx,
        "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c",
    );
}

#[test]
fn test_cbc_sp800_38a_vector_matches() {
    let key = hex("2b7e151628aed2a6abf7158809cf4f3c");
    let c = Aes128::new_from_slice(&key).unwrap();
    let iv = Block::try_from(&hex("000102030405060708090a0b0c0d0e0f")[..]).unwrap();
    let ptx = hex(
        "6bc1bee22e409f96e93d7e117393172a ae2d8a571e03ac9c9eb76fac45af8e51
         30c81c46a35ce411e5fbc1191a0a52ef f69f2445df4f9b17ad2b417be66c3710",
    );
    let mut buf = ptx.clone();
    cbc_encrypt(&c, &iv, &mut buf);
    let want = hex(
        "7649abac8119b246cee98e9b12e9197d 5086cb9b507219ee95db113a917678b2
         73bed6b8e3c1743b7116e69e22229516 3ff1caa1681fac09120eca307586e1a7",
    );
    assert_eq!(buf, want);
    cbc_decrypt(&c, &iv, &mut buf);
    assert_eq!(buf, ptx);
}

fn all_ciphers() -> Vec<SectorCipher> {
    let mut v = Vec::new();
    for mode in [CipherMode::Xts, CipherMode::Cbc] {
        for ivgen in [IvGen::Plain, IvGen::Plain64, IvGen::EssivSha256] {
            let spec = CipherSpec { mode, ivgen };
            for &n in spec.key_sizes() {
                let key: Vec<u8> = (0..n as u8).map(|b| b.wrapping_mul(7)).collect();
                v.push(SectorCipher::new(spec, &MasterKey::new(key)).unwrap());
            }
        }
    }
    v
}

#[test]
fn test_sector_cipher_every_spec_round_trips() {
    let plain: Vec<u8> = (0..4096u32).map(|i| (i * 13) as u8).collect();
    for c in all_ciphers() {
        let mut buf = plain.clone();
        c.encrypt(77, &mut buf).unwrap();
        assert_ne!(buf, plain);
        // Sector-by-sector equals all at once.
        let mut one = plain[512..1024].to_vec();
        c.encrypt(78, &mut one).unwrap();
        assert_eq!(&one[..], &buf[512..1024], "{:?}", c.spec());
        c.decrypt(77, &mut buf).unwrap();
        assert_eq!(buf, plain, "{:?}", c.spec());
    }
}

#[test]
fn test_plain_iv_wraps_at_32_bits() {
    let key = MasterKey::new(vec![5; 32]);
    let spec = |ivgen| CipherSpec {
        mode: CipherMode::Xts,
        ivgen,
    };
    let plain = SectorCipher::new(spec(IvGen::Plain), &key).unwrap();
    let plain64 = SectorCipher::new(spec(IvGen::Plain64), &key).unwrap();
    let (mut a, mut b, mut c) = ([1u8; 512], [1u8; 512], [1u8; 512]);
    plain.encrypt(1 << 32 | 5, &mut a).unwrap();
    plain.encrypt(5, &mut b).unwrap();
    plain64.encrypt(1 << 32 | 5, &mut c).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn test_sector_cipher_unaligned_errors() {
    let c = &all_ciphers()[0];
    let mut buf = [0u8; 513];
    assert_eq!(
        c.encrypt(0, &mut buf).unwrap_err(),
        LuksError::Unaligned {
            len: 513,
            block: 512
        }
    );
    assert!(c.decrypt(0, &mut buf[..16]).is_err());
    assert!(c.encrypt(0, &mut []).is_ok());
}

#[test]
fn test_sector_cipher_wrong_key_length_errors() {
    let r = SectorCipher::new(CipherSpec::XTS_PLAIN64, &MasterKey::new(vec![0; 16]));
    assert!(matches!(r, Err(LuksError::KeyLength { got: 16, .. })));
}

#[test]
fn test_sector_cipher_is_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<SectorCipher>();
}

fn mib_per_s(c: &SectorCipher, encrypt: bool) -> f64 {
    use std::time::Instant;
    let mut buf = vec![0x5au8; 1 << 20];
    let rounds = 200u64;
    let t = Instant::now();
    for i in 0..rounds {
        if encrypt {
            c.encrypt(i * 2048, &mut buf).unwrap();
        } else {
            c.decrypt(i * 2048, &mut buf).unwrap();
        }
    }
    rounds as f64 / t.elapsed().as_secs_f64()
}

/// Run with `cargo test -p qsd-luks --release --lib -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark"]
fn test_bench_xts_decrypt_1mib_prints_throughput() {
    println!("AES hardware acceleration: {}", aes::hardware_accelerated());
    let xts = SectorCipher::new(CipherSpec::XTS_PLAIN64, &MasterKey::new(vec![3; 64])).unwrap();
    let cbc = SectorCipher::new(
        CipherSpec {
            mode: CipherMode::Cbc,
            ivgen: IvGen::EssivSha256,
        },
        &MasterKey::new(vec![3; 32]),
    )
    .unwrap();
    for (name, c) in [("aes-256-xts-plain64", &xts), ("aes-256-cbc-essiv", &cbc)] {
        let (d, e) = (mib_per_s(c, false), mib_per_s(c, true));
        println!("{name}, 1 MiB buffers, 1 thread: decrypt {d:.0} MiB/s, encrypt {e:.0} MiB/s");
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let total: f64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| mib_per_s(&xts, false)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    println!("aes-256-xts-plain64 decrypt, {threads} threads sharing one cipher: {total:.0} MiB/s");
}

fn xts_mode_reference(key: &[u8], first_sector: u64, data: &mut [u8], encrypt: bool) {
    fn run<C: Aes16>(key: &[u8], first: u64, data: &mut [u8], encrypt: bool) {
        let (k1, k2) = key.split_at(key.len() / 2);
        let x = xts_mode::Xts128::new(new_aes::<C>(k1).unwrap(), new_aes::<C>(k2).unwrap());
        let tweak = xts_mode::get_tweak_default;
        if encrypt {
            x.encrypt_area(data, 512, u128::from(first), tweak);
        } else {
            x.decrypt_area(data, 512, u128::from(first), tweak);
        }
    }
    match key.len() {
        32 => run::<Aes128>(key, first_sector, data, encrypt),
        48 => run::<Aes192>(key, first_sector, data, encrypt),
        _ => run::<Aes256>(key, first_sector, data, encrypt),
    }
}

#[test]
fn test_xts_matches_xts_mode_crate() {
    let plain: Vec<u8> = (0..8192u32).map(|i| (i * 31 + 7) as u8).collect();
    for n in [32usize, 48, 64] {
        let key: Vec<u8> = (0..n as u8).map(|b| b ^ 0x5c).collect();
        let ours =
            SectorCipher::new(CipherSpec::XTS_PLAIN64, &MasterKey::new(key.clone())).unwrap();
        for first in [0u64, 1, 0xffff_ffff, u64::MAX - 20] {
            let (mut a, mut b) = (plain.clone(), plain.clone());
            ours.encrypt(first, &mut a).unwrap();
            xts_mode_reference(&key, first, &mut b, true);
            assert_eq!(a, b, "key {n} sector {first}");
            ours.decrypt(first, &mut a).unwrap();
            assert_eq!(a, plain);
        }
    }
}
