//! The accept loop: one front-end at a time, each served by a fresh
//! rust-vmm daemon (its vring worker threads end with the connection).

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::EventConsumer;

use crate::device::BlkDevice;
use crate::relay::{self, Relay};
use crate::Shared;

/// The current connection, so `stop` can cut it and a resize can be
/// announced on it.
#[derive(Default)]
pub(crate) struct ConnSlot {
    stopped: bool,
    conn: Option<ShutdownHandle>,
    /// The backend channel (SET_BACKEND_REQ_FD) of the connection.
    backend_chan: Option<UnixStream>,
}

impl std::fmt::Debug for ConnSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnSlot")
            .field("stopped", &self.stopped)
            .field("connected", &self.conn.is_some())
            .field("backend_channel", &self.backend_chan.is_some())
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

    pub(crate) fn set_backend_channel(&mut self, chan: UnixStream) {
        self.backend_chan = Some(chan);
    }

    /// Tell the front-end its config space changed; false when it gave no
    /// backend channel (or the message could not be sent).
    pub(crate) fn config_changed(&mut self) -> bool {
        let Some(chan) = &self.backend_chan else {
            return false;
        };
        match relay::send_config_change(chan) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("vhost-user-blk: config-change message failed: {e}");
                self.backend_chan = None;
                false
            }
        }
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

/// A listening socket only this process can reach (a fresh 0700
/// directory), for the relay's connection to the rust-vmm daemon. It is
/// removed once that connection is accepted.
struct PrivateSocket {
    dir: PathBuf,
    path: PathBuf,
    listener: Option<Listener>,
}

impl PrivateSocket {
    fn new(id: &str) -> io::Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for attempt in 0..8u64 {
            let tag = RandomState::new().hash_one((seq, attempt, id));
            let dir =
                std::env::temp_dir().join(format!("qsd-vhost-{}-{tag:016x}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    let path = dir.join("s");
                    let mut s = PrivateSocket {
                        dir,
                        path,
                        listener: None,
                    };
                    s.listener = Some(
                        Listener::new(&s.path, true)
                            .map_err(|e| io::Error::other(e.to_string()))?,
                    );
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no private directory")))
    }
}

impl Drop for PrivateSocket {
    fn drop(&mut self) {
        // The listener removes its socket file.
        drop(self.listener.take());
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Start a rust-vmm daemon for `dev` connected to the relay; returns the
/// daemon and the relay's end of the connection.
fn start_daemon(shared: &Shared, dev: &Arc<BlkDevice>) -> io::Result<(Daemon, UnixStream)> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let name = format!("vhost-blk-{}", shared.id);
    let mut daemon = VhostUserDaemon::new(name, Arc::clone(dev), mem)
        .map_err(|e| io::Error::other(format!("cannot set up the device: {e}")))?;
    let mut sock = PrivateSocket::new(&shared.id)?;
    let inner = UnixStream::connect(&sock.path)?;
    let listener = sock
        .listener
        .as_mut()
        .ok_or_else(|| io::Error::other("no private listener"))?;
    daemon
        .start(listener)
        .map_err(|e| io::Error::other(format!("cannot start the device: {e}")))?;
    Ok((daemon, inner))
}

type Daemon = VhostUserDaemon<Arc<BlkDevice>>;

fn serve_one(shared: &Arc<Shared>, listener: &mut Listener, slot: &Arc<Mutex<ConnSlot>>) {
    let front = match listener.accept() {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(export = %shared.id, "vhost-user-blk: accept failed: {e}");
            return;
        }
    };
    let dev = Arc::new(BlkDevice::new(Arc::clone(shared)));
    let (mut daemon, inner) = match start_daemon(shared, &dev) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(export = %shared.id, "vhost-user-blk: {e}");
            return;
        }
    };
    tracing::debug!(export = %shared.id, "vhost-user-blk: front-end connected");
    {
        let mut s = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if s.stopped {
            daemon.request_shutdown();
        } else {
            s.conn = daemon.shutdown_handle();
        }
    }
    relay_connection(shared, &dev, slot, front, inner);
    if let Err(e) = daemon.wait() {
        tracing::info!(export = %shared.id, "vhost-user-blk: front-end connection ended: {e}");
    }
    dev.stop_kicks();
    {
        let mut s = slot.lock().unwrap_or_else(PoisonError::into_inner);
        s.conn = None;
        s.backend_chan = None;
    }
    // Requests still running write into this front-end's rings: finish them
    // before another front-end may map the same memory.
    if !dev.drain() {
        tracing::warn!(export = %shared.id, "vhost-user-blk: requests still in flight after disconnect");
    }
    // Dropping the daemon stops and joins its vring worker threads.
    drop(daemon);
}

/// Relay messages until either side hangs up: requests on this thread,
/// the daemon's replies on a helper thread.
fn relay_connection(
    shared: &Shared,
    dev: &Arc<BlkDevice>,
    slot: &Arc<Mutex<ConnSlot>>,
    front: UnixStream,
    inner: UnixStream,
) {
    let clones = front.try_clone().and_then(|f| Ok((f, inner.try_clone()?)));
    let (front_w, inner_r) = match clones {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(export = %shared.id, "vhost-user-blk: {e}");
            let _ = inner.shutdown(std::net::Shutdown::Both);
            return;
        }
    };
    let relay = Arc::new(Relay::new(Arc::clone(dev), Arc::clone(slot), front_w));
    let r2 = Arc::clone(&relay);
    let pump = std::thread::Builder::new()
        .name(format!("vhost-blk-{}-r", shared.id))
        .spawn(move || r2.replies(&inner_r));
    match pump {
        Ok(pump) => {
            relay.requests(&front, &inner);
            let _ = pump.join();
        }
        Err(e) => {
            tracing::error!(export = %shared.id, "vhost-user-blk: {e}");
            let _ = inner.shutdown(std::net::Shutdown::Both);
        }
    }
}
