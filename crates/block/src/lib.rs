//! The block layer: the data-plane trait every driver implements
//! ([`BlockDriver`]), the node wrapper that applies the common options and
//! tracks in-flight requests ([`Node`]), permissions with share masks
//! ([`Perm`]), the graph of named nodes ([`Graph`]) and the handle exports use
//! ([`BlockBackend`]).
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod backend;
pub mod debug;
pub mod driver;
pub mod error;
pub mod events;
pub mod graph;
pub mod mem;
pub mod node;
pub mod objects;
pub mod perm;
pub mod secrets;
pub mod stats;

pub use backend::BlockBackend;
pub use debug::DebugEvent;
pub use driver::{BlockDriver, BlockStatus, BoxFut, ImageInfo, Limits, WriteFlags, ZeroFlags};
pub use error::{Error, ErrorKind, Result};
pub use events::EventSink;
pub use graph::{DriverFactory, Graph, OpenCtx};
pub use node::{CommonOptions, DetectZeroes, Node, NodeRef};
pub use objects::ObjectStore;
pub use perm::{Perm, PermUser};
pub use qsd_rt::IoBuf;
pub use secrets::{Secret, SecretRef, SecretStore};
