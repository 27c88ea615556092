//! Magic numbers, flag sets and numbered values of the NBD protocol.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of a transmission request (compact header).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of an extended-header request (not negotiated by this server yet).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Longest string (export name, description, query, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Largest payload a request or reply may carry (qemu's NBD_MAX_BUFFER_SIZE).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Size of a compact request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size of a client option header.
pub const OPTION_HEADER_LEN: usize = 16;

/// Define a transparent flag set over an unsigned integer.
macro_rules! flag_set {
    ($(#[$meta:meta])* $name:ident: $ty:ty { $($(#[$fmeta:meta])* $flag:ident = $value:expr;)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub $ty);

        impl $name {
            $($(#[$fmeta])* pub const $flag: $name = $name($value);)*
            /// No flag set.
            pub const EMPTY: $name = $name(0);
            /// Every flag this type names.
            pub const ALL: $name = $name(0 $(| $value)*);

            /// The raw bits.
            pub const fn bits(self) -> $ty {
                self.0
            }

            /// True when every bit of `other` is set in `self`.
            pub const fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }

            /// True when no bit is set.
            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }

            /// Bits of `self` not named by this type.
            pub const fn unknown(self) -> $ty {
                self.0 & !Self::ALL.0
            }

            /// `self` with the bits of `other` set or cleared.
            #[must_use]
            pub const fn with(self, other: $name, on: bool) -> $name {
                if on { $name(self.0 | other.0) } else { $name(self.0 & !other.0) }
            }
        }

        impl std::ops::BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }

        impl std::ops::BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: $name) {
                self.0 |= rhs.0;
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut first = true;
                write!(f, "{}(", stringify!($name))?;
                $(
                    if self.contains($name::$flag) && $value != 0 {
                        if !first { write!(f, " | ")?; }
                        write!(f, "{}", stringify!($flag))?;
                        first = false;
                    }
                )*
                if self.unknown() != 0 {
                    if !first { write!(f, " | ")?; }
                    write!(f, "{:#x}", self.unknown())?;
                }
                write!(f, ")")
            }
        }
    };
}

flag_set! {
    /// Handshake flags the server sends after `IHAVEOPT`.
    HandshakeFlags: u16 {
        /// The server speaks fixed newstyle.
        FIXED_NEWSTYLE = 1 << 0;
        /// The server may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
        NO_ZEROES = 1 << 1;
    }
}

flag_set! {
    /// Flags the client answers the greeting with.
    ClientFlags: u32 {
        /// The client speaks fixed newstyle.
        FIXED_NEWSTYLE = 1 << 0;
        /// The server must not send the 124 zero bytes.
        NO_ZEROES = 1 << 1;
    }
}

flag_set! {
    /// Transmission flags describing an export.
    TransmissionFlags: u16 {
        /// Always set.
        HAS_FLAGS = 1 << 0;
        /// Writes will fail.
        READ_ONLY = 1 << 1;
        /// `NBD_CMD_FLUSH` is understood.
        SEND_FLUSH = 1 << 2;
        /// `NBD_CMD_FLAG_FUA` is understood.
        SEND_FUA = 1 << 3;
        /// The medium seeks.
        ROTATIONAL = 1 << 4;
        /// `NBD_CMD_TRIM` is understood.
        SEND_TRIM = 1 << 5;
        /// `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are understood.
        SEND_WRITE_ZEROES = 1 << 6;
        /// `NBD_CMD_FLAG_DF` is understood (structured replies only).
        SEND_DF = 1 << 7;
        /// Flush and FUA are visible across connections.
        CAN_MULTI_CONN = 1 << 8;
        /// `NBD_CMD_RESIZE` (experimental; never set here).
        SEND_RESIZE = 1 << 9;
        /// `NBD_CMD_CACHE` is understood.
        SEND_CACHE = 1 << 10;
        /// `NBD_CMD_FLAG_FAST_ZERO` is understood.
        SEND_FAST_ZERO = 1 << 11;
        /// Block status accepts a payload (extended headers; never set here).
        BLOCK_STATUS_PAYLOAD = 1 << 12;
    }
}

