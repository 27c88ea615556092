//! The NBD server: listening sockets, the handshake of each new connection,
//! and the hand-over of negotiated connections to their export's I/O thread.
//!
//! Listeners and handshakes run on the runtime that called
//! [`NbdServer::start`] (the main thread). After `NBD_OPT_GO` the socket is
//! detached from that runtime and re-registered on the export's runtime, where
//! the connection then lives until it closes.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use qsd_nbd_proto::negotiate::{ExportCatalog, ExportInfo, Negotiation, Step};
use qsd_nbd_proto::Negotiated;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};
use crate::export::{ExportGone, ExportOptions, NbdExport, RemoveMode};
use crate::session::Session;

/// Server-wide settings (`nbd-server-start` / `--nbd-server`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOptions {
    /// Most simultaneous connections, handshaking ones included; 0 = no limit.
    pub max_connections: u32,
    /// Seconds a client may take to finish the handshake; 0 = no limit.
    pub handshake_max_seconds: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 0,
            handshake_max_seconds: 10,
        }
    }
}

/// Where to listen.
#[derive(Debug)]
pub enum ListenAddr {
    /// A UNIX socket path (a stale socket file there is replaced).
    Unix(PathBuf),
    /// A TCP host (name or numeric) and port; every resolved address is bound.
    Inet {
        /// Host name or address ("" = all IPv4 addresses).
        host: String,
        /// Port number or service name.
        port: String,
    },
    /// An already listening socket.
    Fd(OwnedFd),
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

struct Running {
    stop: watch::Sender<bool>,
    unix_paths: Vec<PathBuf>,
}

struct Shared {
    opts: ServerOptions,
    exports: Mutex<Vec<Arc<NbdExport>>>,
    conns: Option<Arc<Semaphore>>,
    running: Mutex<Option<Running>>,
}

/// The NBD server. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct NbdServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("opts", &self.shared.opts)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl NbdServer {
    /// A server with no listener and no export.
    pub fn new(opts: ServerOptions) -> Self {
        let conns = (opts.max_connections > 0)
            .then(|| Arc::new(Semaphore::new(opts.max_connections as usize)));
        NbdServer {
            shared: Arc::new(Shared {
                opts,
                exports: Mutex::new(Vec::new()),
                conns,
                running: Mutex::new(None),
            }),
        }
    }

    /// The settings.
    pub fn options(&self) -> ServerOptions {
        self.shared.opts
    }

    /// True between `start` and `stop`.
    pub fn is_running(&self) -> bool {
        lock(&self.shared.running).is_some()
    }

    /// Bind `addr` and start accepting on the current runtime.
    pub async fn start(&self, addr: ListenAddr) -> Result<()> {
        if self.is_running() {
            return Err(Error::AlreadyRunning);
        }
        let (listeners, unix_paths) = bind(addr).await?;
        let (stop, _) = watch::channel(false);
        {
            let mut running = lock(&self.shared.running);
            if running.is_some() {
                return Err(Error::AlreadyRunning);
            }
            *running = Some(Running {
                stop: stop.clone(),
                unix_paths,
            });
        }
        for l in listeners {
            tokio::spawn(accept_loop(Arc::clone(&self.shared), l, stop.subscribe()));
        }
        Ok(())
    }

    /// Stop listening, drop handshaking clients, and remove every export in
    /// hard mode. Returns the removed exports with their gone handles.
    pub fn stop(&self) -> Vec<(Arc<NbdExport>, ExportGone)> {
        if let Some(r) = lock(&self.shared.running).take() {
            r.stop.send_replace(true);
            for p in r.unix_paths {
                let _ = std::fs::remove_file(p);
            }
        }
        let exports = std::mem::take(&mut *lock(&self.shared.exports));
        exports
            .into_iter()
            .filter_map(|e| e.remove(RemoveMode::Hard).ok().map(|g| (e, g)))
            .collect()
    }

    /// Add an export. The server must be running, as in qemu.
    pub fn add_export(&self, opts: ExportOptions) -> Result<Arc<NbdExport>> {
        if !self.is_running() {
            return Err(Error::NotRunning);
        }
        let multi_conn = self.shared.opts.max_connections != 1;
        let mut exports = lock(&self.shared.exports);
        if exports.iter().any(|e| e.name() == opts.name) {
            return Err(Error::ExportExists(opts.name));
        }
        let export = NbdExport::new(opts, multi_conn)?;
        exports.push(Arc::clone(&export));
        Ok(export)
    }

    /// Remove an export. New clients cannot find it at once; the handle
    /// resolves when its last connection has finished.
    pub fn remove_export(&self, name: &str, mode: RemoveMode) -> Result<ExportGone> {
        let mut exports = lock(&self.shared.exports);
        let Some(i) = exports.iter().position(|e| e.name() == name) else {
            return Err(Error::ExportNotFound(name.to_owned()));
        };
        let gone = exports[i].remove(mode)?;
        exports.remove(i);
        Ok(gone)
    }

