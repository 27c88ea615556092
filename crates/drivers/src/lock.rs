//! Image locking compatible with qemu's file-posix driver.
//!
//! qemu marks the permissions a process uses and the ones it does not share
//! with shared (read) OFD locks on single bytes of the image file:
//! byte `100 + i` for each permission bit `i` taken, byte `200 + i` for each
//! permission bit not shared. Bits are qemu's: consistent read = 0, write = 1,
//! write unchanged = 2, resize = 3. A conflict is found by testing whether an
//! exclusive lock could be taken on the complementary bytes: another open file
//! description holding a read lock there makes the test fail.

use std::fs::File;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;
use qsd_block::{Error, ErrorKind, Perm, Result};

/// First byte of the "permission used" range.
const PERM_BASE: i64 = 100;
/// First byte of the "permission not shared" range.
const SHARED_BASE: i64 = 200;
/// Number of permission bits qemu locks.
const PERM_BITS: u8 = 4;

fn flock(kind: libc::c_int, offset: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: offset,
        l_len: 1,
        l_pid: 0,
    }
}

fn set_lock(file: &File, offset: i64, lock: bool) -> nix::Result<()> {
    let kind = if lock { libc::F_RDLCK } else { libc::F_UNLCK };
    fcntl(file, FcntlArg::F_OFD_SETLK(&flock(kind, offset))).map(drop)
}

/// True when another open file description holds a lock on the byte.
pub(crate) fn lock_held_elsewhere(file: &File, offset: i64) -> nix::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, offset);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// Whether OFD locks work on this file (qemu's `locking=auto` test).
pub(crate) fn ofd_supported(file: &File) -> bool {
    lock_held_elsewhere(file, 0).is_ok()
}

/// Permission bits present in `p`, as indices.
fn bits(p: Perm) -> impl Iterator<Item = u8> {
    (0..PERM_BITS).filter(move |i| p.bits() & (1 << i) != 0)
}

/// The permission of bit `i`.
fn single(i: u8) -> Perm {
    Perm::ALL
        .iter()
        .find(|p| p.bits() == 1 << i)
        .unwrap_or(Perm::NONE)
}

/// The locks a node holds on its image file.
#[derive(Debug)]
pub(crate) struct ImageLock {
    filename: String,
    enabled: bool,
    state: Mutex<LockState>,
}

#[derive(Debug, Clone, Copy)]
struct LockState {
    perm: Perm,
    shared: Perm,
    /// Bits whose "used" byte is locked.
    locked_perm: u8,
    /// Bits whose "not shared" byte is locked.
    locked_unshared: u8,
}

impl ImageLock {
    /// A lock manager; `enabled` false makes every call a no-op.
    pub(crate) fn new(filename: &str, enabled: bool) -> Self {
        ImageLock {
            filename: filename.to_string(),
            enabled,
            state: Mutex::new(LockState {
                perm: Perm::NONE,
                shared: Perm::ALL,
                locked_perm: 0,
                locked_unshared: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LockState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Take locks for `perm`/`shared` and check that no other process
    /// conflicts; on conflict the previous locks stay in force.
    pub(crate) fn set_perm(&self, file: &File, perm: Perm, shared: Perm) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let mut st = self.state();
        let widening = (st.perm | perm) != st.perm || (st.shared & shared) != st.shared;
        if widening {
            let (want, unshared) = (st.perm | perm, !st.shared | !shared);
            let prepared = apply(&mut st, file, want, unshared, false)
                .and_then(|()| check(file, perm, shared))
                .inspect_err(|_| self.log_hint());
            if let Err(e) = prepared {
                let (p, s) = (st.perm, st.shared);
                if let Err(undo) = apply(&mut st, file, p, !s, true) {
                    tracing::warn!("{undo}");
                }
                return Err(e);
            }
        }
        if let Err(e) = apply(&mut st, file, perm, !shared, true) {
            // Only unlocking can fail here; the wider locks are harmless.
            tracing::warn!("{e}");
        }
        st.perm = perm;
        st.shared = shared;
        Ok(())
    }

    /// qemu's hint after a lock conflict. `qsd_block::Error` has no hint
    /// field, so it goes to the log rather than into the message.
    fn log_hint(&self) {
        tracing::info!("Is another process using the image [{}]?", self.filename);
    }
}

/// Lock the bytes for `perm` and `unshared`; with `unlock`, release the others.
fn apply(st: &mut LockState, file: &File, perm: Perm, unshared: Perm, unlock: bool) -> Result<()> {
    for i in 0..PERM_BITS {
        let bit = 1u8 << i;
        let want = perm.bits() & bit != 0;
        let have = st.locked_perm & bit != 0;
        if want != have && (want || unlock) {
            lock_byte(file, PERM_BASE + i64::from(i), want)?;
            st.locked_perm ^= bit;
        }
    }
    for i in 0..PERM_BITS {
        let bit = 1u8 << i;
        let want = unshared.bits() & bit != 0;
        let have = st.locked_unshared & bit != 0;
        if want != have && (want || unlock) {
            lock_byte(file, SHARED_BASE + i64::from(i), want)?;
            st.locked_unshared ^= bit;
        }
    }
    Ok(())
}

fn lock_byte(file: &File, offset: i64, lock: bool) -> Result<()> {
    set_lock(file, offset, lock).map_err(|errno| {
        let verb = if lock { "lock" } else { "unlock" };
        lock_error(format!("Failed to {verb} byte {offset}"), errno)
    })
}

/// Test the bytes of other processes that conflict with `perm`/`shared`.
fn check(file: &File, perm: Perm, shared: Perm) -> Result<()> {
    for i in bits(perm) {
        test_byte(file, SHARED_BASE + i64::from(i), || {
            format!("Failed to get \"{}\" lock", single(i))
        })?;
    }
    for i in bits(!shared) {
        test_byte(file, PERM_BASE + i64::from(i), || {
            format!("Failed to get shared \"{}\" lock", single(i))
        })?;
    }
    Ok(())
}

fn test_byte(file: &File, offset: i64, msg: impl Fn() -> String) -> Result<()> {
    match lock_held_elsewhere(file, offset) {
        Ok(false) => Ok(()),
        Ok(true) => Err(lock_error(msg(), Errno::EAGAIN)),
        Err(errno) => Err(lock_error(msg(), errno)),
    }
}

/// qemu leaves out the errno text when the byte is simply held by another
/// process (EAGAIN/EACCES), as that is the common case.
fn lock_error(msg: String, errno: Errno) -> Error {
    let msg = match errno {
        Errno::EAGAIN | Errno::EACCES => msg,
        other => format!("{msg}: {}", other.desc()),
    };
    Error::new(ErrorKind::PermissionConflict, msg).with_errno(errno as i32)
}
