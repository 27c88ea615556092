//! Waiting on an eventfd someone else signals (a vhost-user front-end's
//! kick, for one) from the current runtime, without a thread of its own;
//! and registering any other descriptor for reading the same way.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// An eventfd registered with the current runtime's reactor.
#[derive(Debug)]
pub struct EventFdWatch {
    fd: AsyncFd<File>,
}

impl EventFdWatch {
    /// Watch `fd`, which must be an eventfd. It is made non-blocking: the
    /// flag belongs to the open file, so whoever shares it sees it too,
    /// which changes nothing for writers (an eventfd write blocks only
    /// when the counter would overflow). Must run inside a runtime with
    /// I/O enabled.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        let file = File::from(fd);
        // SAFETY: `file` owns the descriptor and moves into the AsyncFd,
        // which keeps it open and unchanged for as long as it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(file, Interest::READABLE)? };
        Ok(EventFdWatch { fd })
    }

    /// Wait until the eventfd has been signalled and reset it; returns the
    /// counter it held (the number of signals, for a normal eventfd).
    pub async fn wait(&self) -> io::Result<u64> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut count = [0u8; 8];
            match ready.try_io(|f| f.get_ref().read_exact(&mut count)) {
                Ok(r) => {
                    // The counter is zero now, and the next write raises a
                    // new readiness event: forgetting this one saves the
                    // read that would only return EAGAIN. (Events arrive
                    // when the reactor polls, never during this call, and
                    // `clear_ready` keeps any that came after `readable`.)
                    ready.clear_ready();
                    return r.map(|()| u64::from_ne_bytes(count));
                }
                // Stale readiness (another reader got there first); cleared.
                Err(_would_block) => continue,
            }
        }
    }
}

/// Make `fd` non-blocking and register it with the current runtime's
/// reactor for reading (a `/dev/fuse` connection, for one). The flag
/// belongs to the open file, so other descriptors of it see it too. Must
/// run inside a runtime with I/O enabled.
pub fn readable_async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    set_nonblocking(&fd)?;
    // SAFETY: `fd` owns the descriptor and moves into the AsyncFd, which
    // keeps it open and unchanged for as long as it is registered.
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
    Ok(fd)
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL only read and set the status flags of a
    // descriptor `fd` keeps open for the duration of the calls.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::FromRawFd;

    fn eventfd(flags: libc::c_int) -> OwnedFd {
        // SAFETY: eventfd has no memory arguments.
        let raw = unsafe { libc::eventfd(0, flags | libc::EFD_CLOEXEC) };
        assert!(raw >= 0, "{}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(raw) }
    }

    #[test]
    fn test_wait_returns_each_signal_batch_and_then_waits() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let efd = eventfd(0); // blocking: `new` must change that
            let mut writer = File::from(efd.try_clone().unwrap());
            let w = EventFdWatch::new(efd).unwrap();
            writer.write_all(&2u64.to_ne_bytes()).unwrap();
            writer.write_all(&1u64.to_ne_bytes()).unwrap();
            assert_eq!(w.wait().await.unwrap(), 3);
            let again = tokio::time::timeout(std::time::Duration::from_millis(50), w.wait());
            assert!(again.await.is_err(), "no signal, no wake-up");
            writer.write_all(&1u64.to_ne_bytes()).unwrap();
            assert_eq!(w.wait().await.unwrap(), 1);
        });
    }
}