flag_set! {
    /// Flags of a transmission request.
    CommandFlags: u16 {
        /// Force unit access: persist before replying.
        FUA = 1 << 0;
        /// Write-zeroes must not punch a hole.
        NO_HOLE = 1 << 1;
        /// Read reply must be one content chunk.
        DF = 1 << 2;
        /// Block status must return one extent per context.
        REQ_ONE = 1 << 3;
        /// Write-zeroes must fail fast with ENOTSUP if it cannot be fast.
        FAST_ZERO = 1 << 4;
        /// Request carries a payload length (extended headers only).
        PAYLOAD_LEN = 1 << 5;
    }
}

flag_set! {
    /// Flags of a structured reply chunk.
    ReplyFlags: u16 {
        /// Last chunk of the reply.
        DONE = 1 << 0;
    }
}

/// Define a `u32`/`u16` numbered enum with an `Unknown` catch-all.
macro_rules! numbered {
    ($(#[$meta:meta])* $name:ident: $ty:ty { $($(#[$vmeta:meta])* $variant:ident = $value:expr,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A value this crate does not know.
            Unknown($ty),
        }

        impl $name {
            /// Decode a wire value.
            pub const fn from_raw(raw: $ty) -> $name {
                match raw {
                    $($value => $name::$variant,)*
                    other => $name::Unknown(other),
                }
            }

            /// The wire value.
            pub const fn raw(self) -> $ty {
                match self {
                    $($name::$variant => $value,)*
                    $name::Unknown(other) => other,
                }
            }
        }
    };
}

numbered! {
    /// Option types a client sends during haggling.
    OptionType: u32 {
        /// Choose an export and enter transmission (no error reply possible).
        ExportName = 1,
        /// End the session.
        Abort = 2,
        /// List exports.
        List = 3,
        /// Upgrade to TLS.
        StartTls = 5,
        /// Describe an export.
        Info = 6,
        /// Describe an export and enter transmission.
        Go = 7,
        /// Use structured replies.
        StructuredReply = 8,
        /// List metadata contexts.
        ListMetaContext = 9,
        /// Select metadata contexts.
        SetMetaContext = 10,
        /// Use extended headers (not supported by this server yet).
        ExtendedHeaders = 11,
    }
}

const ERR: u32 = 1 << 31;

numbered! {
    /// Reply types of option replies.
    OptionReplyType: u32 {
        /// Success / end of a list.
        Ack = 1,
        /// One export of a list.
        Server = 2,
        /// One piece of export information.
        Info = 3,
        /// One metadata context.
        MetaContext = 4,
        /// The option is not known.
        ErrUnsup = 0x8000_0001,
        /// The option is forbidden by policy.
        ErrPolicy = 0x8000_0002,
        /// The option is malformed.
        ErrInvalid = 0x8000_0003,
        /// The option is not available on this platform.
        ErrPlatform = 0x8000_0004,
        /// TLS must be negotiated first.
        ErrTlsReqd = 0x8000_0005,
        /// The export does not exist.
        ErrUnknown = 0x8000_0006,
        /// The server is shutting down.
        ErrShutdown = 0x8000_0007,
        /// The client must request block sizes.
        ErrBlockSizeReqd = 0x8000_0008,
        /// The request or reply is too large.
        ErrTooBig = 0x8000_0009,
        /// Extended headers must be negotiated first.
        ErrExtHeaderReqd = 0x8000_000a,
    }
}

impl OptionReplyType {
    /// True for the error replies (bit 31 set).
    pub const fn is_error(self) -> bool {
        self.raw() & ERR != 0
    }
}

numbered! {
    /// Information items of `NBD_REP_INFO`.
    InfoType: u16 {
        /// Size and transmission flags.
        Export = 0,
        /// Canonical export name.
        Name = 1,
        /// Human-readable description.
        Description = 2,
        /// Minimum, preferred and maximum block sizes.
        BlockSize = 3,
    }
}

numbered! {
    /// Transmission request types.
    CommandType: u16 {
        /// Read data.
        Read = 0,
        /// Write data (payload follows the header).
        Write = 1,
        /// Soft disconnect; no reply.
        Disc = 2,
        /// Persist completed writes.
        Flush = 3,
        /// Discard a range.
        Trim = 4,
        /// Prefetch a range.
        Cache = 5,
        /// Write zeroes without a payload.
        WriteZeroes = 6,
        /// Query metadata contexts over a range.
        BlockStatus = 7,
        /// Resize (experimental; refused).
        Resize = 8,
    }
}

