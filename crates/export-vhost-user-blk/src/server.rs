//! The accept loop: one front-end at a time, each served by a fresh
//! rust-vmm daemon (its vring worker threads end with the connection).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::EventConsumer;

use crate::device::BlkDevice;
use crate::Shared;

/// The current connection, so `stop` can cut it.
#[derive(Default)]
pub(crate) struct ConnSlot {
    stopped: bool,
    conn: Option<ShutdownHandle>,
}

impl std::fmt::Debug for ConnSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnSlot")
            .field("stopped", &self.stopped)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl ConnSlot {
    pub(crate) fn request_stop(&mut self) {
        self.stopped = true;
        if let Some(c) = self.conn.take() {
            c.shutdown();
        }
    }

    pub(crate) fn connected(&self) -> bool {
        self.conn.is_some()
    }
}

const EV_LISTEN: u64 = 0;
const EV_STOP: u64 = 1;

/// Wait until a front-end connects (true) or stop is requested (false).
fn wait_accept(ep: &Epoll) -> bool {
    let mut evs = [EpollEvent::default(); 2];
    loop {
        match ep.wait(-1, &mut evs) {
            Ok(n) => {
                if evs[..n].iter().any(|e| e.data() == EV_STOP) {
                    return false;
                }
                if n > 0 {
                    return true;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!("vhost-user-blk: epoll failed: {e}");
                return false;
            }
        }
    }
}

fn epoll_for(listener: &Listener, stop: &EventConsumer) -> std::io::Result<Epoll> {
    let ep = Epoll::new()?;
    ep.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, EV_LISTEN),
    )?;
    ep.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, EV_STOP),
    )?;
    Ok(ep)
}

/// Serve front-ends until stopped; the listener (and its socket file) is
/// dropped on return.
pub(crate) fn serve(
    shared: Arc<Shared>,
    mut listener: Listener,
    stop: EventConsumer,
    slot: Arc<Mutex<ConnSlot>>,
) {
    let ep = match epoll_for(&listener, &stop) {
        Ok(ep) => ep,
        Err(e) => {
            tracing::error!(export = %shared.id, "vhost-user-blk: cannot poll the socket: {e}");
            return;
        }
    };
    while wait_accept(&ep) {
        serve_one(&shared, &mut listener, &slot);
    }
}

fn serve_one(shared: &Arc<Shared>, listener: &mut Listener, slot: &Mutex<ConnSlot>) {
    let dev = Arc::new(BlkDevice::new(Arc::clone(shared)));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let name = format!("vhost-blk-{}", shared.id);
    let mut daemon = match VhostUserDaemon::new(name, Arc::clone(&dev), mem) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(export = %shared.id, "vhost-user-blk: cannot set up the device: {e}");
            return;
        }
    };
    if let Err(e) = daemon.start(listener) {
        tracing::warn!(export = %shared.id, "vhost-user-blk: accept failed: {e}");
        return;
    }
    tracing::debug!(export = %shared.id, "vhost-user-blk: front-end connected");
    {
        let mut s = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if s.stopped {
            daemon.request_shutdown();
        } else {
            s.conn = daemon.shutdown_handle();
        }
    }
    if let Err(e) = daemon.wait() {
        tracing::info!(export = %shared.id, "vhost-user-blk: front-end connection ended: {e}");
    }
    slot.lock().unwrap_or_else(PoisonError::into_inner).conn = None;
    // Requests still running write into this front-end's rings: finish them
    // before another front-end may map the same memory.
    if !dev.drain() {
        tracing::warn!(export = %shared.id, "vhost-user-blk: requests still in flight after disconnect");
    }
    // Dropping the daemon stops and joins its vring worker threads.
    drop(daemon);
}
