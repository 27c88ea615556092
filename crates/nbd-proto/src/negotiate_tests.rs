use super::*;
use crate::be32;
use crate::handshake::OptionReplyHeader;

struct Catalog(Vec<ExportInfo>);

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.0.iter().find(|e| e.name == name).cloned()
    }
    fn list(&self) -> Vec<(String, String)> {
        self.0
            .iter()
            .map(|e| (e.name.clone(), e.description.clone().unwrap_or_default()))
            .collect()
    }
}

fn export(name: &str, min: u32) -> ExportInfo {
    ExportInfo {
        name: name.into(),
        description: Some("a disk".into()),
        size: 1 << 20,
        flags: TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH,
        block_sizes: BlockSizes {
            minimum: min,
            ..BlockSizes::default()
        },
        allocation_depth: false,
        bitmaps: vec!["bm".into()],
    }
}

fn catalog() -> Catalog {
    Catalog(vec![export("disk", 1), export("aligned", 512)])
}

/// Feed `input` until the machine needs more; return output and last step.
fn run(n: &mut Negotiation, input: &[u8]) -> (Vec<u8>, Result<Step, ProtoError>) {
    let cat = catalog();
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        match n.advance(&input[pos..], &cat, &mut out) {
            Err(e) => return (out, Err(e)),
            Ok((used, step)) => {
                pos += used;
                match step {
                    Step::Continue => continue,
                    other => return (out, Ok(other)),
                }
            }
        }
    }
}

fn opt(o: ClientOption) -> Vec<u8> {
    let mut v = Vec::new();
    o.encode(&mut v);
    v
}

/// Split option replies into (reply type, payload).
fn replies(mut out: &[u8]) -> Vec<(OptionReplyType, Vec<u8>)> {
    let mut v = Vec::new();
    while !out.is_empty() {
        let (h, n) = OptionReplyHeader::decode(out).unwrap().done().unwrap();
        let end = n + h.len as usize;
        v.push((h.reply, out[n..end].to_vec()));
        out = &out[end..];
    }
    v
}

fn go(name: &str, requests: Vec<InfoType>) -> ClientOption {
    ClientOption::Go(InfoRequest {
        name: name.into(),
        requests,
    })
}

fn started(flags: u32) -> Negotiation {
    let mut n = Negotiation::new(false);
    let (_, step) = run(&mut n, &flags.to_be_bytes());
    assert_eq!(step, Ok(Step::NeedMore(16)));
    n
}

#[test]
fn test_negotiation_greeting_is_fixed_newstyle_no_zeroes() {
    let mut out = Vec::new();
    Negotiation::default().greeting(&mut out);
    assert_eq!(out, b"NBDMAGICIHAVEOPT\x00\x03");
}

#[test]
fn test_negotiation_go_enters_transmission() {
    let mut n = started(1);
    let (out, step) = run(&mut n, &opt(go("disk", vec![InfoType::BlockSize])));
    let Ok(Step::Enter(neg)) = step else {
        panic!("{step:?}")
    };
    assert_eq!(neg.export, "disk");
    assert!(!neg.structured);
    assert_eq!(neg.check_align, 1);
    let r = replies(&out);
    let types: Vec<_> = r.iter().map(|x| x.0).collect();
    assert_eq!(
        types,
        vec![
            OptionReplyType::Info,
            OptionReplyType::Info,
            OptionReplyType::Info,
            OptionReplyType::Ack
        ]
    );
    // description, block size, export
    assert_eq!(&r[0].1[..2], &[0, 2]);
    assert_eq!(
        r[1].1,
        b"\x00\x03\x00\x00\x00\x01\x00\x00\x10\x00\x02\x00\x00\x00"
    );
    assert_eq!(r[2].1, b"\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x05");
    assert_eq!(
        n.advance(b"x", &catalog(), &mut Vec::new()),
        Err(ProtoError::Finished)
    );
}

#[test]
fn test_negotiation_go_unknown_export_is_err_unknown() {
    let mut n = started(1);
    let (out, step) = run(&mut n, &opt(go("nope", vec![])));
    assert_eq!(step, Ok(Step::NeedMore(16)));
    let r = replies(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, OptionReplyType::ErrUnknown);
    assert_eq!(r[0].1, b"export 'nope' not present");
}

