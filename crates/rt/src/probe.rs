//! Whether io_uring can be used here, probed once per process.

use std::io;
use std::sync::OnceLock;

use io_uring::{opcode, register::Probe, IoUring};

use crate::Aio;

static PROBE: OnceLock<Result<(), String>> = OnceLock::new();

/// True if this process can create io_uring rings that support the
/// operations qsd needs (read, write, fsync, fallocate).
pub fn io_uring_available() -> bool {
    probe().is_ok()
}

/// The engine to use for `requested`, and why it differs if it does: asking
/// for io_uring where it is unavailable gives `Aio::Threads` and the reason.
pub fn resolve_aio(requested: Aio) -> (Aio, Option<String>) {
    match (requested, probe()) {
        (Aio::IoUring, Err(reason)) => (Aio::Threads, Some(reason.clone())),
        _ => (requested, None),
    }
}

fn probe() -> &'static Result<(), String> {
    PROBE.get_or_init(|| {
        let r = run_probe();
        if let Err(reason) = &r {
            tracing::info!(%reason, "io_uring unavailable; file I/O uses threads");
        }
        r
    })
}

fn run_probe() -> Result<(), String> {
    let ring = IoUring::new(4).map_err(|e| explain_setup_error(&e))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring opcode probe failed: {e}"))?;
    let needed = [
        ("read", opcode::Read::CODE),
        ("write", opcode::Write::CODE),
        ("fsync", opcode::Fsync::CODE),
        ("fallocate", opcode::Fallocate::CODE),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(_, code)| !probe.is_supported(*code))
        .map(|(n, _)| *n)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the kernel's io_uring lacks {}",
            missing.join(", ")
        ))
    }
}

fn explain_setup_error(e: &io::Error) -> String {
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match (e.raw_os_error(), sysctl) {
        (Some(libc::ENOSYS), _) => "the kernel has no io_uring support (ENOSYS)".into(),
        (Some(libc::EPERM), Some(2)) => {
            "io_uring is disabled by kernel.io_uring_disabled=2 (EPERM)".into()
        }
        (Some(libc::EPERM), Some(1)) => {
            "io_uring is restricted by kernel.io_uring_disabled=1 and this process is not in \
             kernel.io_uring_group (EPERM)"
                .into()
        }
        (Some(libc::EPERM), _) => {
            "io_uring_setup is not permitted (EPERM; seccomp or a security policy)".into()
        }
        _ => format!("io_uring_setup failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_resolve_aio_threads_requested_stays_threads() {
        assert_eq!(resolve_aio(Aio::Threads), (Aio::Threads, None));
    }

    #[test]
    fn test_resolve_aio_uring_requested_matches_probe() {
        let (aio, reason) = resolve_aio(Aio::IoUring);
        if io_uring_available() {
            assert_eq!((aio, reason), (Aio::IoUring, None));
        } else {
            assert_eq!(aio, Aio::Threads);
            assert!(reason.is_some());
        }
    }

    #[test]
    fn test_explain_setup_error_enosys_names_it() {
        let msg = explain_setup_error(&io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(msg.contains("ENOSYS"), "{msg}");
    }
}
