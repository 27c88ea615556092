//! The internal snapshot table: parsing, serialization, and the QAPI
//! `SnapshotInfo` view of an entry.
//!
//! Each entry is a 40-byte fixed part, `extra_data_size` bytes of extra data
//! (64-bit VM state size, virtual disk size, icount, then anything newer),
//! the ID and the name, padded to a multiple of 8 bytes.

use crate::be::{be16, be32, be64};
use serde_json::{json, Map, Value};

/// Most snapshots qemu accepts in one image.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table qemu accepts (1 KiB per snapshot on average).
pub const MAX_TABLE_SIZE: usize = 1024 * MAX_SNAPSHOTS as usize;
/// Largest extra data per entry qemu accepts.
pub const MAX_EXTRA_DATA: usize = 1024;
/// Longest ID and name the table can encode (16-bit length fields).
pub const MAX_STRING_LEN: usize = u16::MAX as usize;

/// Size of the fixed part of an entry.
const FIXED_LEN: usize = 40;
/// Extra data qemu knows: VM state size, disk size, icount.
const KNOWN_EXTRA_LEN: usize = 24;
/// qemu reports at most this many bytes of ID and name (its buffers are
/// 128 and 256 bytes with a terminating NUL).
const QAPI_ID_LEN: usize = 127;
const QAPI_NAME_LEN: usize = 255;

/// What is wrong with a snapshot table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("too many snapshots: {0} (at most {MAX_SNAPSHOTS})")]
    TooMany(u32),
    #[error("snapshot table entry {index} is truncated: needs {need} bytes, table has {have}")]
    Truncated {
        index: usize,
        need: usize,
        have: usize,
    },
    #[error(
        "snapshot table entry {index} has {size} bytes of extra data (at most {MAX_EXTRA_DATA})"
    )]
    ExtraTooLarge { index: usize, size: u32 },
    #[error("snapshot table too large: more than {MAX_TABLE_SIZE} bytes at entry {index}")]
    TableTooLarge { index: usize },
    #[error("snapshot {what} is {len} bytes long (at most {MAX_STRING_LEN})")]
    StringTooLong { what: &'static str, len: usize },
}

/// One entry of the snapshot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub vm_state_size: u64,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// Record/replay instruction count; `None` when absent or -1.
    pub icount: Option<u64>,
    /// Virtual disk size at snapshot time; `None` when the entry predates it
    /// (the image's current size applies then).
    pub disk_size: Option<u64>,
    /// The entry's extra data exactly as stored, known fields included, so
    /// fields this code does not know survive a rewrite. May be empty for a
    /// new snapshot: serialization adds the known fields it needs.
    pub extra: Vec<u8>,
    /// Bytes the entry occupies in the table, padding included.
    pub table_len: usize,
}

fn round_up8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Parse `nb_snapshots` entries from the start of `buf` (the table read
/// from `snapshots_offset`; it may extend past the table).
pub fn parse_snapshot_table(buf: &[u8], nb_snapshots: u32) -> Result<Vec<Snapshot>, SnapshotError> {
    if nb_snapshots > MAX_SNAPSHOTS {
        return Err(SnapshotError::TooMany(nb_snapshots));
    }
    let mut snaps = Vec::new();
    let mut pos = 0usize;
    for index in 0..nb_snapshots as usize {
        let rest = buf.get(pos..).unwrap_or_default();
        let (snap, raw_len) = parse_entry(rest, index)?;
        // The unpadded end of the entry is what must fit, as in qemu.
        if pos + raw_len > MAX_TABLE_SIZE {
            return Err(SnapshotError::TableTooLarge { index });
        }
        pos += snap.table_len;
        snaps.push(snap);
    }
    Ok(snaps)
}

/// Parse one entry at the start of `b`; also returns its unpadded length.
fn parse_entry(b: &[u8], index: usize) -> Result<(Snapshot, usize), SnapshotError> {
    let truncated = |need: usize| SnapshotError::Truncated {
        index,
        need,
        have: b.len(),
    };
    if b.len() < FIXED_LEN {
        return Err(truncated(FIXED_LEN));
    }
    let id_len = usize::from(be16(b, 12));
    let name_len = usize::from(be16(b, 14));
    let extra_size = be32(b, 36);
    if extra_size as usize > MAX_EXTRA_DATA {
        return Err(SnapshotError::ExtraTooLarge {
            index,
            size: extra_size,
        });
    }
    let extra_end = FIXED_LEN + extra_size as usize;
    let id_end = extra_end + id_len;
    let name_end = id_end + name_len;
    if b.len() < name_end {
        return Err(truncated(name_end));
    }
    let extra = b[FIXED_LEN..extra_end].to_vec();
    let vm_state_size = if extra.len() >= 8 {
        be64(&extra, 0)
    } else {
        u64::from(be32(b, 32))
    };
    let disk_size = (extra.len() >= 16).then(|| be64(&extra, 8));
    let icount = if extra.len() >= KNOWN_EXTRA_LEN {
        Some(be64(&extra, 16)).filter(|&v| v != u64::MAX)
    } else {
        None
    };
    let snap = Snapshot {
        // Names are bytes on disk; non-UTF-8 ones are shown lossily, as
        // qemu's JSON output does.
        id: String::from_utf8_lossy(&b[extra_end..id_end]).into_owned(),
        name: String::from_utf8_lossy(&b[id_end..name_end]).into_owned(),
        l1_table_offset: be64(b, 0),
        l1_size: be32(b, 8),
        vm_state_size,
        date_sec: be32(b, 16),
        date_nsec: be32(b, 20),
        vm_clock_nsec: be64(b, 24),
        icount,
        disk_size,
        extra,
        table_len: round_up8(name_end),
    };
    Ok((snap, name_end))
}

/// Serialize a snapshot table; every entry is padded to 8 bytes.
///
/// Entries should pass [`Snapshot::validate`] first: an ID or name longer
/// than 65535 bytes is cut to that length here.
pub fn serialize_snapshot_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for snap in snaps {
        snap.write_entry(&mut out);
    }
    out
}

