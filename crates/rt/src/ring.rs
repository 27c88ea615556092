//! The per-thread io_uring reactor.
//!
//! A [`Ring`] is created on one thread and installed in that thread's
//! thread-local slot. Operations started on the thread push their SQE at once
//! and record themselves in the ring's operation table ([`crate::op`]); the
//! SQEs are submitted together, by one `io_uring_enter`, when the reaper task
//! runs (it is woken by the first push of a batch, so it runs after the tasks
//! already queued in this tick) or when the runtime is about to park.
//! Operations on a [`crate::Submit::Eager`] descriptor (`O_DIRECT` files)
//! are submitted by the push itself while the thread has few operations in
//! the kernel ([`EAGER_DEPTH`]), so that the device starts on a burst of
//! requests while the rest of it is still being prepared. The
//! reaper also waits on an eventfd registered with the ring, drains the
//! completion queue and wakes the waiting futures.
//!
//! Only the owning thread ever calls `io_uring_enter` (the ring may be set up
//! with `SINGLE_ISSUER`/`DEFER_TASKRUN`); other threads may poll or drop an
//! operation's future, which only touches the table under the mutex.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, EnterFlags, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::op::Table;

/// Submission queue size of each thread's ring.
const RING_ENTRIES: u32 = 256;

/// An [`crate::Submit::Eager`] operation is given to the kernel at once
/// while at most this many of the thread's operations are there (itself
/// included); above it, the device has enough to work on and the
/// operation waits for the end of the pass like the others.
pub(crate) const EAGER_DEPTH: usize = 16;

/// How long a ring being torn down waits for operations the kernel still owns.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

thread_local! {
    static CURRENT: Installed = const { Installed(RefCell::new(None)) };
}

/// The thread-local slot; a ring still installed when the thread exits is
/// shut down properly (its in-flight operations waited for).
struct Installed(RefCell<Option<Arc<Ring>>>);

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(ring) = self.0.get_mut().take() {
            ring.shutdown();
        }
    }
}

/// One thread's io_uring instance and its table of in-flight operations.
pub(crate) struct Ring {
    state: Mutex<State>,
    eventfd: OwnedFd,
    /// Completions are posted only when the owner enters with GETEVENTS.
    defer_taskrun: bool,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("defer_taskrun", &self.defer_taskrun)
            .finish_non_exhaustive()
    }
}

/// Everything behind the ring's mutex.
pub(crate) struct State {
    pub(crate) uring: IoUring,
    pub(crate) table: Table,
    /// SQEs that did not fit in the submission queue yet, oldest first.
    pub(crate) backlog: VecDeque<squeue::Entry>,
    /// Operations whose SQE was pushed to the SQ and whose CQE has not arrived.
    pub(crate) in_kernel: usize,
    /// At most this many operations are given to the kernel at once, so the
    /// completion queue cannot overflow.
    pub(crate) max_in_kernel: usize,
    /// Waker of the reaper task.
    pub(crate) reaper: Option<Waker>,
    /// A submission is due (the reaper was woken for it).
    pub(crate) flush_requested: bool,
    /// The ring is being torn down: no new operations.
    pub(crate) closed: bool,
    /// Number of io_uring_enter calls made (for tests and benchmarks).
    pub(crate) enters: u64,
    /// The ring keeps `IORING_SQ_TASKRUN` up to date (IORING_SETUP_TASKRUN_FLAG).
    pub(crate) taskrun_flag: bool,
    /// The eventfd registered with the ring (owned by `Ring`).
    eventfd: RawFd,
}

/// Things to do after the mutex is released: wake tasks, drop payloads.
#[derive(Default)]
pub(crate) struct Deferred {
    pub(crate) wakers: Vec<Waker>,
    pub(crate) garbage: Vec<crate::op::Payload>,
}

impl Deferred {
    fn run(self) {
        drop(self.garbage);
        for w in self.wakers {
            w.wake();
        }
    }
}

impl Ring {
    /// Create a ring owned by the calling thread, with the fastest set-up the
    /// kernel accepts.
    pub(crate) fn new() -> io::Result<Arc<Ring>> {
        Self::with_defer(true)
    }

