//! 4 KiB random reads at a fixed queue depth: io_uring against the thread pool.
//!
//! Usage: `uring_bench [FILE|-] [SECONDS] [QD] [--direct]`. Without FILE (or
//! with `-`) a 256 MiB temporary file is created in the current directory.
//! Prints IOPS and CPU time (getrusage, whole process) per engine; set
//! `BENCH_ONLY=uring` or `BENCH_ONLY=threads` to run one (e.g. under strace).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use qsd_rt::io::read_at;
use qsd_rt::{Aio, IoBuf, SharedFd};

const BLOCK: u64 = 4096;

fn cpu_seconds() -> (f64, f64) {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage to write into.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(ru.ru_utime), t(ru.ru_stime))
}

/// xorshift: cheap, good enough to scatter offsets.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

async fn worker(aio: Aio, fd: SharedFd, blocks: u64, seed: u64, until: Instant) -> u64 {
    let mut rng = seed | 1;
    let mut buf = IoBuf::new(BLOCK as usize);
    let mut done = 0;
    while Instant::now() < until {
        let off = (next(&mut rng) % blocks) * BLOCK;
        let (r, b) = read_at(aio, &fd, buf, off).await;
        assert_eq!(r.unwrap(), BLOCK as usize);
        buf = b;
        done += 1;
    }
    done
}

fn run(aio: Aio, fd: &SharedFd, blocks: u64, qd: u64, secs: u64) {
    let rt = qsd_rt::build_runtime("bench").unwrap();
    let (u0, s0) = cpu_seconds();
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let total = qsd_rt::block_on_with_ring(&rt, async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..qd {
            set.spawn(worker(
                aio,
                fd.clone(),
                blocks,
                0x9e37_79b9_7f4a_7c15 ^ i,
                until,
            ));
        }
        let mut total = 0;
        while let Some(n) = set.join_next().await {
            total += n.unwrap();
        }
        total
    });
    let wall = start.elapsed().as_secs_f64();
    let (u1, s1) = cpu_seconds();
    let cpu = (u1 - u0) + (s1 - s0);
    println!(
        "{:<8} qd={qd:<3} {:>9.0} IOPS  cpu {:.2}s (user {:.2} sys {:.2})  {:.2} us cpu/IO",
        format!("{aio:?}"),
        total as f64 / wall,
        cpu,
        u1 - u0,
        s1 - s0,
        cpu * 1e6 / total as f64
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let direct = args.iter().any(|a| a == "--direct");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let secs = pos.get(1).map_or(3, |s| s.parse().unwrap());
    let qd = pos.get(2).map_or(32, |s| s.parse().unwrap());
    let _tmp;
    let path = match pos.first().filter(|p| p.as_str() != "-") {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let t = tempfile::NamedTempFile::new_in(".").unwrap();
            t.as_file().set_len(256 << 20).unwrap();
            let data = vec![0xa5u8; 1 << 20];
            for i in 0..256u64 {
                std::os::unix::fs::FileExt::write_all_at(t.as_file(), &data, i << 20).unwrap();
            }
            let p = t.path().to_path_buf();
            _tmp = t;
            p
        }
    };
    let mut opts = OpenOptions::new();
    opts.read(true);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let file = opts.open(&path).unwrap();
    let blocks = file.metadata().unwrap().len() / BLOCK;
    assert!(blocks > 0, "file too small");
    let fd = SharedFd::new(file.into());
    println!(
        "file {} ({} MiB), direct={direct}, io_uring available={}",
        path.display(),
        (blocks * BLOCK) >> 20,
        qsd_rt::io_uring_available()
    );
    let only = std::env::var("BENCH_ONLY").ok();
    if only.as_deref() != Some("threads") {
        run(Aio::IoUring, &fd, blocks, qd, secs);
    }
    if only.as_deref() != Some("uring") {
        run(Aio::Threads, &fd, blocks, qd, secs);
    }
}
