//! The command line, as qemu-storage-daemon reads it: options are kept in
//! the order given, because each is set up in turn (a `--blockdev` may name a
//! node made by an earlier one).

use std::ffi::OsString;

use anyhow::{bail, Result};

/// One option that creates something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// `--blockdev`
    Blockdev(String),
    /// `--object`
    Object(String),
    /// `--chardev`
    Chardev(String),
    /// `--monitor`
    Monitor(String),
    /// `--nbd-server`
    NbdServer(String),
    /// `--export`
    Export(String),
}

impl Item {
    /// The option's name as the user typed it, for error messages.
    pub fn flag(&self) -> &'static str {
        match self {
            Item::Blockdev(_) => "--blockdev",
            Item::Object(_) => "--object",
            Item::Chardev(_) => "--chardev",
            Item::Monitor(_) => "--monitor",
            Item::NbdServer(_) => "--nbd-server",
            Item::Export(_) => "--export",
        }
    }

    /// The option's argument.
    pub fn arg(&self) -> &str {
        match self {
            Item::Blockdev(a)
            | Item::Object(a)
            | Item::Chardev(a)
            | Item::Monitor(a)
            | Item::NbdServer(a)
            | Item::Export(a) => a,
        }
    }
}

/// The whole command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cli {
    /// Creating options, in order.
    pub items: Vec<Item>,
    /// `--pidfile`
    pub pidfile: Option<String>,
    /// `--daemonize`
    pub daemonize: bool,
    /// `-T/--trace` patterns (a tracing filter).
    pub trace: Vec<String>,
    /// `-h/--help`
    pub help: bool,
    /// `-V/--version`
    pub version: bool,
}

/// Parse arguments (without the program name). Errors are worded as
/// qemu-storage-daemon's (getopt's) are.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Cli> {
    use lexopt::prelude::*;
    let mut cli = Cli::default();
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next().map_err(lexopt_error)? {
        let key = match arg {
            Short(c) => format!("-{c}"),
            Long(l) => format!("--{l}"),
            Value(v) => bail!("{}: Unexpected argument", v.to_string_lossy()),
        };
        let item = |f: fn(String) -> Item, p: &mut lexopt::Parser| take_value(p, &key).map(f);
        match key.as_str() {
            "-h" | "--help" => cli.help = true,
            "-V" | "--version" => cli.version = true,
            "-T" | "--trace" => cli.trace.push(take_value(&mut p, &key)?),
            "--blockdev" => cli.items.push(item(Item::Blockdev, &mut p)?),
            "--object" => cli.items.push(item(Item::Object, &mut p)?),
            "--chardev" => cli.items.push(item(Item::Chardev, &mut p)?),
            "--monitor" => cli.items.push(item(Item::Monitor, &mut p)?),
            "--nbd-server" => cli.items.push(item(Item::NbdServer, &mut p)?),
            "--export" => cli.items.push(item(Item::Export, &mut p)?),
            "--pidfile" => cli.pidfile = Some(take_value(&mut p, &key)?),
            "--daemonize" => cli.daemonize = true,
            k if k.starts_with("--") => bail!("unrecognized option '{k}'"),
            k => bail!("invalid option -- '{}'", &k[1..]),
        }
    }
    Ok(cli)
}

fn take_value(p: &mut lexopt::Parser, name: &str) -> Result<String> {
    match p.value() {
        Ok(v) => v
            .into_string()
            .map_err(|_| anyhow::anyhow!("{name}: argument is not valid UTF-8")),
        Err(_) => bail!("option '{name}' requires an argument"),
    }
}

fn lexopt_error(e: lexopt::Error) -> anyhow::Error {
    match e {
        lexopt::Error::UnexpectedValue { option, .. } => {
            anyhow::anyhow!("option '{option}' doesn't allow an argument")
        }
        other => anyhow::anyhow!("{other}"),
    }
}

/// `--help` text: qemu-storage-daemon's options, plus where we differ.
pub const HELP: &str = "\
Usage: qsd [options]
qsd: a storage daemon compatible with qemu-storage-daemon

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>]
                         enable log output for a tracing filter pattern
                         (for example 'qsd_export_nbd=debug'); see docs/cli.md
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend
                         (drivers: file, host_device, raw, qcow2, luks, null-co,
                         null-aio, throttle, quorum, blkdebug, blkverify, compress)

  --chardev socket,id=<id>,path=<path>|host=<host>,port=<port>|fd=<fd>
            [,server=on][,wait=off]
                         configure a character device backend (for --monitor)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,description=<text>][,iothread=<id>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object iothread,id=<id>
                         create an I/O thread

  --pidfile <path>       write process ID to a file after startup

Documentation: docs/ in the qsd source tree.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn test_parse_keeps_order_of_items() {
        let cli = parse(args(&[
            "--blockdev",
            "a",
            "--export",
            "b",
            "--blockdev",
            "c",
        ]))
        .unwrap();
        assert_eq!(
            cli.items,
            vec![
                Item::Blockdev("a".into()),
                Item::Export("b".into()),
                Item::Blockdev("c".into())
            ]
        );
    }

    #[test]
    fn test_parse_equals_form_and_flags() {
        let cli = parse(args(&["--pidfile=/p", "--daemonize", "-T", "x=debug"])).unwrap();
        assert_eq!(cli.pidfile.as_deref(), Some("/p"));
        assert!(cli.daemonize);
        assert_eq!(cli.trace, vec!["x=debug".to_string()]);
    }

    #[test]
    fn test_parse_errors_are_worded_like_getopt() {
        let e = parse(args(&["--foo"])).unwrap_err().to_string();
        assert_eq!(e, "unrecognized option '--foo'");
        let e = parse(args(&["--blockdev"])).unwrap_err().to_string();
        assert_eq!(e, "option '--blockdev' requires an argument");
        let e = parse(args(&["extra"])).unwrap_err().to_string();
        assert_eq!(e, "extra: Unexpected argument");
    }
}