    /// As `new`; `try_defer` false skips `DEFER_TASKRUN` (tests the plain mode).
    pub(crate) fn with_defer(try_defer: bool) -> io::Result<Arc<Ring>> {
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let (uring, defer_taskrun, taskrun_flag) = build_uring(eventfd.as_raw_fd(), try_defer)?;
        let max_in_kernel = uring.params().cq_entries() as usize;
        let state = State {
            uring,
            table: Table::default(),
            backlog: VecDeque::new(),
            in_kernel: 0,
            max_in_kernel,
            reaper: None,
            flush_requested: false,
            closed: false,
            enters: 0,
            taskrun_flag,
            eventfd: eventfd.as_raw_fd(),
        };
        Ok(Arc::new(Ring {
            state: Mutex::new(state),
            eventfd,
            defer_taskrun,
        }))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the table consistent enough to
        // keep going: every mutation is a single step.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the ring uses `DEFER_TASKRUN`.
    #[cfg(test)]
    pub(crate) fn uses_defer_taskrun(&self) -> bool {
        self.defer_taskrun
    }

    /// True unless the ring's TASKRUN flag says no deferred completion is
    /// waiting to be posted (then an enter would find nothing to do).
    fn task_work_pending(&self) -> bool {
        let mut st = self.lock();
        !st.taskrun_flag || st.uring.submission().taskrun()
    }

    /// Ask the reaper to submit soon (called after pushing an SQE).
    pub(crate) fn request_flush(state: &mut State) -> Option<Waker> {
        if state.flush_requested {
            return None;
        }
        state.flush_requested = true;
        state.reaper.clone()
    }

    /// Submit what is queued and reap what has completed. Only the owning
    /// thread calls this (the reaper, the park hook, shutdown).
    /// `force_enter` enters the kernel even with nothing to submit, which a
    /// `DEFER_TASKRUN` ring needs to post its completions.
    pub(crate) fn turn(&self, force_enter: bool) {
        let mut deferred = Deferred::default();
        {
            let mut st = self.lock();
            st.flush_requested = false;
            st.turn(force_enter, &mut deferred);
        }
        deferred.run();
    }

    /// Submit pending SQEs if there are any (the runtime's park hook).
    pub(crate) fn flush_if_pending(&self) {
        let pending = {
            let mut st = self.lock();
            st.flush_requested || !st.backlog.is_empty() || !st.uring.submission().is_empty()
        };
        if pending {
            self.turn(false);
        }
    }

    /// Tear the ring down on its owning thread: fail operations the kernel
    /// never saw, then wait (bounded) for those it owns. Operations still
    /// owned by the kernel after the wait keep their buffers forever (leaked)
    /// and their futures resolve with an error and an empty buffer.
    pub(crate) fn shutdown(&self) {
        let mut deferred = Deferred::default();
        self.lock().cancel_backlog(&mut deferred);
        deferred.run();
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        loop {
            self.turn(true);
            let left = self.lock().in_kernel;
            if left == 0 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    ops = left,
                    "io_uring ops still running at shutdown; leaking their buffers"
                );
                let mut deferred = Deferred::default();
                self.lock().table.abandon_in_kernel(&mut deferred);
                deferred.run();
                break;
            }
            wait_readable(self.eventfd.as_raw_fd(), deadline - now);
            drain_eventfd(self.eventfd.as_raw_fd());
        }
    }
}

impl State {
    fn turn(&mut self, force_enter: bool, out: &mut Deferred) {
        let mut force = force_enter;
        // Bounded: each round either empties the backlog or stops making progress.
        for _ in 0..8 {
            self.fill_from_backlog(out);
            let pending = self.uring.submission().len();
            if pending > 0 || force {
                if let Err(e) = self.enter(pending as u32) {
                    tracing::warn!(error = %e, "io_uring submit failed; will retry");
                }
                force = false;
            }
            self.reap(out);
            if self.backlog.is_empty() || !self.has_room() {
                break;
            }
        }
    }

