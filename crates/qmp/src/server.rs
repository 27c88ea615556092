//! Serving monitor connections: greeting, request loop, replies and events.
//!
//! Each connection is one task. Requests are handled strictly one at a time
//! and in order, as qemu does per monitor; the command itself runs as its own
//! task, so events are written while it runs, a slow client does not stall
//! it, and a client that disconnects mid-command does not cancel it (its
//! reply is discarded). While a command runs at most [`MAX_QUEUED`] further
//! inputs are buffered; then the connection is not read until it finishes.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::task::{JoinError, JoinHandle};

use crate::event::EventBus;
use crate::protocol::{response, Greeting, QmpError};
use crate::session::{Action, CommandInfo, Session};
use crate::writer::to_message;
use crate::{Error, JsonStreamer, ParseError};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Inputs buffered while a command runs before reading pauses (qemu: 8).
pub const MAX_QUEUED: usize = 8;

const READ_CHUNK: usize = 64 * 1024;

/// The daemon's command table.
pub trait Dispatcher: Send + Sync + 'static {
    /// Run one command (after negotiation). `args` is the `arguments`
    /// object (empty if absent). Unknown commands should fail with
    /// [`QmpError::command_not_found`].
    fn dispatch(
        &self,
        name: &str,
        args: Map<String, Value>,
    ) -> BoxFuture<'static, Result<Value, QmpError>>;

    /// Whether `name` exists and may run out of band; `None` if unknown.
    ///
    /// Used for `exec-oob`, whose errors depend on it. The default claims
    /// every command exists and none allows out-of-band execution
    /// (qemu-storage-daemon has no out-of-band commands).
    fn command_info(&self, name: &str) -> Option<CommandInfo> {
        let _ = name;
        Some(CommandInfo::default())
    }
}

struct InFlight {
    handle: JoinHandle<Result<Value, QmpError>>,
    id: Option<Value>,
    command: String,
}

struct Conn<W> {
    writer: W,
    pretty: bool,
    session: Session,
    bus: EventBus,
    events: Option<broadcast::Receiver<Arc<Value>>>,
    dispatcher: Arc<dyn Dispatcher>,
    pending: VecDeque<Result<Value, ParseError>>,
    in_flight: Option<InFlight>,
}

/// Serve one monitor connection until the client goes away.
///
/// Sends the greeting, then handles requests in order. `pretty` lays out
/// replies and events over several lines as qemu's `pretty=on` does.
/// Returns when the client closed the connection (after answering what it
/// sent), or with an error if writing failed or the client fell too far
/// behind on events.
pub async fn serve_stream<S>(
    stream: S,
    dispatcher: Arc<dyn Dispatcher>,
    events: EventBus,
    greeting: Greeting,
    pretty: bool,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let mut conn = Conn {
        writer,
        pretty,
        session: Session::new(),
        bus: events,
        events: None,
        dispatcher,
        pending: VecDeque::new(),
        in_flight: None,
    };
    conn.send(&greeting.to_value()).await?;
    let mut streamer = JsonStreamer::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut eof = false;
    loop {
        conn.start_pending().await?;
        if eof && conn.in_flight.is_none() && conn.pending.is_empty() {
            break;
        }
        let can_read = !eof && conn.pending.len() < MAX_QUEUED;
        tokio::select! {
            biased;
            ev = next_event(&mut conn.events) => conn.on_event(ev).await?,
            res = wait_command(&mut conn.in_flight) => conn.finish_command(res).await?,
            n = reader.read(&mut buf), if can_read => {
                let n = n?;
                let items = if n == 0 {
                    eof = true;
                    streamer.finish()
                } else {
                    streamer.feed(buf.get(..n).unwrap_or_default())
                };
                conn.accept(items).await?;
            }
        }
    }
    // The client may have only shut down its sending side; it has its
    // replies now. Failing to shut down ours is of no consequence.
    let _ = conn.writer.shutdown().await;
    Ok(())
}

/// qemu's test: `exec-oob` present and `execute` absent.
fn is_oob(item: &Result<Value, ParseError>) -> bool {
    matches!(item, Ok(Value::Object(m)) if m.contains_key("exec-oob") && !m.contains_key("execute"))
}

async fn next_event(
    rx: &mut Option<broadcast::Receiver<Arc<Value>>>,
) -> Result<Arc<Value>, RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn wait_command(
    in_flight: &mut Option<InFlight>,
) -> Result<Result<Value, QmpError>, JoinError> {
    match in_flight {
        Some(f) => (&mut f.handle).await,
        None => std::future::pending().await,
    }
}

