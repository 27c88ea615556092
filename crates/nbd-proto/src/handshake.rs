//! Fixed-newstyle handshake messages: the greeting, client flags, options and
//! option replies. Server-side decoders and encoders, plus the client-side
//! counterparts that tests and test clients need.

use bytes::BufMut;

use crate::consts::*;
use crate::{be16, be32, be64, Decoded, ProtoError};

/// Length of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Length of the reply to `NBD_OPT_EXPORT_NAME` without the zero padding.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless NO_ZEROES.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Write the server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(out: &mut impl BufMut, flags: HandshakeFlags) {
    out.put_u64(NBD_MAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(flags.bits());
}

/// Decode the server greeting (client side).
pub fn decode_greeting(buf: &[u8]) -> Result<Decoded<HandshakeFlags>, ProtoError> {
    if buf.len() < GREETING_LEN {
        return Ok(Decoded::Incomplete(GREETING_LEN));
    }
    check_magic("greeting", NBD_MAGIC, be64(buf, 0))?;
    check_magic("greeting", IHAVEOPT, be64(buf, 8))?;
    Ok(Decoded::Done(HandshakeFlags(be16(buf, 16)), GREETING_LEN))
}

/// Decode the client's flags. Unknown bits are an error (the spec requires
/// the server to drop the connection).
pub fn decode_client_flags(buf: &[u8]) -> Result<Decoded<ClientFlags>, ProtoError> {
    if buf.len() < 4 {
        return Ok(Decoded::Incomplete(4));
    }
    let flags = ClientFlags(be32(buf, 0));
    if flags.unknown() != 0 {
        return Err(ProtoError::UnknownClientFlags(flags.unknown()));
    }
    Ok(Decoded::Done(flags, 4))
}

fn check_magic(what: &'static str, expected: u64, found: u64) -> Result<(), ProtoError> {
    if expected == found {
        Ok(())
    } else {
        Err(ProtoError::BadMagic {
            what,
            expected,
            found,
        })
    }
}

/// Header of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Which option.
    pub option: OptionType,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionHeader {
    /// Decode the 16-byte header (`IHAVEOPT`, option, length).
    pub fn decode(buf: &[u8]) -> Result<Decoded<OptionHeader>, ProtoError> {
        if buf.len() < OPTION_HEADER_LEN {
            return Ok(Decoded::Incomplete(OPTION_HEADER_LEN));
        }
        check_magic("option", IHAVEOPT, be64(buf, 0))?;
        let h = OptionHeader {
            option: OptionType::from_raw(be32(buf, 8)),
            len: be32(buf, 12),
        };
        Ok(Decoded::Done(h, OPTION_HEADER_LEN))
    }

    /// Encode the header (client side).
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64(IHAVEOPT);
        out.put_u32(self.option.raw());
        out.put_u32(self.len);
    }
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" is the default export).
    pub name: String,
    /// Information items asked for.
    pub requests: Vec<InfoType>,
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name.
    pub export: String,
    /// Queries, each `namespace:leaf`.
    pub queries: Vec<String>,
}

/// A parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaRequest),
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// Anything else (answered with `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

/// An option that could not be parsed: answer with this reply and go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    /// The error reply type.
    pub reply: OptionReplyType,
    /// A message for the human at the client.
    pub message: String,
}

impl OptionError {
    fn invalid(message: impl Into<String>) -> Self {
        OptionError {
            reply: OptionReplyType::ErrInvalid,
            message: message.into(),
        }
    }
}

/// A cursor over option data that reports qemu-style errors.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        if self.data.len() - self.pos < n {
            return Err(OptionError::invalid("inconsistent lengths in option"));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, OptionError> {
        self.take(2).map(|b| be16(b, 0))
    }

    fn u32(&mut self) -> Result<u32, OptionError> {
        self.take(4).map(|b| be32(b, 0))
    }

    /// A length-prefixed string of at most `MAX_STRING_LEN` bytes.
    fn string(&mut self, what: &str) -> Result<String, OptionError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_LEN {
            return Err(OptionError::invalid(format!(
                "invalid {what} length: {len}"
            )));
        }
        text(self.take(len)?, what)
    }

    fn finish(&self) -> Result<(), OptionError> {
        if self.pos == self.data.len() {
            Ok(())
        } else {
            Err(OptionError::invalid("option has unexpected length"))
        }
    }
}

fn text(bytes: &[u8], what: &str) -> Result<String, OptionError> {
    if bytes.contains(&0) {
        return Err(OptionError::invalid(format!(
            "unexpected embedded NUL in {what}"
        )));
    }
    String::from_utf8(bytes.to_vec())
        .map_err(|_| OptionError::invalid(format!("{what} is not valid UTF-8")))
}

