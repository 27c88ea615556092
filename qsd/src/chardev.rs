//! `--chardev socket,...`: the listening sockets QMP monitors are served on.

use std::os::fd::OwnedFd;

use anyhow::{anyhow, bail, Context, Result};
use qsd_qapi::options::ChardevSocketOptions;

/// A bound, listening socket waiting for a `--monitor` to claim it.
#[derive(Debug)]
pub enum Chardev {
    /// A unix socket (the path is removed when the daemon exits).
    Unix(std::os::unix::net::UnixListener, String),
    /// A TCP socket.
    Tcp(std::net::TcpListener),
    /// An already-connected stream passed as a file descriptor.
    Stream(OwnedFd),
}

/// Parse `--chardev` text (qemu's QemuOpts syntax, where `server` and
/// `nowait` may stand alone).
pub fn parse(arg: &str) -> Result<ChardevSocketOptions> {
    let parsed = qsd_qapi::keyval::parse_qemu_opts(arg, Some("backend"))?;
    for w in &parsed.warnings {
        tracing::warn!("--chardev {arg}: {w}");
    }
    Ok(ChardevSocketOptions::from_opts(&parsed.value)?)
}

/// Create the socket a parsed chardev describes; returns its id.
pub fn bind(o: ChardevSocketOptions) -> Result<(String, Chardev)> {
    if o.backend != "socket" {
        bail!(
            "chardev backend '{}' is not supported by qsd (use 'socket')",
            o.backend
        );
    }
    if o.fd.is_none() && o.server != Some(true) {
        bail!(
            "chardev '{}': only server sockets (server=on) are supported",
            o.id
        );
    }
    if o.wait == Some(true) {
        bail!("chardev '{}': wait=on is not supported; use wait=off", o.id);
    }
    let dev = match (&o.path, &o.host, &o.fd) {
        (Some(path), None, None) => bind_unix(path)?,
        (None, Some(host), None) => bind_tcp(host, o.port.as_deref())?,
        (None, None, Some(fd)) => Chardev::Stream(take_fd(fd)?),
        (None, None, None) => bail!("Unable to parse FD number "),
        _ => bail!("chardev '{}': give exactly one of path, host or fd", o.id),
    };
    Ok((o.id, dev))
}

fn bind_unix(path: &str) -> Result<Chardev> {
    // qemu removes a stale socket file before binding.
    if std::fs::metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        let _ = std::fs::remove_file(path);
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("Failed to bind socket to {path}"))?;
    Ok(Chardev::Unix(l, path.to_string()))
}

fn bind_tcp(host: &str, port: Option<&str>) -> Result<Chardev> {
    let port = port.ok_or_else(|| anyhow!("chardev: host requires port"))?;
    let l = std::net::TcpListener::bind((host, port.parse::<u16>().context("invalid port")?))
        .with_context(|| format!("Failed to bind socket to {host}:{port}"))?;
    Ok(Chardev::Tcp(l))
}

fn take_fd(fd: &str) -> Result<OwnedFd> {
    let n: i32 = fd
        .parse()
        .map_err(|_| anyhow!("Unable to parse FD number {fd}"))?;
    Ok(qsd_rt::process::take_inherited_fd(n)?)
}
