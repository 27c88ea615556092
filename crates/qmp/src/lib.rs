//! The QMP monitor protocol as qemu-storage-daemon speaks it, independent of
//! what the commands do.
//!
//! - [`JsonStreamer`]: splits a byte stream into JSON values with qemu's
//!   lexer, error texts, recovery and limits (64 MiB per message, 2 Mi
//!   tokens, nesting depth 1024). Pure, so it can be fuzzed.
//! - [`parse_request`] and [`Session`]: request validation and capabilities
//!   negotiation, with qemu's exact error messages. Pure as well.
//! - [`to_json`]: output formatting identical to qemu's, including its
//!   hash-table key order, `\uXXXX` escapes, `%.17g` doubles and `pretty=on`.
//! - [`serve_stream`], [`Monitor`]: the connection loop over any async stream,
//!   and accept loops for UNIX and TCP listeners.
//! - [`EventBus`]: broadcast of events to all negotiated sessions.
//!
//! Compatibility choices:
//! - Single-quoted strings (`{'execute': 'x'}`) and the `\'` escape are
//!   accepted, as qemu accepts them; some clients and test suites send them.
//! - Numbers too large for a double are rejected with a parse error; qemu
//!   turns them into an infinity and would print `inf` back.
//! - Several clients may be connected to one monitor socket at once (qemu
//!   serves one at a time); each has its own negotiation state.
//! - A client that falls behind on events by more than the event backlog is
//!   disconnected (see [`EventBus`]).
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod event;
mod lexer;
mod parser;
mod protocol;
mod ratelimit;
mod server;
mod session;
mod streamer;
mod writer;

pub use event::{event_message, EventBus, DEFAULT_EVENT_BACKLOG};
pub use protocol::{
    error_response, parse_request, response, success_response, ErrorClass, Greeting, QmpError,
    Request, RequestError,
};
pub use server::{serve_stream, BoxFuture, Dispatcher, Monitor, MAX_QUEUED};
pub use session::{Action, CommandInfo, Session};
pub use streamer::{JsonStreamer, Limits, ParseError};
pub use writer::{qdict_order, to_json, to_message};

/// Why a monitor connection ended abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading from or writing to the client failed.
    #[error("QMP monitor I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The client stopped reading and missed events; it was disconnected.
    #[error("QMP client fell {missed} events behind and was disconnected")]
    EventBacklog {
        /// Number of events it missed.
        missed: u64,
    },
}
