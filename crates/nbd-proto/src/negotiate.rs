//! Server side of the fixed-newstyle handshake as a state machine without I/O.
//!
//! The caller sends [`Negotiation::greeting`], then feeds the client's bytes to
//! [`Negotiation::advance`] until it says [`Step::Enter`] (go to transmission),
//! [`Step::Abort`] (the client quit), [`Step::StartTls`] (upgrade, then call
//! [`Negotiation::tls_started`]) or returns an error (close the connection).
//! Replies are appended to an output buffer the caller writes out.
//!
//! Behaviour follows qemu-storage-daemon where the spec leaves a choice.

use crate::consts::*;
use crate::handshake::{self, BlockSizes, ClientOption, InfoRequest, MetaRequest, OptionHeader};
use crate::meta::{MetaOffer, MetaSelection};
use crate::{Decoded, ProtoError};

/// Default limit on the data of one option; longer options are skipped and
/// answered with `NBD_REP_ERR_INVALID`.
pub const DEFAULT_MAX_OPTION_LEN: u32 = 64 * 1024;

/// What the handshake needs to know about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name.
    pub name: String,
    /// Description sent with `NBD_INFO_DESCRIPTION` and in lists.
    pub description: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (SEND_DF is added when structured replies are on).
    pub flags: TransmissionFlags,
    /// Block size constraints.
    pub block_sizes: BlockSizes,
    /// `qemu:allocation-depth` is offered.
    pub allocation_depth: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME`, in order.
    pub bitmaps: Vec<String>,
}

/// The server's set of exports, as seen by the handshake.
pub trait ExportCatalog {
    /// Find an export by the name the client gave.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Names and descriptions of every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
}

/// The outcome of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The export chosen (canonical name).
    pub export: String,
    /// Size sent to the client.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub flags: TransmissionFlags,
    /// Structured replies are on.
    pub structured: bool,
    /// Metadata contexts selected for this export (empty if none, or if they
    /// were selected for another export).
    pub meta: MetaSelection,
    /// Alignment the client promised to honour (0: none promised).
    pub check_align: u32,
}

/// What to do after [`Negotiation::advance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing more can be done until the input holds this many bytes
    /// (counted from the start of the slice that was passed).
    NeedMore(usize),
    /// One message was handled; call again with the rest.
    Continue,
    /// The client sent `NBD_OPT_ABORT`: write the output, then close.
    Abort,
    /// `NBD_OPT_STARTTLS` was acknowledged: write the output, run the TLS
    /// handshake, then call [`Negotiation::tls_started`].
    StartTls,
    /// Enter transmission with this export.
    Enter(Negotiated),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    /// Skipping the data of an over-long option before answering it.
    Discard {
        option: u32,
        remaining: u32,
    },
    Done,
}

/// Server-side handshake state.
#[derive(Debug)]
pub struct Negotiation {
    state: State,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    tls_required: bool,
    tls_active: bool,
    max_option_len: u32,
    /// Export name and contexts from the last `NBD_OPT_SET_META_CONTEXT`.
    meta: Option<(String, MetaSelection)>,
}

impl Default for Negotiation {
    fn default() -> Self {
        Negotiation::new(false)
    }
}

impl Negotiation {
    /// A new handshake. With `tls_required`, every option but STARTTLS and
    /// ABORT is refused with `NBD_REP_ERR_TLS_REQD` until TLS is up.
    pub fn new(tls_required: bool) -> Self {
        Negotiation {
            state: State::ClientFlags,
            fixed: false,
            no_zeroes: false,
            structured: false,
            tls_required,
            tls_active: false,
            max_option_len: DEFAULT_MAX_OPTION_LEN,
            meta: None,
        }
    }

    /// Change the limit on one option's data (at most 32 MiB is honoured).
    pub fn set_max_option_len(&mut self, len: u32) {
        self.max_option_len = len.min(MAX_PAYLOAD);
    }

    /// The greeting to send as soon as the client connects.
    pub fn greeting(&self, out: &mut Vec<u8>) {
        handshake::encode_greeting(
            out,
            HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
        );
    }

