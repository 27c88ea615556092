//! The seam to the compression codecs in `compress.rs`: which codec an
//! image uses, and inflating/deflating one cluster.

pub use crate::compress::{CompressError as CodecError, CompressionType as Kind};

/// Inflate one cluster into all of `out`.
pub fn decompress(kind: Kind, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    crate::compress::decompress(kind, input, out)
}

/// Deflate one cluster; None when the result would not fit in `max_out`.
pub fn compress(kind: Kind, input: &[u8], max_out: usize) -> Result<Option<Vec<u8>>, CodecError> {
    crate::compress::compress(kind, input, max_out)
}
