//! Side-by-side benchmark of a vhost-user-blk server with libblkio as the
//! front-end: 4k random read/write at QD1 and QD32, 1M sequential.
//!
//! `vhost_bench qsd <image>`: serve `<image>` with this crate in-process.
//! `vhost_bench ext <socket> <pid>`: an external server (qemu-storage-daemon).
//! Server CPU is user+system time of the server (for `qsd`: the process
//! minus the client thread) divided by the I/Os done.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use qsd_block::{BlockBackend, Graph, Perm};
use qsd_export_vhost_user_blk::{VhostAddr, VhostBlkOptions, VhostUserBlkExport};

const SPAN: u64 = 256 << 20;
const RUN: Duration = Duration::from_secs(3);

/// utime + stime of a /proc stat file, in clock ticks.
fn ticks(path: &str) -> u64 {
    let s = std::fs::read_to_string(path).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

enum Server {
    InProcess,
    Pid(u32),
}

impl Server {
    fn cpu(&self) -> u64 {
        match self {
            Server::InProcess => ticks("/proc/self/stat") - ticks("/proc/thread-self/stat"),
            Server::Pid(p) => ticks(&format!("/proc/{p}/stat")),
        }
    }
}

struct Job {
    name: &'static str,
    bs: usize,
    qd: usize,
    write: bool,
    random: bool,
}

fn run(q: &mut Blkioq, buf: *mut u8, job: &Job, server: &Server) -> (f64, f64, f64) {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut seq = 0u64;
    let mut next = |rng: &mut u64| {
        if job.random {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            (*rng % (SPAN / job.bs as u64)) * job.bs as u64
        } else {
            seq = (seq + job.bs as u64) % SPAN;
            seq
        }
    };
    let submit = |q: &mut Blkioq, slot: usize, off: u64| {
        let p = buf.wrapping_add(slot * job.bs);
        if job.write {
            q.write(off, p, job.bs, slot, ReqFlags::empty());
        } else {
            q.read(off, p, job.bs, slot, ReqFlags::empty());
        }
    };
    for slot in 0..job.qd {
        submit(q, slot, next(&mut rng));
    }
    let mut done = 0u64;
    let mut c: Vec<MaybeUninit<Completion>> = (0..job.qd).map(|_| MaybeUninit::uninit()).collect();
    let cpu0 = server.cpu();
    let t0 = Instant::now();
    let mut stop = false;
    let mut outstanding = job.qd;
    while outstanding > 0 {
        let n = q.do_io(&mut c, 1, None, None).unwrap();
        for x in &c[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let x = unsafe { x.assume_init_read() };
            assert_eq!(x.ret, 0, "{} failed", job.name);
            done += 1;
            outstanding -= 1;
            if !stop {
                submit(q, x.user_data, next(&mut rng));
                outstanding += 1;
            }
        }
        if !stop && t0.elapsed() >= RUN {
            stop = true;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (server.cpu() - cpu0) as f64 / 100.0; // USER_HZ = 100
    let iops = done as f64 / secs;
    (
        iops,
        iops * job.bs as f64 / (1 << 20) as f64,
        cpu * 1e6 / done as f64,
    )
}

fn client(sock: &str, server: Server) {
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", 1).unwrap();
    let mut out = b.start().unwrap();
    let mut q = out.queues.pop().unwrap();
    let mr = b.alloc_mem_region(32 << 20).unwrap();
    b.map_mem_region(&mr).unwrap();
    let buf = mr.addr as *mut u8;
    let jobs = [
        Job {
            name: "4k randread QD1",
            bs: 4096,
            qd: 1,
            write: false,
            random: true,
        },
        Job {
            name: "4k randread QD32",
            bs: 4096,
            qd: 32,
            write: false,
            random: true,
        },
        Job {
            name: "4k randwrite QD1",
            bs: 4096,
            qd: 1,
            write: true,
            random: true,
        },
        Job {
            name: "4k randwrite QD32",
            bs: 4096,
            qd: 32,
            write: true,
            random: true,
        },
        Job {
            name: "1M seqread QD4",
            bs: 1 << 20,
            qd: 4,
            write: false,
            random: false,
        },
        Job {
            name: "1M seqwrite QD4",
            bs: 1 << 20,
            qd: 4,
            write: true,
            random: false,
        },
    ];
    println!("| job | IOPS | MiB/s | server CPU us/IO |");
    println!("|---|---:|---:|---:|");
    for j in &jobs {
        let (iops, mbs, cpu) = run(&mut q, buf, j, &server);
        println!("| {} | {iops:.0} | {mbs:.1} | {cpu:.2} |", j.name);
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("ext") => client(&a[2], Server::Pid(a[3].parse().unwrap())),
        Some("qsd") => {
            let img = PathBuf::from(&a[2]);
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("vhost.sock");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut g = Graph::new();
            qsd_drivers::register_all(&mut g);
            let opts = serde_json::json!({"driver": "file", "node-name": "f",
                                          "filename": img.to_str().unwrap()});
            let node = rt
                .block_on(g.open(opts.as_object().cloned().unwrap(), qsd_qapi::InputMode::Qmp))
                .unwrap();
            let blk = BlockBackend::new(node, "export 'e'", Perm::ALL, Perm::ALL).unwrap();
            let io = qsd_rt::IoThread::spawn("bench").unwrap();
            let mut o = VhostBlkOptions::new("e", VhostAddr::Path(sock.clone()));
            o.writable = true;
            let export = VhostUserBlkExport::start(o, blk, io.handle()).unwrap();
            client(sock.to_str().unwrap(), Server::InProcess);
            export.stop();
            rt.block_on(g.close_all());
            io.stop();
        }
        _ => eprintln!("usage: vhost_bench qsd <image> | vhost_bench ext <socket> <pid>"),
    }
}