impl<S: AsyncWrite> Conn<WriteHalf<S>> {
    async fn send(&mut self, message: &Value) -> Result<(), Error> {
        let text = to_message(message, self.pretty);
        self.writer.write_all(text.as_bytes()).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Queue new inputs. Out-of-band requests that will be refused are
    /// answered at once, ahead of a running command, as qemu does; those
    /// that may run out of band are queued in order like the rest.
    async fn accept(&mut self, items: Vec<Result<Value, ParseError>>) -> Result<(), Error> {
        for item in items {
            if !self.session.oob_enabled() || !is_oob(&item) || self.oob_runnable(&item) {
                self.pending.push_back(item);
                continue;
            }
            let dispatcher = Arc::clone(&self.dispatcher);
            match self
                .session
                .handle(item, |name| dispatcher.command_info(name))
            {
                Action::Reply(reply) => self.send(&reply).await?,
                // Not reached: oob_runnable() said no.
                Action::Dispatch(req) => {
                    tracing::warn!(command = %req.command, "dropped OOB request")
                }
            }
        }
        Ok(())
    }

    /// Whether an `exec-oob` item names a command allowed to run out of band.
    fn oob_runnable(&self, item: &Result<Value, ParseError>) -> bool {
        let name = item
            .as_ref()
            .ok()
            .and_then(|v| v.get("exec-oob"))
            .and_then(Value::as_str);
        name.and_then(|n| self.dispatcher.command_info(n))
            .is_some_and(|info| info.allow_oob)
    }

    /// Handle queued inputs until one needs a command to run.
    async fn start_pending(&mut self) -> Result<(), Error> {
        while self.in_flight.is_none() {
            let Some(item) = self.pending.pop_front() else {
                break;
            };
            let dispatcher = Arc::clone(&self.dispatcher);
            let action = self
                .session
                .handle(item, |name| dispatcher.command_info(name));
            if self.session.is_negotiated() && self.events.is_none() {
                self.events = Some(self.bus.subscribe());
            }
            match action {
                Action::Reply(reply) => self.send(&reply).await?,
                Action::Dispatch(req) => {
                    tracing::debug!(command = %req.command, "QMP command");
                    let fut = dispatcher.dispatch(&req.command, req.arguments);
                    self.in_flight = Some(InFlight {
                        handle: tokio::spawn(fut),
                        id: req.id,
                        command: req.command,
                    });
                }
            }
        }
        Ok(())
    }

    async fn on_event(&mut self, ev: Result<Arc<Value>, RecvError>) -> Result<(), Error> {
        match ev {
            Ok(message) => self.send(&message).await,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "QMP client not reading events; disconnecting it");
                Err(Error::EventBacklog { missed })
            }
            Err(RecvError::Closed) => {
                self.events = None;
                Ok(())
            }
        }
    }

    async fn finish_command(
        &mut self,
        res: Result<Result<Value, QmpError>, JoinError>,
    ) -> Result<(), Error> {
        let Some(done) = self.in_flight.take() else {
            return Ok(());
        };
        // Events the command emitted go out before its reply, as in qemu.
        self.drain_events().await?;
        let result = res.unwrap_or_else(|e| {
            tracing::error!(command = %done.command, error = %e, "QMP command task failed");
            Err(QmpError::generic(format!(
                "Command {} failed unexpectedly",
                done.command
            )))
        });
        self.send(&response(result, done.id)).await
    }

    async fn drain_events(&mut self) -> Result<(), Error> {
        loop {
            let ev = match self.events.as_mut().map(|rx| rx.try_recv()) {
                None | Some(Err(TryRecvError::Empty)) => return Ok(()),
                Some(Ok(m)) => Ok(m),
                Some(Err(TryRecvError::Lagged(n))) => Err(RecvError::Lagged(n)),
                Some(Err(TryRecvError::Closed)) => Err(RecvError::Closed),
            };
            self.on_event(ev).await?;
        }
    }
}

/// Accepts monitor clients and serves each on its own task.
///
/// qemu's socket character device serves one client at a time; we serve
/// any number concurrently. Each has its own negotiation state and receives
/// events once negotiated.
#[derive(Clone)]
pub struct Monitor {
    inner: Arc<MonitorInner>,
}

struct MonitorInner {
    dispatcher: Arc<dyn Dispatcher>,
    events: EventBus,
    greeting: Greeting,
    pretty: bool,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("greeting", &self.inner.greeting)
            .field("pretty", &self.inner.pretty)
            .finish_non_exhaustive()
    }
}

impl Monitor {
    /// A monitor answering with `dispatcher` and forwarding `events`.
    pub fn new(
        dispatcher: Arc<dyn Dispatcher>,
        events: EventBus,
        greeting: Greeting,
        pretty: bool,
    ) -> Self {
        Self {
            inner: Arc::new(MonitorInner {
                dispatcher,
                events,
                greeting,
                pretty,
            }),
        }
    }

    /// Serve an already-connected stream (e.g. an inherited socket fd
    /// turned into a tokio stream) on a new task.
    pub fn spawn_stream<S>(&self, stream: S) -> JoinHandle<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            let served = serve_stream(
                stream,
                Arc::clone(&inner.dispatcher),
                inner.events.clone(),
                inner.greeting.clone(),
                inner.pretty,
            )
            .await;
            match served {
                Ok(()) => tracing::debug!("QMP client disconnected"),
                Err(e) => tracing::info!(error = %e, "QMP connection ended"),
            }
        })
    }

    /// Accept clients on a UNIX socket forever (abort the task to stop).
    pub async fn serve_unix(&self, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    self.spawn_stream(stream);
                }
                Err(e) => accept_failed(&e).await,
            }
        }
    }

    /// Accept clients on a TCP socket forever (abort the task to stop).
    pub async fn serve_tcp(&self, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tracing::debug!(%peer, "QMP client connected");
                    // Small request/response messages: do not wait to batch.
                    let _ = stream.set_nodelay(true);
                    self.spawn_stream(stream);
                }
                Err(e) => accept_failed(&e).await,
            }
        }
    }
}

/// Accept errors are mostly transient (EMFILE, ECONNABORTED): log, back off.
async fn accept_failed(e: &std::io::Error) {
    tracing::warn!(error = %e, "accepting a QMP client failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