impl Snapshot {
    /// Check what the table format and qemu's limits require of one entry.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        for (what, len) in [("id", self.id.len()), ("name", self.name.len())] {
            if len > MAX_STRING_LEN {
                return Err(SnapshotError::StringTooLong { what, len });
            }
        }
        let extra = self.extra_data().len();
        if extra > MAX_EXTRA_DATA {
            return Err(SnapshotError::ExtraTooLarge {
                index: 0,
                size: u32::try_from(extra).unwrap_or(u32::MAX),
            });
        }
        Ok(())
    }

    /// Bytes this entry takes when serialized, padding included.
    pub fn serialized_len(&self) -> usize {
        let id = self.id.len().min(MAX_STRING_LEN);
        let name = self.name.len().min(MAX_STRING_LEN);
        round_up8(FIXED_LEN + self.extra_data().len() + id + name)
    }

    /// The extra data to store: the stored bytes, grown to hold every known
    /// field that has a value, with those fields written over.
    fn extra_data(&self) -> Vec<u8> {
        let mut need = self.extra.len();
        if self.vm_state_size > u64::from(u32::MAX) {
            need = need.max(8);
        }
        if self.disk_size.is_some() {
            need = need.max(16);
        }
        if self.icount.is_some() {
            need = need.max(KNOWN_EXTRA_LEN);
        }
        let mut extra = self.extra.clone();
        extra.resize(need, 0);
        let icount = self.icount.unwrap_or(u64::MAX);
        let fields = [
            (0, Some(self.vm_state_size)),
            (8, self.disk_size),
            (16, Some(icount)),
        ];
        for (at, value) in fields {
            if let (Some(v), Some(slot)) = (value, extra.get_mut(at..at + 8)) {
                slot.copy_from_slice(&v.to_be_bytes());
            }
        }
        extra
    }

    fn write_entry(&self, out: &mut Vec<u8>) {
        let id = &self.id.as_bytes()[..self.id.len().min(MAX_STRING_LEN)];
        let name = &self.name.as_bytes()[..self.name.len().min(MAX_STRING_LEN)];
        let extra = self.extra_data();
        // A VM state too large for the old 32-bit field is recorded there
        // as 0, so old readers see a disk-only snapshot (qemu does this).
        let vm_state32 = u32::try_from(self.vm_state_size).unwrap_or(0);
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&vm_state32.to_be_bytes());
        let extra_len = u32::try_from(extra.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&extra_len.to_be_bytes());
        out.extend_from_slice(&extra);
        out.extend_from_slice(id);
        out.extend_from_slice(name);
        out.resize(round_up8(out.len()), 0);
    }

    /// qemu's `SnapshotInfo` for this entry, members in schema order.
    pub fn to_qapi_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("id".into(), json!(qapi_string(&self.id, QAPI_ID_LEN)));
        obj.insert("name".into(), json!(qapi_string(&self.name, QAPI_NAME_LEN)));
        obj.insert("vm-state-size".into(), json!(self.vm_state_size));
        obj.insert("date-sec".into(), json!(self.date_sec));
        obj.insert("date-nsec".into(), json!(self.date_nsec));
        obj.insert(
            "vm-clock-sec".into(),
            json!(self.vm_clock_nsec / 1_000_000_000),
        );
        obj.insert(
            "vm-clock-nsec".into(),
            json!(self.vm_clock_nsec % 1_000_000_000),
        );
        if let Some(icount) = self.icount {
            obj.insert("icount".into(), json!(icount));
        }
        Value::Object(obj)
    }
}

