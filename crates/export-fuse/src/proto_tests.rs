use super::*;

/// A request as the kernel lays it out: header, then `args`.
fn request(opcode: u32, unique: u64, args: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; IN_HEADER_LEN];
    let len = (IN_HEADER_LEN + args.len()) as u32;
    b[0..4].copy_from_slice(&len.to_le_bytes());
    b[4..8].copy_from_slice(&opcode.to_le_bytes());
    b[8..16].copy_from_slice(&unique.to_le_bytes());
    b[16..24].copy_from_slice(&1u64.to_le_bytes());
    b[24..28].copy_from_slice(&1000u32.to_le_bytes());
    b.extend_from_slice(args);
    b
}

fn rw_args(offset: u64, size: u32) -> Vec<u8> {
    let mut a = vec![0u8; 40];
    a[8..16].copy_from_slice(&offset.to_le_bytes());
    a[16..20].copy_from_slice(&size.to_le_bytes());
    a
}

#[test]
fn test_decode_read_gives_offset_size_and_caller() {
    let r = request(opcode::READ, 7, &rw_args(1 << 33, 4096));
    let (h, op) = decode(&r, r.len()).unwrap();
    assert_eq!((h.unique, h.nodeid, h.uid, h.len), (7, 1, 1000, 80));
    assert_eq!(
        op,
        Op::Read {
            offset: 1 << 33,
            size: 4096
        }
    );
}

#[test]
fn test_decode_write_takes_payload_length_from_the_total() {
    let r = request(opcode::WRITE, 9, &rw_args(512, 4096));
    // Only header and arguments are in `head`; the payload was read
    // elsewhere.
    let total = r.len() + 4096;
    let r = {
        let mut r = r;
        r[0..4].copy_from_slice(&(total as u32).to_le_bytes());
        r
    };
    let (_, op) = decode(&r, total).unwrap();
    assert_eq!(
        op,
        Op::Write {
            offset: 512,
            size: 4096
        }
    );
    // A payload that disagrees with the size is refused.
    let mut bad = r.clone();
    bad[0..4].copy_from_slice(&((total - 1) as u32).to_le_bytes());
    assert!(matches!(decode(&bad, total - 1), Err(DecodeError::Args(_))));
}

#[test]
fn test_decode_refuses_short_and_inconsistent_lengths() {
    let r = request(opcode::GETATTR, 1, &[0; 16]);
    assert_eq!(decode(&r[..39], 39), Err(DecodeError::Short));
    assert_eq!(decode(&r, r.len() + 1), Err(DecodeError::Length));
    let cut = request(opcode::READ, 3, &[0; 12]);
    assert!(matches!(
        decode(&cut, cut.len()),
        Err(DecodeError::Args(h)) if h.unique == 3
    ));
}

#[test]
fn test_decode_setattr_picks_members_by_valid_bits() {
    let mut a = vec![0u8; 88];
    let valid = fattr::MODE | fattr::SIZE | fattr::GID;
    a[0..4].copy_from_slice(&valid.to_le_bytes());
    a[16..24].copy_from_slice(&(1u64 << 30).to_le_bytes());
    a[68..72].copy_from_slice(&0o100640u32.to_le_bytes());
    a[76..80].copy_from_slice(&55u32.to_le_bytes());
    a[80..84].copy_from_slice(&66u32.to_le_bytes());
    let r = request(opcode::SETATTR, 2, &a);
    let (_, op) = decode(&r, r.len()).unwrap();
    let want = SetAttr {
        mode: Some(0o100640),
        uid: None,
        gid: Some(66),
        size: Some(1 << 30),
        times: false,
    };
    assert_eq!(op, Op::SetAttr(want));
    a[0..4].copy_from_slice(&fattr::MTIME_NOW.to_le_bytes());
    let r = request(opcode::SETATTR, 2, &a);
    assert!(matches!(decode(&r, r.len()), Ok((_, Op::SetAttr(s))) if s.times));
}

#[test]
fn test_decode_fallocate_lseek_and_unknown() {
    let mut a = vec![0u8; 32];
    a[8..16].copy_from_slice(&4096u64.to_le_bytes());
    a[16..24].copy_from_slice(&8192u64.to_le_bytes());
    a[24..28].copy_from_slice(&3u32.to_le_bytes());
    let r = request(opcode::FALLOCATE, 4, &a);
    assert_eq!(
        decode(&r, r.len()).unwrap().1,
        Op::Fallocate {
            offset: 4096,
            length: 8192,
            mode: 3
        }
    );
    let mut a = vec![0u8; 24];
    a[8..16].copy_from_slice(&100u64.to_le_bytes());
    a[16..20].copy_from_slice(&4u32.to_le_bytes());
    let r = request(opcode::LSEEK, 5, &a);
    assert_eq!(
        decode(&r, r.len()).unwrap().1,
        Op::Lseek {
            offset: 100,
            whence: 4
        }
    );
    let r = request(52, 6, &[0; 24]);
    assert_eq!(decode(&r, r.len()).unwrap().1, Op::Other);
}

#[test]
fn test_out_header_carries_negative_errno_and_length() {
    let h = out_header(42, libc::ENOSYS, 0);
    assert_eq!(u32::from_le_bytes(h[0..4].try_into().unwrap()), 16);
    assert_eq!(i32::from_le_bytes(h[4..8].try_into().unwrap()), -38);
    assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), 42);
    let h = out_header(1, 0, 104);
    assert_eq!(u32::from_le_bytes(h[0..4].try_into().unwrap()), 120);
}

#[test]
fn test_attr_out_layout() {
    let a = Attr {
        ino: 1,
        size: 1 << 20,
        blocks: 2048,
        time: 1_700_000_000,
        mode: 0o100600,
        uid: 10,
        gid: 20,
        blksize: 512,
    };
    let b = attr_out(&a, 1);
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    assert_eq!(
        (u64_at(0), u64_at(16), u64_at(24), u64_at(32)),
        (1, 1, 1 << 20, 2048)
    );
    assert_eq!((u64_at(40), u64_at(56)), (1_700_000_000, 1_700_000_000));
    // mode, nlink, uid, gid, rdev, blksize.
    let tail: Vec<u32> = (0..6).map(|i| u32_at(76 + i * 4)).collect();
    assert_eq!(tail, [0o100600, 1, 10, 20, 0, 512]);
}

#[test]
fn test_small_replies_layout() {
    assert_eq!(open_out(0x41)[8], 0x41);
    assert_eq!(write_out(4096)[..4], 4096u32.to_le_bytes());
    assert_eq!(lseek_out(7), 7u64.to_le_bytes());
    let s = statfs_out(2048);
    assert_eq!(s[0..8], 2048u64.to_le_bytes());
    assert_eq!(s[24..32], 1u64.to_le_bytes());
    assert_eq!(s[40..44], 512u32.to_le_bytes());
    assert_eq!(s[44..48], 255u32.to_le_bytes());
}
