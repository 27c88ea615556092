//! Start-up and shut-down: options set up in order, monitors served,
//! signals turned into an orderly stop.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use qsd_qapi::options::{MonitorMode, MonitorOptions};
use qsd_qapi::{parse_option, InputMode};
use serde_json::Value;

use crate::chardev::Chardev;
use crate::cli::{Cli, Item};
use crate::commands::Commands;
use crate::daemon::{Daemon, StopReason};
use crate::daemonize::ReadySignal;
use crate::{chardev, exports, objects};

/// Set up logging to stderr. `-T` patterns are tracing filter directives;
/// `QSD_LOG` (env-filter syntax) works too. The default shows warnings.
pub fn init_logging(patterns: &[String]) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let mut filter = EnvFilter::try_from_env("QSD_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    for p in patterns {
        let p = p.strip_prefix("enable=").unwrap_or(p);
        let directive = p
            .parse()
            .map_err(|e| anyhow!("-T {p}: invalid trace pattern: {e}"))?;
        filter = filter.add_directive(directive);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

/// Build the main runtime, set everything up, serve until stopped.
pub fn run_daemon(cli: Cli, ready: Option<ReadySignal>) -> Result<ExitCode> {
    let rt = qsd_rt::build_runtime("qsd-main").context("cannot start the main runtime")?;
    qsd_rt::block_on_with_ring(&rt, async move {
        let daemon = Arc::new(Daemon::new());
        if let Err(e) = setup_all(&daemon, &cli).await {
            if let Some(r) = ready {
                r.failed();
            }
            shutdown(&daemon).await;
            return Err(e);
        }
        if let Some(path) = &cli.pidfile {
            write_pidfile(path)?;
        }
        if let Some(r) = ready {
            r.done();
        }
        let reason = wait_for_stop(&daemon).await;
        tracing::info!("stopping: {reason:?}");
        if reason == StopReason::Quit || reason == StopReason::Signal {
            shutdown(&daemon).await;
        }
        if let Some(path) = &cli.pidfile {
            let _ = std::fs::remove_file(path);
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn setup_all(d: &Arc<Daemon>, cli: &Cli) -> Result<()> {
    for item in &cli.items {
        setup_item(d, item)
            .await
            .map_err(|e| anyhow!("{} {}: {e:#}", item.flag(), item.arg()))?;
    }
    Ok(())
}

fn parse(arg: &str, implied: Option<&str>) -> Result<(serde_json::Map<String, Value>, InputMode)> {
    let (v, mode) = parse_option(arg, implied)?;
    match v {
        Value::Object(m) => Ok((m, mode)),
        _ => bail!("the option must be an object"),
    }
}

async fn setup_item(d: &Arc<Daemon>, item: &Item) -> Result<()> {
    match item {
        Item::Blockdev(a) => {
            let (opts, mode) = parse(a, Some("driver"))?;
            d.graph.lock().await.open(opts, mode).await?;
        }
        Item::Object(a) => {
            let (opts, mode) = parse(a, Some("qom-type"))?;
            d.object_tables(|t| objects::add(t, opts, mode))?;
        }
        Item::Chardev(a) => {
            let opts = chardev::parse(a)?;
            if d.chardevs().contains_key(&opts.id) {
                bail!(
                    "attempt to add duplicate property '{}' to object (type 'container')",
                    opts.id
                );
            }
            let (id, dev) = chardev::bind(opts)?;
            d.chardevs().insert(id, dev);
        }
        Item::Monitor(a) => {
            let (opts, mode) = parse(a, Some("chardev"))?;
            start_monitor(d, opts, mode)?;
        }
        Item::NbdServer(a) => {
            let (opts, mode) = parse(a, None)?;
            exports::cli_nbd_server(d, opts, mode).await?;
        }
        Item::Export(a) => {
            let (opts, mode) = parse(a, Some("type"))?;
            exports::add(d, opts, mode).await?;
        }
    }
    Ok(())
}

fn start_monitor(
    d: &Arc<Daemon>,
    opts: serde_json::Map<String, Value>,
    mode: InputMode,
) -> Result<()> {
    let m: MonitorOptions = qsd_qapi::from_value(&Value::Object(opts), mode)?;
    if m.mode() != MonitorMode::Control {
        bail!("Only QMP is supported");
    }
    let dev = d
        .chardevs()
        .remove(&m.chardev)
        .ok_or_else(|| anyhow!("chardev \"{}\" not found", m.chardev))?;
    let (major, minor, micro) = crate::daemon::QEMU_COMPAT_VERSION;
    let greeting = qsd_qmp::Greeting {
        major,
        minor,
        micro,
        package: format!("qsd {}", env!("CARGO_PKG_VERSION")),
    };
    let dispatcher: Arc<dyn qsd_qmp::Dispatcher> = Arc::new(Commands(d.clone()));
    let monitor = qsd_qmp::Monitor::new(
        dispatcher,
        d.events.clone(),
        greeting,
        m.pretty.unwrap_or(false),
    );
    match dev {
        Chardev::Unix(l, path) => {
            l.set_nonblocking(true)?;
            let l = tokio::net::UnixListener::from_std(l)?;
            d.remember_socket(path);
            tokio::spawn(async move { monitor.serve_unix(l).await });
        }
        Chardev::Tcp(l) => {
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            tokio::spawn(async move { monitor.serve_tcp(l).await });
        }
        Chardev::Stream(fd) => {
            let s = std::os::unix::net::UnixStream::from(fd);
            s.set_nonblocking(true)?;
            monitor.spawn_stream(tokio::net::UnixStream::from_std(s)?);
        }
    }
    Ok(())
}

fn write_pidfile(path: &str) -> Result<()> {
    std::fs::write(path, format!("{}\n", std::process::id()))
        .with_context(|| format!("cannot write pid file '{path}'"))
}

async fn wait_for_stop(d: &Daemon) -> StopReason {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with 'quit' over QMP");
        return d.stopped().await;
    };
    tokio::select! {
        r = d.stopped() => r,
        _ = term.recv() => StopReason::Signal,
        _ = int.recv() => StopReason::Signal,
        _ = hup.recv() => StopReason::Signal,
    }
}

/// Orderly stop: stop accepting clients, remove exports (completing
/// requests in flight), flush and close every node, stop I/O threads.
async fn shutdown(d: &Arc<Daemon>) {
    let reason = if d.stopped_reason_is_quit() {
        "host-qmp-quit"
    } else {
        "host-signal"
    };
    d.events.emit(
        "SHUTDOWN",
        serde_json::json!({"guest": false, "reason": reason}),
    );
    exports::shutdown(d).await;
    d.graph.lock().await.close_all().await;
    d.iothreads().stop_all();
    for (_, dev) in std::mem::take(&mut *d.chardevs()) {
        if let Chardev::Unix(_, path) = dev {
            d.remember_socket(path);
        }
    }
    d.remove_sockets();
    // Let monitor sessions write the events above before the process exits.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
}
