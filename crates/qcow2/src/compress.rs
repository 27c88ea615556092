//! Compressed clusters: the zlib and zstd codecs qcow2 uses, and the
//! compressed-cluster descriptor stored in L2 entries.
//!
//! qcow2's "zlib" is a raw deflate stream (no zlib header) read with a 4 KiB
//! window; "zstd" is a sequence of zstd frames. Either way the decoder stops
//! once one cluster has been produced, so the bytes after the stream (the rest
//! of the last 512-byte sector) are ignored.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Size of the sectors a compressed descriptor counts in.
const SECTOR_SIZE: u64 = 512;

/// Largest back-reference distance a qcow2 zlib reader accepts (window bits 12).
const DEFLATE_WINDOW: usize = 4096;

/// Bit 62 of an L2 entry: the cluster is compressed.
pub const L2_COMPRESSED_FLAG: u64 = 1 << 62;

/// Smallest and largest cluster_bits qemu accepts.
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;

/// zstd level qemu uses (the library default).
const ZSTD_LEVEL: i32 = 3;

/// What went wrong compressing or decompressing a cluster.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("unknown compression type {0}")]
    UnknownType(u8),
    #[error("{kind} stream ended after {got} of {want} bytes")]
    Truncated {
        kind: &'static str,
        got: usize,
        want: usize,
    },
    #[error("corrupt {kind} stream: {detail}")]
    Corrupt { kind: &'static str, detail: String },
    #[error("zstd frame continues past the end of the cluster")]
    Overlong,
    #[error("{kind} compressor failed: {detail}")]
    Compressor { kind: &'static str, detail: String },
    #[error("invalid cluster_bits {0} (must be 9..=21)")]
    ClusterBits(u32),
    #[error("compressed length must not be zero")]
    EmptyData,
    #[error("host offset {0:#x} does not fit in a compressed descriptor")]
    OffsetTooLarge(u64),
    #[error("compressed length {0} does not fit in a compressed descriptor")]
    LengthTooLarge(u64),
}

/// The compression algorithm of an image (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

impl CompressionType {
    /// Decode the header's `compression_type` field.
    pub fn from_header(byte: u8) -> Result<Self, CompressError> {
        match byte {
            0 => Ok(Self::Zlib),
            1 => Ok(Self::Zstd),
            other => Err(CompressError::UnknownType(other)),
        }
    }

    /// The header byte for this type.
    pub fn to_header(self) -> u8 {
        match self {
            Self::Zlib => 0,
            Self::Zstd => 1,
        }
    }

    /// The QAPI name (`Qcow2CompressionType`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

/// Decompress one cluster: fill `out` exactly from `input`.
///
/// `input` may extend past the end of the compressed stream; the extra
/// bytes are ignored. A stream that cannot produce `out.len()` bytes is an
/// error.
pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), CompressError> {
    match kind {
        CompressionType::Zlib => inflate_raw(input, out),
        CompressionType::Zstd => zstd_decompress(input, out),
    }
}

/// Compress one cluster. `Ok(None)` when the result would be longer than
/// `max_out` bytes (the caller then stores the cluster uncompressed).
pub fn compress(
    kind: CompressionType,
    input: &[u8],
    max_out: usize,
) -> Result<Option<Vec<u8>>, CompressError> {
    match kind {
        CompressionType::Zlib => deflate_raw(input, max_out),
        CompressionType::Zstd => zstd_compress(input, max_out),
    }
}

fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<(), CompressError> {
    let mut inflater = Decompress::new(false);
    let want = out.len();
    loop {
        let in_pos = usize::try_from(inflater.total_in()).unwrap_or(usize::MAX);
        let out_pos = usize::try_from(inflater.total_out()).unwrap_or(usize::MAX);
        if out_pos >= want {
            return Ok(());
        }
        let (Some(src), Some(dst)) = (input.get(in_pos..), out.get_mut(out_pos..)) else {
            return Err(truncated("zlib", out_pos, want));
        };
        let status = inflater
            .decompress(src, dst, FlushDecompress::Finish)
            .map_err(|e| CompressError::Corrupt {
                kind: "zlib",
                detail: e.to_string(),
            })?;
        let made = usize::try_from(inflater.total_out()).unwrap_or(usize::MAX);
        let read = usize::try_from(inflater.total_in()).unwrap_or(usize::MAX);
        if made >= want {
            return Ok(());
        }
        // The stream ended, or no progress is possible: the cluster is short.
        if status == Status::StreamEnd || (made == out_pos && read == in_pos) {
            return Err(truncated("zlib", made, want));
        }
    }
}

fn truncated(kind: &'static str, got: usize, want: usize) -> CompressError {
    CompressError::Truncated { kind, got, want }
}

/// Raw deflate whose back-references never reach further than 4 KiB.
///
/// The compressor has a 32 KiB window and no setting to shrink it, so the
/// input is fed in 4 KiB pieces with a full flush after each: a full flush
/// empties the compressor's dictionary, which keeps every match inside its
/// own piece and thus readable by qemu's 4 KiB-window inflate.
fn deflate_raw(input: &[u8], max_out: usize) -> Result<Option<Vec<u8>>, CompressError> {
    let mut deflater = Compress::new(Compression::default(), false);
    // One spare byte tells "fits exactly" apart from "ran out of room".
    let mut out = vec![0u8; max_out.saturating_add(1)];
    let mut chunks = input.chunks(DEFLATE_WINDOW).peekable();
    if input.is_empty() {
        return finish_deflate(&mut deflater, &[], &mut out, max_out);
    }
    while let Some(chunk) = chunks.next() {
        if chunks.peek().is_none() {
            return finish_deflate(&mut deflater, chunk, &mut out, max_out);
        }
        let before_in = deflater.total_in();
        let pos = usize::try_from(deflater.total_out()).unwrap_or(usize::MAX);
        let dst = out.get_mut(pos..).unwrap_or_default();
        deflater
            .compress(chunk, dst, FlushCompress::Full)
            .map_err(|e| compressor_error("zlib", e))?;
        let consumed = deflater.total_in().saturating_sub(before_in);
        let produced = usize::try_from(deflater.total_out()).unwrap_or(usize::MAX);
        // Output full (or the chunk not fully taken): it cannot fit.
        if produced >= out.len() || consumed != chunk.len() as u64 {
            return Ok(None);
        }
    }
    Ok(None)
}

fn finish_deflate(
    deflater: &mut Compress,
    chunk: &[u8],
    out: &mut Vec<u8>,
    max_out: usize,
) -> Result<Option<Vec<u8>>, CompressError> {
    let pos = usize::try_from(deflater.total_out()).unwrap_or(usize::MAX);
    let dst = out.get_mut(pos..).unwrap_or_default();
    let status = deflater
        .compress(chunk, dst, FlushCompress::Finish)
        .map_err(|e| compressor_error("zlib", e))?;
    let produced = usize::try_from(deflater.total_out()).unwrap_or(usize::MAX);
    if status != Status::StreamEnd || produced > max_out {
        return Ok(None);
    }
    out.truncate(produced);
    Ok(Some(std::mem::take(out)))
}

fn compressor_error(kind: &'static str, e: impl std::fmt::Display) -> CompressError {
    CompressError::Compressor {
        kind,
        detail: e.to_string(),
    }
}

/// Decode zstd frames until `out` is full; the frame being decoded must end
/// exactly there (a longer frame means a damaged cluster).
fn zstd_decompress(input: &[u8], out: &mut [u8]) -> Result<(), CompressError> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let corrupt = |e: std::io::Error| CompressError::Corrupt {
        kind: "zstd",
        detail: e.to_string(),
    };
    let want = out.len();
    let mut decoder = Decoder::new().map_err(corrupt)?;
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    let mut hint = 0;
    while dst.pos() < want {
        let (in_before, out_before) = (src.pos(), dst.pos());
        hint = decoder.run(&mut src, &mut dst).map_err(corrupt)?;
        if src.pos() <= in_before && dst.pos() <= out_before {
            return Err(truncated("zstd", dst.pos(), want));
        }
    }
    if hint > 0 {
        // The output is full but the frame is not finished: ask the decoder
        // whether it still holds data (a frame longer than the cluster).
        let mut spare = [0u8; 1];
        let mut probe = OutBuffer::around(&mut spare[..]);
        hint = decoder.run(&mut src, &mut probe).map_err(corrupt)?;
        if probe.pos() > 0 || hint > 0 {
            return Err(CompressError::Overlong);
        }
    }
    Ok(())
}