/// A name as qemu reports it: up to the first NUL, at most `max` bytes
/// (cut back to a character boundary).
fn qapi_string(s: &str, max: usize) -> &str {
    let s = s.split('\0').next().unwrap_or_default();
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The snapshot table `qemu-img snapshot -c snap1` and then
    /// `-c "second snap"` wrote into a 64 MiB image (qemu 10.0.2).
    const QEMU_TABLE: &str = "000000000006000000000001000100056b01363d068a9f200000000000000000\
        0000000000000018000000000000000000000000040000000000000000000000\
        31736e61703100000000000000080000000000010001000b6b01363d07210708\
        0000000000000000000000000000001800000000000000000000000004000000\
        0000000000000000327365636f6e6420736e617000000000";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn qemu_table() -> Vec<u8> {
        hex(QEMU_TABLE)
    }

    #[test]
    fn test_parse_snapshot_table_qemu_image_decodes() {
        let snaps = parse_snapshot_table(&qemu_table(), 2).unwrap();
        assert_eq!(snaps.len(), 2);
        let s = &snaps[0];
        assert_eq!((s.id.as_str(), s.name.as_str()), ("1", "snap1"));
        assert_eq!(s.l1_table_offset, 0x60000);
        assert_eq!(s.l1_size, 1);
        assert_eq!(s.date_sec, 1_795_241_533);
        assert_eq!(s.date_nsec, 109_748_000);
        assert_eq!(s.disk_size, Some(64 << 20));
        assert_eq!(s.icount, Some(0));
        assert_eq!(s.table_len, 72);
        assert_eq!(snaps[1].name, "second snap");
        assert_eq!(snaps[1].table_len, 80);
    }

    #[test]
    fn test_serialize_snapshot_table_qemu_image_is_byte_identical() {
        let table = qemu_table();
        let snaps = parse_snapshot_table(&table, 2).unwrap();
        assert_eq!(serialize_snapshot_table(&snaps), table);
    }

    #[test]
    fn test_to_qapi_json_matches_qemu_img_info() {
        let snaps = parse_snapshot_table(&qemu_table(), 2).unwrap();
        let want = json!({"id": "1", "name": "snap1", "vm-state-size": 0,
            "date-sec": 1_795_241_533u32, "date-nsec": 109_748_000, "vm-clock-sec": 0,
            "vm-clock-nsec": 0, "icount": 0});
        assert_eq!(snaps[0].to_qapi_json(), want);
        let keys: Vec<_> = want.as_object().unwrap().keys().cloned().collect();
        let got: Vec<_> = snaps[0]
            .to_qapi_json()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(got, keys);
    }

    fn sample() -> Snapshot {
        Snapshot {
            id: "7".into(),
            name: "nightly".into(),
            l1_table_offset: 0x30000,
            l1_size: 2,
            vm_state_size: 0,
            date_sec: 10,
            date_nsec: 20,
            vm_clock_nsec: 3_500_000_001,
            icount: None,
            disk_size: Some(1 << 30),
            extra: Vec::new(),
            table_len: 0,
        }
    }

    #[test]
    fn test_to_qapi_json_no_icount_omits_member_and_splits_clock() {
        let v = sample().to_qapi_json();
        assert!(v.get("icount").is_none());
        assert_eq!(v["vm-clock-sec"], 3);
        assert_eq!(v["vm-clock-nsec"], 500_000_001);
    }

    #[test]
    fn test_to_qapi_json_long_name_is_cut_like_qemu() {
        let mut s = sample();
        s.name = "n".repeat(300);
        s.id = "é".repeat(100);
        let v = s.to_qapi_json();
        assert_eq!(v["name"].as_str().unwrap().len(), 255);
        assert_eq!(v["id"].as_str().unwrap().len(), 126);
    }

    #[test]
    fn test_serialize_new_snapshot_round_trips() {
        let mut snaps = vec![sample(), sample()];
        snaps[1].id = "8".into();
        snaps[1].icount = Some(5);
        snaps[1].vm_state_size = 1 << 33;
        snaps[1].extra = vec![0; 40]; // unknown trailing fields survive
        snaps[1].extra[39] = 0x5a;
        let bytes = serialize_snapshot_table(&snaps);
        assert_eq!(bytes.len() % 8, 0);
        let back = parse_snapshot_table(&bytes, 2).unwrap();
        assert_eq!(back[0].disk_size, Some(1 << 30));
        assert_eq!(back[0].extra.len(), 16);
        assert_eq!(back[0].table_len, sample().serialized_len());
        assert_eq!(back[1].icount, Some(5));
        assert_eq!(back[1].vm_state_size, 1 << 33);
        assert_eq!(back[1].extra[39], 0x5a);
        // The 32-bit field reads as "no VM state" to old readers.
        let second = &bytes[back[0].table_len..];
        assert_eq!(&second[32..36], &[0, 0, 0, 0]);
        assert_eq!(serialize_snapshot_table(&back), bytes);
    }

    #[test]
    fn test_parse_snapshot_table_old_entry_without_extra_uses_32bit_size() {
        let mut s = sample();
        s.disk_size = None;
        s.vm_state_size = 4096;
        let bytes = serialize_snapshot_table(&[s]);
        let back = parse_snapshot_table(&bytes, 1).unwrap();
        assert!(back[0].extra.is_empty());
        assert_eq!(back[0].vm_state_size, 4096);
        assert_eq!(back[0].disk_size, None);
        assert_eq!(back[0].table_len, 48);
    }

    #[test]
    fn test_parse_snapshot_table_too_many_errors() {
        assert_eq!(
            parse_snapshot_table(&[], MAX_SNAPSHOTS + 1),
            Err(SnapshotError::TooMany(MAX_SNAPSHOTS + 1))
        );
    }

    #[test]
    fn test_parse_snapshot_table_truncated_errors() {
        let table = qemu_table();
        let err = parse_snapshot_table(&table[..100], 2).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Truncated { index: 1, .. }),
            "{err}"
        );
        let err = parse_snapshot_table(&table, 3).unwrap_err();
        assert!(matches!(
            err,
            SnapshotError::Truncated {
                index: 2,
                need: 40,
                ..
            }
        ));
    }

    #[test]
    fn test_parse_snapshot_table_big_extra_errors() {
        let mut s = sample();
        s.extra = vec![0; MAX_EXTRA_DATA + 8];
        assert!(s.validate().is_err());
        let bytes = serialize_snapshot_table(&[s]);
        let err = parse_snapshot_table(&bytes, 1).unwrap_err();
        assert_eq!(
            err,
            SnapshotError::ExtraTooLarge {
                index: 0,
                size: 1032
            }
        );
    }

    #[test]
    fn test_validate_long_name_errors() {
        let mut s = sample();
        assert!(s.validate().is_ok());
        s.name = "x".repeat(MAX_STRING_LEN + 1);
        assert!(matches!(
            s.validate(),
            Err(SnapshotError::StringTooLong { what: "name", .. })
        ));
    }

    #[test]
    fn test_parse_snapshot_table_oversized_table_errors() {
        // 65536 entries of ~1 KiB + 24 bytes exceed 64 MiB.
        let mut s = sample();
        s.name = "x".repeat(1000);
        let one = serialize_snapshot_table(&[s]);
        let table: Vec<u8> = one
            .iter()
            .copied()
            .cycle()
            .take(one.len() * 65536)
            .collect();
        let err = parse_snapshot_table(&table, 65536).unwrap_err();
        assert!(matches!(err, SnapshotError::TableTooLarge { .. }), "{err}");
    }

    proptest! {
        #[test]
        fn test_parse_snapshot_table_arbitrary_bytes_never_panics(
            buf in proptest::collection::vec(any::<u8>(), 0..512), nb in 0u32..8,
        ) {
            if let Ok(snaps) = parse_snapshot_table(&buf, nb) {
                let total: usize = snaps.iter().map(|s| s.table_len).sum();
                prop_assert!(total <= buf.len() + 7);
                for s in &snaps {
                    let _ = s.to_qapi_json();
                }
                // Valid UTF-8 entries survive a rewrite unchanged.
                let again = parse_snapshot_table(&serialize_snapshot_table(&snaps), nb);
                if !snaps.iter().any(|s| s.id.contains('\u{fffd}') || s.name.contains('\u{fffd}')) {
                    prop_assert_eq!(again.unwrap(), snaps);
                }
            }
        }

        #[test]
        fn test_parse_snapshot_table_mutated_qemu_table_never_panics(
            flips in proptest::collection::vec((0usize..152, any::<u8>()), 1..6),
        ) {
            let mut raw = qemu_table();
            for (at, v) in flips {
                raw[at] = v;
            }
            if let Ok(snaps) = parse_snapshot_table(&raw, 2) {
                let _ = serialize_snapshot_table(&snaps);
            }
        }
    }
}
