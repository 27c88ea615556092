//! The machine's floor for one request/reply exchange between two CPUs.
//!
//! Usage: `wake_floor [CPU_A] [CPU_B] [ROUND_TRIPS]` (defaults 1, 0, 50000).
//! Two threads, pinned to CPU_A (the "client") and CPU_B (the "server"),
//! pass a token back and forth through two eventfds, sleeping in read(2)
//! in between: the least work any daemon does per request at queue depth 1
//! (wake up on a notification, notify back), with nothing else in it.
//! Prints one JSON line: round trips per second, microseconds per round
//! trip, and the server thread's CPU time per round trip. The benches print
//! it beside their tables: at QD 1 on a virtual machine, where a wake-up of
//! an idle vCPU costs tens of microseconds, this floor is most of what
//! either daemon's latency and CPU time are made of.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

fn eventfd() -> OwnedFd {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Block until the eventfd's counter is non-zero, then reset it.
fn wait(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into `v`, which is 8 bytes long.
    let r = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    assert_eq!(r, 8, "eventfd read: {}", std::io::Error::last_os_error());
}

fn signal(fd: RawFd) {
    let v = 1u64;
    // SAFETY: writes the 8 bytes of `v`.
    let r = unsafe { libc::write(fd, (&v as *const u64).cast(), 8) };
    assert_eq!(r, 8, "eventfd write: {}", std::io::Error::last_os_error());
}

fn pin(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET stays in it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t and `cpu` is checked by the kernel.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is valid for the size passed; 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(
        r,
        0,
        "cannot pin to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .map(|a| a.parse().expect("arguments are numbers"))
        .unwrap_or(default)
}

fn main() {
    let (client_cpu, server_cpu, rounds) = (arg(1, 1), arg(2, 0), arg(3, 50_000));
    let (to_server, to_client) = (eventfd(), eventfd());
    let (srv_in, srv_out) = (to_server.as_raw_fd(), to_client.as_raw_fd());
    let server = std::thread::spawn(move || {
        pin(server_cpu);
        let cpu0 = thread_cpu();
        for _ in 0..rounds {
            wait(srv_in);
            signal(srv_out);
        }
        thread_cpu() - cpu0
    });
    pin(client_cpu);
    let t0 = Instant::now();
    for _ in 0..rounds {
        signal(to_server.as_raw_fd());
        wait(to_client.as_raw_fd());
    }
    let secs = t0.elapsed().as_secs_f64();
    let server_cpu_s = server.join().expect("server thread");
    let n = rounds as f64;
    println!(
        "{{\"round_trips_per_s\": {:.0}, \"us_per_round_trip\": {:.1}, \"server_cpu_us_per_round_trip\": {:.1}}}",
        n / secs,
        secs * 1e6 / n,
        server_cpu_s * 1e6 / n
    );
}