fn zstd_compress(input: &[u8], max_out: usize) -> Result<Option<Vec<u8>>, CompressError> {
    use zstd::stream::raw::{Encoder, InBuffer, Operation, OutBuffer};
    let fail = |e: std::io::Error| compressor_error("zstd", e);
    let mut encoder = Encoder::new(ZSTD_LEVEL).map_err(fail)?;
    let mut out = vec![0u8; max_out];
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(&mut out[..]);
    while src.pos() < input.len() {
        let (in_before, out_before) = (src.pos(), dst.pos());
        encoder.run(&mut src, &mut dst).map_err(fail)?;
        if src.pos() == in_before && dst.pos() == out_before {
            return Ok(None);
        }
    }
    loop {
        let out_before = dst.pos();
        let remaining = encoder.finish(&mut dst, true).map_err(fail)?;
        if remaining == 0 {
            break;
        }
        if dst.pos() == out_before {
            return Ok(None);
        }
    }
    let len = dst.pos();
    out.truncate(len);
    Ok(Some(out))
}

fn check_cluster_bits(cluster_bits: u32) -> Result<(), CompressError> {
    if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        Ok(())
    } else {
        Err(CompressError::ClusterBits(cluster_bits))
    }
}

/// Position of the sector-count field: x = 62 - (cluster_bits - 8).
/// Clamped so that hostile cluster_bits cannot make a shift overflow.
fn size_shift(cluster_bits: u32) -> u32 {
    62u32.saturating_sub(cluster_bits.clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS) - 8)
}

