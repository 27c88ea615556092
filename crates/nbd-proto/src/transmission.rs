//! Transmission phase: request headers, simple replies and structured reply
//! chunks (compact headers; extended headers are not negotiated yet).

use bytes::BufMut;

use crate::consts::*;
use crate::{be16, be32, be64, Decoded, ProtoError};

/// A request header. For `NBD_CMD_WRITE`, `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: CommandFlags,
    /// Command.
    pub command: CommandType,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Decode the 28-byte header. A wrong magic is a protocol violation.
    pub fn decode(buf: &[u8]) -> Result<Decoded<Request>, ProtoError> {
        if buf.len() < REQUEST_HEADER_LEN {
            return Ok(Decoded::Incomplete(REQUEST_HEADER_LEN));
        }
        let magic = be32(buf, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "request",
                expected: u64::from(REQUEST_MAGIC),
                found: u64::from(magic),
            });
        }
        let req = Request {
            flags: CommandFlags(be16(buf, 4)),
            command: CommandType::from_raw(be16(buf, 6)),
            cookie: be64(buf, 8),
            offset: be64(buf, 16),
            length: be32(buf, 24),
        };
        Ok(Decoded::Done(req, REQUEST_HEADER_LEN))
    }

    /// Encode the header (client side).
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags.bits());
        out.put_u16(self.command.raw());
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }

    /// Bytes of data that follow the header on the wire.
    pub fn payload_len(&self) -> usize {
        if self.command == CommandType::Write {
            self.length as usize
        } else {
            0
        }
    }

    /// The exclusive end of the range, or `None` if it overflows.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.length))
    }
}

/// Write a simple reply header; for a successful read the data follows.
pub fn encode_simple_reply(out: &mut impl BufMut, cookie: u64, error: NbdErrno) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error.0);
    out.put_u64(cookie);
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// Error (0 = success).
    pub error: u32,
    /// Cookie of the request.
    pub cookie: u64,
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Chunk flags.
    pub flags: ReplyFlags,
    /// Chunk type.
    pub kind: ChunkType,
    /// Cookie of the request.
    pub cookie: u64,
    /// Payload length.
    pub len: u32,
}

impl ChunkHeader {
    /// Encode the 20-byte header.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(self.flags.bits());
        out.put_u16(self.kind.raw());
        out.put_u64(self.cookie);
        out.put_u32(self.len);
    }
}

/// Any reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (16 bytes).
    Simple(SimpleReply),
    /// A structured chunk (20 bytes).
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    /// Decode a simple or structured reply header (client side).
    pub fn decode(buf: &[u8]) -> Result<Decoded<ReplyHeader>, ProtoError> {
        if buf.len() < 4 {
            return Ok(Decoded::Incomplete(4));
        }
        match be32(buf, 0) {
            SIMPLE_REPLY_MAGIC if buf.len() < SIMPLE_REPLY_LEN => {
                Ok(Decoded::Incomplete(SIMPLE_REPLY_LEN))
            }
            SIMPLE_REPLY_MAGIC => {
                let r = SimpleReply {
                    error: be32(buf, 4),
                    cookie: be64(buf, 8),
                };
                Ok(Decoded::Done(ReplyHeader::Simple(r), SIMPLE_REPLY_LEN))
            }
            STRUCTURED_REPLY_MAGIC if buf.len() < CHUNK_HEADER_LEN => {
                Ok(Decoded::Incomplete(CHUNK_HEADER_LEN))
            }
            STRUCTURED_REPLY_MAGIC => {
                let c = ChunkHeader {
                    flags: ReplyFlags(be16(buf, 4)),
                    kind: ChunkType::from_raw(be16(buf, 6)),
                    cookie: be64(buf, 8),
                    len: be32(buf, 16),
                };
                Ok(Decoded::Done(ReplyHeader::Chunk(c), CHUNK_HEADER_LEN))
            }
            other => Err(ProtoError::BadMagic {
                what: "reply",
                expected: u64::from(SIMPLE_REPLY_MAGIC),
                found: u64::from(other),
            }),
        }
    }
}

