//! The daemon's vhost-user-blk export end to end: the real `qsd` binary
//! started with `--export type=vhost-user-blk`, libblkio as the front-end (a
//! virtio-blk driver without a guest), QMP for removal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use serde_json::{json, Value};

const IMG_LEN: u64 = 16 << 20;
const BUF: usize = 1 << 20;

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(writable: bool) -> Daemon {
        Daemon::start_with(writable, &[], "")
    }

    /// With extra arguments before `--export` and extra export options.
    fn start_with(writable: bool, args: &[&str], export_opts: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(IMG_LEN).unwrap();
        f.write_all_at(&vec![0x5a; 1 << 20], 8 << 20).unwrap();
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        let child = Command::new(env!("CARGO_BIN_EXE_qsd"))
            .args(args)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk,filename={}",
                p("disk.raw")
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=vb,node-name=disk,addr.type=unix,addr.path={},writable={}{}",
                p("vhost.sock"),
                if writable { "on" } else { "off" },
                export_opts
            ))
            .arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                p("qmp.sock")
            ))
            .arg("--monitor")
            .arg("chardev=m")
            .spawn()
            .expect("the qsd binary starts");
        let d = Daemon { child, dir };
        d.wait_for(&d.path("vhost.sock"));
        d.wait_for(&d.path("qmp.sock"));
        d
    }

    fn path(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    fn wait_for(&self, p: &Path) {
        let t = Instant::now();
        while !p.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{p:?} never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn image(&self, offset: u64, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(self.path("disk.raw")).unwrap();
        let mut v = vec![0; len];
        f.read_exact_at(&mut v, offset).unwrap();
        v
    }

    fn stop(mut self) -> i32 {
        nix_kill(self.child.id());
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nix_kill(pid: u32) {
    Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
}

/// A minimal QMP client: negotiate, run commands, collect events.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(p: &Path) -> Qmp {
        let s = UnixStream::connect(p).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            events: Vec::new(),
        };
        q.line();
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap()
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let m = json!({"execute": name, "arguments": args});
        writeln!(self.w, "{m}").unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }
}

/// A libblkio front-end with one queue (plus `extra`) and a 1 MiB buffer.
struct Client {
    b: Blkio,
    q: Blkioq,
    extra: Vec<Blkioq>,
    buf: *mut u8,
}

impl Client {
    fn connect(sock: &Path, read_only: bool) -> Client {
        Client::connect_queues(sock, read_only, 1)
    }

    fn connect_queues(sock: &Path, read_only: bool, n: i32) -> Client {
        let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", sock.to_str().unwrap()).unwrap();
        b.set_bool("read-only", read_only).unwrap();
        b.connect().unwrap();
        b.set_i32("num-queues", n).unwrap();
        let mut out = b.start().unwrap();
        let q = out.queues.remove(0);
        let mr = b.alloc_mem_region(BUF).unwrap();
        b.map_mem_region(&mr).unwrap();
        Client {
            buf: mr.addr as *mut u8,
            b,
            q,
            extra: out.queues,
        }
    }

    fn mem(&mut self) -> &mut [u8] {
        // SAFETY: `buf` is a live mapping of BUF bytes owned by the Blkio
        // instance in `self`; no request is in flight while it is used.
        unsafe { std::slice::from_raw_parts_mut(self.buf, BUF) }
    }

    fn done(&mut self) -> i32 {
        done_on(&mut self.q)
    }
}

/// Wait for one completion on `q`.
fn done_on(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::<Completion>::uninit()];
    while q.do_io(&mut c, 1, None, None).unwrap() == 0 {}
    // SAFETY: do_io returned one initialised completion.
    unsafe { c[0].assume_init_read() }.ret
}

/// CPU time (ns) a thread of process `pid` has run.
fn thread_cpu_ns(pid: u32, tid: u64) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).unwrap();
    s.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn test_vhost_user_blk_export_serves_reads_writes_and_is_removed() {
    let d = Daemon::start(true);
    let mut c = Client::connect(&d.path("vhost.sock"), false);
    c.q.read(8 << 20, c.buf, BUF, 1, ReqFlags::empty());
    assert_eq!(c.done(), 0);
    assert!(c.mem().iter().all(|&x| x == 0x5a), "host pattern read back");
    for (i, x) in c.mem().iter_mut().enumerate() {
        *x = (i % 251) as u8;
    }
    let want = c.mem().to_vec();
    c.q.write(1 << 20, c.buf, BUF, 2, ReqFlags::empty());
    assert_eq!(c.done(), 0);
    c.q.flush(3, ReqFlags::empty());
    assert_eq!(c.done(), 0);
    assert_eq!(
        d.image(1 << 20, BUF),
        want,
        "the image holds what was written"
    );

    let mut qmp = Qmp::connect(&d.path("qmp.sock"));
    let q = qmp.cmd("query-block-exports", json!({}));
    assert_eq!(q["return"][0]["type"], "vhost-user-blk");
    drop(c);
    let r = qmp.cmd("block-export-del", json!({"id": "vb"}));
    assert!(r.get("return").is_some(), "{r}");
    let t = Instant::now();
    while !qmp
        .events
        .iter()
        .any(|e| e["event"] == "BLOCK_EXPORT_DELETED")
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no BLOCK_EXPORT_DELETED"
        );
        let v = qmp.line();
        if v.get("event").is_some() {
            qmp.events.push(v);
        }
    }
    let q = qmp.cmd("query-block-exports", json!({}));
    assert_eq!(q["return"], json!([]));
    assert_eq!(d.stop(), 0, "SIGTERM exits cleanly");
}

