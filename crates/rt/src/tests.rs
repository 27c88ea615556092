//! Tests of the io_uring engine and runtimes on real files.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::unix::fs::OpenOptionsExt;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::io::{fallocate, fsync, read_at, write_at};
use crate::{ring, Aio, IoBuf, IoThread, SharedFd, Submit};

fn temp_fd() -> (tempfile::NamedTempFile, SharedFd) {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(tmp.path())
        .unwrap();
    (tmp, SharedFd::new(f.into()))
}

fn pattern(seed: u64, len: usize) -> IoBuf {
    let data: Vec<u8> = (0..len)
        .map(|i| (seed.wrapping_mul(31) as usize + i * 7) as u8)
        .collect();
    IoBuf::from_slice(&data)
}

/// Run `f` on a fresh ring runtime on this (test) thread, then tear down.
fn with_ring<F: Future>(f: F) -> F::Output {
    if !crate::io_uring_available() {
        eprintln!("io_uring unavailable here; test runs on threads");
    }
    let rt = crate::build_runtime("test").unwrap();
    let out = crate::block_on_with_ring(&rt, f);
    drop(rt);
    ring::shutdown_current();
    out
}

fn enters() -> u64 {
    ring::current().map(|r| r.lock().enters).unwrap_or(0)
}

fn live_ops() -> usize {
    ring::current().map(|r| r.lock().table.live()).unwrap_or(0)
}

#[test]
fn test_uring_write_fsync_read_fallocate_roundtrip() {
    let (tmp, fd) = temp_fd();
    with_ring(async {
        assert_eq!(crate::current_has_ring(), crate::io_uring_available());
        let (r, _) = write_at(Aio::IoUring, &fd, pattern(1, 65536), 4096).await;
        assert_eq!(r.unwrap(), 65536);
        fsync(Aio::IoUring, &fd, false).await.unwrap();
        fsync(Aio::IoUring, &fd, true).await.unwrap();
        let (r, buf) = read_at(Aio::IoUring, &fd, IoBuf::new(65536), 4096).await;
        assert_eq!(r.unwrap(), 65536);
        assert_eq!(&buf[..], &pattern(1, 65536)[..]);
        fallocate(Aio::IoUring, &fd, 0, 0, 1 << 20).await.unwrap();
    });
    assert_eq!(std::fs::metadata(tmp.path()).unwrap().len(), 1 << 20);
}

#[test]
fn test_uring_read_past_eof_returns_zero() {
    let (_tmp, fd) = temp_fd();
    with_ring(async {
        let (r, buf) = read_at(Aio::IoUring, &fd, IoBuf::new(4096), 1 << 30).await;
        assert_eq!(r.unwrap(), 0);
        assert_eq!(buf.len(), 4096);
    });
}

#[test]
fn test_uring_bad_fd_reports_os_error() {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let ro = SharedFd::new(File::open(tmp.path()).unwrap().into());
    with_ring(async {
        let (r, buf) = write_at(Aio::IoUring, &ro, IoBuf::new(512), 0).await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
        assert_eq!(buf.len(), 512);
    });
}

