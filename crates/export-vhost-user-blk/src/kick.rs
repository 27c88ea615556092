//! Kicks read on the queue's own runtime.
//!
//! Left to itself, the backend crate watches the front-end's kick eventfd
//! on a vring worker thread, which must then wake the runtime that does the
//! I/O: two thread wake-ups before a request even starts. Instead the relay
//! keeps the front-end's eventfd and gives the backend crate a private
//! "proxy" eventfd in its place (see `relay::Relay::set_vring_kick`). A
//! task on the queue's runtime waits for the real kick and pops the ring
//! itself, so a request is read, submitted to io_uring and completed by the
//! one thread that the kick woke.
//!
//! The proxy carries the kicks that task cannot serve: those that come
//! before the backend crate first hands us the ring (its `handle_event` is
//! where the `Vring` comes from), and those that come while the ring is
//! stopped or disabled. The backend crate's own start and enable logic then
//! decides when they are served, exactly as without this module.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use nix::sys::eventfd::{EfdFlags, EventFd};
use qsd_rt::EventFdWatch;

use crate::device::QueueCtx;

/// A fresh proxy eventfd: the descriptor for the backend crate, and our
/// handle on the same eventfd. It is left blocking: the crate reads it only
/// once epoll has said it is readable.
pub(crate) fn proxy() -> io::Result<(OwnedFd, File)> {
    let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).map_err(io::Error::from)?;
    let theirs = OwnedFd::from(efd);
    let ours = File::from(theirs.try_clone()?);
    Ok((theirs, ours))
}

/// Hand one kick to the backend crate through `proxy`.
pub(crate) fn poke(proxy: &File) {
    if let Err(e) = (&*proxy).write_all(&1u64.to_ne_bytes()) {
        tracing::debug!("vhost-user-blk: cannot forward a kick: {e}");
    }
}

/// Serve the kicks `watch` sees until the task is aborted (a new kick fd
/// for the ring, or the connection ended) or the descriptor fails.
pub(crate) async fn serve(q: Arc<QueueCtx>, watch: EventFdWatch, proxy: File) {
    loop {
        match watch.wait().await {
            Ok(_) => q.on_kick(&proxy),
            Err(e) => {
                // Hand over to the backend crate's thread: nothing reads
                // the front-end's eventfd any more, so the ring stalls
                // until the front-end sets a new one.
                tracing::error!("vhost-user-blk: kick eventfd failed: {e}");
                poke(&proxy);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn test_proxy_pokes_reach_the_backend_side() {
        let (theirs, ours) = proxy().unwrap();
        poke(&ours);
        poke(&ours);
        let mut count = [0u8; 8];
        (&File::from(theirs)).read_exact(&mut count).unwrap();
        assert_eq!(u64::from_ne_bytes(count), 2);
    }
}
