//! One FUSE export: mounting over a regular file, starting the serving
//! loop on the export's I/O thread, and removal (unmount now; requests in
//! flight finish before the export is gone).

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};
use qsd_block::{BlockBackend, NodeRef, Perm};
use qsd_rt::IoThread;
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::error::{strerror, Error, Result};
use crate::fs::ExportFs;
use crate::serve;
use crate::state::{Attrs, Shared, MAX_IO};

/// qemu's `FuseExportAllowOther`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllowOther {
    /// Only the daemon's user may access the file.
    Off,
    /// Everybody may (subject to the mode bits); failing to mount so fails.
    On,
    /// Try `On`, fall back to `Off`.
    #[default]
    Auto,
}

/// What `block-export-add type=fuse` configures.
#[derive(Debug, Clone)]
pub struct FuseExportOptions {
    /// An existing regular file to mount over.
    pub mountpoint: String,
    /// Allow writes (and resizing).
    pub writable: bool,
    /// Writes past the end grow the node.
    pub growable: bool,
    /// Mount with `allow_other`.
    pub allow_other: AllowOther,
    /// Runtime of the I/O thread that reads and runs the requests. `None`:
    /// a thread of the export's own. Never the main loop: the daemon itself
    /// may touch the mounted file there (open it as a node, stat it), and
    /// would then wait for an answer only it could give.
    pub io: Option<Handle>,
}

/// The permissions an export takes: consistent read, plus write when
/// writable, plus resize when writable or growable (qemu's rule). It
/// shares everything.
pub fn permissions(writable: bool, growable: bool) -> Perm {
    let mut perm = Perm::CONSISTENT_READ;
    if writable {
        perm = perm | Perm::WRITE;
    }
    if writable || growable {
        perm = perm | Perm::RESIZE;
    }
    perm
}

/// A mounted export.
pub struct FuseExport {
    mountpoint: String,
    shared: Arc<Shared>,
    allow_other: bool,
    /// `st_dev` of the mounted file (0 if unknown).
    mount_dev: u64,
    unmounter: Mutex<Option<SessionUnmounter>>,
    /// fuser's session: it holds the mount (dropping it unmounts) and the
    /// original `/dev/fuse` descriptor. Its own loop never runs.
    session: Mutex<Option<Session<ExportFs>>>,
    /// The export's own I/O thread when it was given none; stopped last.
    _thread: Option<IoThread>,
}

impl std::fmt::Debug for FuseExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseExport")
            .field("mountpoint", &self.mountpoint)
            .field("allow_other", &self.allow_other)
            .field("removed", &self.shared.is_removed())
            .finish_non_exhaustive()
    }
}

fn check_regular_file(path: &str) -> Result<()> {
    let md = std::fs::metadata(path).map_err(|e| Error::Stat {
        path: path.to_owned(),
        reason: strerror(&e),
    })?;
    if !md.is_file() {
        return Err(Error::NotRegularFile(path.to_owned()));
    }
    Ok(())
}

fn mount(shared: &Shared, path: &str, allow_other: bool) -> Result<Session<ExportFs>> {
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::DefaultPermissions,
        MountOption::CUSTOM(format!("max_read={MAX_IO}")),
    ];
    cfg.acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    shared
        .allow_other
        .store(allow_other, std::sync::atomic::Ordering::Relaxed);
    Session::new(ExportFs, path, &cfg).map_err(|source| Error::Mount {
        path: path.to_owned(),
        source,
    })
}

impl FuseExport {
    /// Attach to `node`, mount over `opts.mountpoint` and start serving.
    /// Blocks while mounting: call it off the runtime's thread.
    pub fn start(node: NodeRef, opts: FuseExportOptions) -> Result<Arc<FuseExport>> {
        let perm = permissions(opts.writable, opts.growable);
        let backend = BlockBackend::new(node, "an unnamed block device", perm, Perm::ALL)?;
        let path = opts.mountpoint.as_str();
        check_regular_file(path)?;
        let attrs = Attrs {
            mode: if opts.writable { 0o600 } else { 0o400 },
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        };
        let shared = Shared::new(backend, opts.writable, opts.growable, attrs);
        let (mut session, allow_other) = match opts.allow_other {
            AllowOther::On => (mount(&shared, path, true)?, true),
            AllowOther::Off => (mount(&shared, path, false)?, false),
            AllowOther::Auto => match mount(&shared, path, true) {
                Ok(s) => (s, true),
                Err(_) => (mount(&shared, path, false)?, false),
            },
        };
        let unmounter = session.unmount_callable();
        let fd = session
            .as_fd()
            .try_clone_to_owned()
            .map_err(Error::Session)?;
        let (io, thread) = match opts.io {
            Some(io) => (io, None),
            None => {
                let t = IoThread::spawn("fuse").map_err(Error::Session)?;
                (t.handle(), Some(t))
            }
        };
        io.spawn(serve::serve(Arc::clone(&shared), fd));
        // Answered by the loop just started.
        let mount_dev = std::fs::metadata(path).map_or(0, |m| m.dev());
        Ok(Arc::new(FuseExport {
            mountpoint: opts.mountpoint,
            shared,
            allow_other,
            mount_dev,
            unmounter: Mutex::new(Some(unmounter)),
            session: Mutex::new(Some(session)),
            _thread: thread,
        }))
    }

