//! The daemon's state, owned by the main thread's runtime and shared with
//! QMP command handlers.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use qsd_block::Graph;
use qsd_qmp::EventBus;
use tokio::sync::watch;

use crate::chardev::Chardev;
use crate::exports::Exports;
use crate::objects::IoThreads;

/// The qemu-storage-daemon version whose wire contract we follow.
pub const QEMU_COMPAT_VERSION: (u64, u64, u64) = (10, 0, 2);
/// The same, as text.
pub const QEMU_COMPAT_VERSION_STR: &str = "10.0.2";

/// Why the daemon stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Still running.
    Running,
    /// `quit` over QMP.
    Quit,
    /// SIGTERM, SIGINT or SIGHUP.
    Signal,
}

/// Everything the control plane owns. Lock order (never take an earlier
/// lock while holding a later one): exports, graph, iothreads, chardevs.
#[derive(Debug)]
pub struct Daemon {
    /// The block graph (async lock: opening a node does I/O).
    pub graph: tokio::sync::Mutex<Graph>,
    /// Exports and the NBD server.
    pub exports: tokio::sync::Mutex<Exports>,
    /// `--object iothread` threads.
    pub iothreads: Mutex<IoThreads>,
    /// Character devices not yet claimed by a monitor.
    pub chardevs: Mutex<BTreeMap<String, Chardev>>,
    /// QMP events to every monitor.
    pub events: EventBus,
    /// `secret` objects (shared with the graph, where drivers look them up).
    pub secrets: qsd_block::SecretStore,
    /// Objects drivers look up, such as throttle groups (shared with the graph).
    pub objects: qsd_block::ObjectStore,
    stop: watch::Sender<StopReason>,
    /// Unix socket paths we bound, removed at exit.
    sockets: Mutex<Vec<String>>,
}

impl Daemon {
    /// A daemon with every driver registered and nothing configured.
    pub fn new() -> Self {
        let mut graph = Graph::new();
        qsd_drivers::register_all(&mut graph);
        qsd_qcow2::register(&mut graph);
        qsd_throttle::register(&mut graph);
        qsd_quorum::register(&mut graph);
        qsd_blkdebug::register(&mut graph);
        let events = EventBus::new();
        let bus = events.clone();
        graph.set_event_sink(qsd_block::EventSink::new(move |name, data| {
            bus.emit(name, data);
        }));
        let secrets = graph.secrets().clone();
        let objects = graph.objects().clone();
        Daemon {
            secrets,
            objects,
            graph: tokio::sync::Mutex::new(graph),
            exports: tokio::sync::Mutex::new(Exports::default()),
            iothreads: Mutex::new(IoThreads::default()),
            chardevs: Mutex::new(BTreeMap::new()),
            events,
            stop: watch::channel(StopReason::Running).0,
            sockets: Mutex::new(Vec::new()),
        }
    }

    /// Ask the daemon to stop.
    pub fn request_stop(&self, why: StopReason) {
        self.stop.send_replace(why);
    }

    /// Wait until a stop was requested; returns why.
    pub async fn stopped(&self) -> StopReason {
        let mut rx = self.stop.subscribe();
        loop {
            let now = *rx.borrow_and_update();
            if now != StopReason::Running {
                return now;
            }
            if rx.changed().await.is_err() {
                return StopReason::Signal;
            }
        }
    }

    /// True when the stop was asked for over QMP.
    pub fn stopped_reason_is_quit(&self) -> bool {
        *self.stop.borrow() == StopReason::Quit
    }

    /// Remember a unix socket path to remove at exit.
    pub fn remember_socket(&self, path: String) {
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(path);
    }

    /// Remove the unix sockets we bound.
    pub fn remove_sockets(&self) {
        for p in self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = std::fs::remove_file(p);
        }
    }

    /// The object tables for `objects::add`/`del`, with the I/O threads locked.
    pub fn object_tables<R>(&self, f: impl FnOnce(crate::objects::Tables<'_>) -> R) -> R {
        let mut threads = self.iothreads();
        f(crate::objects::Tables {
            threads: &mut threads,
            secrets: &self.secrets,
            objects: &self.objects,
        })
    }

    /// The I/O threads (poison-tolerant).
    pub fn iothreads(&self) -> MutexGuard<'_, IoThreads> {
        self.iothreads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The unclaimed chardevs (poison-tolerant).
    pub fn chardevs(&self) -> MutexGuard<'_, BTreeMap<String, Chardev>> {
        self.chardevs.lock().unwrap_or_else(|p| p.into_inner())
    }
}