    /// Find an export by name.
    pub fn export(&self, name: &str) -> Option<Arc<NbdExport>> {
        self.shared.find(name)
    }

    /// All exports, in the order they were added.
    pub fn exports(&self) -> Vec<Arc<NbdExport>> {
        lock(&self.shared.exports).clone()
    }
}

impl Shared {
    fn find(&self, name: &str) -> Option<Arc<NbdExport>> {
        lock(&self.exports)
            .iter()
            .find(|e| e.name() == name)
            .cloned()
    }
}

impl ExportCatalog for Shared {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.find(name).map(|e| e.info())
    }

    fn list(&self) -> Vec<(String, String)> {
        lock(&self.exports)
            .iter()
            .map(|e| {
                (
                    e.name().to_owned(),
                    e.description().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }
}

async fn bind(addr: ListenAddr) -> Result<(Vec<Listener>, Vec<PathBuf>)> {
    match addr {
        ListenAddr::Unix(path) => {
            // Like qemu, replace a stale socket left by an earlier run.
            if std::fs::symlink_metadata(&path).is_ok() {
                let _ = std::fs::remove_file(&path);
            }
            let l = UnixListener::bind(&path).map_err(|source| Error::Listen {
                addr: path.display().to_string(),
                source,
            })?;
            Ok((vec![Listener::Unix(l)], vec![path]))
        }
        ListenAddr::Inet { host, port } => Ok((bind_inet(&host, &port).await?, Vec::new())),
        ListenAddr::Fd(fd) => Ok((vec![listener_from_fd(fd)?], Vec::new())),
    }
}

async fn bind_inet(host: &str, port: &str) -> Result<Vec<Listener>> {
    let host = match host {
        "" => "0.0.0.0".to_owned(),
        h if h.contains(':') && !h.starts_with('[') => format!("[{h}]"),
        h => h.to_owned(),
    };
    let spec = format!("{host}:{port}");
    let addrs: Vec<_> = tokio::net::lookup_host(&spec)
        .await
        .map_err(|source| Error::Resolve {
            addr: spec.clone(),
            source,
        })?
        .collect();
    let mut out = Vec::new();
    let mut last_err = None;
    for a in addrs {
        match TcpListener::bind(a).await {
            Ok(l) => out.push(Listener::Tcp(l)),
            // A dual-stack "::" socket may already cover an IPv4 address.
            Err(e) => last_err = Some(e),
        }
    }
    match (out.is_empty(), last_err) {
        (true, Some(source)) => Err(Error::Listen { addr: spec, source }),
        (true, None) => Err(Error::Resolve {
            addr: spec,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        }),
        _ => Ok(out),
    }
}

fn listener_from_fd(fd: OwnedFd) -> Result<Listener> {
    let err = |source| Error::Listen {
        addr: "fd".to_owned(),
        source,
    };
    let unix = std::os::unix::net::UnixListener::from(fd);
    if unix.local_addr().is_ok() {
        unix.set_nonblocking(true).map_err(err)?;
        return UnixListener::from_std(unix)
            .map(Listener::Unix)
            .map_err(err);
    }
    let tcp = std::net::TcpListener::from(OwnedFd::from(unix));
    tcp.set_nonblocking(true).map_err(err)?;
    TcpListener::from_std(tcp).map(Listener::Tcp).map_err(err)
}

async fn accept_loop(shared: Arc<Shared>, l: Listener, mut stop: watch::Receiver<bool>) {
    loop {
        let permit = match &shared.conns {
            None => None,
            Some(sem) => tokio::select! {
                p = Arc::clone(sem).acquire_owned() => p.ok(),
                _ = stop.wait_for(|s| *s) => return,
            },
        };
        let accepted = tokio::select! {
            r = accept(&l) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((conn, peer)) => {
                let fut = client(Arc::clone(&shared), conn, peer, permit, stop.clone());
                tokio::spawn(fut);
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("NBD server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn accept(l: &Listener) -> std::io::Result<(Conn, String)> {
    match l {
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            widen_send_buffer(&s);
            Ok((Conn::Unix(s), "unix".to_owned()))
        }
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            s.set_nodelay(true)?;
            Ok((Conn::Tcp(s), a.to_string()))
        }
    }
}

/// Send buffer asked for on unix connections (the kernel caps it at
/// `net.core.wmem_max`).
const UNIX_SNDBUF: usize = 4 << 20;

/// A unix socket's default send buffer (about 200 KiB) holds a fraction of
/// a 1 MiB read reply, so the writer would stop and wait for the client to
/// drain it several times per reply: with room for whole replies, 1 MiB
/// reads from the page cache run about twice as fast. (TCP tunes its own
/// buffers; fixing a size there would switch that off.)
fn widen_send_buffer(s: &tokio::net::UnixStream) {
    use nix::sys::socket::{setsockopt, sockopt::SndBuf};
    if let Err(e) = setsockopt(s, SndBuf, &UNIX_SNDBUF) {
        tracing::debug!("NBD server: cannot widen the send buffer: {e}");
    }
}

/// Drive one connection through the handshake, then hand it over.
async fn client(
    shared: Arc<Shared>,
    mut conn: Conn,
    peer: String,
    permit: Option<OwnedSemaphorePermit>,
    mut stop: watch::Receiver<bool>,
) {
    let secs = shared.opts.handshake_max_seconds;
    let negotiated = async {
        let r = match &mut conn {
            Conn::Unix(s) => handshake(s, &*shared).await,
            Conn::Tcp(s) => handshake(s, &*shared).await,
        };
        r.map_err(|e| e.to_string())
    };
    let limited = async {
        if secs == 0 {
            negotiated.await
        } else {
            let t = Duration::from_secs(u64::from(secs));
            tokio::time::timeout(t, negotiated)
                .await
                .unwrap_or_else(|_| Err("handshake timed out".into()))
        }
    };
    let r = tokio::select! {
        r = limited => r,
        _ = stop.wait_for(|s| *s) => return,
    };
    match r {
        Ok(Some((neg, leftover))) => enter(&shared, conn, peer, neg, leftover, permit),
        Ok(None) => tracing::debug!("NBD client {peer} aborted the handshake"),
        Err(e) => tracing::warn!("NBD client {peer}: option negotiation failed: {e}"),
    }
}

/// Errors that end a handshake.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("{0}")]
    Proto(#[from] qsd_nbd_proto::ProtoError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS is not available")]
    NoTls,
}

type Handshaken = Option<(Negotiated, BytesMut)>;

async fn handshake<S>(
    s: &mut S,
    catalog: &(dyn ExportCatalog + Sync),
) -> std::result::Result<Handshaken, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut neg = Negotiation::new(false);
    let mut out = Vec::with_capacity(4096);
    neg.greeting(&mut out);
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        let (used, step) = neg.advance(&buf, catalog, &mut out)?;
        buf.advance(used);
        match step {
            Step::Continue => continue,
            Step::NeedMore(n) => {
                s.write_all(&out).await?;
                out.clear();
                buf.reserve(n.saturating_sub(buf.len()).max(4096));
                if s.read_buf(&mut buf).await? == 0 {
                    return Ok(None);
                }
            }
            Step::Abort => {
                // The client may already be gone; ignore write errors.
                let _ = s.write_all(&out).await;
                return Ok(None);
            }
            Step::StartTls => return Err(HandshakeError::NoTls),
            Step::Enter(n) => {
                s.write_all(&out).await?;
                return Ok(Some((n, buf)));
            }
        }
    }
}

/// Move a negotiated connection to its export's runtime and serve it there.
fn enter(
    shared: &Shared,
    conn: Conn,
    peer: String,
    negotiated: Negotiated,
    leftover: BytesMut,
    permit: Option<OwnedSemaphorePermit>,
) {
    let Some(export) = shared.find(&negotiated.export) else {
        tracing::warn!("NBD client {peer}: export '{}' vanished", negotiated.export);
        return;
    };
    let Some(guard) = export.attach() else {
        tracing::warn!(
            "NBD client {peer}: export '{}' is being removed",
            negotiated.export
        );
        return;
    };
    let io = export.io().clone();
    let (unix, tcp) = match conn {
        Conn::Unix(s) => (s.into_std().map(Some), Ok(None)),
        Conn::Tcp(s) => (Ok(None), s.into_std().map(Some)),
    };
    let (unix, tcp) = match (unix, tcp) {
        (Ok(u), Ok(t)) => (u, t),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("NBD client {peer}: cannot move connection: {e}");
            return;
        }
    };
    io.spawn(async move {
        let _permit = permit;
        macro_rules! serve {
            ($ty:ty, $std:expr) => {
                match <$ty>::from_std($std) {
                    Ok(s) => {
                        let (rd, wr) = s.into_split();
                        let session = Session {
                            rd,
                            wr,
                            leftover,
                            negotiated,
                            export,
                            guard,
                            peer,
                        };
                        session.run().await;
                    }
                    Err(e) => tracing::warn!("NBD client {peer}: cannot register connection: {e}"),
                }
            };
        }
        if let Some(s) = unix {
            serve!(UnixStream, s);
        } else if let Some(s) = tcp {
            serve!(TcpStream, s);
        }
    });
}
