//! The `fuser::Filesystem` of an export. fuser mounts the file and answers
//! the kernel's `INIT` with what [`ExportFs::init`] asks for; every request
//! after that is served by [`crate::serve`], so no other method is ever
//! called.

use std::io;

use fuser::{Filesystem, InitFlags, KernelConfig, Request};

use crate::state::MAX_IO;

/// Requests the kernel may keep queued to us in the background (async
/// direct I/O counts here): enough for deep queues from several jobs.
const MAX_BACKGROUND: u16 = 256;

/// The export's side of the `INIT` negotiation.
#[derive(Debug)]
pub(crate) struct ExportFs;

impl Filesystem for ExportFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let max = MAX_IO as u32;
        if let Err(cap) = config.set_max_write(max) {
            let _ = config.set_max_write(cap.min(max));
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        // Without ASYNC_DIO the kernel turns libaio/io_uring O_DIRECT I/O
        // into one synchronous request at a time.
        let wanted = InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
        let _ = config.add_capabilities(wanted & config.capabilities());
        Ok(())
    }
}