    /// Whether an eager operation just pushed should be submitted now.
    pub(crate) fn wants_eager_submit(&mut self) -> bool {
        self.in_kernel <= EAGER_DEPTH && !self.uring.submission().is_empty()
    }

    fn has_room(&mut self) -> bool {
        self.in_kernel < self.max_in_kernel && !self.uring.submission().is_full()
    }

    /// Push an SQE (already tagged with its user_data), or queue it locally if
    /// the kernel has enough work or the SQ stays full.
    /// Called on the owning thread only (operations start on the calling
    /// thread's ring), so it may submit.
    pub(crate) fn push(&mut self, sqe: squeue::Entry) -> bool {
        if self.backlog.is_empty() && self.in_kernel < self.max_in_kernel {
            if self.uring.submission().is_full() {
                let pending = self.uring.submission().len() as u32;
                if let Err(e) = self.enter(pending) {
                    tracing::debug!(error = %e, "io_uring submit on full SQ failed");
                }
            }
            // SAFETY: the SQE's buffer and descriptor are held by the operation
            // table until its completion is reaped (see `op::Table`).
            if unsafe { self.uring.submission().push(&sqe) }.is_ok() {
                self.in_kernel += 1;
                return true;
            }
        }
        self.backlog.push_back(sqe);
        false
    }

    fn fill_from_backlog(&mut self, out: &mut Deferred) {
        while self.has_room() {
            let Some(sqe) = self.backlog.pop_front() else {
                break;
            };
            if !self.table.take_queued(sqe.get_user_data(), out) {
                continue; // its future was dropped before it reached the kernel
            }
            // SAFETY: as in `push`; has_room() checked the SQ has space.
            if unsafe { self.uring.submission().push(&sqe) }.is_err() {
                self.table.requeue(sqe.get_user_data());
                self.backlog.push_front(sqe);
                break;
            }
            self.in_kernel += 1;
        }
    }

    /// Submit and post completions. Completions posted by our own enter
    /// are reaped right after it, so their eventfd signal would only cause
    /// a spurious wake-up: it is switched off around the call. Work that
    /// arrives meanwhile has set IORING_SQ_TASKRUN without a signal, so the
    /// flag is checked once notifications are back on and the signal is
    /// then sent by hand. (x86_64 only: there both the kernel's flag update
    /// and our re-enable are locked instructions, i.e. full barriers, so
    /// one side always sees the other.)
    fn enter(&mut self, to_submit: u32) -> io::Result<usize> {
        let quiet = cfg!(target_arch = "x86_64") && self.taskrun_flag;
        if !quiet {
            return self.enter_raw(to_submit);
        }
        self.uring.completion().disable_eventfd();
        let r = self.enter_raw(to_submit);
        self.uring.completion().enable_eventfd();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if self.uring.submission().taskrun() {
            signal_eventfd(self.eventfd);
        }
        r
    }

    fn enter_raw(&mut self, to_submit: u32) -> io::Result<usize> {
        loop {
            self.enters += 1;
            // SAFETY: no argument pointer is passed; the SQEs in the ring refer
            // to memory kept alive by the operation table.
            let r = unsafe {
                self.uring.submitter().enter::<libc::sigset_t>(
                    to_submit,
                    0,
                    EnterFlags::GETEVENTS.bits(),
                    None,
                )
            };
            // EBUSY/EAGAIN (kernel short of resources) are left to the next turn.
            match r {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                other => return other,
            }
        }
    }

    fn reap(&mut self, out: &mut Deferred) {
        let mut cq = self.uring.completion();
        cq.sync();
        for cqe in &mut cq {
            if self.table.complete(cqe.user_data(), cqe.result(), out) {
                self.in_kernel = self.in_kernel.saturating_sub(1);
            }
        }
    }