/// Decode a compressed cluster's L2 entry (bits 62 and 63 are ignored).
///
/// Returns the host offset of the compressed data and the number of bytes
/// from there to the end of its last sector: the most that must be read.
/// `cluster_bits` outside 9..=21 is clamped into that range.
pub fn compressed_descriptor(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let shift = size_shift(cluster_bits);
    let offset = entry & ((1u64 << shift) - 1);
    let extra_sectors = (entry & !(L2_COMPRESSED_FLAG | (1 << 63))) >> shift;
    let sectors = extra_sectors + 1;
    let len = sectors * SECTOR_SIZE - (offset % SECTOR_SIZE);
    (offset, len)
}

/// Build the L2 entry of a compressed cluster stored at `host_offset` with
/// `compressed_len` bytes: the descriptor with bit 62 (compressed) set.
pub fn make_descriptor(
    host_offset: u64,
    compressed_len: u64,
    cluster_bits: u32,
) -> Result<u64, CompressError> {
    check_cluster_bits(cluster_bits)?;
    if compressed_len == 0 {
        return Err(CompressError::EmptyData);
    }
    let shift = size_shift(cluster_bits);
    // Offsets must also stay below 2^56, like every other host offset.
    let offset_limit = (1u64 << shift.min(56)) - 1;
    if host_offset > offset_limit {
        return Err(CompressError::OffsetTooLarge(host_offset));
    }
    let last = host_offset
        .checked_add(compressed_len - 1)
        .ok_or(CompressError::LengthTooLarge(compressed_len))?;
    let extra_sectors = last / SECTOR_SIZE - host_offset / SECTOR_SIZE;
    let size_mask = (1u64 << (62 - shift)) - 1;
    if extra_sectors > size_mask {
        return Err(CompressError::LengthTooLarge(compressed_len));
    }
    Ok(L2_COMPRESSED_FLAG | (extra_sectors << shift) | host_offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_cluster(len: usize) -> Vec<u8> {
        let mut data = Vec::with_capacity(len);
        let mut i = 0u32;
        while data.len() < len {
            data.extend_from_slice(format!("line {} of the sample; ", i % 97).as_bytes());
            i += 1;
        }
        data.truncate(len);
        data
    }

    #[test]
    fn test_compression_type_from_header_known_values_decode() {
        assert_eq!(
            CompressionType::from_header(0).unwrap(),
            CompressionType::Zlib
        );
        assert_eq!(
            CompressionType::from_header(1).unwrap(),
            CompressionType::Zstd
        );
        assert_eq!(CompressionType::Zstd.name(), "zstd");
        assert_eq!(CompressionType::Zlib.name(), "zlib");
        assert_eq!(CompressionType::Zstd.to_header(), 1);
    }

    #[test]
    fn test_compression_type_from_header_unknown_errors() {
        assert!(matches!(
            CompressionType::from_header(2),
            Err(CompressError::UnknownType(2))
        ));
    }

    #[test]
    fn test_compress_zlib_cluster_round_trips() {
        let data = sample_cluster(65536);
        let packed = compress(CompressionType::Zlib, &data, 65535)
            .unwrap()
            .unwrap();
        assert!(packed.len() < 8192);
        // Trailing garbage after the stream is ignored.
        let mut padded = packed.clone();
        padded.extend_from_slice(&[0xa5; 300]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zlib, &padded, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn test_compress_zstd_cluster_round_trips() {
        let data = sample_cluster(65536);
        let packed = compress(CompressionType::Zstd, &data, 65535)
            .unwrap()
            .unwrap();
        let mut padded = packed.clone();
        padded.extend_from_slice(&[0u8; 300]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zstd, &padded, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn test_compress_incompressible_data_returns_none() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            assert!(compress(kind, &data, 65535).unwrap().is_none());
        }
    }

    #[test]
    fn test_compress_exact_fit_is_accepted() {
        let data = sample_cluster(4096);
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let packed = compress(kind, &data, 4095).unwrap().unwrap();
            let again = compress(kind, &data, packed.len()).unwrap().unwrap();
            assert_eq!(again, packed);
            assert!(compress(kind, &data, packed.len() - 1).unwrap().is_none());
        }
    }

    #[test]
    fn test_decompress_short_stream_errors() {
        let data = sample_cluster(65536);
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let packed = compress(kind, &data[..32768], 65535).unwrap().unwrap();
            let mut out = vec![0u8; 65536];
            assert!(decompress(kind, &packed, &mut out).is_err());
            let cut = &packed[..packed.len() / 2];
            let mut out = vec![0u8; 32768];
            assert!(decompress(kind, cut, &mut out).is_err());
        }
    }

    #[test]
    fn test_decompress_zstd_overlong_frame_errors() {
        let data = sample_cluster(8192);
        let packed = compress(CompressionType::Zstd, &data, 8191)
            .unwrap()
            .unwrap();
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zstd, &packed, &mut out).is_err());
    }

    #[test]
    fn test_decompress_zlib_longer_stream_fills_cluster() {
        // Like qemu: zlib decoding stops once the cluster is full.
        let data = sample_cluster(8192);
        let packed = compress(CompressionType::Zlib, &data, 8191)
            .unwrap()
            .unwrap();
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zlib, &packed, &mut out).unwrap();
        assert_eq!(out, data[..4096]);
    }

    #[test]
    fn test_compressed_descriptor_64k_cluster_decodes_fields() {
        // cluster_bits 16: x = 54; offset 0x50210, 3 additional sectors.
        let entry = L2_COMPRESSED_FLAG | (3u64 << 54) | 0x50210;
        let (off, len) = compressed_descriptor(entry, 16);
        assert_eq!(off, 0x50210);
        assert_eq!(len, 4 * 512 - 0x10);
    }

    #[test]
    fn test_make_descriptor_round_trips_through_decode() {
        for bits in 9..=21u32 {
            let cluster = 1u64 << bits;
            for (off, len) in [
                (0x10000u64, 1u64),
                (0x12345, 700),
                (0x200, cluster),
                (511, 2),
            ] {
                // Compressed data is never longer than a cluster.
                let len = len.min(cluster);
                let entry = make_descriptor(off, len, bits).unwrap();
                assert_eq!(entry & L2_COMPRESSED_FLAG, L2_COMPRESSED_FLAG);
                let (o, max) = compressed_descriptor(entry, bits);
                assert_eq!(o, off);
                assert!(
                    max >= len && max < len + 512,
                    "bits {bits} off {off} len {len}"
                );
            }
        }
    }

    #[test]
    fn test_make_descriptor_bad_inputs_error() {
        assert!(matches!(
            make_descriptor(0, 1, 8),
            Err(CompressError::ClusterBits(8))
        ));
        assert!(matches!(
            make_descriptor(0, 0, 16),
            Err(CompressError::EmptyData)
        ));
        assert!(matches!(
            make_descriptor(1 << 54, 1, 16),
            Err(CompressError::OffsetTooLarge(_))
        ));
        // 9-bit clusters: one sector-count bit, so at most two sectors.
        assert!(make_descriptor(0, 1024, 9).is_ok());
        assert!(matches!(
            make_descriptor(0, 1025, 9),
            Err(CompressError::LengthTooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn test_decompress_arbitrary_bytes_never_panics(
            input in proptest::collection::vec(any::<u8>(), 0..2048),
            out_len in 0usize..9000,
        ) {
            let mut out = vec![0u8; out_len];
            let _ = decompress(CompressionType::Zlib, &input, &mut out);
            let _ = decompress(CompressionType::Zstd, &input, &mut out);
        }

        #[test]
        fn test_compress_arbitrary_data_round_trips(
            input in proptest::collection::vec(0u8..4, 1..20000),
            max_out in 0usize..20000,
        ) {
            for kind in [CompressionType::Zlib, CompressionType::Zstd] {
                if let Some(packed) = compress(kind, &input, max_out).unwrap() {
                    prop_assert!(packed.len() <= max_out);
                    let mut out = vec![0u8; input.len()];
                    decompress(kind, &packed, &mut out).unwrap();
                    prop_assert_eq!(&out, &input);
                }
            }
        }

        #[test]
        fn test_compressed_descriptor_arbitrary_entry_never_panics(
            entry in any::<u64>(), bits in any::<u32>(),
        ) {
            let _ = compressed_descriptor(entry, bits);
            let _ = make_descriptor(entry, entry >> 40, bits);
        }
    }
}
