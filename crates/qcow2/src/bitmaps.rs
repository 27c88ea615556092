//! Persistent dirty bitmaps: the bitmaps header extension, the bitmap
//! directory and bitmap tables, and the QAPI `Qcow2BitmapInfo` view.

use crate::be::{be16, be32, be64};
use serde_json::{json, Map, Value};
use std::collections::HashSet;

/// Most bitmaps qemu supports in one image.
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory qemu accepts.
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Granularity bits qemu supports.
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name qemu supports.
pub const MAX_NAME_SIZE: usize = 1023;
/// Most entries qemu accepts in one bitmap table.
pub const MAX_TABLE_SIZE: u32 = 0x0800_0000;
/// Most bytes of bitmap data (table entries times cluster size) qemu accepts.
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;

/// Entry flags.
pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE);

/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// Size of the bitmaps extension payload and of a directory entry's fixed part.
const EXT_LEN: usize = 24;
const ENTRY_FIXED_LEN: usize = 24;

/// Bitmap table entry: bits that must be zero, the offset, "all ones".
const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_ALL_ONES: u64 = 1;

/// What is wrong with the bitmaps metadata.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BitmapError {
    #[error("bitmaps extension has length {0} (must be {EXT_LEN})")]
    ExtLength(usize),
    #[error("bitmaps extension: reserved field is not zero")]
    ExtReserved,
    #[error("bitmaps extension with zero bitmaps")]
    NoBitmaps,
    #[error("image has {0} bitmaps, more than the supported {MAX_BITMAPS}")]
    TooMany(u32),
    #[error("bitmap directory size {0} exceeds the supported {MAX_DIRECTORY_SIZE}")]
    DirectoryTooLarge(u64),
    #[error("bitmap directory is truncated at entry {index}")]
    DirectoryTruncated { index: usize },
    #[error("bitmap directory has {have} bytes but its {nb} entries take {used}")]
    DirectorySize { have: usize, used: usize, nb: u32 },
    #[error("bitmap {index}: name size {size} is not in 1..={MAX_NAME_SIZE}")]
    NameSize { index: usize, size: u16 },
    #[error("bitmap '{name}': duplicate name")]
    DuplicateName { name: String },
    #[error("bitmap '{name}': granularity bits {bits} not in {MIN_GRANULARITY_BITS}..={MAX_GRANULARITY_BITS}")]
    Granularity { name: String, bits: u8 },
    #[error("bitmap '{name}': reserved flags set ({flags:#x})")]
    ReservedFlags { name: String, flags: u32 },
    #[error("bitmap '{name}': unknown type {kind}")]
    Type { name: String, kind: u8 },
    #[error("bitmap '{name}': invalid bitmap table (offset {offset:#x}, {size} entries)")]
    Table {
        name: String,
        offset: u64,
        size: u32,
    },
    #[error("bitmap '{name}': bitmap table too small for the disk")]
    TableTooSmall { name: String },
    #[error("bitmap table has {have} bytes, {need} needed")]
    TableTruncated { have: usize, need: u64 },
    #[error("bitmap table entry {index} is invalid: {entry:#018x}")]
    TableEntry { index: usize, entry: u64 },
}

/// The bitmaps header extension (type 0x23852875).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// One entry of the bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    pub name: String,
    pub granularity_bits: u8,
    pub flags: u32,
    pub bitmap_type: u8,
    pub table_offset: u64,
    pub table_size: u32,
    /// Type-specific extra data, kept as stored.
    pub extra: Vec<u8>,
    /// Bytes the entry occupies in the directory, padding included.
    pub entry_len: usize,
}