    fn cancel_backlog(&mut self, out: &mut Deferred) {
        self.closed = true;
        out.wakers.extend(self.reaper.take()); // lets the reaper see `closed` and end
        for sqe in std::mem::take(&mut self.backlog) {
            self.table.cancel_queued(sqe.get_user_data(), out);
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // Anything still owned by the kernel must not be freed: the kernel
        // could still write into it. Normally `shutdown` ran and there is none.
        self.table.leak_in_kernel();
    }
}

/// Build the ring, preferring `SINGLE_ISSUER | DEFER_TASKRUN` when the kernel
/// both accepts it and signals the eventfd for deferred completions.
/// Returns the ring, whether it defers task work, and whether it keeps the
/// TASKRUN flag.
fn build_uring(eventfd: RawFd, try_defer: bool) -> io::Result<(IoUring, bool, bool)> {
    let mut b = IoUring::builder();
    b.setup_single_issuer().setup_defer_taskrun();
    // TASKRUN_FLAG lets the reaper see in the SQ flags whether deferred
    // completions wait for an io_uring_enter (5.19+); without it every
    // eventfd signal costs an enter.
    let mut with_flag = b.clone();
    with_flag.setup_taskrun_flag();
    let built = try_defer
        .then(|| match with_flag.build(RING_ENTRIES) {
            Ok(r) => Some((r, true)),
            Err(_) => b.build(RING_ENTRIES).ok().map(|r| (r, false)),
        })
        .flatten();
    if let Some((ring, flag)) = built {
        ring.submitter().register_eventfd(eventfd)?;
        if eventfd_sees_deferred(&ring, eventfd) {
            return Ok((ring, true, flag));
        }
        tracing::debug!("io_uring DEFER_TASKRUN does not signal the eventfd; not using it");
    }
    // COOP_TASKRUN is not used: it would not interrupt a thread asleep in
    // epoll_wait, so completions delivered as task work could wait forever.
    let ring = IoUring::new(RING_ENTRIES)?;
    ring.submitter().register_eventfd(eventfd)?;
    Ok((ring, false, false))
}

/// Check on a new `DEFER_TASKRUN` ring that a completion that arrives as task
/// work (a 1 ms timeout) makes the eventfd readable while we sleep in poll(2).
fn eventfd_sees_deferred(ring: &IoUring, eventfd: RawFd) -> bool {
    let ts = types::Timespec::new().nsec(1_000_000);
    let sqe = opcode::Timeout::new(&ts).build().user_data(u64::MAX);
    // SAFETY: we are the only user of this ring during set-up, so no other
    // SubmissionQueue exists; `ts` outlives the operation (we wait for its
    // completion below, and the kernel copies the timespec at submission).
    let pushed = unsafe { ring.submission_shared().push(&sqe) }.is_ok();
    if !pushed || ring.submit().is_err() {
        return false;
    }
    let seen = wait_readable(eventfd, Duration::from_secs(2));
    drain_eventfd(eventfd);
    // Post and consume the CQE so the ring starts empty.
    // SAFETY: no argument pointer.
    let _ = unsafe {
        ring.submitter()
            .enter::<libc::sigset_t>(0, 1, EnterFlags::GETEVENTS.bits(), None)
    };
    // SAFETY: we are the only user of this ring during set-up.
    let mut cq = unsafe { ring.completion_shared() };
    cq.sync();
    let done = cq.by_ref().any(|c| c.user_data() == u64::MAX);
    drop(cq);
    drain_eventfd(eventfd);
    seen && done
}

/// Sleep until `fd` is readable or `timeout` passes; true if readable.
pub(crate) fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    r > 0 && pfd.revents & libc::POLLIN != 0
}

/// Add one to the eventfd counter (wakes the reaper).
fn signal_eventfd(fd: RawFd) {
    let v: u64 = 1;
    // SAFETY: writes the 8 bytes of `v`, which is 8 bytes long.
    let r = unsafe { libc::write(fd, (&v as *const u64).cast(), 8) };
    if r != 8 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot signal the io_uring eventfd");
    }
}

/// Reset the eventfd counter; false if it was already zero.
fn drain_eventfd(fd: RawFd) -> bool {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into `v`, which is 8 bytes long.
    let r = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    r == 8
}

