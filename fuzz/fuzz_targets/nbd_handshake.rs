//! Feeds arbitrary client bytes through the server-side NBD handshake state
//! machine, split into pieces of varying size. It must never panic, never
//! claim more bytes than it was given, and every reply it writes must be a
//! well-formed option reply (or the fixed-size NBD_OPT_EXPORT_NAME answer).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qsd_nbd_proto::handshake::{BlockSizes, OptionReplyHeader};
use qsd_nbd_proto::negotiate::{ExportCatalog, ExportInfo, Negotiation, Step};
use qsd_nbd_proto::{Decoded, TransmissionFlags};

struct Catalog;

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name.is_empty() || name == "disk").then(|| ExportInfo {
            name: name.to_owned(),
            description: Some("fuzz".into()),
            size: 1 << 30,
            flags: TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH,
            block_sizes: BlockSizes {
                minimum: if name.is_empty() { 512 } else { 1 },
                ..BlockSizes::default()
            },
            allocation_depth: true,
            bitmaps: vec!["b0".into(), "b1".into()],
        })
    }

    fn list(&self) -> Vec<(String, String)> {
        vec![
            ("disk".into(), "fuzz".into()),
            (String::new(), String::new()),
        ]
    }
}

fn check_replies(mut out: &[u8]) {
    while !out.is_empty() {
        match OptionReplyHeader::decode(out) {
            Ok(Decoded::Done(h, n)) => {
                let end = n + h.len as usize;
                assert!(end <= out.len(), "reply longer than written");
                out = &out[end..];
            }
            // The NBD_OPT_EXPORT_NAME reply is not an option reply.
            _ => {
                assert!(out.len() == 10 || out.len() == 134, "malformed reply");
                return;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let mut neg = Negotiation::new(control & 0x80 != 0);
    neg.set_max_option_len(u32::from(control & 0x3f) * 64 + 16);
    let piece = usize::from(control & 0x0f) + 1;
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut out = Vec::new();
    loop {
        let (used, step) = match neg.advance(&buf, &Catalog, &mut out) {
            Ok(r) => r,
            Err(_) => break,
        };
        assert!(used <= buf.len());
        buf.drain(..used);
        check_replies(&out);
        out.clear();
        match step {
            Step::Continue => {}
            Step::NeedMore(n) => {
                assert!(used == 0 && n > buf.len(), "NeedMore without need");
                if fed >= input.len() {
                    break;
                }
                let end = (fed + piece).min(input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            Step::StartTls => neg.tls_started(),
            Step::Abort | Step::Enter(_) => break,
        }
    }
});
