//! Feeds arbitrary bytes through the NBD transmission request decoder, the
//! way the server's reader does (header, then write payload). Decoded headers
//! must re-encode to the same bytes; reply encoders are exercised with the
//! decoded values and their headers must decode back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qsd_nbd_proto::transmission::{self as tx, ReplyHeader};
use qsd_nbd_proto::{Decoded, Extent, NbdErrno, Request, REQUEST_HEADER_LEN};

fn replies_roundtrip(req: &Request) {
    let mut out = Vec::new();
    let len = req.length.min(1 << 16);
    tx::encode_simple_reply(&mut out, req.cookie, NbdErrno(u32::from(req.flags.bits())));
    tx::encode_offset_data_header(&mut out, req.cookie, req.offset, len, false);
    out.resize(out.len() + len as usize, 0);
    tx::encode_offset_hole(&mut out, req.cookie, req.offset, req.length, false);
    let ext = [Extent {
        length: req.length,
        flags: u32::from(req.command.raw()),
    }];
    tx::encode_block_status(&mut out, req.cookie, 0, &ext, false);
    let msg = String::from_utf8_lossy(&req.offset.to_be_bytes()).into_owned();
    tx::encode_error_offset(&mut out, req.cookie, NbdErrno::EIO, &msg, req.offset, false);
    tx::encode_error_chunk(&mut out, req.cookie, NbdErrno::EINVAL, &msg);
    let mut rest = &out[..];
    while !rest.is_empty() {
        let Ok(Decoded::Done(h, n)) = ReplyHeader::decode(rest) else {
            panic!("reply header did not decode");
        };
        let payload = match h {
            ReplyHeader::Simple(s) => {
                assert_eq!(s.cookie, req.cookie);
                0
            }
            ReplyHeader::Chunk(c) => {
                assert_eq!(c.cookie, req.cookie);
                c.len as usize
            }
        };
        rest = &rest[n + payload..];
    }
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while !rest.is_empty() {
        let (req, n) = match Request::decode(rest) {
            Ok(Decoded::Done(req, n)) => (req, n),
            Ok(Decoded::Incomplete(need)) => {
                assert!(need > rest.len());
                return;
            }
            Err(_) => return,
        };
        assert_eq!(n, REQUEST_HEADER_LEN);
        let mut enc = Vec::new();
        req.encode(&mut enc);
        assert_eq!(&enc[..], &rest[..n]);
        let _ = req.end();
        replies_roundtrip(&req);
        let skip = n.saturating_add(req.payload_len());
        if skip > rest.len() {
            return;
        }
        rest = &rest[skip..];
    }
});