#[test]
fn test_negotiation_info_aligned_without_block_size_is_reqd() {
    let mut n = started(1);
    let o = ClientOption::Info(InfoRequest {
        name: "aligned".into(),
        requests: vec![],
    });
    let (out, _) = run(&mut n, &opt(o));
    let r = replies(&out);
    assert_eq!(r.last().unwrap().0, OptionReplyType::ErrBlockSizeReqd);
    // GO without asking is tolerated, but advertises minimum 1 and no check.
    let (_, step) = run(&mut n, &opt(go("aligned", vec![])));
    let Ok(Step::Enter(neg)) = step else { panic!() };
    assert_eq!(neg.check_align, 0);
}

#[test]
fn test_negotiation_structured_reply_sets_df_flag() {
    let mut n = started(3);
    let (out, _) = run(&mut n, &opt(ClientOption::StructuredReply));
    assert_eq!(replies(&out)[0].0, OptionReplyType::Ack);
    let (out, _) = run(&mut n, &opt(ClientOption::StructuredReply));
    assert_eq!(replies(&out)[0].0, OptionReplyType::ErrInvalid);
    let (_, step) = run(&mut n, &opt(go("disk", vec![])));
    let Ok(Step::Enter(neg)) = step else { panic!() };
    assert!(neg.structured);
    assert!(neg.flags.contains(TransmissionFlags::SEND_DF));
}

#[test]
fn test_negotiation_set_meta_requires_structured() {
    let mut n = started(1);
    let q = MetaRequest {
        export: "disk".into(),
        queries: vec!["base:allocation".into()],
    };
    let (out, _) = run(&mut n, &opt(ClientOption::SetMetaContext(q)));
    assert_eq!(replies(&out)[0].0, OptionReplyType::ErrInvalid);
}

#[test]
fn test_negotiation_set_meta_then_go_keeps_selection() {
    let mut n = started(1);
    let _ = run(&mut n, &opt(ClientOption::StructuredReply));
    let q = MetaRequest {
        export: "disk".into(),
        queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:bm".into()],
    };
    let (out, _) = run(&mut n, &opt(ClientOption::SetMetaContext(q)));
    let r = replies(&out);
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].1, b"\x00\x00\x00\x00base:allocation");
    assert_eq!(r[1].1, b"\x00\x00\x00\x02qemu:dirty-bitmap:bm");
    let (_, step) = run(&mut n, &opt(go("disk", vec![])));
    let Ok(Step::Enter(neg)) = step else { panic!() };
    assert_eq!(neg.meta.len(), 2);
}

#[test]
fn test_negotiation_meta_for_other_export_is_dropped_at_go() {
    let mut n = started(1);
    let _ = run(&mut n, &opt(ClientOption::StructuredReply));
    let q = MetaRequest {
        export: "aligned".into(),
        queries: vec!["base:allocation".into()],
    };
    let _ = run(&mut n, &opt(ClientOption::SetMetaContext(q)));
    let (_, step) = run(&mut n, &opt(go("disk", vec![])));
    let Ok(Step::Enter(neg)) = step else { panic!() };
    assert!(neg.meta.is_empty());
}

#[test]
fn test_negotiation_list_meta_uses_id_zero() {
    let mut n = started(1);
    let q = MetaRequest {
        export: "disk".into(),
        queries: vec![],
    };
    let (out, _) = run(&mut n, &opt(ClientOption::ListMetaContext(q)));
    let r = replies(&out);
    assert_eq!(r.len(), 3);
    assert_eq!(be32(&r[1].1, 0), 0);
    assert_eq!(r[2].0, OptionReplyType::Ack);
}

#[test]
fn test_negotiation_list_sends_servers_then_ack() {
    let mut n = started(1);
    let (out, _) = run(&mut n, &opt(ClientOption::List));
    let r = replies(&out);
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].0, OptionReplyType::Server);
    assert_eq!(r[0].1, b"\x00\x00\x00\x04diska disk");
}