    /// TLS is now running: forget what was negotiated in clear text.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.meta = None;
    }

    /// Handle at most one message from `input`, appending replies to `out`.
    /// Returns how many bytes of `input` were used and what to do next.
    pub fn advance(
        &mut self,
        input: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Step), ProtoError> {
        match self.state {
            State::ClientFlags => self.client_flags(input),
            State::Options => self.option(input, catalog, out),
            State::Discard { option, remaining } => Ok(self.discard(input, option, remaining, out)),
            State::Done => Err(ProtoError::Finished),
        }
    }

    fn client_flags(&mut self, input: &[u8]) -> Result<(usize, Step), ProtoError> {
        match handshake::decode_client_flags(input)? {
            Decoded::Incomplete(n) => Ok((0, Step::NeedMore(n))),
            Decoded::Done(flags, n) => {
                self.fixed = flags.contains(ClientFlags::FIXED_NEWSTYLE);
                self.no_zeroes = flags.contains(ClientFlags::NO_ZEROES);
                self.state = State::Options;
                Ok((n, Step::Continue))
            }
        }
    }

    fn discard(
        &mut self,
        input: &[u8],
        option: u32,
        remaining: u32,
        out: &mut Vec<u8>,
    ) -> (usize, Step) {
        let take = remaining.min(u32::try_from(input.len()).unwrap_or(u32::MAX));
        let left = remaining - take;
        if left == 0 {
            self.state = State::Options;
            let msg = format!(
                "option {option} is longer than {} bytes",
                self.max_option_len
            );
            handshake::encode_error(out, option, OptionReplyType::ErrInvalid, &msg);
            (take as usize, Step::Continue)
        } else {
            self.state = State::Discard {
                option,
                remaining: left,
            };
            (
                take as usize,
                if take == 0 {
                    Step::NeedMore(1)
                } else {
                    Step::Continue
                },
            )
        }
    }

    fn option(
        &mut self,
        input: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Step), ProtoError> {
        let (h, hlen) = match OptionHeader::decode(input)? {
            Decoded::Incomplete(n) => return Ok((0, Step::NeedMore(n))),
            Decoded::Done(h, n) => (h, n),
        };
        let raw = h.option.raw();
        if h.len > MAX_PAYLOAD
            || (h.option == OptionType::ExportName && h.len as usize > MAX_STRING_LEN)
        {
            return Err(ProtoError::OptionTooLong {
                option: raw,
                len: h.len,
                max: MAX_PAYLOAD,
            });
        }
        if !self.fixed && h.option != OptionType::ExportName {
            return Err(ProtoError::Refused(format!(
                "option {raw} sent without fixed newstyle negotiation"
            )));
        }
        if h.len > self.max_option_len {
            self.state = State::Discard {
                option: raw,
                remaining: h.len,
            };
            return Ok((hlen, Step::Continue));
        }
        let total = hlen + h.len as usize;
        if input.len() < total {
            return Ok((0, Step::NeedMore(total)));
        }
        let step = self.dispatch(h.option, &input[hlen..total], catalog, out)?;
        Ok((total, step))
    }

    fn dispatch(
        &mut self,
        option: OptionType,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Result<Step, ProtoError> {
        let raw = option.raw();
        if self.tls_required && !self.tls_active {
            return self.before_tls(option, data, out);
        }
        let parsed = match handshake::parse_option(option, data) {
            Ok(p) => p,
            Err(e) if option == OptionType::ExportName => {
                return Err(ProtoError::Refused(e.message))
            }
            Err(e) => {
                handshake::encode_error(out, raw, e.reply, &e.message);
                return Ok(Step::Continue);
            }
        };
        match parsed {
            ClientOption::ExportName(name) => self.export_name(&name, catalog, out),
            ClientOption::Abort => {
                handshake::encode_ack(out, raw);
                self.state = State::Done;
                Ok(Step::Abort)
            }
            ClientOption::List => {
                for (name, desc) in catalog.list() {
                    handshake::encode_server(out, raw, &name, &desc);
                }
                handshake::encode_ack(out, raw);
                Ok(Step::Continue)
            }
            ClientOption::StartTls => Ok(self.start_tls(raw, out)),
            ClientOption::Info(req) => Ok(self.info(raw, &req, false, catalog, out)),
            ClientOption::Go(req) => Ok(self.info(raw, &req, true, catalog, out)),
            ClientOption::StructuredReply => {
                if self.structured {
                    let msg = "structured reply already negotiated";
                    handshake::encode_error(out, raw, OptionReplyType::ErrInvalid, msg);
                } else {
                    self.structured = true;
                    handshake::encode_ack(out, raw);
                }
                Ok(Step::Continue)
            }
            ClientOption::ListMetaContext(req) => Ok(self.meta(raw, &req, true, catalog, out)),
            ClientOption::SetMetaContext(req) => Ok(self.meta(raw, &req, false, catalog, out)),
            ClientOption::ExtendedHeaders | ClientOption::Unknown(_) => {
                let msg = format!("unsupported option {raw} ({})", option_name(option));
                handshake::encode_error(out, raw, OptionReplyType::ErrUnsup, &msg);
                Ok(Step::Continue)
            }
        }
    }

    /// FORCEDTLS mode before the upgrade (qemu's behaviour).
    fn before_tls(
        &mut self,
        option: OptionType,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Step, ProtoError> {
        let raw = option.raw();
        match option {
            OptionType::StartTls if data.is_empty() => Ok(self.start_tls(raw, out)),
            OptionType::StartTls => Err(ProtoError::Refused("STARTTLS with data".into())),
            OptionType::ExportName => Err(ProtoError::Refused(format!(
                "option {raw} not permitted before TLS"
            ))),
            _ => {
                let msg = format!("option {raw:#x} not permitted before TLS");
                handshake::encode_error(out, raw, OptionReplyType::ErrTlsReqd, &msg);
                if option == OptionType::Abort {
                    self.state = State::Done;
                    return Ok(Step::Abort);
                }
                Ok(Step::Continue)
            }
        }
    }

    fn start_tls(&mut self, raw: u32, out: &mut Vec<u8>) -> Step {
        if self.tls_active {
            handshake::encode_error(out, raw, OptionReplyType::ErrInvalid, "TLS already enabled");
            Step::Continue
        } else if self.tls_required {
            handshake::encode_ack(out, raw);
            Step::StartTls
        } else {
            handshake::encode_error(out, raw, OptionReplyType::ErrPolicy, "TLS not configured");
            Step::Continue
        }
    }

    fn send_flags(&self, info: &ExportInfo) -> TransmissionFlags {
        info.flags.with(TransmissionFlags::SEND_DF, self.structured)
    }

    fn negotiated(&mut self, info: &ExportInfo, check_align: u32) -> Negotiated {
        let meta = match self.meta.take() {
            Some((name, sel)) if name == info.name => sel,
            _ => MetaSelection::default(),
        };
        self.state = State::Done;
        Negotiated {
            export: info.name.clone(),
            size: info.size,
            flags: self.send_flags(info),
            structured: self.structured,
            meta,
            check_align,
        }
    }

    fn export_name(
        &mut self,
        name: &str,
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Result<Step, ProtoError> {
        let Some(info) = catalog.lookup(name) else {
            return Err(ProtoError::Refused(format!(
                "export '{}' not found",
                sanitize(name)
            )));
        };
        handshake::encode_export_name_reply(out, info.size, self.send_flags(&info), self.no_zeroes);
        Ok(Step::Enter(self.negotiated(&info, 0)))
    }

    fn info(
        &mut self,
        raw: u32,
        req: &InfoRequest,
        go: bool,
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Step {
        let Some(info) = catalog.lookup(&req.name) else {
            let msg = format!("export '{}' not present", sanitize(&req.name));
            handshake::encode_error(out, raw, OptionReplyType::ErrUnknown, &msg);
            return Step::Continue;
        };
        if req.requests.contains(&InfoType::Name) {
            handshake::encode_info_name(out, raw, &info.name);
        }
        if let Some(desc) = &info.description {
            handshake::encode_info_description(out, raw, desc);
        }
        // Like qemu: advertise the real minimum only to clients that promise to
        // honour it (or that merely ask, with INFO); others get 1.
        let asked = req.requests.contains(&InfoType::BlockSize);
        let min = if asked || !go {
            info.block_sizes.minimum.max(1)
        } else {
            1
        };
        let sizes = BlockSizes {
            minimum: min,
            preferred: info.block_sizes.preferred.max(min).max(512),
            maximum: info.block_sizes.maximum,
        };
        handshake::encode_info_block_size(out, raw, sizes);
        handshake::encode_info_export(out, raw, info.size, self.send_flags(&info));
        if !go && !asked && info.block_sizes.minimum > 1 {
            let msg = "request NBD_INFO_BLOCK_SIZE to use this export";
            handshake::encode_error(out, raw, OptionReplyType::ErrBlockSizeReqd, msg);
            return Step::Continue;
        }
        handshake::encode_ack(out, raw);
        if go {
            let check_align = if asked { min } else { 0 };
            Step::Enter(self.negotiated(&info, check_align))
        } else {
            Step::Continue
        }
    }

    fn meta(
        &mut self,
        raw: u32,
        req: &MetaRequest,
        listing: bool,
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Step {
        if !listing {
            // A set request replaces the previous selection, even if it fails.
            self.meta = None;
            if !self.structured {
                let msg =
                    "request option 'set meta context' when structured reply is not negotiated";
                handshake::encode_error(out, raw, OptionReplyType::ErrInvalid, msg);
                return Step::Continue;
            }
        }
        let Some(info) = catalog.lookup(&req.export) else {
            let msg = format!("export '{}' not present", sanitize(&req.export));
            handshake::encode_error(out, raw, OptionReplyType::ErrUnknown, &msg);
            return Step::Continue;
        };
        let offer = MetaOffer {
            allocation_depth: info.allocation_depth,
            bitmaps: &info.bitmaps,
        };
        let sel = MetaSelection::resolve(&req.queries, listing, offer);
        for (id, ctx) in sel.contexts(&info.bitmaps) {
            let id = if listing { 0 } else { id };
            handshake::encode_meta_context(out, raw, id, &ctx.name());
        }
        handshake::encode_ack(out, raw);
        if !listing {
            self.meta = Some((info.name, sel));
        }
        Step::Continue
    }
}

/// At most 80 characters of a client-supplied name, for error messages.
fn sanitize(name: &str) -> String {
    match name.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &name[..i]),
        None => name.to_owned(),
    }
}

fn option_name(o: OptionType) -> &'static str {
    match o {
        OptionType::ExportName => "export name",
        OptionType::Abort => "abort",
        OptionType::List => "list",
        OptionType::StartTls => "starttls",
        OptionType::Info => "info",
        OptionType::Go => "go",
        OptionType::StructuredReply => "structured reply",
        OptionType::ListMetaContext => "list meta context",
        OptionType::SetMetaContext => "set meta context",
        OptionType::ExtendedHeaders => "extended headers",
        OptionType::Unknown(_) => "<unknown>",
    }
}

#[cfg(test)]
#[path = "negotiate_tests.rs"]
mod tests;
