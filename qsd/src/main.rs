//! qsd: a storage daemon compatible with qemu-storage-daemon.
//!
//! `main` parses the command line, optionally daemonizes, and runs the
//! daemon on the main thread's runtime; all wiring lives in small modules.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod blockdev_change;
mod chardev;
mod cli;
mod commands;
mod daemon;
mod daemonize;
mod exports;
mod objects;
mod qom;
mod query;
mod setup;
mod vhost_backend;

use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qsd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let cli = match vhost_backend::parse(&args) {
        Some(backend) => match backend? {
            vhost_backend::Backend::PrintCapabilities => {
                println!("{}", qsd_export_vhost_user_blk::capabilities_json());
                return Ok(ExitCode::SUCCESS);
            }
            vhost_backend::Backend::Serve(cli) => cli,
        },
        None => cli::parse(args)?,
    };
    if cli.help {
        print!("{}", cli::HELP);
        return Ok(ExitCode::SUCCESS);
    }
    if cli.version {
        println!(
            "qsd version {} (compatible with qemu-storage-daemon {})",
            env!("CARGO_PKG_VERSION"),
            daemon::QEMU_COMPAT_VERSION_STR
        );
        return Ok(ExitCode::SUCCESS);
    }
    setup::init_logging(&cli.trace)?;
    let ready = if cli.daemonize {
        Some(daemonize::fork_and_wait()?)
    } else {
        None
    };
    setup::run_daemon(cli, ready)
}