/// Parse the bitmaps extension payload. The caller checks that
/// `directory_offset` is cluster aligned (the cluster size is not known here).
pub fn parse_bitmaps_ext(data: &[u8]) -> Result<BitmapsExt, BitmapError> {
    if data.len() != EXT_LEN {
        return Err(BitmapError::ExtLength(data.len()));
    }
    let ext = BitmapsExt {
        nb_bitmaps: be32(data, 0),
        directory_size: be64(data, 8),
        directory_offset: be64(data, 16),
    };
    if be32(data, 4) != 0 {
        return Err(BitmapError::ExtReserved);
    }
    if ext.nb_bitmaps == 0 {
        return Err(BitmapError::NoBitmaps);
    }
    if ext.nb_bitmaps > MAX_BITMAPS {
        return Err(BitmapError::TooMany(ext.nb_bitmaps));
    }
    if ext.directory_size > MAX_DIRECTORY_SIZE {
        return Err(BitmapError::DirectoryTooLarge(ext.directory_size));
    }
    Ok(ext)
}

/// Serialize the bitmaps extension payload.
pub fn serialize_bitmaps_ext(ext: &BitmapsExt) -> [u8; EXT_LEN] {
    let mut out = [0u8; EXT_LEN];
    out[0..4].copy_from_slice(&ext.nb_bitmaps.to_be_bytes());
    out[8..16].copy_from_slice(&ext.directory_size.to_be_bytes());
    out[16..24].copy_from_slice(&ext.directory_offset.to_be_bytes());
    out
}

/// Parse the whole bitmap directory (`directory_size` bytes read from
/// `directory_offset`): exactly `nb_bitmaps` entries must fill it.
pub fn parse_bitmap_directory(
    buf: &[u8],
    nb_bitmaps: u32,
) -> Result<Vec<BitmapEntry>, BitmapError> {
    if nb_bitmaps > MAX_BITMAPS {
        return Err(BitmapError::TooMany(nb_bitmaps));
    }
    if buf.len() as u64 > MAX_DIRECTORY_SIZE {
        return Err(BitmapError::DirectoryTooLarge(buf.len() as u64));
    }
    let mut entries = Vec::new();
    let mut names = HashSet::new();
    let mut pos = 0usize;
    for index in 0..nb_bitmaps as usize {
        let rest = buf.get(pos..).unwrap_or_default();
        let entry = parse_entry(rest, index)?;
        entry.validate()?;
        if !names.insert(entry.name.clone()) {
            return Err(BitmapError::DuplicateName { name: entry.name });
        }
        pos += entry.entry_len;
        entries.push(entry);
    }
    if pos != buf.len() {
        return Err(BitmapError::DirectorySize {
            have: buf.len(),
            used: pos,
            nb: nb_bitmaps,
        });
    }
    Ok(entries)
}

fn parse_entry(b: &[u8], index: usize) -> Result<BitmapEntry, BitmapError> {
    if b.len() < ENTRY_FIXED_LEN {
        return Err(BitmapError::DirectoryTruncated { index });
    }
    let name_size = be16(b, 18);
    if name_size == 0 || usize::from(name_size) > MAX_NAME_SIZE {
        return Err(BitmapError::NameSize {
            index,
            size: name_size,
        });
    }
    let extra_end = usize::try_from(be32(b, 20))
        .ok()
        .and_then(|n| n.checked_add(ENTRY_FIXED_LEN))
        .ok_or(BitmapError::DirectoryTruncated { index })?;
    let name_end = extra_end + usize::from(name_size);
    let entry_len = name_end.div_ceil(8) * 8;
    // The padding belongs to the entry and must be inside the directory.
    if b.len() < entry_len {
        return Err(BitmapError::DirectoryTruncated { index });
    }
    Ok(BitmapEntry {
        // Non-UTF-8 names are shown lossily, as qemu's JSON output does.
        name: String::from_utf8_lossy(&b[extra_end..name_end]).into_owned(),
        granularity_bits: b[17],
        flags: be32(b, 12),
        bitmap_type: b[16],
        table_offset: be64(b, 0),
        table_size: be32(b, 8),
        extra: b[ENTRY_FIXED_LEN..extra_end].to_vec(),
        entry_len,
    })
}

/// Serialize a bitmap directory; entries are padded with zeros to 8 bytes.
/// Entries should pass validation: a name is cut to 1023 bytes here.
pub fn serialize_bitmap_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let name = &e.name.as_bytes()[..e.name.len().min(MAX_NAME_SIZE)];
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(e.bitmap_type);
        out.push(e.granularity_bits);
        out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&u32::try_from(e.extra.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&e.extra);
        out.extend_from_slice(name);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out
}