#[test]
fn test_uring_many_concurrent_ops_data_matches() {
    // 1000 > SQ (256) and CQ (512) sizes: exercises the local backlog.
    const N: u64 = 1000;
    let (_tmp, fd) = temp_fd();
    with_ring(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..N {
            let fd = fd.clone();
            set.spawn(async move {
                write_at(Aio::IoUring, &fd, pattern(i, 4096), i * 4096)
                    .await
                    .0
            });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap().unwrap(), 4096);
        }
        for i in 0..N {
            let fd = fd.clone();
            set.spawn(async move {
                let (r, buf) = read_at(Aio::IoUring, &fd, IoBuf::new(4096), i * 4096).await;
                assert_eq!(r.unwrap(), 4096);
                assert_eq!(&buf[..], &pattern(i, 4096)[..], "block {i}");
                Ok(0)
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        assert_eq!(live_ops(), 0);
    });
}

#[test]
fn test_uring_32_ops_in_one_tick_cost_one_enter() {
    let (_tmp, fd) = temp_fd();
    with_ring(async {
        if !crate::current_has_ring() {
            return;
        }
        let before = enters();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..32u64 {
            let fd = fd.clone();
            set.spawn(async move {
                read_at(Aio::IoUring, &fd, IoBuf::new(4096), i * 4096)
                    .await
                    .0
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        let used = enters() - before;
        // One submit for the batch, plus at most one enter to reap a deferred
        // completion batch.
        assert!(used <= 2, "{used} io_uring_enter calls for 32 reads");
    });
}

/// A pipe: reads on its first end wait in the kernel until the second
/// end is written.
pub(crate) fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

type ReadFuture<'a> = std::pin::Pin<Box<dyn Future<Output = (std::io::Result<usize>, IoBuf)> + 'a>>;

/// Start `n` one-byte reads of `fd` (polled once each) and return them
/// with the number of io_uring_enter calls that starting them made.
fn start_reads(fd: &SharedFd, n: usize) -> (Vec<ReadFuture<'_>>, u64) {
    let before = enters();
    let mut reads = Vec::new();
    for _ in 0..n {
        let mut f: ReadFuture<'_> = Box::pin(read_at(Aio::IoUring, fd, IoBuf::new(1), 0));
        assert!(poll_once(f.as_mut()).is_pending());
        reads.push(f);
    }
    (reads, enters() - before)
}

#[test]
fn test_uring_eager_ops_enter_at_once_up_to_the_depth() {
    let (rd, wr) = pipe();
    let eager = SharedFd::with_submit(rd, Submit::Eager);
    with_ring(async {
        if !crate::current_has_ring() {
            return;
        }
        let depth = ring::EAGER_DEPTH;
        let (reads, used) = start_reads(&eager, depth + 4);
        assert_eq!(used, depth as u64, "one enter per op up to the depth");
        let queued = ring::current().map(|r| r.lock().uring.submission().len());
        assert_eq!(queued, Some(4), "past the depth, ops wait for the pass");
        // SAFETY: writes from a live buffer to an open pipe.
        let n = unsafe {
            use std::os::fd::AsRawFd;
            libc::write(wr.as_raw_fd(), [7u8; 64].as_ptr().cast(), depth + 4)
        };
        assert_eq!(n, (depth + 4) as isize);
        for f in reads {
            let (r, buf) = f.await;
            assert_eq!((r.unwrap(), buf[0]), (1, 7));
        }
    });
}

#[test]
fn test_uring_batched_ops_wait_for_the_pass() {
    let (rd, wr) = pipe();
    let batched = SharedFd::new(rd);
    with_ring(async {
        if !crate::current_has_ring() {
            return;
        }
        let (reads, used) = start_reads(&batched, 3);
        assert_eq!(used, 0, "batched ops are not submitted on start");
        // SAFETY: writes from a live buffer to an open pipe.
        let n = unsafe {
            use std::os::fd::AsRawFd;
            libc::write(wr.as_raw_fd(), b"abc".as_ptr().cast(), 3)
        };
        assert_eq!(n, 3);
        for f in reads {
            assert_eq!(f.await.0.unwrap(), 1);
        }
    });
}

fn poll_once<F: Future + ?Sized>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

#[test]
fn test_uring_dropped_futures_complete_later_and_free() {
    let (_tmp, fd) = temp_fd();
    with_ring(async {
        let (r, _) = write_at(Aio::IoUring, &fd, pattern(3, 1 << 20), 0).await;
        r.unwrap();
        for i in 0..1000u64 {
            let mut fut = pin!(read_at(
                Aio::IoUring,
                &fd,
                IoBuf::new(4096),
                (i % 256) * 4096
            ));
            let _ = poll_once(fut.as_mut());
            // dropped here, usually while in flight
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while live_ops() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} orphaned ops never freed",
                live_ops()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The ring still works afterwards.
        let (r, buf) = read_at(Aio::IoUring, &fd, IoBuf::new(4096), 0).await;
        assert_eq!(r.unwrap(), 4096);
        assert_eq!(&buf[..], &pattern(3, 1 << 20)[..4096]);
    });
}

#[test]
fn test_threads_forced_in_ring_runtime_works() {
    let (_tmp, fd) = temp_fd();
    with_ring(async {
        let before = enters();
        let (r, _) = write_at(Aio::Threads, &fd, pattern(5, 8192), 0).await;
        assert_eq!(r.unwrap(), 8192);
        fsync(Aio::Threads, &fd, true).await.unwrap();
        fallocate(Aio::Threads, &fd, 0, 0, 16384).await.unwrap();
        let (r, buf) = read_at(Aio::Threads, &fd, IoBuf::new(8192), 0).await;
        assert_eq!(r.unwrap(), 8192);
        assert_eq!(&buf[..], &pattern(5, 8192)[..]);
        assert_eq!(enters(), before, "thread path must not touch the ring");
    });
}

#[test]
fn test_uring_requested_without_ring_falls_back_to_threads() {
    let (_tmp, fd) = temp_fd();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(!crate::current_has_ring());
        let (r, _) = write_at(Aio::IoUring, &fd, pattern(6, 4096), 0).await;
        assert_eq!(r.unwrap(), 4096);
        let (r, buf) = read_at(Aio::IoUring, &fd, IoBuf::new(4096), 0).await;
        assert_eq!(r.unwrap(), 4096);
        assert_eq!(&buf[..], &pattern(6, 4096)[..]);
    });
}

#[test]
fn test_offset_beyond_i64_is_einval() {
    let (_tmp, fd) = temp_fd();
    with_ring(async {
        let (r, _) = read_at(Aio::IoUring, &fd, IoBuf::new(512), u64::MAX).await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL));
    });
}