fn done_flag(done: bool) -> ReplyFlags {
    ReplyFlags::EMPTY.with(ReplyFlags::DONE, done)
}

/// Bytes written by [`encode_offset_data_header`].
pub const OFFSET_DATA_HEADER_LEN: usize = CHUNK_HEADER_LEN + 8;

/// Write the header of an `OFFSET_DATA` chunk; `data_len` bytes must follow.
pub fn encode_offset_data_header(
    out: &mut impl BufMut,
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) {
    let len = data_len.saturating_add(8);
    ChunkHeader {
        flags: done_flag(done),
        kind: ChunkType::OffsetData,
        cookie,
        len,
    }
    .encode(out);
    out.put_u64(offset);
}

/// Write an `OFFSET_HOLE` chunk.
pub fn encode_offset_hole(out: &mut impl BufMut, cookie: u64, offset: u64, len: u32, done: bool) {
    ChunkHeader {
        flags: done_flag(done),
        kind: ChunkType::OffsetHole,
        cookie,
        len: 12,
    }
    .encode(out);
    out.put_u64(offset);
    out.put_u32(len);
}

/// Write the final empty `NONE` chunk.
pub fn encode_none(out: &mut impl BufMut, cookie: u64) {
    ChunkHeader {
        flags: ReplyFlags::DONE,
        kind: ChunkType::None,
        cookie,
        len: 0,
    }
    .encode(out);
}

/// One extent of a block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u32,
    /// Context-defined flags.
    pub flags: u32,
}

/// Write a `BLOCK_STATUS` chunk for one context.
pub fn encode_block_status(
    out: &mut impl BufMut,
    cookie: u64,
    context_id: u32,
    extents: &[Extent],
    done: bool,
) {
    let len = 4 + 8 * extents.len();
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    ChunkHeader {
        flags: done_flag(done),
        kind: ChunkType::BlockStatus,
        cookie,
        len,
    }
    .encode(out);
    out.put_u32(context_id);
    for e in extents {
        out.put_u32(e.length);
        out.put_u32(e.flags);
    }
}

fn message(msg: &str) -> &[u8] {
    let mut end = msg.len().min(MAX_STRING_LEN);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg.as_bytes()[..end]
}

/// Write an `ERROR` chunk (always final here, as qemu does).
pub fn encode_error_chunk(out: &mut impl BufMut, cookie: u64, error: NbdErrno, msg: &str) {
    let m = message(msg);
    let len = 6 + m.len() as u32;
    ChunkHeader {
        flags: ReplyFlags::DONE,
        kind: ChunkType::Error,
        cookie,
        len,
    }
    .encode(out);
    out.put_u32(error.0);
    out.put_u16(m.len() as u16);
    out.put_slice(m);
}