fn no_data(option: ClientOption, data: &[u8]) -> Result<ClientOption, OptionError> {
    if data.is_empty() {
        Ok(option)
    } else {
        Err(OptionError::invalid("option has unexpected length"))
    }
}

/// Parse the data of an option whose header said `option`.
pub fn parse_option(option: OptionType, data: &[u8]) -> Result<ClientOption, OptionError> {
    match option {
        OptionType::ExportName => {
            if data.len() > MAX_STRING_LEN {
                return Err(OptionError::invalid("export name too long"));
            }
            text(data, "export name").map(ClientOption::ExportName)
        }
        // The spec asks servers to ignore data sent with ABORT.
        OptionType::Abort => Ok(ClientOption::Abort),
        OptionType::List => no_data(ClientOption::List, data),
        OptionType::StartTls => no_data(ClientOption::StartTls, data),
        OptionType::StructuredReply => no_data(ClientOption::StructuredReply, data),
        OptionType::ExtendedHeaders => no_data(ClientOption::ExtendedHeaders, data),
        OptionType::Info => parse_info(data).map(ClientOption::Info),
        OptionType::Go => parse_info(data).map(ClientOption::Go),
        OptionType::ListMetaContext => parse_meta(data).map(ClientOption::ListMetaContext),
        OptionType::SetMetaContext => parse_meta(data).map(ClientOption::SetMetaContext),
        OptionType::Unknown(raw) => Ok(ClientOption::Unknown(raw)),
    }
}

fn parse_info(data: &[u8]) -> Result<InfoRequest, OptionError> {
    let mut c = Cursor { data, pos: 0 };
    let name = c.string("export name")?;
    let n = c.u16()?;
    let mut requests = Vec::with_capacity(usize::from(n).min(16));
    for _ in 0..n {
        requests.push(InfoType::from_raw(c.u16()?));
    }
    c.finish()?;
    Ok(InfoRequest { name, requests })
}

fn parse_meta(data: &[u8]) -> Result<MetaRequest, OptionError> {
    let mut c = Cursor { data, pos: 0 };
    let export = c.string("export name")?;
    let n = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        let len = c.u32()? as usize;
        let bytes = c.take(len)?;
        // Over-long queries are skipped rather than refused, as qemu does.
        if len <= MAX_STRING_LEN {
            queries.push(text(bytes, "query")?);
        }
    }
    c.finish()?;
    Ok(MetaRequest { export, queries })
}

fn put_string(out: &mut impl BufMut, s: &str) {
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

impl ClientOption {
    /// The option number.
    pub fn option_type(&self) -> OptionType {
        match self {
            ClientOption::ExportName(_) => OptionType::ExportName,
            ClientOption::Abort => OptionType::Abort,
            ClientOption::List => OptionType::List,
            ClientOption::StartTls => OptionType::StartTls,
            ClientOption::Info(_) => OptionType::Info,
            ClientOption::Go(_) => OptionType::Go,
            ClientOption::StructuredReply => OptionType::StructuredReply,
            ClientOption::ListMetaContext(_) => OptionType::ListMetaContext,
            ClientOption::SetMetaContext(_) => OptionType::SetMetaContext,
            ClientOption::ExtendedHeaders => OptionType::ExtendedHeaders,
            ClientOption::Unknown(raw) => OptionType::Unknown(*raw),
        }
    }

    /// Encode header and data (client side).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        OptionHeader {
            option: self.option_type(),
            len: 0,
        }
        .encode(out);
        match self {
            ClientOption::ExportName(name) => out.put_slice(name.as_bytes()),
            ClientOption::Info(r) | ClientOption::Go(r) => {
                put_string(out, &r.name);
                out.put_u16(r.requests.len() as u16);
                for i in &r.requests {
                    out.put_u16(i.raw());
                }
            }
            ClientOption::ListMetaContext(m) | ClientOption::SetMetaContext(m) => {
                put_string(out, &m.export);
                out.put_u32(m.queries.len() as u32);
                for q in &m.queries {
                    put_string(out, q);
                }
            }
            _ => {}
        }
        let len = (out.len() - start - OPTION_HEADER_LEN) as u32;
        out[start + 12..start + 16].copy_from_slice(&len.to_be_bytes());
    }
}

/// Header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// The reply type.
    pub reply: OptionReplyType,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Encode the 20-byte header.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64(OPTION_REPLY_MAGIC);
        out.put_u32(self.option);
        out.put_u32(self.reply.raw());
        out.put_u32(self.len);
    }

    /// Decode the 20-byte header (client side).
    pub fn decode(buf: &[u8]) -> Result<Decoded<OptionReplyHeader>, ProtoError> {
        if buf.len() < OPTION_REPLY_HEADER_LEN {
            return Ok(Decoded::Incomplete(OPTION_REPLY_HEADER_LEN));
        }
        check_magic("option reply", OPTION_REPLY_MAGIC, be64(buf, 0))?;
        let h = OptionReplyHeader {
            option: be32(buf, 8),
            reply: OptionReplyType::from_raw(be32(buf, 12)),
            len: be32(buf, 16),
        };
        Ok(Decoded::Done(h, OPTION_REPLY_HEADER_LEN))
    }
}

