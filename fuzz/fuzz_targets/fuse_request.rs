//! Feeds arbitrary bytes, as one read of `/dev/fuse` returns them, through
//! the FUSE export's request decoder the way its serving loop does: the
//! first 80 bytes (header and a write's arguments) apart, the rest joined
//! back only for requests other than writes. Checks: a decoded request's
//! length is the input's, a write's payload is exactly what follows its
//! arguments, and reply headers carry the length of what follows them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qsd_export_fuse::proto::{self, DecodeError, Op, WRITE_PAYLOAD_AT};

fuzz_target!(|data: &[u8]| {
    let n = data.len();
    let head = &data[..n.min(WRITE_PAYLOAD_AT)];
    let is_write = head.get(4..8) == Some(&proto::opcode::WRITE.to_le_bytes()[..]);
    let whole = if is_write { head } else { data };
    match proto::decode(whole, n) {
        Ok((h, op)) => {
            assert_eq!(h.len as usize, n);
            if let Op::Write { size, .. } = op {
                assert!(n >= WRITE_PAYLOAD_AT + size as usize);
            }
            let attr = proto::Attr {
                ino: h.nodeid,
                size: h.unique,
                blocks: h.unique / 512,
                time: h.nodeid,
                mode: h.opcode,
                uid: h.uid,
                gid: h.uid,
                blksize: 512,
            };
            let body = proto::attr_out(&attr, 1);
            let out = proto::out_header(h.unique, 0, body.len());
            assert_eq!(u32::from_le_bytes([out[0], out[1], out[2], out[3]]), 120);
        }
        Err(DecodeError::Args(h)) => assert_eq!(h.len as usize, n),
        Err(DecodeError::Short | DecodeError::Length) => {}
    }
});
