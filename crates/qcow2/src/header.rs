//! The qcow2 header and its extensions: parsing, validation and encoding.

use crate::be::{be32, be64};
use qsd_block::{Error, ErrorKind, Result};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;

/// Byte offsets of header fields we rewrite in place.
pub mod field {
    /// Virtual disk size (u64).
    pub const SIZE: u64 = 24;
    /// L1 size (u32) followed by the L1 table offset (u64).
    pub const L1_SIZE: u64 = 36;
    /// Refcount table offset (u64) followed by its cluster count (u32).
    pub const REFTABLE: u64 = 48;
    /// Incompatible features (u64), then compatible, then autoclear.
    pub const INCOMPAT: u64 = 72;
    /// Autoclear features (u64).
    pub const AUTOCLEAR: u64 = 88;
}

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be inconsistent (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// The image is known to be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// The compression type field is meaningful.
    pub const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this driver understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Bits this driver keeps valid when writing.
    pub const MAINTAINED: u64 = DATA_FILE_RAW;
}

/// Header extension types.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// qemu's limits on table sizes (bytes), checked before allocating.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table qemu accepts (bytes).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;

/// The bitmaps extension contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the directory in bytes.
    pub directory_size: u64,
    /// Offset of the directory.
    pub directory_offset: u64,
}

/// One feature name table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name (up to 46 bytes).
    pub name: String,
}

