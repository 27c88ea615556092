//! Process-level operations that need `unsafe`: forking for `--daemonize`.

use std::io;

/// Which side of a fork we are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// The original process; `child` is the new process's pid.
    Parent {
        /// The child's pid.
        child: i32,
    },
    /// The new process.
    Child,
}

/// fork(2), refused unless the process has a single thread (the child of a
/// multi-threaded process gets only the calling thread, and locks held by
/// the others would stay locked forever).
pub fn fork_single_threaded() -> io::Result<Forked> {
    if !is_single_threaded() {
        return Err(io::Error::other("cannot fork: other threads are running"));
    }
    // SAFETY: checked just above that no other thread exists.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Parent { child }),
    }
}

/// True when the process has exactly one thread (from /proc/self/status).
pub fn is_single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("Threads:")
                        .map(|n| n.trim().parse::<u32>().ok())
                })
                .flatten()
        })
        == Some(1)
}

/// Take ownership of a descriptor inherited from the parent process and
/// named on the command line (`fd=N`). Refuses 0-2 and descriptors that are
/// not open. Call it once per number: the descriptor is closed on drop.
pub fn take_inherited_fd(fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    if fd < 3 {
        return Err(io::Error::other(format!(
            "file descriptor {fd} is a standard stream"
        )));
    }
    // SAFETY: F_GETFD only inspects the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::other(format!(
            "file descriptor {fd} is not open"
        )));
    }
    // SAFETY: the descriptor is open (checked above) and was handed to this
    // process by its parent for this purpose; nothing else in qsd owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Read the payload of key `serial` from the kernel keyring (what qemu's
/// `secret_keyring` object does). The caller must possess the key or be
/// allowed to read it.
pub fn keyring_read(serial: i32) -> io::Result<Vec<u8>> {
    const KEYCTL_READ: libc::c_long = 11;
    let mut buf = Vec::new();
    loop {
        // SAFETY: keyctl(KEYCTL_READ) writes at most `buf.len()` bytes into
        // `buf` (a null pointer with length 0 asks only for the size); the
        // pointer and length describe memory we own for the whole call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                KEYCTL_READ,
                libc::c_long::from(serial),
                if buf.is_empty() {
                    std::ptr::null_mut()
                } else {
                    buf.as_mut_ptr()
                },
                buf.len(),
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        if n <= buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        // The key is larger than the buffer (or this was the size query).
        buf.resize(n, 0);
    }
}

#[cfg(test)]
mod keyring_tests {
    use super::*;

    #[test]
    fn test_keyring_read_missing_key_fails() {
        let err = keyring_read(0x7fff_fff0).unwrap_err();
        assert!(err.raw_os_error().is_some());
    }
}
