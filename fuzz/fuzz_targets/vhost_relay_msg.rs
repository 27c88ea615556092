//! Feeds a front-end's byte stream, in pieces and optionally with a file
//! descriptor attached, through the vhost-user relay's message reader
//! (`read_msg`). Input: a control byte (see
//! `qsd_export_vhost_user_blk::fuzzing::relay_msgs`), then the stream.
//! Checks: payloads respect the size limit; the messages read re-encode to
//! the start of the stream, and to all of it when reading ended cleanly;
//! reading ends early only on an over-long payload or a truncated message.
#![no_main]

use std::io::ErrorKind;

use libfuzzer_sys::fuzz_target;
use qsd_export_vhost_user_blk::fuzzing;

fuzz_target!(|data: &[u8]| {
    let (msgs, err) = fuzzing::relay_msgs(data).expect("socket pair");
    let Some((_, stream)) = data.split_first() else {
        return;
    };
    let stream = &stream[..stream.len().min(fuzzing::RELAY_MAX_INPUT)];
    assert!(
        msgs.iter().all(|m| m.2.len() <= 4096),
        "over-long payload accepted"
    );
    if data[0] & 1 == 0 {
        assert!(msgs.iter().all(|m| m.3 == 0), "descriptors without asking");
    }
    let enc = fuzzing::encode_msgs(&msgs).expect("encode");
    assert!(
        stream.starts_with(&enc),
        "messages do not re-encode to the stream"
    );
    match err {
        None => assert_eq!(enc.len(), stream.len(), "bytes left unread"),
        Some(e) => assert!(
            matches!(e.kind(), ErrorKind::InvalidData | ErrorKind::UnexpectedEof),
            "unexpected error {e}"
        ),
    }
});
