//! Codecs of table entries: L1, L2 (standard and extended) and refcounts.

/// The entry's cluster is referenced exactly once (refcount 1).
pub const COPIED: u64 = 1 << 63;
/// The cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Standard L2 entries: the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Bits 9..55 of L1 entries and standard L2 entries: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// What an L2 entry (plus, for extended L2, its bitmap) says about a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: the backing file shows through (or zeroes).
    Unallocated,
    /// Reads as zeroes; `host` keeps a preallocated cluster when nonzero.
    Zero { host: u64 },
    /// Data at `host`; `copied` says the refcount is exactly 1.
    Normal { host: u64, copied: bool },
    /// Compressed data at `host`, `len` bytes long (an upper bound).
    Compressed { host: u64, len: u64 },
}

/// Geometry needed to decode entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub cluster_bits: u32,
    pub extended: bool,
    /// v3 images have the standard zero flag.
    pub zero_flag: bool,
    /// Data lives in an external data file, where host offset 0 is valid:
    /// an entry with offset 0 and the copied flag is allocated there.
    pub data_file: bool,
}

impl Layout {
    /// Bytes per L2 entry.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        (1u64 << self.cluster_bits) / self.l2_entry_bytes()
    }

    /// Bytes per subcluster (the cluster size without extended L2).
    pub fn subcluster_bits(&self) -> u32 {
        if self.extended {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }

    /// Decode a standard entry (the first word of an extended one).
    pub fn decode(&self, entry: u64) -> Mapping {
        if entry & COMPRESSED != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = (entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1);
            let len = (sectors + 1) * 512 - (host & 511);
            return Mapping::Compressed { host, len };
        }
        let host = entry & OFFSET_MASK;
        if !self.extended && self.zero_flag && entry & ZERO != 0 {
            return Mapping::Zero { host };
        }
        if host == 0 && !(self.data_file && entry & COPIED != 0) {
            return Mapping::Unallocated;
        }
        Mapping::Normal {
            host,
            copied: entry & COPIED != 0,
        }
    }

    /// Status of subcluster `sc` of an extended entry with bitmap `bm`.
    pub fn decode_sub(&self, entry: u64, bm: u64, sc: u32) -> Mapping {
        let m = self.decode(entry);
        if matches!(m, Mapping::Compressed { .. }) {
            return m;
        }
        let host = entry & OFFSET_MASK;
        if bm & (1u64 << (32 + sc)) != 0 {
            Mapping::Zero { host }
        } else if bm & (1u64 << sc) != 0 {
            m
        } else {
            Mapping::Unallocated
        }
    }

    /// Encode a compressed descriptor (tests; writes use
    /// `compress::make_descriptor`, which checks the ranges).
    #[cfg(test)]
    pub fn encode_compressed(&self, host: u64, len: u64) -> u64 {
        let x = 62 - (self.cluster_bits - 8);
        let sectors = (host + len - 1) / 512 - host / 512;
        COMPRESSED | (sectors << x) | host
    }
}

/// Read big-endian u64 number `i` of `table`.
pub fn get_u64(table: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&table[i * 8..i * 8 + 8]);
    u64::from_be_bytes(a)
}

/// Store big-endian u64 number `i` of `table`.
pub fn set_u64(table: &mut [u8], i: usize, v: u64) {
    table[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

/// Refcount `i` of a refcount block of `1 << order`-bit entries.
pub fn get_refcount(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            u64::from((block[i / per_byte] >> shift) & ((1u8 << bits) - 1))
        }
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(&block[4 * i..4 * i + 4]);
            u64::from(u32::from_be_bytes(a))
        }
        _ => get_u64(block, i),
    }
}

/// Largest refcount of the width.
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    }
}

/// Store refcount `i`; the caller checks `v <= max_refcount(order)`.
pub fn set_refcount(block: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            let b = &mut block[i / per_byte];
            *b = (*b & !mask) | (((v as u8) << shift) & mask);
        }
        3 => block[i] = v as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => set_u64(block, i, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: Layout = Layout {
        cluster_bits: 16,
        extended: false,
        zero_flag: true,
        data_file: false,
    };

    #[test]
    fn test_l2_standard_entries_decode_each_kind() {
        assert_eq!(STD.decode(0), Mapping::Unallocated);
        assert_eq!(STD.decode(ZERO), Mapping::Zero { host: 0 });
        assert_eq!(
            STD.decode(COPIED | 0x50000),
            Mapping::Normal {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(STD.decode(0x50000 | ZERO), Mapping::Zero { host: 0x50000 });
        let v2 = Layout {
            zero_flag: false,
            ..STD
        };
        assert_eq!(
            v2.decode(0x50000 | ZERO),
            Mapping::Normal {
                host: 0x50000,
                copied: false
            }
        );
    }

    #[test]
    fn test_l2_offset_zero_in_data_file_is_allocated_when_copied() {
        let df = Layout {
            data_file: true,
            ..STD
        };
        assert_eq!(
            df.decode(COPIED),
            Mapping::Normal {
                host: 0,
                copied: true
            }
        );
        assert_eq!(df.decode(0), Mapping::Unallocated);
        assert_eq!(STD.decode(COPIED), Mapping::Unallocated);
    }

    #[test]
    fn test_l2_compressed_entry_round_trips() {
        for bits in [9, 12, 16, 21] {
            let l = Layout {
                cluster_bits: bits,
                ..STD
            };
            let want = 3000.min((1u64 << bits) - 400);
            let e = l.encode_compressed(0x12345, want);
            let Mapping::Compressed { host, len } = l.decode(e) else {
                panic!("not compressed")
            };
            assert_eq!(host, 0x12345);
            assert!((want..want + 512).contains(&len), "{bits}: {len}");
        }
    }

    #[test]
    fn test_l2_extended_entries_decode_subclusters() {
        let l = Layout {
            extended: true,
            ..STD
        };
        let e = COPIED | 0x70000;
        let bm = 0b01 | (0b100u64 << 32);
        assert!(matches!(l.decode_sub(e, bm, 0), Mapping::Normal { .. }));
        assert_eq!(l.decode_sub(e, bm, 1), Mapping::Unallocated);
        assert_eq!(l.decode_sub(e, bm, 2), Mapping::Zero { host: 0x70000 });
        assert_eq!(l.decode_sub(0, 1u64 << 32, 0), Mapping::Zero { host: 0 });
        assert_eq!(l.l2_entries(), 4096);
        assert_eq!(l.subcluster_bits(), 11);
    }

    #[test]
    fn test_refcount_get_set_every_width() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let n = (512 * 8) >> order;
            let max = max_refcount(order);
            for i in 0..n {
                set_refcount(&mut block, order, i, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&block, order, i),
                    (i as u64 * 7) & max,
                    "{order}"
                );
            }
            set_refcount(&mut block, order, 3, max);
            assert_eq!(get_refcount(&block, order, 3), max);
            assert_eq!(get_refcount(&block, order, 2), 14 & max);
        }
    }

    #[test]
    fn test_refcount_sub_byte_layout_is_lsb_first() {
        let mut block = vec![0u8; 1];
        set_refcount(&mut block, 0, 1, 1);
        assert_eq!(block[0], 0b10);
        set_refcount(&mut block, 2, 1, 0xf);
        assert_eq!(block[0], 0xf2);
    }
}
