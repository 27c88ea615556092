//! Typed arguments of the storage daemon's command-line options and QMP commands, named
//! as in qemu's QAPI schema. All members are kebab-case on the wire; optional members are
//! `Option` and accessor methods apply qemu's documented defaults.
//!
//! Parse them with [`crate::from_value`]; qemu's flat unions (`SocketAddress`,
//! `BlockExportOptions`, `object-add`) have hand-written `Deserialize` impls built on
//! [`crate::Raw`] so keyval coercion and error paths work inside them.

mod block;
mod export;
mod misc;
mod nbd;
mod socket;

pub use block::*;
pub use export::*;
pub use misc::*;
pub use nbd::*;
pub use socket::*;

#[cfg(test)]
mod tests;