fn reply_header(out: &mut impl BufMut, option: u32, reply: OptionReplyType, len: usize) {
    OptionReplyHeader {
        option,
        reply,
        len: len as u32,
    }
    .encode(out);
}

/// `NBD_REP_ACK`.
pub fn encode_ack(out: &mut impl BufMut, option: u32) {
    reply_header(out, option, OptionReplyType::Ack, 0);
}

/// An error reply with a message (truncated to the protocol's string limit).
pub fn encode_error(out: &mut impl BufMut, option: u32, reply: OptionReplyType, msg: &str) {
    let msg = truncate(msg, MAX_STRING_LEN);
    reply_header(out, option, reply, msg.len());
    out.put_slice(msg.as_bytes());
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `NBD_REP_SERVER`: one export of a list.
pub fn encode_server(out: &mut impl BufMut, option: u32, name: &str, description: &str) {
    reply_header(
        out,
        option,
        OptionReplyType::Server,
        4 + name.len() + description.len(),
    );
    put_string(out, name);
    out.put_slice(description.as_bytes());
}

fn info_header(out: &mut impl BufMut, option: u32, info: InfoType, len: usize) {
    reply_header(out, option, OptionReplyType::Info, 2 + len);
    out.put_u16(info.raw());
}

/// `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(out: &mut impl BufMut, option: u32, size: u64, flags: TransmissionFlags) {
    info_header(out, option, InfoType::Export, 10);
    out.put_u64(size);
    out.put_u16(flags.bits());
}

/// `NBD_REP_INFO` / `NBD_INFO_NAME`.
pub fn encode_info_name(out: &mut impl BufMut, option: u32, name: &str) {
    info_header(out, option, InfoType::Name, name.len());
    out.put_slice(name.as_bytes());
}

/// `NBD_REP_INFO` / `NBD_INFO_DESCRIPTION`.
pub fn encode_info_description(out: &mut impl BufMut, option: u32, description: &str) {
    info_header(out, option, InfoType::Description, description.len());
    out.put_slice(description.as_bytes());
}

/// Block size constraints of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum block size (alignment of offsets and lengths).
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum payload.
    pub maximum: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_PAYLOAD,
        }
    }
}

/// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(out: &mut impl BufMut, option: u32, sizes: BlockSizes) {
    info_header(out, option, InfoType::BlockSize, 12);
    out.put_u32(sizes.minimum);
    out.put_u32(sizes.preferred);
    out.put_u32(sizes.maximum);
}