/// Write an `ERROR_OFFSET` chunk.
pub fn encode_error_offset(
    out: &mut impl BufMut,
    cookie: u64,
    error: NbdErrno,
    msg: &str,
    offset: u64,
    done: bool,
) {
    let m = message(msg);
    let len = 14 + m.len() as u32;
    ChunkHeader {
        flags: done_flag(done),
        kind: ChunkType::ErrorOffset,
        cookie,
        len,
    }
    .encode(out);
    out.put_u32(error.0);
    out.put_u16(m.len() as u16);
    out.put_slice(m);
    out.put_u64(offset);
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ_FIXTURE: &[u8] = b"\x25\x60\x95\x13\x00\x04\x00\x00\
        \x01\x02\x03\x04\x05\x06\x07\x08\
        \x00\x00\x00\x00\x00\x00\x10\x00\
        \x00\x00\x02\x00";

    #[test]
    fn test_request_decode_read_fixture() {
        let (r, n) = Request::decode(READ_FIXTURE).unwrap().done().unwrap();
        assert_eq!(n, 28);
        assert_eq!(r.command, CommandType::Read);
        assert_eq!(r.flags, CommandFlags::DF);
        assert_eq!(r.cookie, 0x0102_0304_0506_0708);
        assert_eq!(r.offset, 4096);
        assert_eq!(r.length, 512);
        assert_eq!(r.payload_len(), 0);
        let mut enc = Vec::new();
        r.encode(&mut enc);
        assert_eq!(enc, READ_FIXTURE);
    }

    #[test]
    fn test_request_decode_short_is_incomplete() {
        assert_eq!(
            Request::decode(&READ_FIXTURE[..27]).unwrap(),
            Decoded::Incomplete(28)
        );
    }

    #[test]
    fn test_request_decode_bad_magic_errors() {
        let mut b = READ_FIXTURE.to_vec();
        b[0] = 0x12;
        assert!(matches!(
            Request::decode(&b),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn test_request_write_has_payload_and_end_overflow_detected() {
        let r = Request {
            flags: CommandFlags::FUA,
            command: CommandType::Write,
            cookie: 1,
            offset: u64::MAX,
            length: 9,
        };
        assert_eq!(r.payload_len(), 9);
        assert_eq!(r.end(), None);
    }

    #[test]
    fn test_simple_reply_fixture() {
        let mut out = Vec::new();
        encode_simple_reply(&mut out, 0xaabb, NbdErrno::EINVAL);
        assert_eq!(
            out,
            b"\x67\x44\x66\x98\x00\x00\x00\x16\x00\x00\x00\x00\x00\x00\xaa\xbb"
        );
        let (h, n) = ReplyHeader::decode(&out).unwrap().done().unwrap();
        assert_eq!(n, 16);
        assert_eq!(
            h,
            ReplyHeader::Simple(SimpleReply {
                error: 22,
                cookie: 0xaabb
            })
        );
    }

    #[test]
    fn test_offset_data_and_hole_fixtures() {
        let mut out = Vec::new();
        encode_offset_data_header(&mut out, 5, 0x200, 4, true);
        assert_eq!(
            out,
            b"\x66\x8e\x33\xef\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x05\
              \x00\x00\x00\x0c\x00\x00\x00\x00\x00\x00\x02\x00"
        );
        out.clear();
        encode_offset_hole(&mut out, 5, 0x200, 0x1000, false);
        assert_eq!(&out[4..8], b"\x00\x00\x00\x02");
        assert_eq!(
            &out[16..],
            b"\x00\x00\x00\x0c\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x10\x00"
        );
    }

    #[test]
    fn test_block_status_chunk_layout() {
        let mut out = Vec::new();
        let ext = [
            Extent {
                length: 4096,
                flags: STATE_HOLE | STATE_ZERO,
            },
            Extent {
                length: 512,
                flags: 0,
            },
        ];
        encode_block_status(&mut out, 9, 0, &ext, true);
        let (h, n) = ReplyHeader::decode(&out).unwrap().done().unwrap();
        let ReplyHeader::Chunk(c) = h else { panic!() };
        assert_eq!(c.kind, ChunkType::BlockStatus);
        assert_eq!(c.len, 20);
        assert_eq!(c.flags, ReplyFlags::DONE);
        assert_eq!(
            &out[n..],
            b"\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x03\x00\x00\x02\x00\x00\x00\x00\x00"
        );
    }

    #[test]
    fn test_error_chunks_layout() {
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 1, NbdErrno::EIO, "bad");
        assert_eq!(&out[4..8], b"\x00\x01\x80\x01");
        assert_eq!(&out[16..], b"\x00\x00\x00\x09\x00\x00\x00\x05\x00\x03bad");
        out.clear();
        encode_error_offset(&mut out, 1, NbdErrno::EIO, "", 7, true);
        assert_eq!(
            &out[16..],
            b"\x00\x00\x00\x0e\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00\x07"
        );
        out.clear();
        encode_none(&mut out, 3);
        assert_eq!(out.len(), 20);
        assert_eq!(&out[4..8], b"\x00\x01\x00\x00");
    }
}
