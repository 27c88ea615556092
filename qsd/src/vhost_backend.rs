//! The vhost-user back-end program convention (qemu's
//! docs/interop/vhost-user.rst, "Backend program conventions"): management
//! tools such as libvirt find a back-end through a description file and
//! start it as `BINARY --print-capabilities` or `BINARY --socket-path=PATH
//! --blk-file=FILE [--read-only]` (or `--fd=N` instead of the socket path).
//! qsd answers that command line itself; it is translated into a `file`
//! node and one vhost-user-blk export. **Extension**: qemu-storage-daemon
//! does not read these options.

use std::ffi::OsString;

use anyhow::{anyhow, bail, Result};
use serde_json::json;

use crate::cli::{Cli, Item};

/// What a back-end command line asks for.
#[derive(Debug, PartialEq)]
pub enum Backend {
    /// `--print-capabilities`: the JSON on stdout, then exit.
    PrintCapabilities,
    /// Serve the file over vhost-user-blk.
    Serve(Cli),
}

const OPTIONS: &[&str] = &[
    "--print-capabilities",
    "--socket-path",
    "--fd",
    "--blk-file",
    "--read-only",
];

fn is_convention_option(arg: &OsString) -> bool {
    let s = arg.to_string_lossy();
    OPTIONS
        .iter()
        .any(|o| s == *o || s.starts_with(&format!("{o}=")))
}

/// `None` unless the command line uses the back-end convention.
pub fn parse(args: &[OsString]) -> Option<Result<Backend>> {
    if !args.iter().any(is_convention_option) {
        return None;
    }
    Some(parse_convention(args))
}

fn parse_convention(args: &[OsString]) -> Result<Backend> {
    let mut p = lexopt::Parser::from_args(args.iter().cloned());
    let (mut socket, mut fd, mut file, mut read_only, mut caps) = (None, None, None, false, false);
    while let Some(arg) = p.next().map_err(|e| anyhow!("{e}"))? {
        use lexopt::Arg::Long;
        match arg {
            Long("print-capabilities") => caps = true,
            Long("read-only") => read_only = true,
            Long("socket-path") => socket = Some(value(&mut p)?),
            Long("fd") => fd = Some(value(&mut p)?),
            Long("blk-file") => file = Some(value(&mut p)?),
            other => bail!(
                "{}: not a vhost-user back-end option (--print-capabilities, --socket-path, \
                 --fd, --blk-file, --read-only)",
                describe(other)
            ),
        }
    }
    if caps {
        return Ok(Backend::PrintCapabilities);
    }
    let addr = match (socket, fd) {
        (Some(path), None) => json!({"type": "unix", "path": path}),
        (None, Some(fd)) => json!({"type": "fd", "str": fd}),
        (Some(_), Some(_)) => bail!("--socket-path and --fd cannot be used together"),
        (None, None) => bail!("--socket-path or --fd is required"),
    };
    let Some(file) = file else {
        bail!("--blk-file is required");
    };
    let node = json!({"driver": "file", "node-name": "blk-file", "filename": file,
                      "read-only": read_only});
    let export = json!({"type": "vhost-user-blk", "id": "vhost-user-blk0",
                        "node-name": "blk-file", "addr": addr, "writable": !read_only});
    Ok(Backend::Serve(Cli {
        items: vec![
            Item::Blockdev(node.to_string()),
            Item::Export(export.to_string()),
        ],
        ..Cli::default()
    }))
}

fn value(p: &mut lexopt::Parser) -> Result<String> {
    let v = p.value().map_err(|e| anyhow!("{e}"))?;
    v.into_string()
        .map_err(|v| anyhow!("{}: not valid UTF-8", v.to_string_lossy()))
}

fn describe(arg: lexopt::Arg<'_>) -> String {
    match arg {
        lexopt::Arg::Long(l) => format!("--{l}"),
        lexopt::Arg::Short(c) => format!("-{c}"),
        lexopt::Arg::Value(v) => v.to_string_lossy().into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn test_backend_plain_daemon_options_are_not_the_convention() {
        assert!(parse(&args(&["--blockdev", "null-co,node-name=n"])).is_none());
    }

    #[test]
    fn test_backend_print_capabilities() {
        let b = parse(&args(&["--print-capabilities"])).unwrap().unwrap();
        assert_eq!(b, Backend::PrintCapabilities);
    }

    #[test]
    fn test_backend_socket_and_file_become_node_and_export() {
        let b = parse(&args(&[
            "--socket-path=/s,x",
            "--blk-file",
            "/i,mg",
            "--read-only",
        ]))
        .unwrap()
        .unwrap();
        let Backend::Serve(cli) = b else {
            panic!("not a serve command line")
        };
        let node: serde_json::Value = serde_json::from_str(cli.items[0].arg()).unwrap();
        assert_eq!(node["filename"], "/i,mg");
        assert_eq!(node["read-only"], true);
        let exp: serde_json::Value = serde_json::from_str(cli.items[1].arg()).unwrap();
        assert_eq!(exp["addr"], json!({"type": "unix", "path": "/s,x"}));
        assert_eq!(exp["writable"], false);
    }

    #[test]
    fn test_backend_errors() {
        let e = |v: &[&str]| parse(&args(v)).unwrap().unwrap_err().to_string();
        assert_eq!(e(&["--blk-file=/i"]), "--socket-path or --fd is required");
        assert_eq!(e(&["--socket-path=/s"]), "--blk-file is required");
        assert_eq!(
            e(&["--fd=3", "--socket-path=/s", "--blk-file=/i"]),
            "--socket-path and --fd cannot be used together"
        );
        assert!(e(&["--blk-file=/i", "--blockdev", "x"]).starts_with("--blockdev: not a"));
    }
}
