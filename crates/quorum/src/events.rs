//! QUORUM_REPORT_BAD and QUORUM_FAILURE, with the members qemu sends.
//!
//! Ranges are in 512-byte sectors: the first sector touched and the count up
//! to the last sector touched, as qemu rounds them.

use qsd_block::EventSink;
use serde_json::{Map, Value};

const SECTOR: u64 = 512;

/// The operation a QUORUM_REPORT_BAD is about (QAPI `QuorumOpType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpType {
    Read,
    Write,
    Flush,
}

impl OpType {
    fn as_str(self) -> &'static str {
        match self {
            OpType::Read => "read",
            OpType::Write => "write",
            OpType::Flush => "flush",
        }
    }
}

/// `(sector-num, sectors-count)` of a byte range.
pub(crate) fn sectors(offset: u64, bytes: u64) -> (u64, u64) {
    let start = offset / SECTOR;
    let end = offset.saturating_add(bytes).div_ceil(SECTOR);
    (start, end - start)
}

/// The C library's text for `errno` ("Input/output error"), as qemu puts
/// it in the `error` member.
pub(crate) fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.find(" (os error ") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// A child gave a bad answer: an error (`errno`), or data that lost the vote.
pub(crate) fn report_bad(
    sink: &EventSink,
    op: OpType,
    offset: u64,
    bytes: u64,
    node_name: &str,
    errno: Option<i32>,
) {
    let (start, count) = sectors(offset, bytes);
    let mut data = Map::new();
    data.insert("type".into(), op.as_str().into());
    if let Some(errno) = errno {
        data.insert("error".into(), strerror(errno).into());
    }
    data.insert("node-name".into(), node_name.into());
    data.insert("sector-num".into(), start.into());
    data.insert("sectors-count".into(), count.into());
    tracing::debug!(
        node = node_name,
        op = op.as_str(),
        offset,
        bytes,
        ?errno,
        "quorum child reported bad"
    );
    sink.emit("QUORUM_REPORT_BAD", Value::Object(data));
}

/// No version of a request reached the vote threshold.
pub(crate) fn report_failure(sink: &EventSink, reference: &str, offset: u64, bytes: u64) {
    let (start, count) = sectors(offset, bytes);
    let mut data = Map::new();
    data.insert("reference".into(), reference.into());
    data.insert("sector-num".into(), start.into());
    data.insert("sectors-count".into(), count.into());
    tracing::debug!(node = reference, offset, bytes, "quorum failure");
    sink.emit("QUORUM_FAILURE", Value::Object(data));
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::json;

    use super::*;

    #[test]
    fn test_sectors_rounds_out_to_whole_sectors() {
        assert_eq!(sectors(4000, 1000), (7, 3));
        assert_eq!(sectors(4096, 4096), (8, 8));
        assert_eq!(sectors(0, 0), (0, 0));
        assert_eq!(sectors(511, 2), (0, 2));
    }

    #[test]
    fn test_strerror_has_no_rust_suffix() {
        assert_eq!(strerror(5), "Input/output error");
        assert_eq!(strerror(28), "No space left on device");
    }

    #[test]
    fn test_report_bad_members_match_qemu() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let sink = EventSink::new(move |n, d| s2.lock().unwrap().push((n.to_string(), d)));
        report_bad(&sink, OpType::Write, 1000, 1000, "r1", Some(28));
        report_bad(&sink, OpType::Read, 0, 512, "f0", None);
        report_failure(&sink, "q", 8192, 512);
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].0, "QUORUM_REPORT_BAD");
        assert_eq!(
            seen[0].1,
            json!({"type": "write", "error": "No space left on device", "node-name": "r1",
                   "sector-num": 1, "sectors-count": 3})
        );
        assert_eq!(
            seen[1].1,
            json!({"type": "read", "node-name": "f0", "sector-num": 0, "sectors-count": 1})
        );
        assert_eq!(seen[2].0, "QUORUM_FAILURE");
        assert_eq!(
            seen[2].1,
            json!({"reference": "q", "sector-num": 16, "sectors-count": 1})
        );
    }
}