    fn lock_unmounter(&self) -> MutexGuard<'_, Option<SessionUnmounter>> {
        self.unmounter.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mount point as given.
    pub fn mountpoint(&self) -> &str {
        &self.mountpoint
    }

    /// The backend, until the export is removed.
    pub fn backend(&self) -> Option<BlockBackend> {
        self.shared.backend()
    }

    /// True if mounted with `allow_other`.
    pub fn allow_other(&self) -> bool {
        self.allow_other
    }

    /// True once removal has started.
    pub fn is_removed(&self) -> bool {
        self.shared.is_removed()
    }

    /// True if `path` names this export's mounted file (another spelling of
    /// the same mount point).
    pub fn is_mounted_at(&self, path: &str) -> bool {
        if path == self.mountpoint {
            return true;
        }
        self.mount_dev != 0
            && std::fs::metadata(path).is_ok_and(|m| m.dev() == self.mount_dev && m.ino() == 1)
    }

    /// Resolves once the export is removed and its last request finished.
    pub fn gone(&self) -> ExportGone {
        ExportGone(self.shared.gone())
    }

    /// Unmount now and stop serving. Open files of the export fail from now
    /// on; requests already running finish first, then [`ExportGone`]
    /// resolves. Removing twice is harmless.
    pub fn remove(&self) -> ExportGone {
        let gone = self.gone();
        if self.shared.is_removed() {
            return gone;
        }
        self.unmount();
        self.shared.remove();
        gone
    }

    fn fusectl_abort(&self) -> Option<PathBuf> {
        if self.mount_dev == 0 {
            return None;
        }
        // The kernel names a connection by its device number.
        let dev = self.mount_dev;
        let id = (nix::sys::stat::major(dev) << 20) | nix::sys::stat::minor(dev);
        let p = PathBuf::from(format!("/sys/fs/fuse/connections/{id}/abort"));
        p.exists().then_some(p)
    }

    fn unmount(&self) {
        let abort = self.fusectl_abort();
        let taken = self.lock_unmounter().take();
        // A plain unmount works when no file is open; it also takes the
        // mount out of the session's hands for good.
        let plain = taken.map(|mut u| u.unmount());
        if !matches!(plain, Some(Ok(()))) {
            let flags = nix::mount::MntFlags::MNT_DETACH;
            if let Err(e) = nix::mount::umount2(self.mountpoint.as_str(), flags) {
                tracing::warn!("FUSE export: unmounting '{}': {e}", self.mountpoint);
            }
        }
        // Open files keep a detached mount alive: cut its connection so
        // they fail at once and the serving loop ends.
        if let Some(p) = abort {
            if let Err(e) = std::fs::write(&p, "1") {
                tracing::debug!("FUSE export: {}: {e}", p.display());
            }
        }
        drop(
            self.session
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        if !self.shared.is_removed() {
            self.unmount();
            self.shared.remove();
        }
    }
}

/// Resolves once a removed export has no request left.
#[derive(Debug, Clone)]
pub struct ExportGone(watch::Receiver<bool>);

impl ExportGone {
    /// True if already gone.
    pub fn is_gone(&self) -> bool {
        *self.0.borrow()
    }

    /// Wait until gone.
    pub async fn wait(mut self) {
        // An error means the export state was dropped: gone as well.
        let _ = self.0.wait_for(|g| *g).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_permissions_follow_qemu() {
        assert_eq!(permissions(false, false), Perm::CONSISTENT_READ);
        assert_eq!(
            permissions(true, false),
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE
        );
        assert_eq!(
            permissions(false, true),
            Perm::CONSISTENT_READ | Perm::RESIZE
        );
    }

    #[test]
    fn test_check_regular_file_rejects_dir_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_owned();
        assert_eq!(
            check_regular_file(&d).unwrap_err().to_string(),
            format!("'{d}' is not a regular file")
        );
        let missing = format!("{d}/nope");
        assert_eq!(
            check_regular_file(&missing).unwrap_err().to_string(),
            format!("Failed to stat '{missing}': No such file or directory")
        );
        let f = format!("{d}/file");
        std::fs::write(&f, b"").unwrap();
        assert!(check_regular_file(&f).is_ok());
    }
}