/// Parse a bitmap table of `table_size` entries from the start of `buf`,
/// checking every entry's reserved bits. Cluster alignment of the offsets is
/// checked by [`check_table_alignment`].
pub fn parse_bitmap_table(buf: &[u8], table_size: u32) -> Result<Vec<u64>, BitmapError> {
    if table_size > MAX_TABLE_SIZE {
        return Err(BitmapError::TableTruncated {
            have: buf.len(),
            need: u64::from(table_size) * 8,
        });
    }
    let need = table_size as usize * 8;
    let Some(bytes) = buf.get(..need) else {
        return Err(BitmapError::TableTruncated {
            have: buf.len(),
            need: need as u64,
        });
    };
    let mut entries = Vec::with_capacity(table_size as usize);
    for (index, raw) in bytes.chunks_exact(8).enumerate() {
        let entry = be64(raw, 0);
        let offset = entry & TABLE_OFFSET_MASK;
        // With an offset, bit 0 ("read as all ones") is reserved.
        if entry & TABLE_RESERVED_MASK != 0 || (offset != 0 && entry & TABLE_ALL_ONES != 0) {
            return Err(BitmapError::TableEntry { index, entry });
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// Check that every data cluster a bitmap table points to is cluster aligned.
pub fn check_table_alignment(entries: &[u64], cluster_bits: u32) -> Result<(), BitmapError> {
    let mask = 1u64.checked_shl(cluster_bits).map_or(u64::MAX, |c| c - 1);
    match entries
        .iter()
        .position(|e| e & TABLE_OFFSET_MASK & mask != 0)
    {
        Some(index) => Err(BitmapError::TableEntry {
            index,
            entry: entries[index],
        }),
        None => Ok(()),
    }
}

/// Host offset of a bitmap table entry's data cluster, or `None` when the
/// cluster is not allocated (see [`table_entry_all_ones`] then).
pub fn table_entry_offset(entry: u64) -> Option<u64> {
    Some(entry & TABLE_OFFSET_MASK).filter(|&o| o != 0)
}

/// Whether an unallocated bitmap cluster reads as all ones (else zeros).
pub fn table_entry_all_ones(entry: u64) -> bool {
    entry & TABLE_OFFSET_MASK == 0 && entry & TABLE_ALL_ONES != 0
}

impl BitmapEntry {
    /// The bitmap was not saved cleanly and may be inconsistent.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// The bitmap is enabled: it must track every write.
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Whether software that does not understand the extra data may use the
    /// bitmap (it may not when unknown extra data is present without the
    /// extra_data_compatible flag).
    pub fn usable(&self) -> bool {
        self.extra.is_empty() || self.flags & FLAG_EXTRA_DATA_COMPATIBLE != 0
    }

    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1u64.checked_shl(u32::from(self.granularity_bits))
            .unwrap_or(0)
    }

    /// The checks that need no knowledge of the image.
    pub fn validate(&self) -> Result<(), BitmapError> {
        let name = || self.name.clone();
        if self.bitmap_type != TYPE_DIRTY_TRACKING {
            return Err(BitmapError::Type {
                name: name(),
                kind: self.bitmap_type,
            });
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            return Err(BitmapError::Granularity {
                name: name(),
                bits: self.granularity_bits,
            });
        }
        if self.flags & RESERVED_FLAGS != 0 {
            return Err(BitmapError::ReservedFlags {
                name: name(),
                flags: self.flags,
            });
        }
        let bad_table = self.table_size == 0
            || self.table_size > MAX_TABLE_SIZE
            || self.table_offset == 0
            || !self.table_offset.is_multiple_of(512);
        if bad_table {
            return Err(self.table_error());
        }
        Ok(())
    }

    fn table_error(&self) -> BitmapError {
        BitmapError::Table {
            name: self.name.clone(),
            offset: self.table_offset,
            size: self.table_size,
        }
    }

    /// The checks that need the image's cluster size and virtual disk size:
    /// the table is cluster aligned, its data is not too large, and (unless
    /// the bitmap is in use) it covers the whole disk.
    pub fn check_for_image(&self, cluster_bits: u32, disk_size: u64) -> Result<(), BitmapError> {
        let cluster = 1u64.checked_shl(cluster_bits).unwrap_or(0);
        if cluster == 0 || !self.table_offset.is_multiple_of(cluster) {
            return Err(self.table_error());
        }
        let phys = u128::from(self.table_size) * u128::from(cluster);
        if phys > u128::from(MAX_PHYS_SIZE) {
            return Err(self.table_error());
        }
        let covered = (phys * 8) << self.granularity_bits.min(63);
        if !self.in_use() && u128::from(disk_size) > covered {
            return Err(BitmapError::TableTooSmall {
                name: self.name.clone(),
            });
        }
        Ok(())
    }

    /// qemu's `Qcow2BitmapInfo` for this bitmap.
    pub fn to_qapi_json(&self) -> Value {
        let mut flags = Vec::new();
        if self.in_use() {
            flags.push("in-use");
        }
        if self.auto() {
            flags.push("auto");
        }
        let mut obj = Map::new();
        obj.insert("name".into(), json!(self.name));
        obj.insert("granularity".into(), json!(self.granularity()));
        obj.insert("flags".into(), json!(flags));
        Value::Object(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// From an image where `qemu-img bitmap --add img b0` and
    /// `--add -g 65536 --disable img bitmap-two` ran (qemu 10.0.2).
    const QEMU_EXT: &str = "0000000200000000000000000000004800000000000d0000";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn test_parse_bitmaps_ext_qemu_image_decodes() {
        let ext = parse_bitmaps_ext(&hex(QEMU_EXT)).unwrap();
        assert_eq!(
            ext,
            BitmapsExt {
                nb_bitmaps: 2,
                directory_size: 72,
                directory_offset: 0xd0000
            }
        );
        assert_eq!(serialize_bitmaps_ext(&ext).to_vec(), hex(QEMU_EXT));
    }

    #[test]
    fn test_parse_bitmaps_ext_bad_fields_error() {
        let good = hex(QEMU_EXT);
        assert_eq!(
            parse_bitmaps_ext(&good[..16]),
            Err(BitmapError::ExtLength(16))
        );
        let mut b = good.clone();
        b[7] = 1;
        assert_eq!(parse_bitmaps_ext(&b), Err(BitmapError::ExtReserved));
        let mut b = good.clone();
        b[3] = 0;
        assert_eq!(parse_bitmaps_ext(&b), Err(BitmapError::NoBitmaps));
        let mut b = good.clone();
        b[0..4].copy_from_slice(&65536u32.to_be_bytes());
        assert_eq!(parse_bitmaps_ext(&b), Err(BitmapError::TooMany(65536)));
        let mut b = good;
        b[8..16].copy_from_slice(&(MAX_DIRECTORY_SIZE + 1).to_be_bytes());
        assert!(matches!(
            parse_bitmaps_ext(&b),
            Err(BitmapError::DirectoryTooLarge(_))
        ));
    }

    /// The directory of that image after `qemu-io -c 'write -P 1 1M 3M'`
    /// dirtied b0, and while qemu-storage-daemon had it open (both in use).
    const QEMU_DIR: &str = "00000000003f0000000000010000000201100002000000006230000000000000\
        000000000040000000000001000000000110000a000000006269746d61702d74\
        776f000000000000";
    const QEMU_DIR_OPEN: &str = "00000000003f0000000000010000000301100002000000006230000000000000\
        000000000040000000000001000000010110000a000000006269746d61702d74\
        776f000000000000";

    #[test]
    fn test_parse_bitmap_directory_qemu_image_decodes() {
        let dir = parse_bitmap_directory(&hex(QEMU_DIR), 2).unwrap();
        assert_eq!(dir.len(), 2);
        let b0 = &dir[0];
        assert_eq!(b0.name, "b0");
        assert_eq!((b0.table_offset, b0.table_size), (0x3f_0000, 1));
        assert_eq!((b0.granularity_bits, b0.bitmap_type), (16, 1));
        assert!(b0.auto() && !b0.in_use() && b0.usable());
        assert_eq!(b0.entry_len, 32);
        assert_eq!(dir[1].name, "bitmap-two");
        assert_eq!(dir[1].entry_len, 40);
        assert!(!dir[1].auto());
        b0.check_for_image(16, 64 << 20).unwrap();
        assert_eq!(serialize_bitmap_directory(&dir), hex(QEMU_DIR));
    }

    #[test]
    fn test_to_qapi_json_matches_qemu_img_info() {
        let dir = parse_bitmap_directory(&hex(QEMU_DIR), 2).unwrap();
        assert_eq!(
            dir[0].to_qapi_json(),
            json!({"name": "b0", "granularity": 65536, "flags": ["auto"]})
        );
        assert_eq!(
            dir[1].to_qapi_json(),
            json!({"name": "bitmap-two", "granularity": 65536, "flags": []})
        );
        let open = parse_bitmap_directory(&hex(QEMU_DIR_OPEN), 2).unwrap();
        let v = open[0].to_qapi_json();
        assert_eq!(v["flags"], json!(["in-use", "auto"]));
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["name", "granularity", "flags"]);
        assert_eq!(open[1].to_qapi_json()["flags"], json!(["in-use"]));
    }

    #[test]
    fn test_parse_bitmap_directory_wrong_count_errors() {
        let dir = hex(QEMU_DIR);
        assert!(matches!(
            parse_bitmap_directory(&dir, 1),
            Err(BitmapError::DirectorySize { used: 32, .. })
        ));
        assert_eq!(
            parse_bitmap_directory(&dir, 3),
            Err(BitmapError::DirectoryTruncated { index: 2 })
        );
        assert_eq!(
            parse_bitmap_directory(&dir[..70], 2),
            Err(BitmapError::DirectoryTruncated { index: 1 })
        );
    }

    fn entry() -> BitmapEntry {
        parse_bitmap_directory(&hex(QEMU_DIR), 2).unwrap().remove(0)
    }

    fn reparse(e: &BitmapEntry) -> Result<Vec<BitmapEntry>, BitmapError> {
        parse_bitmap_directory(&serialize_bitmap_directory(std::slice::from_ref(e)), 1)
    }

    #[test]
    fn test_parse_bitmap_directory_invalid_fields_error() {
        let mut e = entry();
        e.granularity_bits = 8;
        assert!(matches!(
            reparse(&e),
            Err(BitmapError::Granularity { bits: 8, .. })
        ));
        e.granularity_bits = 32;
        assert!(matches!(
            reparse(&e),
            Err(BitmapError::Granularity { bits: 32, .. })
        ));
        let mut e = entry();
        e.flags = 1 << 3;
        assert!(matches!(
            reparse(&e),
            Err(BitmapError::ReservedFlags { .. })
        ));
        let mut e = entry();
        e.bitmap_type = 2;
        assert!(matches!(
            reparse(&e),
            Err(BitmapError::Type { kind: 2, .. })
        ));
        for (off, size) in [
            (0, 1),
            (0x10000, 0),
            (0x10100, 1),
            (0x10000, MAX_TABLE_SIZE + 1),
        ] {
            let mut e = entry();
            (e.table_offset, e.table_size) = (off, size);
            assert!(
                matches!(reparse(&e), Err(BitmapError::Table { .. })),
                "{off} {size}"
            );
        }
    }

    #[test]
    fn test_parse_bitmap_directory_name_sizes_checked() {
        let mut e = entry();
        e.name = "n".repeat(MAX_NAME_SIZE);
        assert_eq!(reparse(&e).unwrap()[0].name.len(), MAX_NAME_SIZE);
        let mut raw = serialize_bitmap_directory(&[entry()]);
        raw[18..20].copy_from_slice(&1024u16.to_be_bytes());
        assert!(matches!(
            parse_bitmap_directory(&raw, 1),
            Err(BitmapError::NameSize { size: 1024, .. })
        ));
        raw[18..20].copy_from_slice(&0u16.to_be_bytes());
        assert!(matches!(
            parse_bitmap_directory(&raw, 1),
            Err(BitmapError::NameSize { size: 0, .. })
        ));
    }

    #[test]
    fn test_parse_bitmap_directory_duplicate_name_errors() {
        let raw = serialize_bitmap_directory(&[entry(), entry()]);
        assert!(matches!(
            parse_bitmap_directory(&raw, 2),
            Err(BitmapError::DuplicateName { .. })
        ));
    }

    #[test]
    fn test_parse_bitmap_directory_extra_data_kept() {
        let mut e = entry();
        e.extra = vec![1, 2, 3];
        let back = reparse(&e).unwrap();
        assert_eq!(back[0].extra, [1, 2, 3]);
        assert_eq!(back[0].entry_len, 32);
        assert!(!back[0].usable());
        e.flags |= FLAG_EXTRA_DATA_COMPATIBLE;
        assert!(reparse(&e).unwrap()[0].usable());
    }

    #[test]
    fn test_check_for_image_small_table_errors_unless_in_use() {
        // One 64 KiB cluster of bits at 64 KiB granularity covers 32 GiB.
        let mut e = entry();
        assert!(e.check_for_image(16, 32 << 30).is_ok());
        assert!(matches!(
            e.check_for_image(16, (32 << 30) + 1),
            Err(BitmapError::TableTooSmall { .. })
        ));
        e.flags |= FLAG_IN_USE;
        assert!(e.check_for_image(16, (32 << 30) + 1).is_ok());
        e.table_offset = 0x3f_1000;
        assert!(matches!(
            e.check_for_image(16, 0),
            Err(BitmapError::Table { .. })
        ));
        assert!(e.check_for_image(12, 0).is_ok());
    }

    #[test]
    fn test_parse_bitmap_table_qemu_image_decodes() {
        // b0's table in that image: one data cluster at 0x3e0000.
        let table = parse_bitmap_table(&hex("00000000003e0000"), 1).unwrap();
        assert_eq!(table, [0x3e_0000]);
        assert_eq!(table_entry_offset(table[0]), Some(0x3e_0000));
        check_table_alignment(&table, 16).unwrap();
        assert!(check_table_alignment(&[0x3e_1000], 16).is_err());
    }

    #[test]
    fn test_parse_bitmap_table_reserved_bits_error() {
        assert_eq!(parse_bitmap_table(&1u64.to_be_bytes(), 1).unwrap(), [1]);
        assert!(table_entry_all_ones(1) && !table_entry_all_ones(0));
        assert_eq!(table_entry_offset(1), None);
        for bad in [0x3e_0001u64, 2, 1 << 56, 0x100] {
            assert_eq!(
                parse_bitmap_table(&bad.to_be_bytes(), 1),
                Err(BitmapError::TableEntry {
                    index: 0,
                    entry: bad
                })
            );
        }
        assert!(matches!(
            parse_bitmap_table(&[0; 8], 2),
            Err(BitmapError::TableTruncated { have: 8, need: 16 })
        ));
    }

    proptest! {
        #[test]
        fn test_parsers_arbitrary_bytes_never_panic(
            buf in proptest::collection::vec(any::<u8>(), 0..256),
            nb in 0u32..4,
            bits in any::<u32>(),
            disk in any::<u64>(),
        ) {
            let _ = parse_bitmaps_ext(&buf);
            let _ = parse_bitmap_table(&buf, nb * 4);
            if let Ok(dir) = parse_bitmap_directory(&buf, nb) {
                prop_assert_eq!(dir.iter().map(|e| e.entry_len).sum::<usize>(), buf.len());
                for e in &dir {
                    let _ = e.to_qapi_json();
                    let _ = e.check_for_image(bits, disk);
                }
            }
        }

        #[test]
        fn test_parse_bitmap_directory_mutated_entry_never_panics(
            flips in proptest::collection::vec((0usize..72, any::<u8>()), 1..6),
        ) {
            let mut raw = hex(QEMU_DIR);
            for (at, v) in flips {
                raw[at] = v;
            }
            let _ = parse_bitmap_directory(&raw, 2);
        }
    }
}