numbered! {
    /// Structured reply chunk types.
    ChunkType: u16 {
        /// Empty final chunk.
        None = 0,
        /// Data at an offset.
        OffsetData = 1,
        /// Zeroes at an offset.
        OffsetHole = 2,
        /// Extents of one metadata context.
        BlockStatus = 5,
        /// Extents with 64-bit lengths (extended headers).
        BlockStatusExt = 6,
        /// Error for the whole request.
        Error = 0x8001,
        /// Error at an offset.
        ErrorOffset = 0x8002,
    }
}

/// Error values on the wire (the protocol's own numbering, Linux-like).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NbdErrno(pub u32);

impl NbdErrno {
    /// Operation not permitted (also for read-only).
    pub const EPERM: NbdErrno = NbdErrno(1);
    /// I/O error.
    pub const EIO: NbdErrno = NbdErrno(5);
    /// Out of memory.
    pub const ENOMEM: NbdErrno = NbdErrno(12);
    /// Invalid argument.
    pub const EINVAL: NbdErrno = NbdErrno(22);
    /// No space left.
    pub const ENOSPC: NbdErrno = NbdErrno(28);
    /// Value too large (request too big).
    pub const EOVERFLOW: NbdErrno = NbdErrno(75);
    /// Not supported (fast zero).
    pub const ENOTSUP: NbdErrno = NbdErrno(95);
    /// Server shutting down.
    pub const ESHUTDOWN: NbdErrno = NbdErrno(108);

    /// Map a host errno (Linux numbering) to the NBD value, as qemu does:
    /// EROFS becomes EPERM, EFBIG and EDQUOT become ENOSPC, and anything
    /// without a protocol value becomes EINVAL.
    pub const fn from_host(errno: i32) -> NbdErrno {
        // Linux values: EPERM 1, EIO 5, ENOMEM 12, EFBIG 27, ENOSPC 28,
        // EROFS 30, EOVERFLOW 75, EOPNOTSUPP 95, ESHUTDOWN 108, EDQUOT 122.
        match errno.unsigned_abs() {
            1 | 30 => NbdErrno::EPERM,
            5 => NbdErrno::EIO,
            12 => NbdErrno::ENOMEM,
            27 | 28 | 122 => NbdErrno::ENOSPC,
            75 => NbdErrno::EOVERFLOW,
            95 => NbdErrno::ENOTSUP,
            108 => NbdErrno::ESHUTDOWN,
            _ => NbdErrno::EINVAL,
        }
    }
}

/// `base:allocation`: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:*`: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_magic_values_match_ascii() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn test_option_type_roundtrip_known_and_unknown() {
        for raw in 0..20u32 {
            assert_eq!(OptionType::from_raw(raw).raw(), raw);
        }
        assert_eq!(OptionType::from_raw(7), OptionType::Go);
        assert_eq!(OptionType::from_raw(4), OptionType::Unknown(4));
    }

    #[test]
    fn test_reply_type_error_bit_set_for_errors_only() {
        assert!(!OptionReplyType::Ack.is_error());
        assert!(OptionReplyType::ErrUnknown.is_error());
        assert_eq!(OptionReplyType::ErrBlockSizeReqd.raw(), 0x8000_0008);
    }

    #[test]
    fn test_flags_unknown_bits_reported() {
        let f = ClientFlags(0b111);
        assert!(f.contains(ClientFlags::FIXED_NEWSTYLE));
        assert_eq!(f.unknown(), 0b100);
        assert_eq!(
            format!("{:?}", ClientFlags(1)),
            "ClientFlags(FIXED_NEWSTYLE)"
        );
    }

    #[test]
    fn test_errno_from_host_maps_like_qemu() {
        assert_eq!(NbdErrno::from_host(30), NbdErrno::EPERM);
        assert_eq!(NbdErrno::from_host(-5), NbdErrno::EIO);
        assert_eq!(NbdErrno::from_host(122), NbdErrno::ENOSPC);
        assert_eq!(NbdErrno::from_host(2), NbdErrno::EINVAL);
        assert_eq!(NbdErrno::from_host(95), NbdErrno::ENOTSUP);
    }
}