#[test]
fn test_iothread_spawn_runs_ring_ops_and_stops() {
    let (_tmp, fd) = temp_fd();
    let t = IoThread::spawn("t0").unwrap();
    assert_eq!(t.id(), "t0");
    // SAFETY: gettid has no preconditions.
    assert_ne!(t.thread_id(), unsafe { libc::gettid() });
    assert!(t.thread_id() > 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (has_ring, ok) = rt
        .block_on(t.handle().spawn(async move {
            let (r, _) = write_at(Aio::IoUring, &fd, pattern(7, 4096), 0).await;
            r.unwrap();
            let (r, buf) = read_at(Aio::IoUring, &fd, IoBuf::new(4096), 0).await;
            r.unwrap();
            (crate::current_has_ring(), buf[..] == pattern(7, 4096)[..])
        }))
        .unwrap();
    assert_eq!(has_ring, crate::io_uring_available());
    assert!(ok);
    let name = std::fs::read_to_string(format!("/proc/self/task/{}/comm", t.thread_id())).unwrap();
    assert!(name.starts_with("qsd-iothread"), "{name}");
    t.stop();
}

#[test]
fn test_iothread_stop_with_ops_in_flight_is_clean() {
    let (_tmp, fd) = temp_fd();
    let t = IoThread::spawn("busy").unwrap();
    for i in 0..64u64 {
        let fd = fd.clone();
        t.handle().spawn(async move {
            loop {
                let (r, _) = write_at(Aio::IoUring, &fd, pattern(i, 4096), i * 4096).await;
                r.unwrap();
            }
        });
    }
    std::thread::sleep(Duration::from_millis(50));
    t.stop();
}

#[test]
fn test_op_started_on_iothread_completes_when_polled_elsewhere() {
    let (_tmp, fd) = temp_fd();
    let t = IoThread::spawn("x").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    t.handle().spawn(async move {
        let mut fut = Box::pin(async move {
            let (r, _) = write_at(Aio::IoUring, &fd, pattern(8, 4096), 0).await;
            let (r2, buf) = read_at(Aio::IoUring, &fd, IoBuf::new(4096), 0).await;
            (r.unwrap(), r2.unwrap(), buf)
        });
        // Start the first op on this thread's ring, then hand the future over.
        let _ = poll_once(fut.as_mut());
        tx.send(fut).unwrap();
    });
    let fut = rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (w, r, buf) = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .unwrap()
    });
    assert_eq!((w, r), (4096, 4096));
    assert_eq!(&buf[..], &pattern(8, 4096)[..]);
    t.stop();
}