#[test]
fn test_negotiation_unknown_and_starttls_answered() {
    let mut n = started(1);
    let (out, _) = run(&mut n, &opt(ClientOption::Unknown(99)));
    assert_eq!(replies(&out)[0].0, OptionReplyType::ErrUnsup);
    let (out, _) = run(&mut n, &opt(ClientOption::StartTls));
    assert_eq!(replies(&out)[0].0, OptionReplyType::ErrPolicy);
    let (out, _) = run(&mut n, &opt(ClientOption::ExtendedHeaders));
    assert_eq!(replies(&out)[0].0, OptionReplyType::ErrUnsup);
}

#[test]
fn test_negotiation_abort_acks_and_finishes() {
    let mut n = started(1);
    let (out, step) = run(&mut n, &opt(ClientOption::Abort));
    assert_eq!(step, Ok(Step::Abort));
    assert_eq!(replies(&out)[0].0, OptionReplyType::Ack);
}

#[test]
fn test_negotiation_export_name_with_and_without_zeroes() {
    let mut n = started(1);
    let (out, step) = run(&mut n, &opt(ClientOption::ExportName("disk".into())));
    assert!(matches!(step, Ok(Step::Enter(_))));
    assert_eq!(out.len(), 134);
    let mut n = started(3);
    let (out, _) = run(&mut n, &opt(ClientOption::ExportName("disk".into())));
    assert_eq!(out.len(), 10);
}

#[test]
fn test_negotiation_export_name_unknown_closes() {
    let mut n = started(1);
    let (_, step) = run(&mut n, &opt(ClientOption::ExportName("zz".into())));
    assert!(matches!(step, Err(ProtoError::Refused(_))));
}

#[test]
fn test_negotiation_not_fixed_newstyle_refuses_other_options() {
    let mut n = started(0);
    let (_, step) = run(&mut n, &opt(ClientOption::List));
    assert!(matches!(step, Err(ProtoError::Refused(_))));
    let mut n = started(0);
    let (_, step) = run(&mut n, &opt(ClientOption::ExportName("disk".into())));
    assert!(matches!(step, Ok(Step::Enter(_))));
}

#[test]
fn test_negotiation_oversize_option_discarded_then_invalid() {
    let mut n = started(1);
    n.set_max_option_len(100);
    let mut msg = Vec::new();
    OptionHeader {
        option: OptionType::Unknown(50),
        len: 300,
    }
    .encode(&mut msg);
    msg.extend(std::iter::repeat_n(7u8, 300));
    // Deliver in two pieces to exercise the discard state.
    let (out1, step) = run(&mut n, &msg[..120]);
    assert_eq!(step, Ok(Step::NeedMore(1)));
    assert!(out1.is_empty());
    let (out2, step) = run(&mut n, &msg[120..]);
    assert_eq!(step, Ok(Step::NeedMore(16)));
    assert_eq!(replies(&out2)[0].0, OptionReplyType::ErrInvalid);
}

#[test]
fn test_negotiation_huge_option_closes() {
    let mut n = started(1);
    let mut msg = Vec::new();
    OptionHeader {
        option: OptionType::Go,
        len: MAX_PAYLOAD + 1,
    }
    .encode(&mut msg);
    let (_, step) = run(&mut n, &msg);
    assert!(matches!(step, Err(ProtoError::OptionTooLong { .. })));
}

#[test]
fn test_negotiation_partial_option_needs_full_length() {
    let mut n = started(1);
    let o = opt(go("disk", vec![]));
    let (out, step) = run(&mut n, &o[..o.len() - 1]);
    assert_eq!(step, Ok(Step::NeedMore(o.len())));
    assert!(out.is_empty());
}

#[test]
fn test_negotiation_tls_required_refuses_until_upgrade() {
    let mut n = Negotiation::new(true);
    let _ = run(&mut n, &1u32.to_be_bytes());
    let (out, _) = run(&mut n, &opt(go("disk", vec![])));
    assert_eq!(replies(&out)[0].0, OptionReplyType::ErrTlsReqd);
    let (out, step) = run(&mut n, &opt(ClientOption::StartTls));
    assert_eq!(step, Ok(Step::StartTls));
    assert_eq!(replies(&out)[0].0, OptionReplyType::Ack);
    n.tls_started();
    let (_, step) = run(&mut n, &opt(go("disk", vec![])));
    assert!(matches!(step, Ok(Step::Enter(_))));
}
