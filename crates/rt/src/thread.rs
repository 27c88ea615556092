//! Runtimes with an io_uring ring: the main thread's and I/O threads'.
//!
//! Each is a tokio current-thread runtime whose thread owns one ring. The
//! runtime's park hook submits queued SQEs before the thread sleeps, and a
//! reaper task spawned on it turns completions into wake-ups.

use std::future::Future;
use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::runtime::{Handle, Runtime};
use tokio::sync::oneshot;

use crate::ring;

/// A current-thread runtime with I/O and timers, whose park hook submits the
/// thread's pending io_uring operations. Run it with [`block_on_with_ring`].
pub fn build_runtime(name: &str) -> io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .thread_name(name)
        .on_thread_park(ring::park_hook)
        .build()
}

/// Run `f` to completion on `rt`, with the calling thread's io_uring ring
/// installed (created on first use; kept for later calls on this thread) and
/// its reaper running. Without io_uring, this is `rt.block_on(f)` and file
/// I/O goes to the thread pool.
pub fn block_on_with_ring<F: Future>(rt: &Runtime, f: F) -> F::Output {
    let Some(ring) = ring::current_or_install() else {
        return rt.block_on(f);
    };
    rt.block_on(async move {
        let reaper = tokio::spawn(ring::reaper(ring));
        let out = f.await;
        reaper.abort();
        // Wait for the cancellation: the scheduler drops an aborted task
        // only when it gets to run, and after a future that finished
        // without ever yielding it would not, so repeated calls (a fuzz
        // target's) would pile the reapers up.
        let _ = reaper.await;
        out
    })
}

/// Run the daemon's main future on the calling thread: builds the runtime,
/// runs `f` with the thread's ring, then drops the runtime (and its remaining
/// tasks) and tears the ring down once the kernel is done with its buffers.
pub fn run_main<F: Future>(f: F) -> io::Result<F::Output> {
    let rt = build_runtime("qsd-main")?;
    let out = block_on_with_ring(&rt, f);
    drop(rt);
    ring::shutdown_current();
    Ok(out)
}

/// Spawn `fut` on the current runtime after polling it once here, so that
/// the I/O it starts is pushed to this thread's ring (and, for an `O_DIRECT`
/// file, submitted) before the caller goes on; a plain spawn would start
/// it only when the scheduler gets to the task. Returns at once if that
/// first poll finishes it.
///
/// The first poll sees a no-op waker: whatever it waits on is polled again
/// by the task, which registers the task's waker (futures must wake the
/// waker of their latest poll), and the task is scheduled at spawn.
pub fn spawn_started<F>(fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut fut = Box::pin(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if fut.as_mut().poll(&mut cx).is_pending() {
        tokio::spawn(fut);
    }
}

/// True if the calling thread has an io_uring ring installed.
pub fn current_has_ring() -> bool {
    ring::current().is_some()
}

/// An I/O thread (`--object iothread,id=X`): a named OS thread running a
/// current-thread runtime with its own ring until stopped.
#[derive(Debug)]
pub struct IoThread {
    id: String,
    handle: Handle,
    tid: i32,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Start the thread; returns once its runtime is ready for tasks.
    pub fn spawn(id: &str) -> io::Result<IoThread> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        // Linux keeps the first 15 bytes of a thread name.
        let name = format!("qsd-iothread-{id}");
        let join = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || iothread_main(&name, ready_tx, stop_rx))?;
        match ready_rx.recv() {
            Ok(Ok((handle, tid))) => Ok(IoThread {
                id: id.to_owned(),
                handle,
                tid,
                stop: Some(stop_tx),
                join: Some(join),
            }),
            Ok(Err(e)) => {
                let _ = join.join();
                Err(e)
            }
            Err(_) => {
                let _ = join.join();
                Err(io::Error::other(format!(
                    "I/O thread '{id}' failed to start"
                )))
            }
        }
    }

    /// The id given at creation.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Handle to spawn tasks onto this thread.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// The thread's Linux TID (`thread-id` in `query-iothreads`).
    pub fn thread_id(&self) -> i32 {
        self.tid
    }

    /// Stop the thread and wait for it: its tasks are dropped, then its ring
    /// waits (up to a bounded time) for operations the kernel still owns;
    /// buffers of operations that outlive that wait are leaked, never freed.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(join) = self.join.take() {
            if join.join().is_err() {
                tracing::error!(iothread = %self.id, "I/O thread panicked");
            }
        }
    }
}

impl Drop for IoThread {
    /// Same as [`IoThread::stop`]: blocks until the thread has exited.
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

type Ready = io::Result<(Handle, i32)>;

fn iothread_main(name: &str, ready: mpsc::Sender<Ready>, stop: oneshot::Receiver<()>) {
    let rt = match build_runtime(name) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    if ready.send(Ok((rt.handle().clone(), tid))).is_err() {
        return;
    }
    block_on_with_ring(&rt, async {
        // A dropped sender (IoThread dropped) stops the thread too.
        let _ = stop.await;
    });
    // Dropping the runtime drops the tasks; their operations become orphans
    // that the ring shutdown below waits for.
    drop(rt);
    ring::shutdown_current();
}