/// A parsed header with its extensions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// Backing file name (read from `backing_file_offset`).
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub features: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExt>,
    pub data_file: Option<String>,
    pub crypto_ext: Option<(u64, u64)>,
    /// Extensions we do not interpret, kept verbatim (type, data).
    pub unknown_ext: Vec<(u32, Vec<u8>)>,
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parse the fixed part from the start of the image (`buf` holds at
    /// least the first 104 bytes, or less for a short file).
    pub fn parse_fixed(buf: &[u8]) -> Result<Header> {
        if buf.len() < 72 || be32(buf, 0) != MAGIC {
            return Err(corrupt("Image is not in qcow2 format"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            refcount_order: 4,
            header_length: 72,
            ..Header::default()
        };
        if !(9..=21).contains(&h.cluster_bits) {
            return Err(corrupt(format!(
                "Unsupported cluster size: 2^{}",
                h.cluster_bits
            )));
        }
        if version == 3 {
            if buf.len() < 104 {
                return Err(corrupt("qcow2 header exceeds cluster size"));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return Err(corrupt("qcow2 header too short"));
            }
            if u64::from(h.header_length) > h.cluster_size() {
                return Err(corrupt("qcow2 header exceeds cluster size"));
            }
            if h.header_length > 104 && buf.len() > 104 {
                h.compression_type = buf[104];
            }
        }
        if h.refcount_order > 6 {
            return Err(corrupt(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        Ok(h)
    }

    /// Parse the header extensions and the backing file name from the
    /// first cluster of the image.
    pub fn parse_extensions(&mut self, cluster: &[u8]) -> Result<()> {
        let mut at = self.header_length as usize;
        let end =
            if self.backing_file_offset != 0 && self.backing_file_offset < cluster.len() as u64 {
                self.backing_file_offset as usize
            } else {
                cluster.len()
            };
        loop {
            if at + 8 > end {
                break;
            }
            let ty = be32(cluster, at);
            let len = be32(cluster, at + 4) as usize;
            at += 8;
            if ty == ext::END {
                break;
            }
            if len > end - at {
                return Err(corrupt("Invalid extension length"));
            }
            let data = &cluster[at..at + len];
            self.parse_one_ext(ty, data)?;
            at += len.next_multiple_of(8);
        }
        self.parse_backing_name(cluster)
    }

    fn parse_one_ext(&mut self, ty: u32, data: &[u8]) -> Result<()> {
        match ty {
            ext::BACKING_FORMAT => {
                if data.len() > 1023 {
                    return Err(corrupt("ERROR: ext_backing_format: len too large"));
                }
                self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            ext::FEATURE_TABLE => {
                self.features = data
                    .chunks_exact(48)
                    .map(|c| FeatureName {
                        kind: c[0],
                        bit: c[1],
                        name: String::from_utf8_lossy(&c[2..])
                            .trim_end_matches('\0')
                            .to_string(),
                    })
                    .collect();
            }
            ext::BITMAPS => {
                if data.len() < 24 {
                    return Err(corrupt("bitmaps_ext: Invalid extension length"));
                }
                self.bitmaps = Some(BitmapsExt {
                    nb_bitmaps: be32(data, 0),
                    directory_size: be64(data, 8),
                    directory_offset: be64(data, 16),
                });
            }
            ext::CRYPTO => {
                if data.len() != 16 {
                    return Err(corrupt(format!(
                        "CRYPTO header extension size {}, but expected size 16",
                        data.len()
                    )));
                }
                self.crypto_ext = Some((be64(data, 0), be64(data, 8)));
            }
            ext::DATA_FILE => {
                self.data_file = Some(String::from_utf8_lossy(data).into_owned());
            }
            _ => self.unknown_ext.push((ty, data.to_vec())),
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, cluster: &[u8]) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        if self.backing_file_size > MAX_BACKING_NAME {
            return Err(corrupt("Backing file name too long"));
        }
        let start = self.backing_file_offset;
        let end = start.saturating_add(u64::from(self.backing_file_size));
        if end > cluster.len() as u64 {
            return Err(corrupt("Backing file name is outside the header cluster"));
        }
        let name = &cluster[start as usize..end as usize];
        self.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        Ok(())
    }

    /// qemu's message for incompatible bits we do not support, or None.
    pub fn unsupported_features(&self) -> Option<String> {
        let unknown = self.incompatible & !incompat::KNOWN;
        if unknown == 0 {
            return None;
        }
        let mut parts = Vec::new();
        let mut rest = unknown;
        for f in &self.features {
            if f.kind == 0 && f.bit < 64 && rest & (1 << f.bit) != 0 {
                parts.push(f.name.clone());
                rest &= !(1 << f.bit);
            }
        }
        if rest != 0 {
            parts.push(format!("Unknown incompatible feature: {rest:x}"));
        }
        Some(format!(
            "Unsupported qcow2 feature(s): {}",
            parts.join(", ")
        ))
    }

    /// Encode the fixed header (72 or 112 bytes).
    // TODO(#3): used once snapshots or bitmaps rewrite the header.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn encode_fixed(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(112);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        b.extend_from_slice(&self.backing_file_size.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > 104 {
                b.push(self.compression_type);
                b.resize(self.header_length as usize, 0);
            }
        }
        b
    }

    /// Encode the extension area (including the end marker); unknown
    /// extensions are written back verbatim.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn encode_extensions(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let mut put = |ty: u32, data: &[u8]| {
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        };
        if let Some(f) = &self.backing_format {
            put(ext::BACKING_FORMAT, f.as_bytes());
        }
        if let Some(f) = &self.data_file {
            put(ext::DATA_FILE, f.as_bytes());
        }
        if let Some(bm) = &self.bitmaps {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&bm.nb_bitmaps.to_be_bytes());
            d.extend_from_slice(&0u32.to_be_bytes());
            d.extend_from_slice(&bm.directory_size.to_be_bytes());
            d.extend_from_slice(&bm.directory_offset.to_be_bytes());
            put(ext::BITMAPS, &d);
        }
        if !self.features.is_empty() {
            let mut d = Vec::with_capacity(48 * self.features.len());
            for f in &self.features {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                d.extend_from_slice(&e);
            }
            put(ext::FEATURE_TABLE, &d);
        }
        for (ty, data) in &self.unknown_ext {
            put(*ty, data);
        }
        put(ext::END, &[]);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            refcount_order: 4,
            header_length: 112,
            compatible: compat::LAZY_REFCOUNTS,
            backing_format: Some("raw".into()),
            features: vec![FeatureName {
                kind: 0,
                bit: 9,
                name: "frobnicate".into(),
            }],
            unknown_ext: vec![(0x1234_5678, vec![1, 2, 3])],
            ..Header::default()
        }
    }

    #[test]
    fn test_header_encode_parse_round_trip_keeps_extensions() {
        let h = sample();
        let mut cluster = h.encode_fixed();
        cluster.extend_from_slice(&h.encode_extensions());
        cluster.resize(65536, 0);
        let mut p = Header::parse_fixed(&cluster).unwrap();
        p.parse_extensions(&cluster).unwrap();
        assert_eq!(p, h);
    }

    #[test]
    fn test_header_bad_magic_is_refused() {
        let err = Header::parse_fixed(&[0u8; 112]).unwrap_err();
        assert_eq!(err.message(), "Image is not in qcow2 format");
    }

    #[test]
    fn test_header_bad_cluster_bits_is_refused() {
        let mut h = sample();
        h.cluster_bits = 22;
        let err = Header::parse_fixed(&h.encode_fixed()).unwrap_err();
        assert_eq!(err.message(), "Unsupported cluster size: 2^22");
    }

    #[test]
    fn test_header_unknown_incompatible_bits_are_named() {
        let mut h = sample();
        h.incompatible = (1 << 9) | (1 << 20);
        assert_eq!(
            h.unsupported_features().unwrap(),
            "Unsupported qcow2 feature(s): frobnicate, Unknown incompatible feature: 100000"
        );
        h.incompatible = incompat::DIRTY;
        assert!(h.unsupported_features().is_none());
    }

    #[test]
    fn test_header_extension_length_overflow_is_refused() {
        let h = sample();
        let mut cluster = h.encode_fixed();
        cluster.extend_from_slice(&0x1111u32.to_be_bytes());
        cluster.extend_from_slice(&u32::MAX.to_be_bytes());
        cluster.resize(512, 0);
        let mut p = Header::parse_fixed(&cluster).unwrap();
        assert!(p.parse_extensions(&cluster).is_err());
    }

    proptest::proptest! {
        #[test]
        fn test_header_parse_random_bytes_never_panics(
            mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
            version in 2u32..4,
            bits in 9u32..13,
        ) {
            if bytes.len() >= 24 {
                bytes[..4].copy_from_slice(&MAGIC.to_be_bytes());
                bytes[4..8].copy_from_slice(&version.to_be_bytes());
                bytes[20..24].copy_from_slice(&bits.to_be_bytes());
            }
            if let Ok(mut h) = Header::parse_fixed(&bytes) {
                let _ = h.parse_extensions(&bytes);
                let _ = h.unsupported_features();
            }
        }
    }
}