/// `NBD_REP_META_CONTEXT`.
pub fn encode_meta_context(out: &mut impl BufMut, option: u32, id: u32, name: &str) {
    reply_header(out, option, OptionReplyType::MetaContext, 4 + name.len());
    out.put_u32(id);
    out.put_slice(name.as_bytes());
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeroes unless
/// the client asked for NO_ZEROES.
pub fn encode_export_name_reply(
    out: &mut impl BufMut,
    size: u64,
    flags: TransmissionFlags,
    no_zeroes: bool,
) {
    out.put_u64(size);
    out.put_u16(flags.bits());
    if !no_zeroes {
        out.put_bytes(0, EXPORT_NAME_PADDING);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_greeting_bytes_match_fixture() {
        let mut out = Vec::new();
        encode_greeting(
            &mut out,
            HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
        );
        assert_eq!(out, b"NBDMAGICIHAVEOPT\x00\x03");
        assert_eq!(
            decode_greeting(&out).unwrap(),
            Decoded::Done(HandshakeFlags(3), 18)
        );
        assert_eq!(decode_greeting(&out[..5]).unwrap(), Decoded::Incomplete(18));
    }

    #[test]
    fn test_client_flags_unknown_bit_rejected() {
        assert_eq!(
            decode_client_flags(&[0, 0, 0, 3]).unwrap(),
            Decoded::Done(ClientFlags(3), 4)
        );
        assert_eq!(
            decode_client_flags(&[0, 0, 0]).unwrap(),
            Decoded::Incomplete(4)
        );
        assert_eq!(
            decode_client_flags(&[0, 0, 0, 4]),
            Err(ProtoError::UnknownClientFlags(4))
        );
    }

    #[test]
    fn test_option_header_decodes_fixture() {
        let buf = b"IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x06rest";
        let (h, n) = OptionHeader::decode(buf).unwrap().done().unwrap();
        assert_eq!(n, 16);
        assert_eq!(
            h,
            OptionHeader {
                option: OptionType::Go,
                len: 6
            }
        );
        let bad = b"IHAVEOPX\x00\x00\x00\x07\x00\x00\x00\x06";
        assert!(matches!(
            OptionHeader::decode(bad),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn test_parse_go_with_requests() {
        let data = b"\x00\x00\x00\x03abc\x00\x02\x00\x03\x00\x01";
        let opt = parse_option(OptionType::Go, data).unwrap();
        assert_eq!(
            opt,
            ClientOption::Go(InfoRequest {
                name: "abc".into(),
                requests: vec![InfoType::BlockSize, InfoType::Name]
            })
        );
    }

    #[test]
    fn test_parse_info_inconsistent_length_is_invalid() {
        let data = b"\x00\x00\x00\x09abc\x00\x00";
        let err = parse_option(OptionType::Info, data).unwrap_err();
        assert_eq!(err.reply, OptionReplyType::ErrInvalid);
        let trailing = b"\x00\x00\x00\x00\x00\x00x";
        assert!(parse_option(OptionType::Info, trailing).is_err());
        let nul = b"\x00\x00\x00\x01\x00\x00\x00";
        assert!(parse_option(OptionType::Info, nul).is_err());
    }

    #[test]
    fn test_parse_list_with_data_is_invalid() {
        assert_eq!(
            parse_option(OptionType::List, b"").unwrap(),
            ClientOption::List
        );
        assert!(parse_option(OptionType::List, b"x").is_err());
        assert_eq!(
            parse_option(OptionType::Abort, b"junk").unwrap(),
            ClientOption::Abort
        );
    }

    #[test]
    fn test_parse_meta_skips_overlong_query() {
        let mut data = Vec::new();
        put_string(&mut data, "exp");
        data.put_u32(2);
        put_string(&mut data, &"x".repeat(MAX_STRING_LEN + 1));
        put_string(&mut data, "base:allocation");
        let opt = parse_option(OptionType::SetMetaContext, &data).unwrap();
        assert_eq!(
            opt,
            ClientOption::SetMetaContext(MetaRequest {
                export: "exp".into(),
                queries: vec!["base:allocation".into()]
            })
        );
    }

    #[test]
    fn test_client_option_encode_parse_roundtrip() {
        let opts = [
            ClientOption::ExportName("e".into()),
            ClientOption::Info(InfoRequest {
                name: "n".into(),
                requests: vec![InfoType::Name],
            }),
            ClientOption::ListMetaContext(MetaRequest {
                export: "".into(),
                queries: vec!["base:".into(), "qemu:".into()],
            }),
            ClientOption::StructuredReply,
        ];
        for o in opts {
            let mut buf = Vec::new();
            o.encode(&mut buf);
            let (h, n) = OptionHeader::decode(&buf).unwrap().done().unwrap();
            assert_eq!(h.len as usize, buf.len() - n);
            assert_eq!(parse_option(h.option, &buf[n..]).unwrap(), o);
        }
    }

    #[test]
    fn test_reply_encoders_match_fixtures() {
        let mut out = Vec::new();
        encode_ack(&mut out, 7);
        assert_eq!(
            out,
            b"\x00\x03\xe8\x89\x04\x55\x65\xa9\x00\x00\x00\x07\x00\x00\x00\x01\x00\x00\x00\x00"
        );
        out.clear();
        encode_info_export(&mut out, 7, 0x1000, TransmissionFlags(0x0d));
        assert_eq!(&out[12..20], b"\x00\x00\x00\x03\x00\x00\x00\x0c");
        assert_eq!(
            &out[20..],
            b"\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x0d"
        );
        out.clear();
        encode_meta_context(&mut out, 10, 0, "base:allocation");
        assert_eq!(be32(&out, 16), 4 + 15);
        assert_eq!(&out[24..], b"base:allocation");
        out.clear();
        encode_server(&mut out, 3, "ab", "desc");
        assert_eq!(&out[16..], b"\x00\x00\x00\x0a\x00\x00\x00\x02abdesc");
    }

    #[test]
    fn test_error_reply_truncates_long_message() {
        let mut out = Vec::new();
        encode_error(&mut out, 1, OptionReplyType::ErrUnsup, &"é".repeat(3000));
        let len = be32(&out, 16) as usize;
        assert!(len <= MAX_STRING_LEN);
        assert_eq!(out.len(), 20 + len);
        assert!(std::str::from_utf8(&out[20..]).is_ok());
    }

    #[test]
    fn test_export_name_reply_padding_depends_on_no_zeroes() {
        let mut out = Vec::new();
        encode_export_name_reply(&mut out, 512, TransmissionFlags::HAS_FLAGS, false);
        assert_eq!(out.len(), 134);
        out.clear();
        encode_export_name_reply(&mut out, 512, TransmissionFlags::HAS_FLAGS, true);
        assert_eq!(out, b"\x00\x00\x00\x00\x00\x00\x02\x00\x00\x01");
    }
}