#[test]
fn test_vhost_user_blk_read_only_export_refuses_writes_and_stops_on_sigterm() {
    let d = Daemon::start(false);
    let mut c = Client::connect(&d.path("vhost.sock"), true);
    c.q.read(8 << 20, c.buf, 4096, 1, ReqFlags::empty());
    assert_eq!(c.done(), 0);
    c.q.write(0, c.buf, 4096, 2, ReqFlags::empty());
    assert_ne!(c.done(), 0, "a write to a read-only export fails");
    assert!(d.image(0, 4096).iter().all(|&x| x == 0));
    drop(c);
    assert_eq!(d.stop(), 0, "SIGTERM exits cleanly");
}

#[test]
fn test_vhost_user_blk_block_resize_shows_new_capacity() {
    let d = Daemon::start(true);
    let c = Client::connect(&d.path("vhost.sock"), false);
    assert_eq!(c.b.get_u64("capacity").unwrap(), IMG_LEN);
    let mut qmp = Qmp::connect(&d.path("qmp.sock"));
    let r = qmp.cmd(
        "block_resize",
        json!({"node-name": "disk", "size": 2 * IMG_LEN}),
    );
    assert!(r.get("return").is_some(), "{r}");
    assert_eq!(c.b.get_u64("capacity").unwrap(), 2 * IMG_LEN);
    drop(c);
    assert_eq!(d.stop(), 0);
}

#[test]
fn test_vhost_user_blk_iothread_list_spreads_queues() {
    let d = Daemon::start_with(
        true,
        &["--object", "iothread,id=t0", "--object", "iothread,id=t1"],
        ",num-queues=2,iothread.0=t0,iothread.1=t1",
    );
    let mut qmp = Qmp::connect(&d.path("qmp.sock"));
    let threads = qmp.cmd("query-iothreads", json!({}));
    let tids: Vec<u64> = ["t0", "t1"]
        .iter()
        .map(|id| {
            threads["return"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["id"] == *id)
                .unwrap()["thread-id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let pid = d.child.id();
    let mut c = Client::connect_queues(&d.path("vhost.sock"), false, 2);
    let before: Vec<u64> = tids.iter().map(|&t| thread_cpu_ns(pid, t)).collect();
    let buf = c.buf;
    for i in 0..2000u64 {
        let off = (i % 256) * 4096;
        c.q.read(off, buf, 4096, i as usize, ReqFlags::empty());
        assert_eq!(c.done(), 0);
        let q1 = &mut c.extra[0];
        q1.read(
            off,
            buf.wrapping_add(4096),
            4096,
            i as usize,
            ReqFlags::empty(),
        );
        assert_eq!(done_on(q1), 0);
    }
    let used: Vec<u64> = tids
        .iter()
        .zip(&before)
        .map(|(&t, b)| thread_cpu_ns(pid, t) - b)
        .collect();
    assert!(
        used.iter().all(|&ns| ns > 1_000_000),
        "both I/O threads serve requests: {used:?} ns"
    );
    // An I/O thread in use by the export cannot be deleted.
    let r = qmp.cmd("object-del", json!({"id": "t1"}));
    assert!(r.get("error").is_some(), "{r}");
    drop(c);
    assert_eq!(d.stop(), 0);
}

/// The vhost-user back-end program convention: `--print-capabilities`, and
/// `--socket-path`/`--blk-file` serving a file without any other option.
#[test]
fn test_vhost_user_backend_convention_command_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_qsd"))
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let caps: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        caps,
        json!({"type": "block", "features": ["read-only", "blk-file"]})
    );

    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(IMG_LEN).unwrap();
    f.write_all_at(&vec![0x6b; 4096], 4096).unwrap();
    let sock = dir.path().join("vhost.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qsd"))
        .arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--blk-file={}", img.display()))
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Client::connect(&sock, false);
    c.q.read(4096, c.buf, 4096, 1, ReqFlags::empty());
    assert_eq!(c.done(), 0);
    assert!(c.mem()[..4096].iter().all(|&x| x == 0x6b));
    c.mem()[..4096].fill(0x3c);
    c.q.write(0, c.buf, 4096, 2, ReqFlags::empty());
    assert_eq!(c.done(), 0);
    drop(c);
    nix_kill(child.id());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let mut head = vec![0; 4096];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert!(
        head.iter().all(|&x| x == 0x3c),
        "the write reached the file"
    );
}