/// The calling thread's ring, if one is installed.
pub(crate) fn current() -> Option<Arc<Ring>> {
    CURRENT.try_with(|c| c.0.borrow().clone()).ok().flatten()
}

/// The calling thread's ring, creating and installing one if io_uring is
/// usable; `None` (after logging why, once per process) if it is not.
pub(crate) fn current_or_install() -> Option<Arc<Ring>> {
    if let Some(r) = current() {
        return Some(r);
    }
    if !crate::io_uring_available() {
        return None;
    }
    match Ring::new() {
        Ok(ring) => {
            tracing::debug!(
                defer_taskrun = ring.defer_taskrun,
                "io_uring ring installed"
            );
            CURRENT.with(|c| *c.0.borrow_mut() = Some(ring.clone()));
            Some(ring)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot create this thread's io_uring ring; using threads");
            None
        }
    }
}

/// Install `ring` on the calling thread (tests choose the ring's mode).
#[cfg(test)]
pub(crate) fn install(ring: Arc<Ring>) {
    CURRENT.with(|c| *c.0.borrow_mut() = Some(ring));
}

/// Remove the calling thread's ring and shut it down (waits, bounded, for
/// operations the kernel still owns).
pub(crate) fn shutdown_current() {
    if let Some(ring) = CURRENT.try_with(|c| c.0.borrow_mut().take()).ok().flatten() {
        ring.shutdown();
    }
}

/// The park hook: submit whatever this thread's ring has queued.
pub(crate) fn park_hook() {
    // try_with: the hook may run while the thread-local is being destroyed.
    if let Some(ring) = current() {
        ring.flush_if_pending();
    }
}

/// The ring's eventfd, as `AsyncFd` sees it; holding the ring keeps the
/// descriptor open for as long as the registration lives.
struct EventFdOf(Arc<Ring>);

impl AsRawFd for EventFdOf {
    fn as_raw_fd(&self) -> RawFd {
        self.0.eventfd.as_raw_fd()
    }
}

/// The reaper: waits on the eventfd, reaps completions, and submits when an
/// operation asks for it. Runs until the ring is closed or its task aborted.
pub(crate) async fn reaper(ring: Arc<Ring>) {
    // SAFETY: the descriptor belongs to `ring`, which the AsyncFd's inner
    // value keeps alive, so it stays open and unchanged while registered.
    let registered =
        unsafe { AsyncFd::register_with_interest(EventFdOf(ring.clone()), Interest::READABLE) };
    let afd = match registered {
        Ok(a) => a,
        Err(e) => {
            // Without the eventfd watch nothing would reap: finish what is in
            // flight by blocking, and close the ring so later I/O uses threads.
            tracing::error!(error = %e, "cannot watch the io_uring eventfd; using threads");
            ring.shutdown();
            return;
        }
    };
    std::future::poll_fn(|cx| {
        let old = {
            let mut st = ring.lock();
            if st.closed {
                return Poll::Ready(());
            }
            let stale = st.reaper.as_ref().is_none_or(|w| !w.will_wake(cx.waker()));
            stale
                .then(|| st.reaper.replace(cx.waker().clone()))
                .flatten()
        };
        drop(old); // outside the lock
        let mut completed = false;
        while let Poll::Ready(r) = afd.poll_read_ready(cx) {
            match r {
                Ok(mut guard) => {
                    // The registration is edge-triggered and every signal of
                    // an eventfd is a new edge, even while its counter is
                    // not zero: clearing our readiness without reading the
                    // counter saves a syscall per wake-up.
                    guard.clear_ready();
                    completed = true;
                }
                Err(e) => {
                    tracing::error!(error = %e, "io_uring eventfd failed; ring stops");
                    return Poll::Ready(());
                }
            }
        }
        // A DEFER_TASKRUN ring posts completions only inside io_uring_enter.
        // Posting them signals the eventfd once more; the TASKRUN flag (when
        // the kernel keeps it) tells that wake-up apart from new work.
        ring.turn(completed && ring.defer_taskrun && ring.task_work_pending());
        Poll::Pending
    })
    .await
}
