//! QAPI for qsd: qemu's keyval command-line syntax, a deserializer that applies qemu's
//! input rules (strict types over QMP, string coercion for keyval), typed option structs
//! for the storage daemon's commands and options, and the `query-qmp-schema` data.
//!
//! The typical flow for a command-line option is
//! [`parse_option`] (keyval or JSON) followed by [`from_value`] into one of the
//! structs in [`options`]; for a QMP command it is [`from_value`] with [`InputMode::Qmp`].
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod de;
mod error;
pub mod keyval;
mod num;
pub mod options;
pub mod raw;
pub mod schema;

pub use de::{from_value, InputMode, Size};
pub use error::{Error, ErrorKind};
pub use keyval::{parse_keyval, parse_option};
pub use raw::Raw;