#[test]
fn test_uring_o_direct_on_var_tmp_roundtrip() {
    let Ok(tmp) = tempfile::NamedTempFile::new_in("/var/tmp") else {
        return;
    };
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(tmp.path());
    let Ok(f) = opened else {
        eprintln!("O_DIRECT refused on /var/tmp; skipping");
        return;
    };
    let fd = SharedFd::new(f.into());
    with_ring(async {
        let (r, _) = write_at(Aio::IoUring, &fd, pattern(9, 8192), 4096).await;
        assert_eq!(r.unwrap(), 8192);
        let (r, buf) = read_at(Aio::IoUring, &fd, IoBuf::new(8192), 4096).await;
        assert_eq!(r.unwrap(), 8192);
        assert_eq!(&buf[..], &pattern(9, 8192)[..]);
        // Misaligned offsets are refused by the kernel, not by us.
        let (r, _) = read_at(Aio::IoUring, &fd, IoBuf::new(4096), 100).await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL));
    });
}

#[test]
fn test_io_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let (_tmp, fd) = temp_fd();
    assert_send(&read_at(Aio::IoUring, &fd, IoBuf::new(1), 0));
    assert_send(&write_at(Aio::IoUring, &fd, IoBuf::new(1), 0));
    assert_send(&fsync(Aio::IoUring, &fd, true));
    assert_send(&fallocate(Aio::IoUring, &fd, 0, 0, 1));
}

#[test]
fn test_ring_reports_defer_taskrun_choice() {
    with_ring(async {
        if let Some(r) = ring::current() {
            eprintln!("defer_taskrun = {}", r.uses_defer_taskrun());
        }
    });
}

#[test]
fn test_run_main_returns_output_and_uninstalls_ring() {
    let out = crate::run_main(async { crate::current_has_ring() }).unwrap();
    assert_eq!(out, crate::io_uring_available());
    assert!(!crate::current_has_ring());
}

#[test]
fn test_uring_plain_mode_without_defer_taskrun_works() {
    if !crate::io_uring_available() {
        return;
    }
    let (_tmp, fd) = temp_fd();
    let r = ring::Ring::with_defer(false).unwrap();
    assert!(!r.uses_defer_taskrun());
    ring::install(r);
    with_ring(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..300u64 {
            let fd = fd.clone();
            set.spawn(async move {
                let (r, _) = write_at(Aio::IoUring, &fd, pattern(i, 4096), i * 4096).await;
                assert_eq!(r.unwrap(), 4096);
                let (r, buf) = read_at(Aio::IoUring, &fd, IoBuf::new(4096), i * 4096).await;
                assert_eq!(r.unwrap(), 4096);
                assert_eq!(&buf[..], &pattern(i, 4096)[..]);
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
        let r = ring::current().unwrap();
        assert!(!r.uses_defer_taskrun());
    });
}

#[test]
fn test_block_on_with_ring_leaves_no_task_behind() {
    let rt = crate::build_runtime("tasks").unwrap();
    for _ in 0..100 {
        // Finishes without yielding: the reaper never ran before its abort.
        crate::block_on_with_ring(&rt, async {});
    }
    assert_eq!(rt.metrics().num_alive_tasks(), 0);
}

#[test]
fn test_spawn_started_runs_to_the_first_wait_before_returning() {
    let (rd, wr) = pipe();
    let eager = SharedFd::with_submit(rd, Submit::Eager);
    with_ring(async move {
        if !crate::current_has_ring() {
            return;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let before = enters();
        crate::spawn_started(async move {
            let (r, buf) = read_at(Aio::IoUring, &eager, IoBuf::new(1), 0).await;
            let _ = tx.send((r.map(|n| n.min(1)).unwrap_or(0), buf[0]));
        });
        // The read reached the kernel before spawn_started returned.
        assert_eq!(enters() - before, 1);
        // SAFETY: writes one byte from a live buffer to an open pipe.
        let n = unsafe {
            use std::os::fd::AsRawFd;
            libc::write(wr.as_raw_fd(), b"z".as_ptr().cast(), 1)
        };
        assert_eq!(n, 1);
        // The task, polled again with its own waker, gets the completion.
        assert_eq!(rx.await.unwrap(), (1, b'z'));
    });
}

#[test]
fn test_spawn_started_finished_on_first_poll_spawns_nothing() {
    with_ring(async {
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        crate::spawn_started(async move { flag.store(true, std::sync::atomic::Ordering::SeqCst) });
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        // The ring's reaper is the only task.
        assert!(tasks <= 1, "{tasks} tasks alive");
    });
}
