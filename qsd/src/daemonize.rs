//! `--daemonize`: fork before any thread exists; the parent waits on a pipe
//! and exits only when the child says every option is set up (or failed).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use anyhow::{Context, Result};
use nix::unistd::{pipe, setsid};
use qsd_rt::process::{fork_single_threaded, Forked};

/// The child's end of the start-up pipe.
#[derive(Debug)]
pub struct ReadySignal(File);

impl ReadySignal {
    /// Tell the parent start-up succeeded, and detach from the terminal.
    pub fn done(mut self) {
        // A parent that died already cannot be told; nothing to do then.
        let _ = self.0.write_all(&[0]);
        redirect_stdio_to_null();
    }

    /// Tell the parent start-up failed (it exits non-zero).
    pub fn failed(mut self) {
        let _ = self.0.write_all(&[1]);
    }
}

/// Fork. In the parent this does not return: it waits for the child's word
/// and exits. In the child it returns the signal to send.
pub fn fork_and_wait() -> Result<ReadySignal> {
    let (rd, wr): (OwnedFd, OwnedFd) = pipe().context("--daemonize: pipe failed")?;
    let forked = fork_single_threaded().context("--daemonize: fork failed")?;
    match forked {
        Forked::Parent { .. } => {
            drop(wr);
            let mut byte = [1u8];
            let ok = File::from(rd).read_exact(&mut byte).is_ok() && byte[0] == 0;
            std::process::exit(if ok { 0 } else { 1 });
        }
        Forked::Child => {
            drop(rd);
            setsid().context("--daemonize: setsid failed")?;
            Ok(ReadySignal(File::from(wr)))
        }
    }
}

fn redirect_stdio_to_null() {
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    let _ = nix::unistd::dup2_stdin(&null);
    let _ = nix::unistd::dup2_stdout(&null);
    let _ = nix::unistd::dup2_stderr(&null);
}
